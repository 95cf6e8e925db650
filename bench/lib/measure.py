#!/usr/bin/env python3
"""Runs one contender of the throughput benchmark and prints one JSON line.

Used by bench/run.sh; standard library only. Every contender is started by
this script (so `t0` is taken just before the process is spawned), its CPU
time is sampled from /proc/<pid>/stat every --sample-ms, and its rusage
(CPU seconds, peak RSS) is collected with wait4() when it exits.

Times (wall clock, seconds since the epoch):
  t0          just before the process is spawned
  t_assigned  partitions assigned (microbatch: its "partitions assigned" log
              line; Java: start.time + rebalance.time.ms as the tool reports
              them; Python: the on_assign callback)
  t_ready     microbatch only: first 200 from /readyz (polled)
  t_first     first record done (microbatch: processed counter > 0, polled;
              Python: first consume() that returned records; Java: n/a)
  t_done      all records done (microbatch: processed counter >= records,
              polled; Java: end.time; Python: after the last commit)

CPU:
  cpu_done    user+system CPU seconds of the process up to t_done
              (microbatch: read from /proc at t_done; others: interpolated
              from the samples, or rusage if the process ended first)
  cpu_assigned  the same at t_assigned (interpolated from the samples), so
              cpu_done - cpu_assigned excludes start-up (JVM, interpreter)
  cpu_total   rusage of the whole process life, start-up and shutdown too
Memory: max_rss_kib from rusage (ru_maxrss), the peak resident set size.
"""

import argparse
import datetime as dt
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import passthrough

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid):
    """utime + stime of a process (all its threads), seconds; None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode()
    except OSError:
        return None
    # comm may contain spaces; fields after the closing parenthesis.
    rest = data[data.rindex(")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def proc_status(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Sampler(threading.Thread):
    """Samples a process's CPU seconds every `interval` s until it ends."""

    def __init__(self, pid, interval):
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples = []  # (wall time, cpu seconds)
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.is_set():
            c = proc_cpu(self.pid)
            if c is None:
                break
            self.samples.append((time.time(), c))
            self.stopped.wait(self.interval)

    def cpu_at(self, t):
        """CPU seconds at wall time t, interpolated; None if not covered."""
        s = self.samples
        if not s or t is None:
            return None
        if t <= s[0][0]:
            return s[0][1]
        for (t1, c1), (t2, c2) in zip(s, s[1:]):
            if t1 <= t <= t2:
                return c1 + (c2 - c1) * (t - t1) / max(t2 - t1, 1e-9)
        return None


def wait_rusage(proc, timeout):
    """wait4() the process; returns (exit status, rusage, wall time it ended)."""
    deadline = time.time() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage, time.time()
        if time.time() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage, time.time()
        time.sleep(0.01)


def total_lag(mb_bin, topic, group, bootstrap, share=False):
    """Records left: a consumer group's lag, or a share group's backlog."""
    flag, key = ("--share-group", "total_backlog") if share else ("--group", "total_lag")
    try:
        out = subprocess.run(
            [mb_bin, "lag", "--bootstrap-servers", bootstrap, "--topic", topic, flag, group, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        return json.loads(out)[key]
    except (subprocess.SubprocessError, ValueError, KeyError):
        return None


def parse_log_time(line):
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z", line)
    if not m:
        return None
    stamp = m.group(1)
    if "." in stamp:  # fromisoformat takes at most 6 fractional digits
        head, frac = stamp.split(".")
        stamp = f"{head}.{frac[:6]}"
    return dt.datetime.fromisoformat(stamp).replace(tzinfo=dt.timezone.utc).timestamp()


class Http:
    """A keep-alive HTTP client for the worker's port."""

    def __init__(self, addr):
        host, port = addr.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.conn = None

    def get(self, path):
        for _ in range(2):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
                self.conn.request("GET", path)
                r = self.conn.getresponse()
                return r.status, r.read().decode()
            except (OSError, http.client.HTTPException):
                self.conn = None
        return None, ""


# A worker log line that means the broker went away during the run.
BROKER_DOWN = "Connect to ipv4#"

PROCESSED = re.compile(r"^microbatch_records_processed_total (\d+)", re.M)


def run_microbatch(a):
    log_path = a.log
    cmd = [
        a.bin, "run",
        "--bootstrap-servers", a.bootstrap,
        "--topic", a.topic,
        "--share-group" if a.share else "--group", a.group,
        "--http-port", "0",
        "--http-host", "127.0.0.1",
    ] + a.extra
    with open(log_path, "wb") as log:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL)
    sampler = Sampler(proc.pid, a.sample_ms / 1000)
    sampler.start()
    addr = None
    deadline = time.time() + 30
    while addr is None and time.time() < deadline and proc.poll() is None:
        with open(log_path, errors="replace") as f:
            m = re.search(r"serving /healthz, /readyz and /metrics addr=([0-9.]+:\d+)", f.read())
        if m:
            addr = m.group(1)
        else:
            time.sleep(0.002)
    res = {"contender": "microbatch", "t0": t0, "cmd": " ".join(cmd[1:])}
    if addr is None:
        proc.kill()
        res["error"] = "the worker never logged its HTTP address"
        return res
    http_ = Http(addr)
    t_ready = t_first = t_done = None
    cpu_done = hwm_done = None
    deadline = time.time() + a.timeout
    interval = a.poll_ms / 1000
    processed = 0
    while time.time() < deadline and proc.poll() is None:
        if t_ready is None:
            st, _ = http_.get("/readyz")
            if st == 200:
                t_ready = time.time()
        st, body = http_.get("/metrics")
        now = time.time()
        if st == 200:
            m = PROCESSED.search(body)
            processed = int(m.group(1)) if m else 0
            if processed > 0 and t_first is None:
                t_first = now
            if processed >= a.records:
                t_done = now
                cpu_done = proc_cpu(proc.pid)
                hwm_done = proc_status(proc.pid, "VmHWM")
                break
        time.sleep(interval)
    if t_ready is None:
        # Not ready before the records were done: keep asking a little.
        end = time.time() + 5
        while t_ready is None and time.time() < end:
            if http_.get("/readyz")[0] == 200:
                t_ready = time.time()
            else:
                time.sleep(interval)
    t_term = time.time()
    proc.send_signal(signal.SIGTERM)
    code, usage, t_exit = wait_rusage(proc, 60)
    sampler.stopped.set()
    t_assigned = None
    broker_errors = 0
    with open(log_path, errors="replace") as f:
        for line in f:
            # A share group assigns no partitions: joined is when work can come.
            if t_assigned is None and ("partitions assigned" in line or "worker started (share group)" in line):
                t_assigned = parse_log_time(line)
            if BROKER_DOWN in line:
                broker_errors += 1
    res.update(
        exit_code=code,
        records_processed=processed,
        t_assigned=t_assigned,
        t_ready=t_ready,
        t_first=t_first,
        t_done=t_done,
        shutdown_s=t_exit - t_term,
        cpu_done=cpu_done,
        cpu_assigned=sampler.cpu_at(t_assigned),
        cpu_total=usage.ru_utime + usage.ru_stime,
        max_rss_kib=usage.ru_maxrss,
        vmhwm_done_kib=hwm_done,
        broker_errors=broker_errors,
    )
    if t_done is None:
        res["error"] = f"only {processed} of {a.records} records processed"
    elif broker_errors:
        res["error"] = f"the broker was unreachable during the run ({broker_errors} log lines); numbers invalid"
    return res


JAVA_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} [+-]\d{4}), (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} [+-]\d{4}), "
    r"([\d.]+), ([\d.]+), (\d+), ([\d.]+), (\d+), (\d+), ([\d.-]+|NaN|Infinity), ([\d.-]+|NaN|Infinity)",
    re.M,
)


def run_sampled(cmd, a, stderr):
    """Runs `cmd` to its end while sampling its CPU; returns
    (t0, exit code, rusage, sampler, stdout as text)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL)
    sampler = Sampler(proc.pid, a.sample_ms / 1000)
    sampler.start()
    out_chunks = []
    reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    code, usage, _ = wait_rusage(proc, a.timeout)
    reader.join(5)
    sampler.stopped.set()
    return t0, code, usage, sampler, b"".join(out_chunks).decode(errors="replace")


SHARE_JAVA_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} [+-]\d{4}), (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} [+-]\d{4}), "
    r"([\d.]+), ([\d.]+), ([\d.]+), (\d+), (\d+)$",
    re.M,
)


JAVA_DATE_FORMAT = "yyyy-MM-dd HH:mm:ss.SSS Z"


def java_time(s):
    return dt.datetime.strptime(s, "%Y-%m-%d %H:%M:%S.%f %z").timestamp()


def run_java_tool(a, tool, count_flag, line, read):
    """Runs one of Kafka's perf tools to its end; `read(match)` gives the
    records it consumed, its start-of-work and end times, and extra fields
    from its result line."""
    cmd = [
        a.kafka_local, "tool", tool,
        "--bootstrap-server", a.bootstrap,
        "--topic", a.topic,
        "--group", a.group,
        count_flag, str(a.records),
        "--timeout", "30000",
        "--date-format", JAVA_DATE_FORMAT,
    ] + a.extra
    t0, code, usage, sampler, out = run_sampled(cmd, a, subprocess.STDOUT)
    res = {"contender": "java", "t0": t0, "cmd": " ".join(cmd[1:]), "exit_code": code}
    m = line.search(out)
    if not m:
        res["error"] = f"no result line from kafka-{tool}: " + out[-500:]
        return res
    consumed, t_assigned, end, extra = read(m)
    res.update(
        records_processed=consumed,
        tool_line=m.group(0),
        t_assigned=t_assigned,
        t_ready=None,
        t_first=None,
        t_done=end,
        cpu_done=sampler.cpu_at(end),
        cpu_assigned=sampler.cpu_at(t_assigned),
        cpu_total=usage.ru_utime + usage.ru_stime,
        max_rss_kib=usage.ru_maxrss,
        **extra,
    )
    if res["cpu_done"] is None:
        res["cpu_done"] = res["cpu_total"]
    if consumed < a.records:
        res["error"] = f"only {consumed} of {a.records} records consumed"
    return res


def run_java_share(a):
    """Kafka's kafka-share-consumer-perf-test (implicit acknowledgement:
    each poll accepts the records of the one before)."""
    # A new share group starts at the log end unless told otherwise; not timed.
    subprocess.run(
        [a.kafka_local, "tool", "configs", "--bootstrap-server", a.bootstrap, "--alter",
         "--entity-type", "groups", "--entity-name", a.group,
         "--add-config", "share.auto.offset.reset=earliest"],
        check=True, capture_output=True, timeout=120,
    )

    def read(m):
        # The tool subscribes at its start.time; the broker assigns later.
        start, end = java_time(m.group(1)), java_time(m.group(2))
        return int(m.group(6)), start, end, {}

    return run_java_tool(a, "share-consumer-perf-test", "--num-records", SHARE_JAVA_LINE, read)


def run_java(a):
    if a.share:
        return run_java_share(a)

    def read(m):
        start, end = java_time(m.group(1)), java_time(m.group(2))
        rebalance_ms = int(m.group(7))
        return int(m.group(5)), start + rebalance_ms / 1000, end, {
            "tool_fetch_records_per_s": float(m.group(10))}

    return run_java_tool(a, "consumer-perf-test", "--messages", JAVA_LINE, read)


def run_python(a):
    cmd = [
        a.python, a.script,
        "--bootstrap-server", a.bootstrap,
        "--topic", a.topic,
        "--group", a.group,
        "--messages", str(a.records),
    ] + a.extra
    t0, code, usage, sampler, text = run_sampled(cmd, a, None)
    out = text.strip().splitlines()
    shown = ["bench/" + os.path.basename(a.script)] + cmd[2:]
    res = {"contender": "python", "t0": t0, "cmd": " ".join(shown), "exit_code": code}
    try:
        r = json.loads(out[-1])
    except (IndexError, ValueError):
        res["error"] = "no result line from python_consumer.py"
        return res
    res.update(
        records_processed=r["records"],
        commits=r["commits"],
        t_assigned=r["assigned"],
        t_ready=None,
        t_first=r["first"],
        t_done=r["last"],
        cpu_done=r["cpu_s"],
        cpu_assigned=sampler.cpu_at(r["assigned"]),
        cpu_total=usage.ru_utime + usage.ru_stime,
        max_rss_kib=usage.ru_maxrss,
    )
    if r["records"] < a.records:
        res["error"] = f"only {r['records']} of {a.records} records consumed"
    return res


def main():
    ap = argparse.ArgumentParser(
        description="Run one benchmark contender; print one JSON line.",
        epilog="Arguments after `--` are passed to the contender.",
    )
    ap.add_argument("contender", choices=["microbatch", "java", "python"])
    ap.add_argument("--label", help="name in the results (default: the contender)")
    ap.add_argument("--bin", required=True, help="the microbatch binary (also used for `lag`)")
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--topic", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--records", type=int, required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--run", type=int, default=1)
    ap.add_argument("--log", help="microbatch: stderr log file")
    ap.add_argument("--kafka-local", help="java: path of scripts/kafka-local.sh")
    ap.add_argument("--python", help="python: interpreter with confluent-kafka")
    ap.add_argument("--script", help="python: path of python_consumer.py")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--poll-ms", type=float, default=20, help="microbatch: /metrics poll interval")
    ap.add_argument("--sample-ms", type=float, default=20, help="CPU sample interval")
    ap.add_argument("--share", action="store_true",
                    help="a share group: microbatch run --share-group, Java's kafka-share-consumer-perf-test")
    ap.add_argument("--group-config", action="append", default=[], metavar="NAME=VALUE",
                    help="set on the (share) group before the run, untimed; needs --kafka-local")
    a, extra = passthrough.parse(ap)
    a.extra = extra  # arguments after `--` go to the contender
    runner = {"microbatch": run_microbatch, "java": run_java, "python": run_python}[a.contender]
    with open("/proc/loadavg") as f:
        load_before = " ".join(f.read().split()[:3])
    if a.group_config:
        if not a.kafka_local:
            ap.error("--group-config needs --kafka-local")
        try:
            configured = subprocess.run(
                [a.kafka_local, "tool", "configs", "--bootstrap-server", a.bootstrap, "--alter",
                 "--entity-type", "groups", "--entity-name", a.group,
                 "--add-config", ",".join(a.group_config)],
                capture_output=True, text=True, timeout=120,
            )
            failed = configured.stderr.strip()[-500:] if configured.returncode != 0 else None
        except (OSError, subprocess.TimeoutExpired) as e:
            failed = str(e)
        if failed is not None:
            # A line of its own, so this run's figures are never another's.
            print(json.dumps({"contender": a.contender, "label": a.label or a.contender, "run": a.run,
                              "t0": time.time(), "records": a.records, "size": a.size, "topic": a.topic,
                              "group": a.group, "error": f"setting {a.group_config}: {failed}"}),
                  flush=True)
            return 1
    res = runner(a)
    res["group_config"] = a.group_config
    res["loadavg_before"] = load_before
    res.update(label=a.label or a.contender, run=a.run, records=a.records, size=a.size, topic=a.topic, group=a.group)
    if "error" not in res or res.get("t_done"):
        res["lag_after"] = total_lag(a.bin, a.topic, a.group, a.bootstrap, a.share)
    print(json.dumps(res), flush=True)
    return 0 if "error" not in res else 1


if __name__ == "__main__":
    sys.exit(main())
