#!/usr/bin/env bash
# bench/rebalance.sh - how long each scale step stops a partition, and the
# records it makes run twice, under both consumer group protocols in one run.
# See bench/README.md; `--help`.
set -euo pipefail

# shellcheck source=lib/common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib/common.sh"

PARTITIONS=${PARTITIONS:-8}
RATE=${RATE:-2000}
STEP_S=${STEP_S:-8}
PROTOCOLS=${PROTOCOLS:-classic consumer}
REB_ARGS=${REB_ARGS:---max-records 50 --concurrency 2 --commit-interval-ms 100}

usage() {
	cat <<EOF
Usage: bench/rebalance.sh [options]

For each group protocol, a fresh topic of PARTITIONS partitions receives RATE
records/s while workers of one group (exec handler noting each record's
handling time) join and leave every STEP_S seconds: 1 -> 2 -> 4 -> 8, then
8 -> 4 -> 1 with SIGTERM, then one more worker and a SIGKILL of it. A sampler
reads committed offsets and high watermarks every 50 ms. Per event: the
longest and median stall (time a partition's committed offset did not move
while it had lag), split into partitions that moved and those that stayed,
and the records handled twice. Writes bench/results/<date>-rebalance.md and
.json.

Options (environment variable in brackets, default after it):
  --partitions N   [PARTITIONS]  $PARTITIONS
  --rate N         [RATE]        $RATE records/s
  --step-s N       [STEP_S]      $STEP_S seconds between events
  --protocols LIST [PROTOCOLS]   "$PROTOCOLS"
  -h, --help
Other environment: MICROBATCH_BIN, REB_ARGS ("$REB_ARGS"), RESULTS_DIR.
EOF
}

while [[ $# -gt 0 ]]; do
	case $1 in
	--partitions) PARTITIONS=$2 && shift 2 ;;
	--rate) RATE=$2 && shift 2 ;;
	--step-s) STEP_S=$2 && shift 2 ;;
	--protocols) PROTOCOLS=$2 && shift 2 ;;
	-h | --help) usage && exit 0 ;;
	*) usage >&2 && die "unknown option $1" ;;
	esac
done
for v in PARTITIONS RATE STEP_S; do
	if ! is_uint "${!v}" || ((${!v} == 0)); then
		die "$v must be a positive integer, got '${!v}'"
	fi
done
read -r -a protocols <<<"$PROTOCOLS"
read -r -a reb_args <<<"$REB_ARGS"

need_tools jq python3
resolve_binary
ensure_kafka
trap stop_kafka_if_ours EXIT
ensure_venv

WORK=$BENCH_DIR/work/rebalance-$STAMP
mkdir -p "$WORK" "$RESULTS_DIR"
RUNS_FILE=$WORK/runs.jsonl
: >"$RUNS_FILE"
MACHINE=$(machine_json)

for protocol in "${protocols[@]}"; do
	case $protocol in classic | consumer) ;; *) die "--protocols: '$protocol' is not classic or consumer" ;; esac
	topic=bench-reb-$protocol-$STAMP
	create_topic "$topic" "$PARTITIONS"
	log "$protocol: $RATE records/s, a scale step every $STEP_S s"
	"$PY" "$BENCH_DIR/lib/rebalance.py" --bin "$MB" --bootstrap "$BOOTSTRAP" --topic "$topic" \
		--group "$topic" --protocol "$protocol" --partitions "$PARTITIONS" --rate "$RATE" \
		--step-s "$STEP_S" --work "$WORK/$protocol" -- "${reb_args[@]}" >>"$RUNS_FILE"
	tail -n1 "$RUNS_FILE" | jq -r '.events[] | "  \(.event): longest stall \(.longest_stall_s) s (moved \(.longest_stall_moved_s), kept \(.longest_stall_kept_s)), median \(.median_stall_s) s, \(.duplicates) twice"' >&2
	delete_topic "$topic"
done

base=$RESULTS_DIR/$DATE_UTC-rebalance
jq -s --argjson machine "$MACHINE" --arg args "$REB_ARGS" --arg date "$DATE_UTC" \
	'{date: $date, machine: $machine, worker_args: $args, runs: .}' "$RUNS_FILE" >"$base.json"
{
	echo "# Rebalance stalls, $DATE_UTC"
	echo
	echo "Records at $RATE/s through $PARTITIONS partitions; a scale step every $STEP_S s; workers: \`microbatch run --handler exec $REB_ARGS\`. Stall = the longest time a partition's committed offset did not move while it had lag, from a sample every 50 ms; *moved* = partitions assigned anew in that step."
	echo
	echo "| protocol | event | longest stall (s) | moved (s) | stayed (s) | median (s) | handled twice | longest gap between samples (s) |"
	echo "|---|---|---|---|---|---|---|---|"
	jq -r '.protocol as $p | .events[] | "| \($p) | \(.event) | \(.longest_stall_s) | \(.longest_stall_moved_s) | \(.longest_stall_kept_s) | \(.median_stall_s) | \(.duplicates) | \(.max_sample_gap_s) |"' "$RUNS_FILE"
} >"$base.md"
log "results: ${base#"$ROOT"/}.md and .json (logs in ${WORK#"$ROOT"/})"
