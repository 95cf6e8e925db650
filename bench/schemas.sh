#!/usr/bin/env bash
# bench/schemas.sh - the cost of decoding: Avro records (the schema
# registry's wire format) decoded by `microbatch run --value-format avro`
# and handed to a no-op handler, against a Python consumer that decodes
# each value with confluent-kafka's AvroDeserializer, and microbatch's raw
# path on the same records beside them; same broker, same run, rotating
# order, fresh groups. See bench/README.md; `bench/schemas.sh --help`.
set -euo pipefail

# shellcheck source=lib/common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib/common.sh"

RECORDS=${RECORDS:-500000}
PARTITIONS=${PARTITIONS:-8}
RUNS=${RUNS:-3}
BATCH_SIZE=${BATCH_SIZE:-500}
SCHEMA=${SCHEMA:-$BENCH_DIR/lib/order.avsc}
MB_ARGS=${MB_ARGS:---handler simulate --process-time-ms 0 --max-records 500 --commit-interval-ms 100}
REGISTRY_LOCAL=$ROOT/scripts/registry-local.sh

usage() {
	cat <<EOF
Usage: bench/schemas.sh [options]

Produces RECORDS Avro records of SCHEMA (microbatch produce --value-format
avro, registered in the local schema registry, scripts/registry-local.sh,
started if needed) to a fresh topic of PARTITIONS partitions, then reads
them RUNS times with each contender, rotating the order, each time with a
fresh consumer group, and writes bench/results/<date>-schemas.md and .json.

Contenders:
  microbatch-avro  microbatch run \$MB_ARGS --value-format avro
  microbatch-raw   microbatch run \$MB_ARGS (the same records, not decoded)
  python-avro      bench/python_consumer.py --avro-registry URL
                   (confluent-kafka, AvroDeserializer per value, BATCH_SIZE
                   per consume(), synchronous commit after each batch)

Options (environment variable in brackets, default after it):
  --records N       [RECORDS]     $RECORDS
  --partitions N    [PARTITIONS]  $PARTITIONS
  --runs N          [RUNS]        $RUNS
  --schema FILE     [SCHEMA]      ${SCHEMA#"$ROOT"/}
  -h, --help

Other environment: MICROBATCH_BIN, MB_ARGS, RESULTS_DIR, BENCH_STOP_KAFKA,
BENCH_KEEP_TOPICS (as bench/run.sh).
EOF
}

while [[ $# -gt 0 ]]; do
	case $1 in
	--records) RECORDS=$2 && shift 2 ;;
	--partitions) PARTITIONS=$2 && shift 2 ;;
	--runs) RUNS=$2 && shift 2 ;;
	--schema) SCHEMA=$2 && shift 2 ;;
	-h | --help) usage && exit 0 ;;
	*) usage >&2 && die "unknown option $1" ;;
	esac
done
for v in RECORDS PARTITIONS RUNS BATCH_SIZE; do
	if ! is_uint "${!v}" || ((${!v} == 0)); then
		die "$v must be a positive integer, got '${!v}'"
	fi
done
[[ -f $SCHEMA ]] || die "no schema file $SCHEMA"
read -r -a mb_args <<<"$MB_ARGS"

need_tools jq python3 curl
resolve_binary
ensure_kafka
REGISTRY_STARTED_HERE=0
cleanup() {
	if [[ $REGISTRY_STARTED_HERE == 1 ]]; then "$REGISTRY_LOCAL" stop || true; fi
	stop_kafka_if_ours
}
trap cleanup EXIT
if ! "$REGISTRY_LOCAL" status >/dev/null 2>&1; then
	log "starting the schema registry (scripts/registry-local.sh start)"
	"$REGISTRY_LOCAL" start >/dev/null || die "could not start the schema registry"
	REGISTRY_STARTED_HERE=1
fi
REGISTRY=$("$REGISTRY_LOCAL" url)
ensure_venv

WORK=$BENCH_DIR/work/schemas-$STAMP
mkdir -p "$WORK" "$RESULTS_DIR"
RUNS_FILE=$WORK/runs.jsonl
: >"$RUNS_FILE"
MACHINE=$(machine_json)
TOPIC=bench-avro-$STAMP
create_topic "$TOPIC" "$PARTITIONS"
log "producing $RECORDS Avro records of ${SCHEMA#"$ROOT"/} to $TOPIC"
"$MB" produce --bootstrap-servers "$BOOTSTRAP" --topic "$TOPIC" --count "$RECORDS" --keys 1000 \
	--value-format avro --schema "$SCHEMA" --schema-registry-url "$REGISTRY" --quiet | tee "$WORK/produce.txt" >&2
SIZE=$(awk '{ for (i = 1; i <= NF; i++) if ($i == "MB)") { gsub(/\(/, "", $(i - 1)); print int($(i - 1) * 1e6 / '"$RECORDS"') } }' "$WORK/produce.txt")

run_one() { # contender run
	local c=$1 run=$2
	local -a pre post
	case $c in
	microbatch-avro)
		pre=(microbatch --label "$c" --log "$WORK/$c-r$run.log")
		post=("${mb_args[@]}" --value-format avro --schema-registry-url "$REGISTRY")
		;;
	microbatch-raw)
		pre=(microbatch --label "$c" --log "$WORK/$c-r$run.log")
		post=("${mb_args[@]}")
		;;
	python-avro)
		pre=(python --label "$c" --python "$PY" --script "$BENCH_DIR/python_consumer.py")
		post=(--batch-size "$BATCH_SIZE" --avro-registry "$REGISTRY")
		;;
	esac
	log "run $run/$RUNS: $c"
	if ! "$PY" "$BENCH_DIR/lib/measure.py" "${pre[@]}" --bin "$MB" --bootstrap "$BOOTSTRAP" \
		--topic "$TOPIC" --group "bench-$c-r$run-$STAMP" --records "$RECORDS" --size "${SIZE:-0}" \
		--run "$run" -- "${post[@]}" >>"$RUNS_FILE"; then
		log "warning: $c run $run reported an error (see ${RUNS_FILE#"$ROOT"/})"
	fi
	tail -n1 "$RUNS_FILE" | jq -r '"  -> \(.records / ((.t_done // .t0) - (.t_assigned // .t0)) | floor) records/s after assignment, CPU \(.cpu_done) s"' >&2 || true
}

contenders=(microbatch-avro microbatch-raw python-avro)
for ((run = 1; run <= RUNS; run++)); do
	for ((k = 0; k < 3; k++)); do
		run_one "${contenders[$(((k + run - 1) % 3))]}" "$run"
	done
done

base=$RESULTS_DIR/$DATE_UTC-schemas
jq -s --argjson machine "$MACHINE" --arg topic "$TOPIC" --argjson records "$RECORDS" \
	--argjson partitions "$PARTITIONS" --arg schema "${SCHEMA#"$ROOT"/}" --arg mb_args "$MB_ARGS" '
	def median: sort | if length == 0 then null else .[(length / 2 | floor)] end;
	def tput: .records / ((.t_done // .t0) - (.t_assigned // .t0));
	(map(select(.error == null)) | group_by(.label) | map({key: .[0].label, value: {
		runs: length,
		records_per_s: (map(tput) | median),
		cpu_s_per_million: (map(.cpu_done / .records * 1e6) | median),
		peak_rss_mib: (map(.max_rss_kib / 1024) | median)}}) | from_entries) as $s
	| {machine: $machine, topic: $topic, records: $records, partitions: $partitions, schema: $schema,
	   microbatch_args: $mb_args, contenders: $s,
	   ratios: {
	     avro_vs_python_records_per_s: ($s["microbatch-avro"].records_per_s / $s["python-avro"].records_per_s),
	     avro_vs_python_cpu: ($s["microbatch-avro"].cpu_s_per_million / $s["python-avro"].cpu_s_per_million),
	     avro_vs_raw_records_per_s: ($s["microbatch-avro"].records_per_s / $s["microbatch-raw"].records_per_s)},
	   decode_cpu_us_per_record: (($s["microbatch-avro"].cpu_s_per_million - $s["microbatch-raw"].cpu_s_per_million)),
	   failed_runs: map(select(.error != null) | {label: .label, run: .run, error: .error})}' "$RUNS_FILE" >"$base.json"
jq -r '
	"# Schema decoding benchmark, \(.machine.git_commit // "")",
	"",
	"\(.records) Avro records of `\(.schema)` on \(.partitions) partitions, median of the runs; microbatch: `microbatch run \(.microbatch_args)` (with `--value-format avro --schema-registry-url` for microbatch-avro); python-avro: `bench/python_consumer.py --avro-registry` (AvroDeserializer per value). Machine: \(.machine.cpu_model), \(.machine.nproc) CPUs.",
	"",
	"| contender | records/s | CPU s / 1M records | peak RSS MiB | runs |",
	"|---|---|---|---|---|",
	(.contenders | to_entries[] | "| \(.key) | \(.value.records_per_s | floor) | \(.value.cpu_s_per_million * 100 | round / 100) | \(.value.peak_rss_mib | floor) | \(.value.runs) |"),
	"",
	"- microbatch-avro / python-avro: \(.ratios.avro_vs_python_records_per_s * 100 | round / 100)× the records/s, \(.ratios.avro_vs_python_cpu * 100 | round / 100)× the CPU per record",
	"- microbatch-avro / microbatch-raw: \(.ratios.avro_vs_raw_records_per_s * 100 | round / 100)× the records/s; decoding costs \(.decode_cpu_us_per_record * 100 | round / 100) µs of CPU per record",
	(if (.failed_runs | length) > 0 then "- failed runs: \(.failed_runs | tostring)" else empty end)' "$base.json" >"$base.md"
cat "$base.md" >&2
delete_topic "$TOPIC"
log "results: ${base#"$ROOT"/}.md and .json (logs in ${WORK#"$ROOT"/})"
