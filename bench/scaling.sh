#!/usr/bin/env bash
# Issue 5's benchmark: the same burst drained under the `keda` and `rate`
# policies with the same max replicas, on real Kafka, through `microbatch
# demo --compare` (one supervisor per policy, fresh topic and group each).
# Prints time to drain and replica-seconds per policy; writes
# bench/results/<stamp>-scaling.{json,md}.
#
# Environment: BURST (records, default 30000), MAX_REPLICAS (default 6),
# PROCESS_TIME_MS (default 5), CONCURRENCY (slots per worker, default 4),
# LAG_THRESHOLD (keda, default 3 as in the replaced system), MICROBATCH_BIN.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BURST=${BURST:-30000}
MAX_REPLICAS=${MAX_REPLICAS:-6}
PROCESS_TIME_MS=${PROCESS_TIME_MS:-5}
CONCURRENCY=${CONCURRENCY:-4}
LAG_THRESHOLD=${LAG_THRESHOLD:-3}
BIN=${MICROBATCH_BIN:-target/release/microbatch}

if [ ! -x "$BIN" ]; then
	cargo build --release -p microbatch
fi
scripts/kafka-local.sh start
mkdir -p bench/results
stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
json=bench/results/$stamp-scaling.json
html=bench/results/$stamp-scaling.html

"$BIN" demo --compare --scenario fanout --bootstrap-servers 127.0.0.1:9092 \
	--burst "$BURST" --max-replicas "$MAX_REPLICAS" --process-time-ms "$PROCESS_TIME_MS" \
	--concurrency "$CONCURRENCY" --lag-threshold "$LAG_THRESHOLD" \
	--report-json "$json" --report-html "$html" >/dev/null

python3 - "$json" "$stamp" <<'PY' | tee "bench/results/$stamp-scaling.md"
import json, sys
report = json.load(open(sys.argv[1]))
print(f"# Scaling benchmark {sys.argv[2]}\n")
print("| policy | produced | time to drain (s) | peak replicas | replica-seconds | lost |")
print("|---|---|---|---|---|---|")
for run in report["runs"]:
    s = run["scenarios"][0]
    drain = f"{s['drain_seconds']:.1f}" if s["drain_seconds"] is not None else "not drained"
    print(f"| {run['policy']} | {run['produced']} | {drain} | {run['peak_replicas']} | {run['replica_seconds']:.0f} | {run['lost']} |")
PY
