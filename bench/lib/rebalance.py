"""How long each scale step stops a partition, and what it makes run twice.

One run: records flow at a steady rate through the topic while workers of one
group join and leave on a fixed schedule (scale up 1 -> 2 -> 4 -> 8, down
8 -> 4 -> 1 with SIGTERM, then one more worker and a SIGKILL of it). A
sampler reads the group's committed offsets and the high watermarks every
SAMPLE_S. For each event and partition the *stall* is the longest time,
starting in that event's window (or less than LEAD_S before it and lasting
past it), during which the partition's committed offset did not move while
it had lag. The workers run an exec handler that
notes every record with the time it handled it, so a record handled twice is
counted against the event before its second handling.

Prints one JSON line: {"protocol", "events": [{"event", "t", "partitions":
{p: stall_s}, "moved": [p...], "duplicates"}], ...}.
"""

import argparse
import glob
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

from confluent_kafka import Consumer, TopicPartition

SAMPLE_S = 0.05

HANDLER = """import sys, json, os, time
fd = os.open(os.path.join(%r, 'handled-%%d.txt' %% os.getpid()), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
for line in sys.stdin:
    b = json.loads(line)
    os.write(fd, ''.join('%%d %%d %%.3f\\n' %% (r['partition'], r['offset'], time.time()) for r in b['records']).encode())
    print(json.dumps({'batch_id': b['batch_id'], 'failed': []}), flush=True)
"""


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--bin", required=True)
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--protocol", required=True, choices=["classic", "consumer"])
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--rate", type=int, default=2000)
    p.add_argument("--step-s", type=float, default=8.0)
    p.add_argument("--work", required=True)
    p.add_argument("worker_args", nargs=argparse.REMAINDER)
    return p.parse_args()


class Sampler(threading.Thread):
    def __init__(self, bootstrap, topic, group, partitions):
        super().__init__(daemon=True)
        self.c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                           "enable.auto.commit": False})
        self.tps = [TopicPartition(topic, p) for p in range(partitions)]
        self.samples = []  # (t, {p: committed}, {p: high})
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            t = time.time()
            try:
                committed = {tp.partition: tp.offset for tp in self.c.committed(self.tps, timeout=5)}
                high = {tp.partition: self.c.get_watermark_offsets(tp, timeout=5, cached=False)[1]
                        for tp in self.tps}
                self.samples.append((t, committed, high))
            except Exception as e:  # a broker hiccup: the next sample will do
                print(f"sample failed: {e}", file=sys.stderr)
            time.sleep(SAMPLE_S)


def stalls(samples, events, partitions):
    """Per event index, per partition: the longest stall that started in its window."""
    windows = [e["t"] for e in events] + [float("inf")]
    out = [{p: 0.0 for p in range(partitions)} for _ in events]
    for p in range(partitions):
        since = None  # when the committed offset last moved while lagging
        last = None
        for t, committed, high in samples:
            c, h = committed.get(p, -1), high.get(p, 0)
            if last is None or c != last or c >= h:
                if since is not None and last is not None:
                    record(out, windows, p, since, t)
                since, last = (t if c < h else None), c
            elif since is None:
                since = t
        if since is not None:
            record(out, windows, p, since, samples[-1][0])
    return out


# A partition's committed offset last moves up to a commit interval and a
# batch before an event: a stall that began this long before an event and
# lasts past it is that event's (a SIGKILL's wait for the session timeout).
LEAD_S = 1.0


def record(out, windows, p, start, end):
    for i in range(len(windows) - 1):
        if windows[i] <= start < windows[i + 1]:
            nxt = windows[i + 1]
            if i + 1 < len(out) and nxt - LEAD_S <= start and end > nxt:
                i += 1
            out[i][p] = max(out[i][p], end - start)
            return


def sample_gaps(samples, events):
    """The longest time between two samples in each event's window: a stall
    shorter than that cannot be told from a slow sample."""
    windows = [e["t"] for e in events] + [float("inf")]
    out = [0.0] * len(events)
    for (a, _, _), (b, _, _) in zip(samples, samples[1:]):
        for i in range(len(events)):
            if windows[i] <= a < windows[i + 1]:
                out[i] = max(out[i], b - a)
    return out


def moved(work, events, procs):
    """Partitions assigned to some worker within each event's window."""
    windows = [e["t"] for e in events] + [float("inf")]
    out = [set() for _ in events]
    for path in glob.glob(os.path.join(work, "w*.log")):
        for line in open(path, errors="replace"):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            fields = rec.get("fields", {})
            if fields.get("message") != "partitions assigned":
                continue
            ts = rec.get("timestamp", "")
            t = time.mktime(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone \
                + float("0." + ts[20:26] if len(ts) > 20 else 0)
            parts = json.loads(fields.get("partitions", "[]"))
            for i in range(len(events)):
                if windows[i] <= t < windows[i + 1]:
                    out[i].update(parts)
    return [sorted(s) for s in out]


def duplicates(work, events):
    windows = [e["t"] for e in events] + [float("inf")]
    seen = set()
    lines = []
    for path in glob.glob(os.path.join(work, "handled-*.txt")):
        for line in open(path):
            f = line.split()
            if len(f) == 3:
                lines.append((float(f[2]), int(f[0]), int(f[1])))
    lines.sort()
    out = [0] * len(events)
    for t, p, o in lines:
        if (p, o) in seen:
            for i in range(len(events)):
                if windows[i] <= t < windows[i + 1]:
                    out[i] += 1
        seen.add((p, o))
    return out, len(seen)


def main():
    a = parse_args()
    os.makedirs(a.work, exist_ok=True)
    handler = os.path.join(a.work, "handler.py")
    with open(handler, "w") as f:
        f.write(HANDLER % a.work)
    extra = [x for x in a.worker_args if x != "--"]
    env = dict(os.environ, MICROBATCH_GROUP_PROTOCOL=a.protocol, MICROBATCH_LOG=os.environ.get("MICROBATCH_LOG", "info"))
    procs = []

    def spawn():
        n = len(procs) + 1
        log = open(os.path.join(a.work, f"w{n}.log"), "w")
        cmd = [a.bin, "run", "--bootstrap-servers", a.bootstrap, "--topic", a.topic,
               "--group", a.group, "--http-port", "0", "--http-host", "127.0.0.1",
               "--handler", "exec", "--command", f"python3 {handler}",
               "--log-format", "json"] + extra
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env))
        return procs[-1]

    live = []
    step = a.step_s
    schedule = [("start 1", 1), ("scale up 1->2", 1), ("scale up 2->4", 2), ("scale up 4->8", 4),
                ("scale down 8->4 (SIGTERM)", -4), ("scale down 4->1 (SIGTERM)", -3),
                ("scale up 1->2", 1), ("SIGKILL 2->1", "kill")]
    total_s = step * (len(schedule) + 1)
    producer = subprocess.Popen(
        [a.bin, "produce", "--bootstrap-servers", a.bootstrap, "--topic", a.topic,
         "--rate", str(a.rate), "--count", str(int(a.rate * total_s)), "--keys", "1000", "--quiet"],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(a.work, "producer.log"), "w"))
    sampler = Sampler(a.bootstrap, a.topic, a.group, a.partitions)
    sampler.start()
    events = []
    for name, change in schedule:
        t = time.time()
        if change == "kill":
            victim = live.pop()
            victim.send_signal(signal.SIGKILL)
            victim.wait()
        elif change > 0:
            for _ in range(change):
                live.append(spawn())
        else:
            leaving = [live.pop() for _ in range(-change)]
            for w in leaving:
                w.send_signal(signal.SIGTERM)
            for w in leaving:
                w.wait(timeout=120)
        events.append({"event": name, "t": t, "workers": len(live)})
        time.sleep(step)
    producer.wait(timeout=300)
    # Let the last workers finish, then stop them.
    deadline = time.time() + 120
    while time.time() < deadline and sampler.samples:
        _, committed, high = sampler.samples[-1]
        if all(committed.get(p, -1) >= high.get(p, 0) for p in range(a.partitions)):
            break
        time.sleep(0.5)
    sampler.stop.set()
    sampler.join()
    for w in live:
        w.send_signal(signal.SIGTERM)
    for w in live:
        w.wait(timeout=120)
    per_event = stalls(sampler.samples, events, a.partitions)
    moves = moved(a.work, events, procs)
    dups, distinct = duplicates(a.work, events)
    gaps = sample_gaps(sampler.samples, events)
    t0 = events[0]["t"]
    out = {"protocol": a.protocol, "rate": a.rate, "records": distinct, "events": []}
    for e, s, m, d, g in zip(events, per_event, moves, dups, gaps):
        vals = list(s.values())
        kept = [s[p] for p in s if p not in m]
        out["events"].append({
            "event": e["event"], "t": round(e["t"] - t0, 1), "workers": e["workers"],
            "longest_stall_s": round(max(vals), 2), "median_stall_s": round(statistics.median(vals), 2),
            "longest_stall_moved_s": round(max([s[p] for p in m], default=0.0), 2),
            "longest_stall_kept_s": round(max(kept, default=0.0), 2),
            "moved": m, "duplicates": d, "max_sample_gap_s": round(g, 2),
        })
    print(json.dumps(out))


if __name__ == "__main__":
    main()
