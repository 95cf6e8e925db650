#!/usr/bin/env bash
# bench/ordering.sh - issue 4: the replaced system's scenario (8 partitions,
# batches of 10, a fixed processing time per record), time until lag 0 with
# --ordering partition versus --ordering key, on one worker and on several
# workers of one group started together. See bench/README.md; `--help`.
set -euo pipefail

# shellcheck source=lib/common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib/common.sh"

RECORDS=${RECORDS:-20000}
PARTITIONS=${PARTITIONS:-8}
KEYS=${KEYS:-1000}
PROCESS_MS=${PROCESS_MS:-5}
BATCH=${BATCH:-10}
WORKER_COUNTS=${WORKER_COUNTS:-1 3}
SCENARIOS=${SCENARIOS:-partition:8 key:24}
ORD_ARGS=${ORD_ARGS:---commit-interval-ms 100}

usage() {
	cat <<EOF
Usage: bench/ordering.sh [options]

Produces a backlog of RECORDS records ($KEYS keys) to a fresh topic of
PARTITIONS partitions, then for each scenario ORDERING:CONCURRENCY and each
worker count starts that many workers in a fresh group at once:
  microbatch run --handler simulate --process-time-ms PROCESS_MS
                 --max-records BATCH --ordering O --concurrency C $ORD_ARGS
and measures the time until all records are processed and until lag is 0.
Writes bench/results/<date>-ordering.md and .json.

Options (environment variable in brackets, default after it):
  --records N        [RECORDS]       $RECORDS
  --partitions N     [PARTITIONS]    $PARTITIONS
  --keys N           [KEYS]          $KEYS
  --process-ms N     [PROCESS_MS]    $PROCESS_MS per record
  --batch N          [BATCH]         $BATCH records per batch (--max-records)
  --workers LIST     [WORKER_COUNTS] "$WORKER_COUNTS"
  --scenarios LIST   [SCENARIOS]     "$SCENARIOS"
  -h, --help
Other environment: MICROBATCH_BIN, BENCH_COMMIT, ORD_ARGS ("$ORD_ARGS"), RESULTS_DIR.
EOF
}

while [[ $# -gt 0 ]]; do
	case $1 in
	--records) RECORDS=$2 && shift 2 ;;
	--partitions) PARTITIONS=$2 && shift 2 ;;
	--keys) KEYS=$2 && shift 2 ;;
	--process-ms) PROCESS_MS=$2 && shift 2 ;;
	--batch) BATCH=$2 && shift 2 ;;
	--workers) WORKER_COUNTS=$2 && shift 2 ;;
	--scenarios) SCENARIOS=$2 && shift 2 ;;
	-h | --help) usage && exit 0 ;;
	*) usage >&2 && die "unknown option $1" ;;
	esac
done
for v in RECORDS PARTITIONS BATCH; do
	if ! is_uint "${!v}" || ((${!v} == 0)); then
		die "$v must be a positive integer, got '${!v}'"
	fi
done
is_uint "$PROCESS_MS" || die "PROCESS_MS must be a non-negative integer"
is_uint "$KEYS" || die "KEYS must be a non-negative integer"
read -r -a worker_counts <<<"$WORKER_COUNTS"
read -r -a scenarios <<<"$SCENARIOS"
read -r -a ord_args <<<"$ORD_ARGS"

need_tools jq python3
resolve_binary
ensure_kafka
trap stop_kafka_if_ours EXIT
ensure_venv

WORK=$BENCH_DIR/work/ordering-$STAMP
mkdir -p "$WORK" "$RESULTS_DIR"
RUNS_FILE=$WORK/runs.jsonl
: >"$RUNS_FILE"
MACHINE=$(machine_json)
log "machine: $(jq -c . <<<"$MACHINE")"

TOPIC=bench-ord-$STAMP
create_topic "$TOPIC" "$PARTITIONS"
log "producing a backlog of $RECORDS records to $TOPIC"
produce "$TOPIC" "$RECORDS" 100 "$KEYS" >&2

for workers in "${worker_counts[@]}"; do
	if ! is_uint "$workers" || ((workers == 0)); then
		die "--workers: '$workers' is not a positive number"
	fi
	for s in "${scenarios[@]}"; do
		ordering=${s%%:*}
		concurrency=${s##*:}
		name=$ordering-c$concurrency
		log "$name on $workers worker(s)"
		if ! "$PY" "$BENCH_DIR/lib/ordering.py" --bin "$MB" --bootstrap "$BOOTSTRAP" \
			--topic "$TOPIC" --group "bench-ord-$name-w$workers-$STAMP" --records "$RECORDS" \
			--workers "$workers" --scenario "--ordering $ordering --concurrency $concurrency" \
			--work "$WORK/$name-w$workers" -- --handler simulate --process-time-ms "$PROCESS_MS" \
			--max-records "$BATCH" --ordering "$ordering" --concurrency "$concurrency" \
			"${ord_args[@]}" >>"$RUNS_FILE"; then
			log "warning: this scenario reported an error (see ${RUNS_FILE#"$ROOT"/})"
		fi
		tail -n1 "$RUNS_FILE" | jq -r '"  -> lag 0 after \((.t_lag0 // 0) - .t0) s; processed \(.processed), assign rebalances \(.rebalances)"' >&2 || true
	done
done

base=$RESULTS_DIR/$DATE_UTC-ordering
params=$(jq -n --argjson records "$RECORDS" --argjson partitions "$PARTITIONS" --argjson keys "$KEYS" \
	--arg mb_args "--handler simulate --process-time-ms $PROCESS_MS --max-records $BATCH $ORD_ARGS" \
	--arg loadavg_end "$(cut -d' ' -f1-3 /proc/loadavg)" \
	'{records: $records, partitions: $partitions, keys: $keys, mb_args: $mb_args, loadavg_at_end: $loadavg_end}')
"$PY" "$BENCH_DIR/lib/report.py" ordering --runs "$RUNS_FILE" --machine "$MACHINE" \
	--params "$params" --date "$DATE_UTC" --md "$base.md" --json "$base.json"
delete_topic "$TOPIC"
log "results: ${base#"$ROOT"/}.md and .json (logs in ${WORK#"$ROOT"/})"
