#!/usr/bin/env bash
# Scaling on real Kafka, three load shapes (positional arguments, default
# all three):
#   burst    issue 5's benchmark: the same burst drained under the `keda` and
#            `rate` policies with the same max replicas, through `microbatch
#            demo --compare` (one supervisor per policy, fresh topic and group
#            each): time to drain and replica-seconds per policy;
#   steady   `microbatch supervise` on 8 partitions while `produce --rate R`
#            runs for STEADY_SECONDS, for each R in STEADY_RATES: replicas
#            held, replica-seconds, the worst lag, the capacity the workers
#            report;
#   diurnal  the same with the rate following a sine (a day in
#            DIURNAL_SECONDS, in 12 steps) from 5% to 100% of DIURNAL_PEAK.
# Writes bench/results/<stamp>-scaling.{json,md} (burst) and
# bench/results/<stamp>-scaling-shapes.{md,jsonl} (steady, diurnal).
#
# Environment: BURST (records, default 30000), MAX_REPLICAS (default 6),
# PROCESS_TIME_MS (default 5), SHAPE_MAX_REPLICAS (default 8),
# SHAPE_PROCESS_TIME_MS (default 2), CONCURRENCY (slots per worker, default
# 4), LAG_THRESHOLD
# (keda, default 3 as in the replaced system), STEADY_RATES (default
# "1000 5000"), STEADY_SECONDS (default 300), DIURNAL_SECONDS (default 240),
# DIURNAL_PEAK (default 5000), SHAPE_POLICIES (default "rate keda"),
# MICROBATCH_BIN.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

BURST=${BURST:-30000}
MAX_REPLICAS=${MAX_REPLICAS:-6}
PROCESS_TIME_MS=${PROCESS_TIME_MS:-5}
CONCURRENCY=${CONCURRENCY:-4}
LAG_THRESHOLD=${LAG_THRESHOLD:-3}
BIN=${MICROBATCH_BIN:-target/release/microbatch}

SHAPES=("$@")
[ ${#SHAPES[@]} -gt 0 ] || SHAPES=(burst steady diurnal)
STEADY_RATES=${STEADY_RATES:-1000 5000}
STEADY_SECONDS=${STEADY_SECONDS:-300}
DIURNAL_SECONDS=${DIURNAL_SECONDS:-240}
DIURNAL_PEAK=${DIURNAL_PEAK:-5000}
SHAPE_POLICIES=${SHAPE_POLICIES:-rate keda}
SHAPE_MAX_REPLICAS=${SHAPE_MAX_REPLICAS:-8}
SHAPE_PROCESS_TIME_MS=${SHAPE_PROCESS_TIME_MS:-2}

if [ ! -x "$BIN" ]; then
	cargo build --release -p microbatch
fi
# A broker already listening (any checkout's) is used as it is.
if ! (: >/dev/tcp/127.0.0.1/9092) 2>/dev/null; then
	scripts/kafka-local.sh start
fi
mkdir -p bench/results
stamp=$(date -u +%Y-%m-%dT%H%M%SZ)
json=bench/results/$stamp-scaling.json
html=bench/results/$stamp-scaling.html
shapes_md=bench/results/$stamp-scaling-shapes.md
shapes_jsonl=bench/results/$stamp-scaling-shapes.jsonl

# One shape under one policy: supervise on a fresh 8-partition topic while
# the rates given (one per step of step_seconds) are produced in turn.
run_shape() { # name policy step_seconds rate...
	local name=$1 policy=$2 step=$3
	shift 3
	local topic group dir
	topic=16-scaling-$name-$policy-$$
	group=$topic-g
	dir=$(mktemp -d)
	"$BIN" topic create --bootstrap-servers 127.0.0.1:9092 --topic "$topic" --partitions 8 >&2
	"$BIN" supervise --bootstrap-servers 127.0.0.1:9092 --topic "$topic" --group "$group" \
		--policy "$policy" --lag-threshold "$LAG_THRESHOLD" --min 1 --max "$SHAPE_MAX_REPLICAS" \
		--polling-interval-ms 1000 --http-port 0 --timeline "$dir/timeline.jsonl" \
		--log-dir "$dir" -- --process-time-ms "$SHAPE_PROCESS_TIME_MS" \
		--concurrency "$CONCURRENCY" 2>"$dir/supervise.log" &
	local sup=$!
	local rate
	for rate in "$@"; do
		if [ "$rate" -gt 0 ]; then
			"$BIN" produce --bootstrap-servers 127.0.0.1:9092 --topic "$topic" \
				--count $((rate * step)) --rate "$rate" --keys 10000 --quiet
		else
			sleep "$step"
		fi
	done
	sleep 5
	kill -TERM "$sup"
	wait "$sup" || true
	python3 - "$dir/timeline.jsonl" "$name" "$policy" "$*" "$step" <<'PY' >>"$shapes_jsonl"
import json, sys
points = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
name, policy, rates, step = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
replica_seconds = sum(p["replicas"] for p in points)  # one point per second
settled = [p for p in points if p["t_ms"] >= 60_000]
caps = sorted(p["capacity_per_replica"] for p in points if p.get("capacity_per_replica"))
print(json.dumps({
    "shape": name, "policy": policy, "rates": rates, "step_seconds": step,
    "seconds": round(points[-1]["t_ms"] / 1000) if points else 0,
    "replica_seconds": replica_seconds,
    "peak_replicas": max((p["replicas"] for p in points), default=0),
    "most_after_60s": max((p["replicas"] for p in settled), default=0),
    "final_replicas": points[-1]["replicas"] if points else 0,
    "worst_lag": max((p["total_lag"] for p in points), default=0),
    "median_capacity_per_replica": caps[len(caps) // 2] if caps else None,
    "replicas_over_time": [p["replicas"] for p in points[::10]],
}))
PY
	"$BIN" topic delete --bootstrap-servers 127.0.0.1:9092 --topic "$topic" >&2 || true
	rm -rf "$dir"
}

run_shapes() {
	local policy rate steps=() i
	for policy in $SHAPE_POLICIES; do
		for shape in "${SHAPES[@]}"; do
			case $shape in
			steady)
				for rate in $STEADY_RATES; do
					run_shape "steady-$rate" "$policy" "$STEADY_SECONDS" "$rate"
				done
				;;
			diurnal)
				steps=()
				for i in $(seq 0 11); do
					steps+=("$(python3 -c "import math; print(round($DIURNAL_PEAK * (0.525 - 0.475 * math.cos(2 * math.pi * $i / 12))))")")
				done
				run_shape diurnal "$policy" $((DIURNAL_SECONDS / 12)) "${steps[@]}"
				;;
			esac
		done
	done
	python3 - "$shapes_jsonl" "$stamp" <<'PY' | tee "$shapes_md"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"# Scaling on load shapes {sys.argv[2]}\n")
print("| shape | policy | seconds | replica-seconds | peak replicas | most after 60 s | worst lag (records) | capacity per replica (median, reported) | replicas every 10 s |")
print("|---|---|---:|---:|---:|---:|---:|---:|---|")
for r in rows:
    cap = f"{r['median_capacity_per_replica']:.0f}/s" if r["median_capacity_per_replica"] else "-"
    print(f"| {r['shape']} ({r['rates']}/s) | {r['policy']} | {r['seconds']} | {r['replica_seconds']} | {r['peak_replicas']} | {r['most_after_60s']} | {r['worst_lag']} | {cap} | {' '.join(map(str, r['replicas_over_time']))} |")
PY
}

if [[ " ${SHAPES[*]} " != *" burst "* ]]; then
	run_shapes
	exit 0
fi

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

if [[ " ${SHAPES[*]} " == *" steady "* || " ${SHAPES[*]} " == *" diurnal "* ]]; then
	run_shapes
fi
