#!/usr/bin/env python3
"""Capture real libnbd handshakes as seeds for the nbd_option fuzz target.

Runs nbdkit (memory plugin) on a unix socket, puts a recording proxy in front of
it, and connects libnbd clients (nbdinfo) through the proxy.  What each client
sends during the handshake (client flags, then its options) becomes
fuzz/corpus/nbd_option/libnbd-<mode>.
Run from the repository root: python3 fuzz/capture_nbd_options.py
"""
import os
import socket
import struct
import subprocess
import tempfile
import threading
import time

IHAVEOPT = 0x49484156454F5054
NAMES = {1: "export-name", 2: "abort", 3: "list", 6: "info", 7: "go",
         8: "structured-reply", 9: "list-meta", 10: "set-meta", 11: "extended-headers"}


def proxy(listener, upstream, sink):
    client, _ = listener.accept()
    server = socket.socket(socket.AF_UNIX)
    server.connect(upstream)

    def pump(src, dst, record):
        try:
            while True:
                b = src.recv(65536)
                if not b:
                    break
                if record:
                    sink.extend(b)
                dst.sendall(b)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # a client that leaves mid-way (nbdinfo --list) closes early

    up = threading.Thread(target=pump, args=(client, server, True))
    up.start()
    pump(server, client, False)
    up.join()


def handshake(stream):
    """The client flags and options at the start of a client stream, and their names."""
    off, names = 4, []
    while off + 16 <= len(stream):
        magic, opt, n = struct.unpack(">QII", stream[off:off + 16])
        if magic != IHAVEOPT:
            break
        names.append(NAMES.get(opt, "opt%d" % opt))
        off += 16 + n
        if opt in (1, 2, 7):  # EXPORT_NAME, ABORT, GO end the handshake
            break
    return bytes(stream[:off]), names


def main():
    outdir = os.path.join("fuzz", "corpus", "nbd_option")
    os.makedirs(outdir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sock, front = os.path.join(tmp, "nbdkit.sock"), os.path.join(tmp, "proxy.sock")
        kit = subprocess.Popen(["nbdkit", "-f", "-U", sock, "-e", "disk0",
                                "memory", "size=1M"])
        try:
            for _ in range(100):
                if os.path.exists(sock):
                    break
                time.sleep(0.05)
            for mode, args in (("map", ["--map"]), ("list", ["--list"]),
                               ("can-trim", ["--can", "trim"])):
                listener = socket.socket(socket.AF_UNIX)
                if os.path.exists(front):
                    os.unlink(front)
                listener.bind(front)
                listener.listen(1)
                sink = bytearray()
                t = threading.Thread(target=proxy, args=(listener, sock, sink))
                t.start()
                subprocess.run(["nbdinfo", *args, f"nbd+unix:///disk0?socket={front}"],
                               stdout=subprocess.DEVNULL, timeout=30)
                t.join(timeout=30)
                listener.close()
                msg, names = handshake(sink)
                with open(os.path.join(outdir, f"libnbd-{mode}"), "wb") as f:
                    f.write(msg)
                print(f"libnbd-{mode}: {len(msg)} bytes:", " ".join(names))
        finally:
            kit.terminate()
            kit.wait()


if __name__ == "__main__":
    main()
