#!/usr/bin/env python3
"""One setting of the latency benchmark (bench/latency.sh); prints one JSON line.

Starts one `microbatch run` worker on a fresh topic, warms it up with
--warmup records, then produces --rate records/s for --seconds seconds with
`microbatch produce --rate` and measures, per record, the time from the
record's timestamp (CreateTime, set by the producer) to the end of its
handling. Two methods:

  exec   --handler exec with bench/lib/latency_handler.py (Python): the
         handler's clock after it parsed the batch, minus timestamp_ms.
         Includes the exec hop (JSON encoding, a pipe, json.loads).
  audit  --handler simulate --process-time-ms 0 --audit-log FILE: the worker
         appends `partition offset` per record to FILE after each batch
         (flushed per batch); a tailer here reads FILE every --tail-ms and
         notes when each line appeared; the timestamps are read back from
         Kafka afterwards (confluent-kafka). No handler overhead, but up to
         --tail-ms of polling error.

Records are told apart by the sequence number `microbatch produce` writes at
the start of each value. Warm-up records (seq < --warmup) and the first
--skip-s seconds of the measured produce are left out: right after a
producer starts, its first records sometimes arrive a few hundred ms late at
any consumer (seen with a plain confluent-kafka consumer too), which is not
the worker's latency.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import BROKER_DOWN, Http, PROCESSED, proc_cpu, wait_rusage  # noqa: E402
import passthrough  # noqa: E402

BATCHES = re.compile(r"^microbatch_batches_processed_total (\d+)", re.M)


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, int(-(-p / 100 * len(sorted_vals) // 1)) - 1))
    return sorted_vals[k]


def metrics(http_):
    st, body = http_.get("/metrics")
    if st != 200:
        return None, None
    p = PROCESSED.search(body)
    b = BATCHES.search(body)
    return (int(p.group(1)) if p else 0), (int(b.group(1)) if b else 0)


class Tailer(threading.Thread):
    """Notes when each `partition offset` line appears in the audit log."""

    def __init__(self, path, interval):
        super().__init__(daemon=True)
        self.path, self.interval = path, interval
        self.seen = {}  # (partition, offset) -> first time seen (s)
        self.dups = 0
        self.stop = threading.Event()

    def run(self):
        while not os.path.exists(self.path) and not self.stop.is_set():
            time.sleep(self.interval)
        with open(self.path, "rb") as f:
            rest = b""
            while True:
                chunk = f.read()
                now = time.time()
                if chunk:
                    data = rest + chunk
                    lines = data.split(b"\n")
                    rest = lines.pop()
                    for line in lines:
                        if not line:
                            continue
                        p, o = line.split()
                        key = (int(p), int(o))
                        if key in self.seen:
                            self.dups += 1
                        else:
                            self.seen[key] = now
                elif self.stop.is_set():
                    break
                else:
                    time.sleep(self.interval)


def read_back(bootstrap, topic, partitions):
    """(partition, offset) -> (timestamp_ms, seq) for every record of the topic."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-readback", "enable.auto.commit": False})
    highs = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)}
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    out = {}
    want = sum(highs.values())
    deadline = time.time() + 120
    while len(out) < want and time.time() < deadline:
        for m in c.consume(num_messages=10000, timeout=1.0):
            if m.error():
                continue
            seq = (m.value() or b"").split(b" ", 1)[0]
            out[(m.partition(), m.offset())] = (m.timestamp()[1], int(seq) if seq.isdigit() else -1)
    c.close()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--topic", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--partitions", type=int, required=True)
    ap.add_argument("--method", choices=["exec", "audit"], required=True)
    ap.add_argument("--max-wait-ms", type=int, required=True)
    ap.add_argument("--rate", type=int, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--keys", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=2000)
    ap.add_argument("--skip-s", type=float, default=1.0,
                    help="produce this much longer and leave out the first seconds of the measured produce")
    ap.add_argument("--work", required=True, help="directory for logs and handler output")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the exec handler")
    ap.add_argument("--tail-ms", type=float, default=1.0)
    a, extra = passthrough.parse(ap)
    os.makedirs(a.work, exist_ok=True)
    count = int(a.rate * a.seconds)
    skipped = int(a.rate * a.skip_s)
    first_seq = a.warmup + skipped  # records below this are not measured
    audit_path = os.path.join(a.work, "audit.log")
    cmd = [a.bin, "run", "--bootstrap-servers", a.bootstrap, "--topic", a.topic, "--group", a.group,
           "--http-port", "0", "--http-host", "127.0.0.1", "--max-wait-ms", str(a.max_wait_ms)]
    if a.method == "exec":
        handler = os.path.join(os.path.dirname(os.path.abspath(__file__)), "latency_handler.py")
        cmd += ["--handler", "exec", "--command", f"exec '{a.python}' '{handler}' '{a.work}'"]
    else:
        cmd += ["--handler", "simulate", "--process-time-ms", "0", "--audit-log", audit_path]
    cmd += extra
    shown = [c for c in cmd[1:]]
    if a.method == "exec":
        shown[shown.index("--command") + 1] = "python3 bench/lib/latency_handler.py DIR"
    else:
        shown[shown.index("--audit-log") + 1] = "FILE"
    res = {"method": a.method, "max_wait_ms": a.max_wait_ms, "rate": a.rate, "seconds": a.seconds,
           "skipped_s": a.skip_s, "records": count, "cmd": " ".join(shown)}
    log_path = os.path.join(a.work, "worker.log")
    tailer = Tailer(audit_path, a.tail_ms / 1000) if a.method == "audit" else None
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL)
    try:
        addr = None
        deadline = time.time() + 30
        while time.time() < deadline and proc.poll() is None:
            text = open(log_path, errors="replace").read()
            m = re.search(r"addr=([0-9.]+:\d+)", text)
            if m and "partitions assigned" in text:
                addr = m.group(1)
                break
            time.sleep(0.01)
        if addr is None:
            raise RuntimeError("the worker did not get its partitions within 30 s")
        http_ = Http(addr)
        if tailer:
            tailer.start()

        def produce(n, start_seq, rate):
            p = subprocess.run([a.bin, "produce", "--bootstrap-servers", a.bootstrap, "--topic", a.topic,
                                "--count", str(n), "--rate", str(rate), "--size", str(a.size),
                                "--keys", str(a.keys), "--start-seq", str(start_seq), "--quiet"],
                               capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError("produce failed: " + p.stderr[-500:])
            return p.stdout.strip()

        def wait_processed(n, timeout):
            end = time.time() + timeout
            while time.time() < end:
                done, _ = metrics(http_)
                if done is not None and done >= n:
                    return True
                time.sleep(0.05)
            return False

        produce(a.warmup, 0, 0)
        if not wait_processed(a.warmup, 60):
            raise RuntimeError("warm-up records were not processed within 60 s")
        time.sleep(0.5)
        p0, b0 = metrics(http_)
        cpu0 = proc_cpu(proc.pid)
        t_start = time.time()
        res["produce"] = produce(skipped + count, a.warmup, a.rate)
        t_produced = time.time()
        ok = wait_processed(a.warmup + skipped + count, 60)
        p1, b1 = metrics(http_)
        cpu1 = proc_cpu(proc.pid)
        res.update(processed=p1 - p0, batches=b1 - b0, mean_batch=(p1 - p0) / max(b1 - b0, 1),
                   produce_s=t_produced - t_start,
                   worker_cpu_s=None if cpu0 is None or cpu1 is None else cpu1 - cpu0)
        if not ok:
            res["error"] = f"only {p1 - a.warmup} of {skipped + count} records processed within 60 s of the end of produce"
    finally:
        proc.send_signal(signal.SIGTERM)
        wait_rusage(proc, 30)
        if tailer:
            time.sleep(0.1)
            tailer.stop.set()
            tailer.join(10)

    lat = []
    parse_ms = []
    seqs = set()
    dups = 0
    if a.method == "exec":
        for name in os.listdir(a.work):
            if not name.startswith("lat-"):
                continue
            for line in open(os.path.join(a.work, name)):
                if line.startswith("#"):
                    parse_ms.append(float(line.split()[2]))
                    continue
                s, v = line.split()
                s = int(s)
                if s < first_seq:
                    continue
                if s in seqs:
                    dups += 1
                    continue
                seqs.add(s)
                lat.append(float(v))
    else:
        stamps = read_back(a.bootstrap, a.topic, a.partitions)
        dups = tailer.dups
        for key, seen in tailer.seen.items():
            ts, s = stamps.get(key, (None, -1))
            if ts is None or s < first_seq:
                continue
            seqs.add(s)
            lat.append(seen * 1000.0 - ts)
    lat.sort()
    parse_ms.sort()
    broker_errors = sum(1 for line in open(log_path, errors="replace") if BROKER_DOWN in line)
    if broker_errors:
        res["error"] = f"the broker was unreachable during the run ({broker_errors} log lines); numbers invalid"
    res.update(
        measured=len(lat), missing=count - len(seqs), duplicates=dups, broker_errors=broker_errors,
        p50=pct(lat, 50), p90=pct(lat, 90), p99=pct(lat, 99), p999=pct(lat, 99.9),
        max=lat[-1] if lat else None, min=lat[0] if lat else None,
        handler_parse_p50_ms=pct(parse_ms, 50), handler_parse_p99_ms=pct(parse_ms, 99),
    )
    print(json.dumps(res), flush=True)
    return 0 if "error" not in res and res["missing"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
