#!/usr/bin/env python3
"""A small QMP client for qemu and qemu-storage-daemon (stdlib only), used by
tools/cdp-mirror.  Adapted from ../shared/vm/qmp.py.

  qmp.py SOCK COMMAND ['{"json": "arguments"}']
      Run one QMP command; print its "return" value as JSON.  Exit 1 (the
      error on stderr) when qemu answers with an error.
  qmp.py SOCK wait --until synced|concluded [--timeout SECONDS] JOB...
      Poll query-block-jobs every 0.1 s until every JOB is READY and actively
      synced (a write-blocking mirror that forwards every write at once), or
      concluded.  Prints the jobs as a JSON list.  Exit 1 on timeout, when a
      job is missing, or when a job ended with an error.
  qmp.py SOCK jobs [--describe FILE] JOB...
      Print the state of each JOB as a JSON list (a job qemu does not list is
      {"job": JOB, "status": "missing"}).  FILE, a JSON object JOB -> object,
      adds fields to each job (volume, URIs).  Exit 0 only when every JOB is
      READY and actively synced.
  qmp.py SOCK watch JOB...
      Stay connected and print each block-job event (BLOCK_JOB_READY,
      BLOCK_JOB_ERROR, BLOCK_JOB_COMPLETED, BLOCK_JOB_CANCELLED) as one JSON
      line.  Exit 1 as soon as a JOB ends with an error (a BLOCK_JOB_ERROR
      whose action is "report" is followed by BLOCK_JOB_COMPLETED with the
      error text; any other action exits at once); exit 0 once every JOB has
      ended cleanly or qemu has gone.

Each call opens its own connection (greeting, qmp_capabilities, command).
Events that arrive while a command runs are appended to $QMP_EVENT_LOG when
set, and dropped otherwise (qemu sends events only to connected clients, so
callers poll query-block-jobs, or keep `watch` running).
"""
import json
import os
import socket
import sys
import time

JOB_EVENTS = ("BLOCK_JOB_READY", "BLOCK_JOB_ERROR", "BLOCK_JOB_COMPLETED",
              "BLOCK_JOB_CANCELLED")


def log_event(ev):
    path = os.environ.get("QMP_EVENT_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(ev) + "\n")


class QMP:
    def __init__(self, path, timeout=30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.rfile = self.sock.makefile("r", encoding="utf-8")
        greeting = self.read()
        if "QMP" not in greeting:
            raise RuntimeError(f"not a QMP greeting: {greeting}")
        self.cmd("qmp_capabilities")

    def read(self):
        line = self.rfile.readline()
        if not line:
            raise EOFError("QMP connection closed")
        return json.loads(line)

    def cmd(self, name, args=None):
        """Send one command; return its "return" value or raise on "error"."""
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall((json.dumps(msg) + "\n").encode())
        while True:
            reply = self.read()
            if "event" in reply:  # events interleave with replies
                log_event(reply)
                continue
            if "error" in reply:
                err = reply["error"]
                raise RuntimeError(f"{name}: {err.get('class')}: {err.get('desc')}")
            return reply.get("return")


def job_state(job, j):
    """One job as cdp-mirror reports it (qemu's names, '-' as '_')."""
    if j is None:
        return {"job": job, "status": "missing"}
    return {
        "job": job,
        "status": j.get("status"),
        "ready": bool(j.get("ready")),
        "actively_synced": bool(j.get("actively-synced")),
        "io_status": j.get("io-status"),
        "error": j.get("error"),
        "len": j.get("len"),
        "offset": j.get("offset"),
    }


def healthy(s):
    return s["status"] == "ready" and s.get("ready") and \
        s.get("actively_synced") and not s.get("error")


def jobs(q, names):
    listed = {j["device"]: j for j in q.cmd("query-block-jobs")}
    return [job_state(n, listed.get(n)) for n in names]


def wait(q, names, until, timeout):
    deadline = time.monotonic() + timeout
    while True:
        states = jobs(q, names)
        bad = [s for s in states if s["status"] == "missing"
               or (s["status"] == "concluded" and s.get("error"))
               or (until == "synced" and s["status"] == "concluded")]
        if bad:
            print(json.dumps(states))
            for s in bad:
                why = s.get("error") or s["status"]
                print(f"qmp.py: job {s['job']} ended: {why}", file=sys.stderr)
            return 1
        if until == "synced" and all(healthy(s) for s in states):
            print(json.dumps(states))
            return 0
        if until == "concluded" and all(s["status"] == "concluded" for s in states):
            print(json.dumps(states))
            return 0
        if time.monotonic() >= deadline:
            print(json.dumps(states))
            print(f"qmp.py: timeout after {timeout} s waiting for {until}",
                  file=sys.stderr)
            return 1
        time.sleep(0.1)


def watch(q, names):
    """Print job events; 1 at the first error, 0 when every job ended cleanly."""
    q.sock.settimeout(None)
    live = set(names)
    # A failure before we connected is only visible in query-block-jobs.
    for s in jobs(q, names):
        print(json.dumps({"event": "STATE", "data": s}), flush=True)
        if s.get("error") or s["status"] == "missing":
            return 1
        if s["status"] == "concluded":
            live.discard(s["job"])
    while live:
        try:
            ev = q.read()
        except EOFError:
            return 0
        if ev.get("event") not in JOB_EVENTS:
            continue
        job = ev.get("data", {}).get("device")
        if job not in names:
            continue
        print(json.dumps(ev), flush=True)
        if ev.get("data", {}).get("error"):
            return 1
        if ev["event"] == "BLOCK_JOB_ERROR" and ev["data"].get("action") != "report":
            return 1  # the job pauses or ignores it: it will not complete
        if ev["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
            live.discard(job)
    return 0


def main(argv):
    if len(argv) < 3 or argv[1] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        return 2
    path, what, rest = argv[1], argv[2], argv[3:]
    opts = {}
    names = []
    i = 0
    while i < len(rest):
        if rest[i] in ("--until", "--timeout", "--describe") and i + 1 < len(rest):
            opts[rest[i]] = rest[i + 1]
            i += 2
        else:
            names.append(rest[i])
            i += 1
    try:
        q = QMP(path)
        if what == "wait":
            return wait(q, names, opts.get("--until", "synced"),
                        float(opts.get("--timeout", 60)))
        if what == "jobs":
            states = jobs(q, names)
            if "--describe" in opts:
                with open(opts["--describe"], encoding="utf-8") as f:
                    extra = json.load(f)
                states = [dict(extra.get(s["job"], {}), **s) for s in states]
            print(json.dumps(states, indent=2))
            return 0 if all(healthy(s) for s in states) else 1
        if what == "watch":
            return watch(q, names)
        args = json.loads(rest[0]) if rest else None
        print(json.dumps(q.cmd(what, args)))
        return 0
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        print(f"qmp.py: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
