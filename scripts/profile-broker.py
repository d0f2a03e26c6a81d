#!/usr/bin/env python3
"""Where the broker's Redis time per job goes, counted in instructions.

Runs a private redis-server under `valgrind --tool=callgrind` (instrumented only while the
measured calls run), loads the `jobMatching` library or the matcher bench's baseline
(benches/baseline.lua), each alone in the functions VM, and for each of them has WORKERS
workers claim and complete ROUNDS jobs each, pipelined (all the workers' claims, then all their
completions), after one warm-up
round (so the capabilities are memoised, as in `cargo bench --bench matcher`). It prints the
instructions (Ir) per claim and per completion, and with --breakdown the inclusive Ir per call
of the Redis commands the functions run (from callgrind_annotate).

Instruction counts do not move with the load of a shared host (time per call does, by +-30 %
and more), so small steps can be told apart. Usage:

    scripts/profile-broker.py [--workers 1000] [--rounds 3] [--breakdown] [--top self|inclusive] [--cache-sim]
    scripts/profile-broker.py --job-path [--parked 100] [--jobs 50] [--progress 10] [--renewals 0] [--payload-kb 0]

--job-path counts instead the whole path of a ComfyUI-shaped job through the fleet's scheme
(issue 29's all-in figure) with --parked workers parked: the API's submission (HSET, ZADD),
announceJob (index, wake one parked worker), the woken worker's claimOrPark, startJob,
--progress updateJobProgressAt writes (one a second of a 10 s job; --progress-form job:
updateJobProgress, what older machines call), --renewals renewLease (none:
a lease is renewed every third of its 60 s), completeJobText (--complete job: completeJob)
and the worker's empty claimOrPark that parks it again; Ir per job for each step and in all.

--cache-sim adds callgrind's simulated data-cache misses (first level, and a 1 MiB last level
like the host's L2) and mispredicted branches per call: the host is a VM without hardware
counters (`perf stat` reports cycles and cache misses as not supported), and time per
instruction is where ours and the baseline differ most.

KEEP=1 keeps the callgrind dumps (for callgrind_annotate).

Needs redis-server (7.0+), valgrind (callgrind_control, callgrind_annotate) and python3.
"""

import argparse
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The jobs the matcher bench loads (benches/matcher.rs, Bench::load).
LOAD = r"""
for i = 1, tonumber(ARGV[2]) do
  local id = ARGV[1] .. i
  redis.call('HSET', 'job:' .. id, 'id', id, 'service_required', 'comfyui', 'requirements', ARGV[3],
    'priority', ARGV[4], 'payload', '{}', 'status', 'pending', 'customer_id', '', 'retry_count', '0',
    'max_retries', '3', 'created_at', '2025-01-01T00:00:00.000Z', 'workflow_id', '')
  redis.call('ZADD', 'jobs:pending', tonumber(ARGV[4]) * 1e15 - i, id)
end
return 1"""


def caps(worker):
    """What Capabilities::new(worker, "bench", ["comfyui"]) with 24 GB serialises to."""
    return json.dumps({
        "worker_id": worker, "machine_id": "bench", "services": ["comfyui"],
        "job_service_required_map": ["comfyui"],
        "hardware": {"gpu_count": 0, "gpu_memory_gb": 24.0, "gpu_model": "", "ram_gb": 0.0, "cpu_cores": 0},
        "models": {}, "customer_access": {"isolation": "loose", "allowed_customers": [], "denied_customers": []},
        "workflow_id": "",
    }, separators=(",", ":"))


class Redis:
    """A minimal RESP client that pipelines."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.buf = b""

    @staticmethod
    def encode(args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        return b"".join(out)

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def reply(self):
        line = self._line()
        t, rest = line[:1], line[1:]
        if t == b"+":
            return rest.decode()
        if t == b"-":
            raise RuntimeError(rest.decode())
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n).decode()
        if t == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise RuntimeError("unexpected reply %r" % line)

    def pipeline(self, commands):
        self.sock.sendall(b"".join(self.encode(c) for c in commands))
        return [self.reply() for _ in commands]

    def call(self, *args):
        return self.pipeline([args])[0]


def claims(impl, workers):
    if impl == "ours":
        return [("FCALL", "findMatchingJob", 0, caps(w), 100, 60000, "") for w in workers]
    return [("FCALL", "findMatchingJobBaseline", 0, caps(w), 100) for w in workers]


COMPLETE_FORM = "text"


def completions(impl, claimed):
    if impl == "ours" and COMPLETE_FORM == "text":
        # As Broker::complete sends it: the result and complete_job around it, encoded by the
        # worker (the claim's workflow and steps are empty here).
        return [("FCALL", "completeJobText", 0, "", job, w, '{"ok":true}',
                 '{"job_id":%s,"worker_id":%s,"progress":100,"status":"completed","message":"completed","result":'
                 % (json.dumps(job), json.dumps(w)),
                 ',"workflow_id":"","current_step":"","total_steps":""}')
                for job, w in claimed]
    if impl == "ours":
        # completeJob's arguments: the result, the message, the claim's workflow and steps.
        return [("FCALL", "completeJob", 0, "", job, w, '{"ok":true}', "completed", "", "", "")
                for job, w in claimed]
    return [("FCALL", "completeJobBaseline", 0, job, w, '{"success":true}') for job, w in claimed]


def run_round(r, impl, workers):
    replies = r.pipeline(claims(impl, workers))
    claimed = []
    for w, reply in zip(workers, replies):
        if reply is None:
            raise RuntimeError("worker %s claimed nothing: load more jobs" % w)
        claimed.append((json.loads(reply)["jobId"], w))
    return claimed


def control(pid, *args):
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def dumps(outdir):
    return sorted(glob.glob(os.path.join(outdir, "callgrind.out.*")), key=os.path.getmtime)


def wait_for_dump(outdir, before):
    for _ in range(600):
        files = dumps(outdir)
        if len(files) > before:
            # callgrind writes the file in one go but give it a moment to finish.
            time.sleep(0.2)
            return files[-1]
        time.sleep(0.1)
    raise RuntimeError("callgrind wrote no dump")


def totals(path):
    return events(path)["Ir"]


def events(path):
    """The dump's totals by event name (Ir; with --cache-sim also D1mr, DLmr, ...)."""
    names = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("events:"):
                names = line.split()[1:]
            if line.startswith("totals:") or line.startswith("summary:"):
                values = [int(v) for v in line.split()[1:]]
                return dict(zip(names or ["Ir"], values))
    raise RuntimeError("no totals in %s" % path)


def misses(ev, n):
    """Simulated data-cache misses per call (first level, last level), reads and writes."""
    d1 = (ev.get("D1mr", 0) + ev.get("D1mw", 0)) / n
    ll = (ev.get("DLmr", 0) + ev.get("DLmw", 0)) / n
    return d1, ll


def top(path, per, inclusive, n=40):
    """The n functions with the most Ir per call (self or inclusive), from one dump."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=" + ("yes" if inclusive else "no"),
                          "--threshold=100", path], check=True, capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+\S*:(\S+)", line)
        if m:
            rows.append((m.group(2), int(m.group(1).replace(",", "")) / per))
    return rows[:n]


def breakdown(path, per):
    """Inclusive Ir per call of the Redis commands and a few hot spots, from one dump."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", path],
                         check=True, capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+\S*:(\w+)", line)
        if not m:
            continue
        ir, fn = int(m.group(1).replace(",", "")), m.group(2)
        if fn.endswith("Command") or fn in ("luaRedisGenericCommand", "luaCallFunction", "json_encode",
                                              "json_decode", "readQueryFromClient", "writeToClient",
                                              "sha1hex", "luaRedisSha1hexCommand", "luaV_execute",
                                              "processCommand", "call", "addReplyBulk"):
            rows.append((fn, ir / per))
    return rows


def progress_call(id, worker, pct, message, current, total):
    """A progress write as Broker::progress makes it (--progress-form at: updateJobProgressAt,
    update_job_progress encoded and timed by the worker), or as older machines do (job:
    updateJobProgress)."""
    if PROGRESS_FORM == "job":
        return ("FCALL", "updateJobProgress", 0, "", id, worker, pct, message, current, total, "0")
    head = '{"job_id":%s,"worker_id":%s,"progress":%d,"status":"in_progress","message":%s,' \
           '"current_step":%s,"total_steps":%s,"timestamp":' % (
               json.dumps(id), json.dumps(worker), pct, json.dumps(message), json.dumps(str(current)),
               json.dumps(str(total)))
    now = time.time()
    at = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(now)) + "%03dZ" % (int(now * 1000) % 1000)
    return ("FCALL", "updateJobProgressAt", 0, "", id, worker, pct, message, head + "%d}" % int(now * 1000), at)


def workflow_payload(kb):
    """A ComfyUI-workflow-shaped payload of about `kb` KB (sampler nodes with their inputs);
    '{"prompt":{}}' for 0."""
    if kb <= 0:
        return '{"prompt":{}}'
    nodes, i = {}, 0
    while len(json.dumps(nodes)) < kb * 1024:
        nodes[str(i)] = {"class_type": "KSampler", "inputs": {
            "seed": 1000 + i, "steps": 30, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
            "latent_image": ["5", 0]}}
        i += 1
    return json.dumps({"prompt": nodes}, separators=(",", ":"))


def job_path(r, pid, tmp, parked, jobs, progress, renewals, payload_kb=0):
    """Ir per job of each step of a ComfyUI-shaped job's path (see --job-path)."""
    workers = ["fleet-w%d" % i for i in range(parked)]
    r.call("FLUSHALL")
    # Park every worker (and memoise its capabilities), as idle workers of a fleet are.
    r.pipeline([("FCALL", "claimOrPark", 0, caps(w), 100, 60000, "", 15000) for w in workers])
    results = {}

    def measure(name, commands):
        before = len(dumps(tmp))
        control(pid, "-z")
        replies = r.pipeline(commands)
        control(pid, "-d")
        results[name] = results.get(name, 0) + totals(wait_for_dump(tmp, before))
        return replies

    payload = workflow_payload(payload_kb)
    for rnd in range(2):  # the first round warms up (memoised group verdicts, encodings)
        results = {}
        ids = ["j%d-%d" % (rnd, i) for i in range(jobs)]
        now = int(time.time() * 1000)
        submit = []
        for i, id in enumerate(ids):
            submit.append(("HSET", "job:" + id, "id", id, "service_required", "comfyui", "priority", 50,
                           "payload", payload, "requirements", "", "customer_id", "", "status",
                           "pending", "retry_count", 0, "max_retries", 3,
                           "created_at", time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(now / 1000)),
                           "workflow_id", ""))
            submit.append(("ZADD", "jobs:pending", 50 * 10**15 - now // 1000 - i, id))
        measure("submit (HSET, ZADD)", submit)
        woken = measure("announceJob", [("FCALL", "announceJob", 0, "", id, 750) for id in ids])
        claimers = [w[1] for w in woken]
        if "" in claimers:
            raise RuntimeError("a submission woke nobody: park more workers than jobs")
        claimed = measure("claimOrPark (claim)", [("FCALL", "claimOrPark", 0, caps(w), 100, 60000, "", 15000)
                                                  for w in claimers])
        pairs = [(json.loads(c)["jobId"], w) for c, w in zip(claimed, claimers)]
        measure("startJob", [("FCALL", "startJob", 0, "", id, w) for id, w in pairs])
        for step in range(progress):
            pct = (step + 1) * 100 // (progress + 1)
            measure("updateJobProgress", [progress_call(id, w, pct, "sampling step %d of 30" % (3 * step + 1),
                                                        3 * step + 1, 30) for id, w in pairs])
        for _ in range(renewals):
            measure("renewLease", [("FCALL", "renewLease", 0, "", id, w, 60000) for id, w in pairs])
        measure("completeJobText", completions("ours", pairs))
        measure("claimOrPark (empty, parks)", [("FCALL", "claimOrPark", 0, caps(w), 100, 60000, "", 15000)
                                              for _, w in pairs])
    total = 0
    print("ComfyUI-shaped job path, %d parked workers, %d jobs, %d progress writes, payload %d bytes, Ir per job:"
          % (parked, jobs, progress, len(payload)))
    for name, ir in results.items():
        calls = progress if name == "updateJobProgress" else renewals if name == "renewLease" else 1
        total += ir
        print("  %-28s %9.0f%s" % (name, ir / jobs, ("  (%d calls, %.0f each)" % (calls, ir / jobs / calls))
                                   if calls > 1 else ""))
    print("  %-28s %9.0f" % ("all", total / jobs))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--breakdown", action="store_true", help="print Ir per call of each Redis command")
    ap.add_argument("--top", choices=["self", "inclusive"], help="print the costliest functions")
    ap.add_argument("--lib", default=os.path.join(ROOT, "src/broker/job_matching.lua"),
                    help="the library to load (a variant of job_matching.lua, to compare one change)")
    ap.add_argument("--impl", choices=["ours", "baseline", "both"], default="both")
    ap.add_argument("--complete", choices=["text", "job"], default="text",
                    help="ours' completion: completeJobText (what Broker::complete calls) or completeJob")
    ap.add_argument("--progress-form", choices=["at", "job"], default="at",
                    help="--job-path: updateJobProgressAt (what Broker::progress calls) or the older "
                         "machines' updateJobProgress")
    ap.add_argument("--cache-sim", action="store_true",
                    help="also count simulated data-cache misses (first level, a 1 MiB last level like the "
                         "host's L2) and mispredicted branches per call")
    ap.add_argument("--job-path", action="store_true", help="count a ComfyUI-shaped job's whole path instead")
    ap.add_argument("--parked", type=int, default=100, help="--job-path: workers parked")
    ap.add_argument("--jobs", type=int, default=50, help="--job-path: jobs per round (at most --parked)")
    ap.add_argument("--progress", type=int, default=10, help="--job-path: progress writes per job")
    ap.add_argument("--payload-kb", type=int, default=0,
                    help="--job-path: a ComfyUI-workflow-shaped payload of about this many KB (0: a few bytes)")
    ap.add_argument("--renewals", type=int, default=0, help="--job-path: lease renewals per job")
    args = ap.parse_args()
    global COMPLETE_FORM, PROGRESS_FORM
    COMPLETE_FORM = args.complete
    PROGRESS_FORM = args.progress_form
    for tool in ("redis-server", "valgrind", "callgrind_control", "callgrind_annotate"):
        if not shutil.which(tool):
            sys.exit("profile-broker: %s is not installed" % tool)

    tmp = tempfile.mkdtemp(prefix="profile-broker-")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no"] + (["--cache-sim=yes", "--LL=1048576,8,64", "--branch-sim=yes"] if args.cache_sim else []) + [
         "--callgrind-out-file=" + os.path.join(tmp, "callgrind.out.%p"),
         "redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", tmp],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                r = Redis(port)
                r.call("PING")
                break
            except (ConnectionError, OSError, RuntimeError):
                time.sleep(0.1)
        else:
            sys.exit("profile-broker: redis-server did not start")
        def load_only(impl):
            # Each implementation runs in a functions VM of its own, as in production and in the
            # matcher bench: Lua's collector walks whatever any library in the VM keeps, and our
            # library sets the VM's collector step.
            r.call("FUNCTION", "FLUSH")
            if impl == "ours":
                with open(args.lib, encoding="utf-8") as f:
                    r.call("FUNCTION", "LOAD", f.read().replace("__MATCHER_VERSION__", "profile"))
            else:
                with open(os.path.join(ROOT, "benches/baseline.lua"), encoding="utf-8") as f:
                    r.call("FUNCTION", "LOAD", f.read())

        if args.job_path:
            load_only("ours")

        # Instrumented from here on (toggling it between dumps corrupts callgrind's totals); each
        # measured phase starts from zeroed counters.
        control(server.pid, "-i", "on")
        if args.job_path:
            job_path(r, server.pid, tmp, args.parked, args.jobs, args.progress, args.renewals, args.payload_kb)
            return
        workers = ["bench-w%d" % i for i in range(args.workers)]
        impls = ["ours", "baseline"] if args.impl == "both" else [args.impl]
        results = {}
        for impl in impls:
            r.call("FLUSHALL")
            load_only(impl)
            r.call("EVAL", LOAD, 0, "c-", args.workers * (args.rounds + 1), "", 50)
            if impl == "ours":
                while True:
                    n = r.call("FCALL", "sweepIndex", 0, "", 4000)
                    if n[0] == n[1]:
                        break
            # Warm-up: memoised capabilities, the workers' hashes, the hashes' encodings.
            r.pipeline(completions(impl, run_round(r, impl, workers)))
            claim_ir = complete_ir = 0
            claim_ev, complete_ev = {}, {}
            last_claim = last_complete = None
            for _ in range(args.rounds):
                before = len(dumps(tmp))
                control(server.pid, "-z")
                claimed = run_round(r, impl, workers)
                control(server.pid, "-d")
                last_claim = wait_for_dump(tmp, before)
                for k, v in events(last_claim).items():
                    claim_ev[k] = claim_ev.get(k, 0) + v
                claim_ir = claim_ev["Ir"]
                before = len(dumps(tmp))
                control(server.pid, "-z")
                r.pipeline(completions(impl, claimed))
                control(server.pid, "-d")
                last_complete = wait_for_dump(tmp, before)
                for k, v in events(last_complete).items():
                    complete_ev[k] = complete_ev.get(k, 0) + v
                complete_ir = complete_ev["Ir"]
            n = args.workers * args.rounds
            results[impl] = (claim_ir / n, complete_ir / n)
            print("%-8s claim %7.0f Ir  complete %7.0f Ir  job %7.0f Ir  (%d workers x %d rounds)"
                  % (impl, claim_ir / n, complete_ir / n, (claim_ir + complete_ir) / n, args.workers,
                     args.rounds))
            if args.cache_sim:
                (c1, cl), (p1, pl) = misses(claim_ev, n), misses(complete_ev, n)
                print("%-8s data-cache misses per call (simulated): claim D1 %6.0f LL %5.0f  complete D1 %6.0f LL %5.0f"
                      "  job D1 %6.0f LL %5.0f" % ("", c1, cl, p1, pl, c1 + p1, cl + pl))
                bc = (claim_ev.get("Bcm", 0) + claim_ev.get("Bim", 0)) / n
                bp = (complete_ev.get("Bcm", 0) + complete_ev.get("Bim", 0)) / n
                print("%-8s mispredicted branches per call (simulated): claim %6.0f  complete %6.0f  job %6.0f"
                      "  (indirect: claim %.0f complete %.0f)"
                      % ("", bc, bp, bc + bp, claim_ev.get("Bim", 0) / n, complete_ev.get("Bim", 0) / n))
            if args.breakdown:
                for title, path in (("claim", last_claim), ("complete", last_complete)):
                    print("  %s, inclusive Ir per call (last round):" % title)
                    for fn, ir in breakdown(path, args.workers):
                        print("    %-28s %9.0f" % (fn, ir))
            if args.top:
                for title, path in (("claim", last_claim), ("complete", last_complete)):
                    print("  %s, the functions of most Ir per call (%s, last round):"
                          % (title, "inclusive" if args.top == "inclusive" else "self"))
                    for fn, ir in top(path, args.workers, args.top == "inclusive"):
                        print("    %-40s %9.0f" % (fn, ir))
        if len(results) == 2:
            o, b = results["ours"], results["baseline"]
            print("ours/baseline: claim %.2fx, complete %.2fx, job %.2fx"
                  % (o[0] / b[0], o[1] / b[1], sum(o) / sum(b)))
    finally:
        server.terminate()
        server.wait(timeout=60)
        if os.environ.get("KEEP"):
            print("callgrind dumps kept in", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
