#!/usr/bin/env python3
"""What an idle CPU adds to a Redis call's recorded time, on this host.

Starts a private redis-server (a free port, pinned to the last CPU with taskset when there are
two or more), loads a tiny function library (TIME and 20 HSETs, about a progress write's work)
and calls it 400 times back to back, then with a pause of 1, 5 and 20 ms between calls, and
again back to back. It prints `INFO commandstats`' usec_per_call for FCALL in each case: the
same work, so any difference is what the server's CPU costs to come back from idle (caches,
TLB, frequency, a VM's halted vCPU). The fleet bench's ComfyUI-shaped run spreads its calls
like the paused case and its replay like the back-to-back one; see docs/redis-protocol.md
"The fleet bench (issue 29)". Usage: scripts/idle-call-cost.py [--calls 400]
"""

import argparse
import os
import shutil
import socket
import subprocess
import tempfile
import time

LIB = """#!lua name=idlecost
redis.register_function('work', function(_, args)
  redis.call('TIME')
  for i = 1, 20 do redis.call('HSET', 'h' .. i, 'f', args[1]) end
  return 1
end)"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=400)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cpus = os.cpu_count() or 1
    pin = ["taskset", "-c", str(cpus - 1)] if cpus > 1 and shutil.which("taskset") else []
    tmp = tempfile.mkdtemp(prefix="idle-call-cost-")
    server = subprocess.Popen(pin + ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
                                     "--dir", tmp], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                conn = socket.create_connection(("127.0.0.1", port))
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise SystemExit("idle-call-cost: redis-server did not start")
        buf = b""

        def call(*parts):
            nonlocal buf
            enc = [str(p).encode() for p in parts]
            conn.sendall(b"*%d\r\n" % len(enc) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in enc))
            while True:
                if buf[:1] == b"$" and b"\r\n" in buf:
                    n = int(buf[1:buf.index(b"\r\n")])
                    end = buf.index(b"\r\n") + 2 + max(n, 0) + (2 if n >= 0 else 0)
                    if len(buf) >= end:
                        reply, buf = buf[:end], buf[end:]
                        return reply
                elif b"\r\n" in buf and buf[:1] != b"$":
                    i = buf.index(b"\r\n") + 2
                    reply, buf = buf[:i], buf[i:]
                    return reply
                buf += conn.recv(1 << 16)

        call("FUNCTION", "LOAD", "REPLACE", LIB)
        print("the same FCALL (TIME and 20 HSETs), %d calls each, server time per call:" % args.calls)
        for gap_ms in (0, 1, 5, 20, 0):
            call("CONFIG", "RESETSTAT")
            for _ in range(args.calls):
                call("FCALL", "work", 0, "x" * 50)
                if gap_ms:
                    time.sleep(gap_ms / 1000)
            stats = call("INFO", "commandstats").decode()
            line = next(l for l in stats.split("\r\n") if l.startswith("cmdstat_fcall:"))
            per = next(kv for kv in line.split(",") if kv.startswith("usec_per_call="))
            print("  %-15s %s us" % ("back to back" if gap_ms == 0 else "%d ms apart" % gap_ms, per.split("=")[1]))
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
