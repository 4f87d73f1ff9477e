#!/bin/bash
# A throw-away single-node Ceph cluster for tests and benchmarks: one monitor, one
# manager, one bluestore OSD on a sparse file, and radosgw (S3) on 127.0.0.1.
# Adapted from shared/ceph/bootstrap.sh (its README lists the pitfalls handled here).
# The monitor refuses to start when its file system has at most "mon data avail
# crit" percent free (lowered to 0 here, but a shared disk can be at 0%): tests put
# DIR on tmpfs (/dev/shm), where the sparse OSD file costs only the RAM written.
#
#   ceph-test-cluster.sh start DIR [MONPORT RGWPORT]   start; prints the S3 endpoint
#   ceph-test-cluster.sh stop DIR                      stop every daemon by PID, remove DIR
#   ceph-test-cluster.sh rgw-stop DIR | rgw-start DIR  stop / start radosgw only
#   ceph-test-cluster.sh rgw-pause DIR | rgw-resume DIR  SIGSTOP / SIGCONT radosgw
#   ceph-test-cluster.sh s3 DIR mb BUCKET | ls BUCKET PREFIX | rm BUCKET KEY
#                        | corrupt BUCKET KEY OFFSET   (flip one byte, same size)
#
# Auth is off; S3 user TESTKEY / TESTSECRET, region us-east-1, path-style
# addressing.  Each daemon's PID is in DIR/run/pid.*; nothing is stopped by name.
# The OSD's block file is sparse (CEPH_TEST_OSD_BYTES, default 4 GiB) and goes
# away with DIR.  Packages: scripts/setup.sh.
set -euo pipefail
cmd=${1:?usage: $0 start|stop|rgw-stop|rgw-start|mb DIR ...}
D=${2:?DIR}
CONF=$D/ceph.conf
export CEPH_CONF=$CONF

stop_pid() { # NAME: SIGTERM the daemon of DIR/run/pid.NAME, SIGKILL after 20 s
  local f=$D/run/pid.$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

rgw_port() { sed -n 's/^rgw frontends = beast endpoint=127.0.0.1:\([0-9]*\)$/\1/p' "$CONF"; }

rgw_start() {
  setsid radosgw -c "$CONF" -n client.rgw.a -f >>"$D/log/rgw.a.out" 2>&1 </dev/null &
  echo $! >"$D/run/pid.rgw"
  local port; port=$(rgw_port)
  timeout 180 bash -c "until curl -s -o /dev/null http://127.0.0.1:$port/; do sleep 0.3; done"
}

case $cmd in
start)
  MONPORT=${3:-40789}; RGWPORT=${4:-40080}; MONPORT2=$((MONPORT + 1))
  OSD_BYTES=${CEPH_TEST_OSD_BYTES:-4294967296}
  # A cluster left by a killed run in the same DIR is stopped first (by its PIDs).
  if [ -d "$D/run" ]; then "$0" stop "$D"; fi
  rm -rf "$D"; mkdir -p "$D"/{mon,osd,mgr,rgw,log,run,crash}
  FSID=$(uuidgen)
  cat >"$CONF" <<C
[global]
fsid = $FSID
mon host = [v2:127.0.0.1:$MONPORT2,v1:127.0.0.1:$MONPORT]
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = false
keyring = $D/keyring
run dir = $D/run
pid file = $D/run/\$name.pid
admin socket = $D/run/\$name.asok
log file = $D/log/\$name.log
crash dir = $D/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
mon data avail warn = 0
mon data avail crit = 0
[mon]
mon data = $D/mon/\$cluster-\$id
[mgr]
mgr data = $D/mgr/\$cluster-\$id
[osd]
osd data = $D/osd/\$cluster-\$id
osd objectstore = bluestore
osd memory target = 1073741824
bluestore block size = $OSD_BYTES
bluestore block create = true
osd journal size = 100
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:$RGWPORT
rgw data = $D/rgw
rgw dns name = 127.0.0.1
# radosgw defaults to ms_mon_client_mode=secure, impossible with auth none -> EACCES
ms mon client mode = crc
C
  monmaptool --create --fsid "$FSID" --addv a "[v2:127.0.0.1:$MONPORT2,v1:127.0.0.1:$MONPORT]" "$D/monmap" >/dev/null
  ceph-mon -c "$CONF" --mkfs -i a --monmap "$D/monmap"
  setsid ceph-mon -c "$CONF" -i a -f >>"$D/log/mon.a.out" 2>&1 </dev/null &
  echo $! >"$D/run/pid.mon"
  timeout 60 bash -c "until ceph -c $CONF --connect-timeout 5 mon stat >/dev/null 2>&1; do sleep 0.5; done"
  mkdir -p "$D/mgr/ceph-x"
  setsid ceph-mgr -c "$CONF" -i x -f >>"$D/log/mgr.x.out" 2>&1 </dev/null &
  echo $! >"$D/run/pid.mgr"
  OSD_UUID=$(uuidgen)
  ID=$(ceph -c "$CONF" osd new "$OSD_UUID")
  mkdir -p "$D/osd/ceph-$ID"
  ceph-osd -c "$CONF" -i "$ID" --mkfs --osd-uuid "$OSD_UUID" --no-mon-config >>"$D/log/osd.mkfs.out" 2>&1
  setsid ceph-osd -c "$CONF" -i "$ID" -f >>"$D/log/osd.$ID.out" 2>&1 </dev/null &
  echo $! >"$D/run/pid.osd"
  timeout 120 bash -c "until ceph -c $CONF osd stat 2>/dev/null | grep -q '1 up'; do sleep 0.5; done"
  rgw_start
  radosgw-admin -c "$CONF" user create --uid=test --display-name=test \
    --access-key=TESTKEY --secret=TESTSECRET >/dev/null
  echo "http://127.0.0.1:$RGWPORT"
  ;;
stop)
  [ -d "$D" ] || exit 0
  for n in rgw osd mgr mon; do stop_pid $n; done
  rm -rf "$D"
  ;;
rgw-stop) stop_pid rgw ;;
rgw-start) rgw_start ;;
rgw-pause) kill -STOP "$(cat "$D/run/pid.rgw")" ;;
rgw-resume) kill -CONT "$(cat "$D/run/pid.rgw")" ;;
s3)
  shift 2
  /usr/bin/python3 - "$(rgw_port)" "$@" <<'P'
import sys, boto3
from botocore.client import Config
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{sys.argv[1]}", aws_access_key_id="TESTKEY",
                  aws_secret_access_key="TESTSECRET", region_name="us-east-1",
                  config=Config(s3={"addressing_style": "path"}, signature_version="s3v4"))
op, a = sys.argv[2], sys.argv[3:]
if op == "mb":
    s3.create_bucket(Bucket=a[0])
elif op == "ls":  # KEY SIZE per line, every object under the prefix
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=a[0], Prefix=a[1]):
        for o in page.get("Contents", []):
            print(o["Key"], o["Size"])
elif op == "rm":
    s3.delete_object(Bucket=a[0], Key=a[1])
elif op == "corrupt":
    body = bytearray(s3.get_object(Bucket=a[0], Key=a[1])["Body"].read())
    body[int(a[2])] ^= 0xFF
    s3.put_object(Bucket=a[0], Key=a[1], Body=bytes(body))
else:
    sys.exit(f"unknown s3 op {op}")
P
  ;;
*) echo "unknown command $cmd" >&2; exit 2 ;;
esac
