#!/usr/bin/env bash
# bench/latency.sh - end-to-end latency of one `microbatch run` worker at a
# fixed produce rate: record timestamp -> handler completion, p50/p99/max, for
# several --max-wait-ms values. See bench/README.md; `bench/latency.sh --help`.
set -euo pipefail

# shellcheck source=lib/common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib/common.sh"

RATE=${RATE:-20000}
SECONDS_=${DURATION:-15}
SIZE=${SIZE:-100}
KEYS=${KEYS:-1000}
PARTITIONS=${PARTITIONS:-8}
MAX_WAITS=${MAX_WAITS:-5 500}
METHODS=${METHODS:-exec audit}
LAT_ARGS=${LAT_ARGS:---max-records 500}
SKIP_S=${SKIP_S:-1}

usage() {
	cat <<EOF
Usage: bench/latency.sh [options]

For each --max-wait-ms value and method: a fresh topic, one worker
(\`microbatch run $LAT_ARGS --max-wait-ms N\`), a warm-up of 2000
records, then \`microbatch produce --rate RATE\` for DURATION seconds; the
latency of each record is the time from its timestamp (set by the producer)
to the end of its handling. The producer runs SKIP_S ($SKIP_S) seconds
longer and its first SKIP_S seconds are not measured (a producer's first
records are sometimes late at any consumer). Methods:
  exec   --handler exec running bench/lib/latency_handler.py (Python), which
         notes now - timestamp_ms per record (includes the exec hop)
  audit  --handler simulate --process-time-ms 0 --audit-log FILE, with FILE
         tailed every millisecond (no handler overhead, ~1 ms polling error)
Writes bench/results/<date>-latency.md and .json.

Options (environment variable in brackets, default after it):
  --rate N          [RATE]       $RATE records/s
  --duration S      [DURATION]   $SECONDS_ seconds
  --size BYTES      [SIZE]       $SIZE
  --keys N          [KEYS]       $KEYS
  --partitions N    [PARTITIONS] $PARTITIONS
  --max-waits LIST  [MAX_WAITS]  "$MAX_WAITS"
  --methods LIST    [METHODS]    "$METHODS"
  -h, --help
Other environment: MICROBATCH_BIN, BENCH_COMMIT, LAT_ARGS ("$LAT_ARGS"),
SKIP_S ($SKIP_S), RESULTS_DIR.
EOF
}

while [[ $# -gt 0 ]]; do
	case $1 in
	--rate) RATE=$2 && shift 2 ;;
	--duration) SECONDS_=$2 && shift 2 ;;
	--size) SIZE=$2 && shift 2 ;;
	--keys) KEYS=$2 && shift 2 ;;
	--partitions) PARTITIONS=$2 && shift 2 ;;
	--max-waits) MAX_WAITS=$2 && shift 2 ;;
	--methods) METHODS=$2 && shift 2 ;;
	-h | --help) usage && exit 0 ;;
	*) usage >&2 && die "unknown option $1" ;;
	esac
done
is_uint "$SKIP_S" || die "SKIP_S must be a whole number of seconds"
for v in RATE SECONDS_ SIZE PARTITIONS; do
	if ! is_uint "${!v}" || ((${!v} == 0)); then
		die "${v%_} must be a positive integer, got '${!v}'"
	fi
done
is_uint "$KEYS" || die "KEYS must be a non-negative integer"
read -r -a max_waits <<<"$MAX_WAITS"
read -r -a methods <<<"$METHODS"
read -r -a lat_args <<<"$LAT_ARGS"

need_tools jq python3
resolve_binary
ensure_kafka
trap stop_kafka_if_ours EXIT
ensure_venv

WORK=$BENCH_DIR/work/latency-$STAMP
mkdir -p "$WORK" "$RESULTS_DIR"
RUNS_FILE=$WORK/runs.jsonl
: >"$RUNS_FILE"
MACHINE=$(machine_json)
log "machine: $(jq -c . <<<"$MACHINE")"

for method in "${methods[@]}"; do
	for wait_ms in "${max_waits[@]}"; do
		is_uint "$wait_ms" || die "--max-waits: '$wait_ms' is not a number"
		topic=bench-lat-$method-w$wait_ms-$STAMP
		create_topic "$topic" "$PARTITIONS"
		log "$method, --max-wait-ms $wait_ms: $RATE records/s for $SECONDS_ s"
		if ! "$PY" "$BENCH_DIR/lib/latency.py" --bin "$MB" --bootstrap "$BOOTSTRAP" \
			--topic "$topic" --group "$topic" --partitions "$PARTITIONS" --method "$method" \
			--max-wait-ms "$wait_ms" --rate "$RATE" --seconds "$SECONDS_" --size "$SIZE" \
			--keys "$KEYS" --work "$WORK/$method-w$wait_ms" --python "$PY" --skip-s "$SKIP_S" \
			-- "${lat_args[@]}" >>"$RUNS_FILE"; then
			log "warning: this setting reported an error or lost records (see ${RUNS_FILE#"$ROOT"/})"
		fi
		tail -n1 "$RUNS_FILE" | jq -r '"  -> p50 \(.p50) ms, p99 \(.p99) ms, max \(.max) ms; \(.measured) records measured, \(.missing) missing, mean batch \(.mean_batch)"' >&2 || true
		delete_topic "$topic"
	done
done

base=$RESULTS_DIR/$DATE_UTC-latency
params=$(jq -n --argjson rate "$RATE" --argjson seconds "$SECONDS_" --argjson size "$SIZE" \
	--argjson keys "$KEYS" --argjson partitions "$PARTITIONS" --arg mb_args "$LAT_ARGS" \
	--argjson records "$((RATE * SECONDS_))" --arg loadavg_end "$(cut -d' ' -f1-3 /proc/loadavg)" \
	--argjson skip_s "$SKIP_S" \
	'{rate: $rate, seconds: $seconds, skip_s: $skip_s, records: $records, size: $size, keys: $keys,
	  partitions: $partitions, mb_args: $mb_args, loadavg_at_end: $loadavg_end}')
"$PY" "$BENCH_DIR/lib/report.py" latency --runs "$RUNS_FILE" --machine "$MACHINE" \
	--params "$params" --date "$DATE_UTC" --md "$base.md" --json "$base.json"
log "results: ${base#"$ROOT"/}.md and .json (logs in ${WORK#"$ROOT"/})"
