#!/usr/bin/env python3
"""One scenario of bench/ordering.sh; prints one JSON line.

Starts --workers `microbatch run` processes in one group at once (arguments
after `--` go to each), and measures from just before the first is started:
  t_processed     the workers' processed counters add up to --records
  t_lag0          `microbatch lag --json` shows total_lag 0 (all committed)
  t_all_assigned  the last "partitions assigned" log line of any worker
                  before lag 0 (when the group had settled)
Per-partition lag is sampled every --lag-ms for the timeline. Then SIGTERM.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import BROKER_DOWN, PROCESSED, Http, parse_log_time, wait_rusage  # noqa: E402
import passthrough  # noqa: E402

ASSIGNS = re.compile(r'^microbatch_rebalances_total\{kind="assign"\} (\d+)', re.M)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--topic", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--records", type=int, required=True)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--scenario", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--lag-ms", type=float, default=250)
    a, extra = passthrough.parse(ap)
    os.makedirs(a.work, exist_ok=True)
    base = [a.bin, "run", "--bootstrap-servers", a.bootstrap, "--topic", a.topic, "--group", a.group,
            "--http-port", "0", "--http-host", "127.0.0.1"] + extra
    res = {"scenario": a.scenario, "workers": a.workers, "records": a.records, "cmd": " ".join(base[1:])}
    logs = [os.path.join(a.work, f"worker-{k}.log") for k in range(a.workers)]
    t0 = time.time()
    procs = []
    for path in logs:
        with open(path, "wb") as f:
            procs.append(subprocess.Popen(base, stdout=subprocess.DEVNULL, stderr=f, stdin=subprocess.DEVNULL))
    https = [None] * a.workers
    t_processed = t_lag0 = None
    processed = [0] * a.workers
    assigns = [0] * a.workers
    timeline = []
    next_lag = 0.0
    deadline = t0 + a.timeout
    try:
        while time.time() < deadline:
            for k, path in enumerate(logs):
                if https[k] is None:
                    m = re.search(r"addr=([0-9.]+:\d+)", open(path, errors="replace").read())
                    if m:
                        https[k] = Http(m.group(1))
                if https[k] is not None:
                    st, body = https[k].get("/metrics")
                    if st == 200:
                        m = PROCESSED.search(body)
                        processed[k] = int(m.group(1)) if m else 0
                        m = ASSIGNS.search(body)
                        assigns[k] = int(m.group(1)) if m else 0
            now = time.time()
            if t_processed is None and sum(processed) >= a.records:
                t_processed = now
            if now >= next_lag:
                next_lag = now + a.lag_ms / 1000
                out = subprocess.run([a.bin, "lag", "--bootstrap-servers", a.bootstrap, "--topic", a.topic,
                                      "--group", a.group, "--json"], capture_output=True, text=True)
                t_lag = time.time()
                if out.returncode == 0:
                    j = json.loads(out.stdout)
                    parts = sorted(j["partitions"], key=lambda p: p["partition"])
                    timeline.append([round(t_lag - t0, 3), [p["lag"] for p in parts]])
                    if j["total_lag"] == 0 and sum(processed) > 0:
                        t_lag0 = t_lag
                        break
            time.sleep(0.05)
    finally:
        cpu = []
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            _, usage, _ = wait_rusage(p, 60)
            cpu.append(round(usage.ru_utime + usage.ru_stime, 3))
    last_assign = None
    broker_errors = 0
    for path in logs:
        for line in open(path, errors="replace"):
            if BROKER_DOWN in line:
                broker_errors += 1
            if "partitions assigned" in line:
                t = parse_log_time(line)
                if t is not None and (t_lag0 is None or t <= t_lag0):
                    last_assign = t if last_assign is None else max(last_assign, t)
    res.update(t0=t0, t_processed=t_processed, t_lag0=t_lag0, t_all_assigned=last_assign,
               processed=sum(processed), processed_per_worker=processed, rebalances=sum(assigns),
               cpu_s_per_worker=cpu, broker_errors=broker_errors, lag_timeline=timeline)
    if broker_errors:
        res["error"] = f"the broker was unreachable during the run ({broker_errors} log lines); numbers invalid"
    if t_lag0 is None:
        res["error"] = "lag did not reach 0 before the timeout"
    print(json.dumps(res), flush=True)
    return 0 if t_lag0 is not None else 1


if __name__ == "__main__":
    sys.exit(main())
