#!/usr/bin/env python3
"""Turns the raw results of a bench/*.sh run into a table (stdout), a
Markdown file and a JSON file. Standard library only."""

import argparse
import json
import statistics
import sys

ORDER = ["microbatch", "microbatch-tuned", "microbatch-base", "java", "python"]
GOAL_RSS_MIB = 64
GOAL_READY_S = 1.0
GOAL_PYTHON_RATIO = 20
# Share groups (issue 26): at most half Java's share consumer's CPU per record.
GOAL_SHARE_CPU_RATIO = 0.5


def stat(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def fmt(s, digits=0, scale=1.0):
    if s is None:
        return "n/a"
    f = f"{{:,.{digits}f}}"
    med, lo, hi = (s[k] * scale for k in ("median", "min", "max"))
    if s["n"] == 1:
        return f.format(med)
    return f"{f.format(med)} ({f.format(lo)}–{f.format(hi)})"


def diff(a, b):
    return None if a is None or b is None else a - b


def per_run(r):
    """Derived numbers of one run."""
    n, size = r["records"], r["size"]
    ok = "error" not in r and r.get("t_done") and r.get("t_assigned")
    span = (r["t_done"] - r["t_assigned"]) if ok else None
    wall = (r["t_done"] - r["t0"]) if ok else None
    cpu_done, cpu_assigned = r.get("cpu_done"), r.get("cpu_assigned")
    return {
        "records_per_s": n / span if span else None,
        "mb_per_s": n * size / 1e6 / span if span else None,
        "records_per_s_wall": n / wall if wall else None,
        "cpu_s_per_million": cpu_done / n * 1e6 if ok and cpu_done is not None else None,
        "cpu_s_per_million_after_assign": (cpu_done - cpu_assigned) / n * 1e6
        if ok and cpu_done is not None and cpu_assigned is not None
        else None,
        "peak_rss_mib": r["max_rss_kib"] / 1024 if r.get("max_rss_kib") else None,
        "start_to_assigned_s": diff(r.get("t_assigned"), r["t0"]),
        "start_to_first_record_s": diff(r.get("t_first"), r["t0"]),
        "start_to_readyz_s": diff(r.get("t_ready"), r["t0"]),
        "shutdown_s": r.get("shutdown_s"),
        "lag_after": r.get("lag_after"),
        "error": r.get("error"),
    }


METRICS = [
    ("records_per_s", "records/s", 0, 1.0),
    ("mb_per_s", "MB/s", 1, 1.0),
    ("records_per_s_wall", "records/s incl. start-up", 0, 1.0),
    ("cpu_s_per_million", "CPU s / 1M records", 2, 1.0),
    ("cpu_s_per_million_after_assign", "CPU s / 1M after assignment", 2, 1.0),
    ("peak_rss_mib", "peak RSS MiB", 1, 1.0),
    ("start_to_assigned_s", "start → assigned s", 3, 1.0),
    ("start_to_first_record_s", "start → first record s", 3, 1.0),
    ("start_to_readyz_s", "start → /readyz 200 s", 3, 1.0),
    ("shutdown_s", "SIGTERM → exit s", 3, 1.0),
]


def md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def text_table(header, rows):
    cols = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    lines = []
    for k, r in enumerate(cols):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def throughput(a):
    runs = [json.loads(line) for line in open(a.runs) if line.strip()]
    machine = json.loads(a.machine)
    params = json.loads(a.params)
    share = params.get("share", False)
    labels = [c for c in ORDER if any(r["label"] == c for r in runs)]
    derived = {c: [per_run(r) for r in runs if r["label"] == c] for c in labels}
    summary = {c: {k: stat([d[k] for d in derived[c]]) for k, *_ in METRICS} for c in labels}
    for c in labels:
        summary[c]["errors"] = [d["error"] for d in derived[c] if d["error"]]
        summary[c]["lag_after"] = [d["lag_after"] for d in derived[c]]

    def med(c, k):
        s = summary.get(c, {}).get(k)
        return s["median"] if s else None

    ratios = {}
    for mb in [c for c in ("microbatch", "microbatch-tuned") if c in summary]:
        for other in [c for c in ("microbatch-base", "java", "python") if c in summary]:
            ratios[f"{mb}/{other}"] = {
                k: ratio(med(mb, k), med(other, k))
                for k in ("records_per_s", "cpu_s_per_million", "cpu_s_per_million_after_assign", "peak_rss_mib")
            }

    header = ["metric (median, min–max)"] + labels
    rows = [[name] + [fmt(summary[c][k], digits) for c in labels] for k, name, digits, _ in METRICS]
    rows.append(["records left (lag) after"] + [",".join(str(x) for x in summary[c]["lag_after"]) for c in labels])
    rheader = ["ratio of medians", "records/s", "CPU/1M", "CPU/1M after assign", "peak RSS"]
    rrows = [
        [name] + [("n/a" if v[k] is None else f"{v[k]:.2f}×") for k in
                  ("records_per_s", "cpu_s_per_million", "cpu_s_per_million_after_assign", "peak_rss_mib")]
        for name, v in ratios.items()
    ]

    goals = []
    for mb in [c for c in ("microbatch", "microbatch-tuned") if c in summary]:
        def check(name, ok, detail):
            goals.append([mb, name, "n/a" if ok is None else ("met" if ok else "MISSED"), detail])

        r_java = ratios.get(f"{mb}/java", {})
        r_py = ratios.get(f"{mb}/python", {})
        v = r_java.get("records_per_s")
        check("throughput ≥ Java perf test", None if v is None else v >= 1, "n/a" if v is None else f"{v:.2f}× Java")
        if share:
            v = r_java.get("cpu_s_per_million")
            check(f"CPU / 1M records ≤ {GOAL_SHARE_CPU_RATIO}× Java", None if v is None else v <= GOAL_SHARE_CPU_RATIO,
                  "n/a" if v is None else f"{v:.2f}× Java")
        v = r_py.get("records_per_s")
        if "python" in summary:
            check(f"throughput ≥ {GOAL_PYTHON_RATIO}× Python", None if v is None else v >= GOAL_PYTHON_RATIO,
                  "n/a" if v is None else f"{v:.1f}× Python")
        for other, rr in (("Java", r_java), ("Python", r_py)):
            if other.lower() not in summary:
                continue
            v = rr.get("cpu_s_per_million")
            w = rr.get("cpu_s_per_million_after_assign")
            check(f"CPU / 1M records < {other}", None if v is None else v < 1,
                  "n/a" if v is None else f"{v:.2f}× {other} (after assignment: {w:.2f}×)" if w else f"{v:.2f}× {other}")
        v = med(mb, "peak_rss_mib")
        check(f"peak RSS < {GOAL_RSS_MIB} MiB", None if v is None else v < GOAL_RSS_MIB, "n/a" if v is None else f"{v:.1f} MiB")
        v = med(mb, "start_to_readyz_s")
        w = med(mb, "start_to_first_record_s")
        check(f"ready < {GOAL_READY_S:g} s (/readyz)", None if v is None else v < GOAL_READY_S,
              "n/a" if v is None else f"/readyz {v:.3f} s; first record {w:.3f} s" if w else f"{v:.3f} s")

    title = f"{'Share-group throughput' if share else 'Throughput'} benchmark, {a.date}"
    text = [title, "", text_table(header, rows), "", text_table(rheader, rrows), "", text_table(
        ["contender", "goal", "verdict", "measured"], goals)]
    print("\n".join(text))

    md = [f"# {title}", ""]
    md.append(
        f"{params['records']:,} records of {params['size']} bytes ({params['keys']} keys) on "
        f"{params['partitions']} partitions, {params['runs']} run(s) per contender, rotating order, "
        f"fresh {'share ' if share else ''}group each run"
        + (
            f" (its share.heartbeat.interval.ms set to {params['share_heartbeat_ms']} first, untimed)"
            if params.get("share_heartbeat_ms")
            else ""
        )
        + "; local Kafka broker on 127.0.0.1."
    )
    md.append("")
    md.append(
        f"Machine: {machine['cpu_model']}, {machine['nproc']} CPUs, {machine['mem_gib']} GiB; kernel "
        f"{machine['kernel']}; {machine['microbatch_version']} (commit {machine['git_commit']}); load average "
        f"{machine['loadavg_at_start']} at start, {params['loadavg_at_end']} at end (the broker and other "
        "work share the CPUs)."
    )
    md.append("")
    share_flag = " --share-group G" if share else ""
    md.append(f"- microbatch: `microbatch run{share_flag} {params['microbatch_args']}` (defaults otherwise)")
    if "microbatch-tuned" in labels:
        md.append(f"- microbatch-tuned: the same plus `{params['microbatch_tuned_args']}`")
    if "microbatch-base" in labels:
        md.append(
            f"- microbatch-base: the same flags, another build (commit {params.get('base_commit') or 'not named'})"
        )
    if share:
        md.append(
            "- java: `kafka-share-consumer-perf-test` (Kafka 4.3.2, one KafkaShareConsumer, implicit "
            "acknowledgement: each poll accepts the records of the one before; the group's "
            "share.auto.offset.reset set to earliest first, untimed)"
        )
    else:
        md.append("- java: `kafka-consumer-perf-test` (Kafka 4.3.2, default consumer settings)")
    if "python" in labels:
        md.append(
            f"- python: `bench/python_consumer.py --batch-size {params['python_batch_size']}` "
            "(confluent-kafka, commit(asynchronous=False) after each batch)"
        )
    md.append("")
    md.append(md_table(header, rows))
    md.append("")
    md.append(md_table(rheader, rrows))
    md.append("")
    md.append("## Goals")
    md.append("")
    md.append(md_table(["contender", "goal", "verdict", "measured"], goals))
    md.append("")
    md.append("## Runs")
    md.append("")
    rh = ["contender", "run", "records/s", "CPU s", "peak RSS MiB", "load before", "note"]
    rr = []
    for r in runs:
        d = per_run(r)
        rr.append([
            r["label"], r["run"],
            "n/a" if d["records_per_s"] is None else f"{d['records_per_s']:,.0f}",
            "n/a" if r.get("cpu_done") is None else f"{r['cpu_done']:.2f}",
            "n/a" if d["peak_rss_mib"] is None else f"{d['peak_rss_mib']:.1f}",
            r.get("loadavg_before", ""),
            r.get("error", "") or (f"broker unreachable ({r['broker_errors']} log lines)" if r.get("broker_errors") else ""),
        ])
    md.append(md_table(rh, rr))
    md.append("")
    with open(a.md, "w") as f:
        f.write("\n".join(md))
    with open(a.json, "w") as f:
        json.dump({"date": a.date, "machine": machine, "params": params, "summary": summary,
                   "ratios": ratios, "goals": goals, "runs": runs}, f, indent=1)


def pct(values, p):
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def write_report(a, md, machine, params, header, rows, rows_in):
    """Appends the machine line and the table to `md`; writes it and the JSON."""
    md.append("")
    md.append(
        f"Machine: {machine['cpu_model']}, {machine['nproc']} CPUs, {machine['mem_gib']} GiB; "
        f"{machine['microbatch_version']} (commit {machine['git_commit']}); load average "
        f"{machine['loadavg_at_start']} at start, {params['loadavg_at_end']} at end."
    )
    md.append("")
    md.append(md_table(header, rows))
    md.append("")
    with open(a.md, "w") as f:
        f.write("\n".join(md))
    with open(a.json, "w") as f:
        json.dump({"date": a.date, "machine": machine, "params": params, "results": rows_in}, f, indent=1)


def latency(a):
    """Reads the per-setting JSON lines written by bench/lib/latency.py."""
    rows_in = [json.loads(line) for line in open(a.runs) if line.strip()]
    machine = json.loads(a.machine)
    params = json.loads(a.params)
    header = ["method", "--max-wait-ms", "records", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms",
              "handler parse p50 ms", "batches", "mean batch", "worker CPU s", "missing", "note"]
    rows = []
    for r in rows_in:
        rows.append([r["method"], r["max_wait_ms"], f"{r['measured']:,}", *(f"{r[k]:.1f}" if r.get(k) is not None else "n/a"
                     for k in ("p50", "p90", "p99", "p999", "max")),
                     f"{r['handler_parse_p50_ms']:.2f}" if r.get("handler_parse_p50_ms") is not None else "n/a",
                     r.get("batches", "n/a"), f"{r['mean_batch']:.1f}" if r.get("mean_batch") else "n/a",
                     f"{r['worker_cpu_s']:.2f}" if r.get("worker_cpu_s") is not None else "n/a",
                     r.get("missing", "n/a"), r.get("error", "")])
    title = f"Latency benchmark, {a.date}"
    print(title)
    print()
    print(text_table(header, rows))
    md = [f"# {title}", ""]
    md.append(
        f"{params['rate']:,} records/s for {params['seconds']} s measured ({params['records']:,} records of "
        f"{params['size']} bytes, {params['keys']} keys, {params['partitions']} partitions; the producer's "
        f"first {params.get('skip_s', 0)} s before these are not measured), one worker: "
        f"`microbatch run {params['mb_args']} --max-wait-ms N`. Latency = the record's timestamp "
        "(CreateTime, set by `microbatch produce`, whose linger.ms is 5) to the end of its handling: "
        "method exec = `--handler exec` with bench/lib/latency_handler.py (Python) noting its clock "
        "after parsing the batch; method audit = `--handler simulate --process-time-ms 0 --audit-log` "
        "with the log tailed every 1 ms."
    )
    write_report(a, md, machine, params, header, rows, rows_in)


def ordering(a):
    rows_in = [json.loads(line) for line in open(a.runs) if line.strip()]
    machine = json.loads(a.machine)
    params = json.loads(a.params)
    header = ["scenario", "workers", "start → all processed s", "start → lag 0 s",
              "records/s (to lag 0)", "last worker assigned s", "rebalances", "processed (dups)", "note"]
    rows = []
    for r in rows_in:
        lag0 = r.get("t_lag0")
        rows.append([
            r["scenario"], r["workers"],
            "n/a" if r.get("t_processed") is None else f"{r['t_processed'] - r['t0']:.2f}",
            "n/a" if lag0 is None else f"{lag0 - r['t0']:.2f}",
            "n/a" if lag0 is None else f"{r['records'] / (lag0 - r['t0']):,.0f}",
            "n/a" if r.get("t_all_assigned") is None else f"{r['t_all_assigned'] - r['t0']:.2f}",
            r.get("rebalances", "n/a"),
            f"{r.get('processed', 0):,} ({r.get('processed', 0) - r['records']:,})",
            r.get("error", ""),
        ])
    title = f"Ordering benchmark (issue 4), {a.date}"
    print(title)
    print()
    print(text_table(header, rows))
    md = [f"# {title}", ""]
    md.append(
        f"{params['records']:,} records ({params['keys']} keys) on {params['partitions']} partitions, "
        f"backlog produced first; workers `microbatch run {params['mb_args']}` plus the scenario's "
        "ordering and concurrency; several workers share one group and are started together. "
        "Time is from starting the workers; lag 0 is read with `microbatch lag --json`."
    )
    write_report(a, md, machine, params, header, rows, rows_in)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("kind", choices=["throughput", "latency", "ordering"])
    ap.add_argument("--runs", required=True, help="JSON lines of raw results")
    ap.add_argument("--machine", required=True, help="machine description (JSON)")
    ap.add_argument("--params", required=True, help="benchmark parameters (JSON)")
    ap.add_argument("--date", required=True)
    ap.add_argument("--md", required=True)
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    {"throughput": throughput, "latency": latency, "ordering": ordering}[a.kind](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
