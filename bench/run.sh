#!/usr/bin/env bash
# bench/run.sh - throughput benchmark: `microbatch run` against Kafka's Java
# kafka-consumer-perf-test and a Python (confluent-kafka) baseline, on the same
# local broker and the same data, with fresh consumer groups, alternating the
# contenders. See bench/README.md for the method; `bench/run.sh --help`.
set -euo pipefail

# shellcheck source=lib/common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/lib/common.sh"

RECORDS=${RECORDS:-2000000}
SIZE=${SIZE:-100}
PARTITIONS=${PARTITIONS:-8}
RUNS=${RUNS:-3}
KEYS=${KEYS:-1000}
BATCH_SIZE=${BATCH_SIZE:-500}
SHARE=${SHARE:-0}
SHARE_HEARTBEAT_MS=${SHARE_HEARTBEAT_MS:-}
CONTENDERS=${CONTENDERS:-}
MB_ARGS=${MB_ARGS:---handler simulate --process-time-ms 0 --max-records 500 --commit-interval-ms 100}
# The settings before the fetch-queue change, as a control when asked for;
# set but empty means no extra arguments.
MB_TUNED_ARGS=${MB_TUNED_ARGS---kafka-property fetch.queue.backoff.ms=10 --kafka-property queued.min.messages=5000}
TOPIC=${TOPIC:-}

usage() {
	cat <<EOF
Usage: bench/run.sh [options]

Produces RECORDS records of SIZE bytes to a fresh topic of PARTITIONS
partitions on the local broker (scripts/kafka-local.sh, started if needed),
then consumes them RUNS times with each contender, in rotating order, each
time with a fresh consumer group, and writes
bench/results/<date>-throughput.md and .json.

With --share (SHARE=1) every contender reads through a fresh share group
(KIP-932) instead: microbatch with --share-group, Java with Kafka's
kafka-share-consumer-perf-test; results in <date>-share-throughput.*.

Contenders (CONTENDERS, space-separated):
  microbatch        microbatch run \$MB_ARGS
  microbatch-tuned  microbatch run \$MB_ARGS \$MB_TUNED_ARGS (not run unless
                    named: extra flags or --kafka-property settings to try)
  microbatch-base   MICROBATCH_BASE_BIN run \$MB_ARGS (not run unless named:
                    another build, e.g. the commit before a change, compared
                    with MICROBATCH_BIN in the same run)
  java              scripts/kafka-local.sh tool consumer-perf-test
                    (with --share: share-consumer-perf-test)
  python            bench/python_consumer.py (confluent-kafka, BATCH_SIZE per
                    consume(), synchronous commit after each batch)

Options (environment variable in brackets, default after it):
  --records N       [RECORDS]     $RECORDS
  --size BYTES      [SIZE]        $SIZE
  --partitions N    [PARTITIONS]  $PARTITIONS
  --runs N          [RUNS]        $RUNS
  --keys N          [KEYS]        $KEYS distinct keys (microbatch produce --keys)
  --batch-size N    [BATCH_SIZE]  $BATCH_SIZE (Python baseline)
  --contenders LIST [CONTENDERS]  "microbatch java python"; with --share
                                  "microbatch java"
  --share           [SHARE=1]     read through share groups
  --share-heartbeat-ms MS [SHARE_HEARTBEAT_MS] with --share: set each fresh
                                  group's share.heartbeat.interval.ms first
                                  (untimed), e.g. 5000, Kafka's default, where
                                  the local broker's is 1000: shows how long a
                                  new member waits for its first partitions
  --topic NAME      [TOPIC]       reuse an existing topic holding exactly
                                  RECORDS records instead of producing
  -h, --help

Other environment:
  MICROBATCH_BIN   binary to test [target/release/microbatch, built if missing]
  MICROBATCH_BASE_BIN  the microbatch-base contender's binary
  BASE_COMMIT      the commit MICROBATCH_BASE_BIN was built from, for the results
  MB_ARGS          "$MB_ARGS"
  MB_TUNED_ARGS    "$MB_TUNED_ARGS"
  RESULTS_DIR      where results go [bench/results]
  BENCH_COMMIT     the commit MICROBATCH_BIN was built from, for the results
  BENCH_STOP_KAFKA 1: stop the broker at the end if this script started it
  BENCH_KEEP_TOPICS 1: keep the topic this script made (deleted by default)
EOF
}

while [[ $# -gt 0 ]]; do
	case $1 in
	--records) RECORDS=$2 && shift 2 ;;
	--size) SIZE=$2 && shift 2 ;;
	--partitions) PARTITIONS=$2 && shift 2 ;;
	--runs) RUNS=$2 && shift 2 ;;
	--keys) KEYS=$2 && shift 2 ;;
	--batch-size) BATCH_SIZE=$2 && shift 2 ;;
	--contenders) CONTENDERS=$2 && shift 2 ;;
	--share) SHARE=1 && shift ;;
	--share-heartbeat-ms) SHARE_HEARTBEAT_MS=$2 && shift 2 ;;
	--topic) TOPIC=$2 && shift 2 ;;
	-h | --help) usage && exit 0 ;;
	*) usage >&2 && die "unknown option $1" ;;
	esac
done
for v in RECORDS SIZE PARTITIONS RUNS KEYS BATCH_SIZE; do
	if ! is_uint "${!v}" || ((${!v} == 0)); then
		die "$v must be a positive integer, got '${!v}'"
	fi
done
if [[ -z $CONTENDERS ]]; then
	if [[ $SHARE == 1 ]]; then CONTENDERS="microbatch java"; else CONTENDERS="microbatch java python"; fi
fi
share_flag=()
[[ $SHARE == 1 ]] && share_flag=(--share)
if [[ -n $SHARE_HEARTBEAT_MS ]]; then
	[[ $SHARE == 1 ]] || die "--share-heartbeat-ms needs --share"
	is_uint "$SHARE_HEARTBEAT_MS" || die "SHARE_HEARTBEAT_MS must be a number of milliseconds, got '$SHARE_HEARTBEAT_MS'"
	share_flag+=(--kafka-local "$KAFKA_LOCAL" --group-config "share.heartbeat.interval.ms=$SHARE_HEARTBEAT_MS")
fi
read -r -a contenders <<<"$CONTENDERS"
for c in "${contenders[@]}"; do
	case $c in microbatch | microbatch-tuned | java) ;;
	python) [[ $SHARE != 1 ]] || die "the python contender has no share group (--share)" ;;
	microbatch-base) [[ -x ${MICROBATCH_BASE_BIN:-} ]] || die "microbatch-base needs MICROBATCH_BASE_BIN, an executable" ;;
	*) die "unknown contender '$c'" ;;
	esac
done
read -r -a mb_args <<<"$MB_ARGS"
read -r -a mb_tuned_args <<<"$MB_TUNED_ARGS"

need_tools jq python3 curl
resolve_binary
ensure_kafka
trap stop_kafka_if_ours EXIT
ensure_venv

WORK=$BENCH_DIR/work/throughput-$STAMP
mkdir -p "$WORK" "$RESULTS_DIR"
RUNS_FILE=$WORK/runs.jsonl
: >"$RUNS_FILE"
MACHINE=$(machine_json)
log "machine: $(jq -c . <<<"$MACHINE")"

created_topic=false
if [[ -z $TOPIC ]]; then
	created_topic=true
	TOPIC=bench-tput-$STAMP
	create_topic "$TOPIC" "$PARTITIONS"
	log "producing $RECORDS records of $SIZE bytes ($KEYS keys) to $TOPIC"
	produce "$TOPIC" "$RECORDS" "$SIZE" "$KEYS" | tee "$WORK/produce.txt" >&2
fi
available=$("$MB" lag --bootstrap-servers "$BOOTSTRAP" --topic "$TOPIC" \
	--group "bench-probe-$STAMP" --offset-reset-policy earliest --json | jq .total_lag)
[[ $available == "$RECORDS" ]] || die "topic $TOPIC holds $available records, expected $RECORDS"

run_one() { # contender run
	local c=$1 run=$2
	local -a pre=() post=()
	local bin=$MB
	case $c in
	microbatch)
		pre=(microbatch --log "$WORK/$c-r$run.log")
		post=("${mb_args[@]}")
		;;
	microbatch-tuned)
		pre=(microbatch --label microbatch-tuned --log "$WORK/$c-r$run.log")
		post=("${mb_args[@]}" "${mb_tuned_args[@]}")
		;;
	microbatch-base)
		pre=(microbatch --label microbatch-base --log "$WORK/$c-r$run.log")
		post=("${mb_args[@]}")
		bin=$MICROBATCH_BASE_BIN
		;;
	java)
		pre=(java --kafka-local "$KAFKA_LOCAL")
		;;
	python)
		pre=(python --python "$PY" --script "$BENCH_DIR/python_consumer.py")
		post=(--batch-size "$BATCH_SIZE")
		;;
	esac
	log "run $run/$RUNS: $c"
	# Arguments after `--` go to the contender itself.
	if ! "$PY" "$BENCH_DIR/lib/measure.py" "${pre[@]}" "${share_flag[@]}" --bin "$bin" --bootstrap "$BOOTSTRAP" \
		--topic "$TOPIC" --group "bench-$c-r$run-$STAMP" --records "$RECORDS" --size "$SIZE" \
		--run "$run" -- "${post[@]}" >>"$RUNS_FILE"; then
		log "warning: $c run $run reported an error (see ${RUNS_FILE#"$ROOT"/})"
	fi
	tail -n1 "$RUNS_FILE" | jq -r '"  -> \(.records / ((.t_done // .t0) - (.t_assigned // .t0)) | floor) records/s after assignment, CPU \(.cpu_done) s, peak RSS \(.max_rss_kib / 1024 | floor) MiB, lag after \(.lag_after)"' >&2 || true
}

n=${#contenders[@]}
for ((run = 1; run <= RUNS; run++)); do
	# Rotate the order each run so no contender always goes first.
	for ((k = 0; k < n; k++)); do
		run_one "${contenders[$(((k + run - 1) % n))]}" "$run"
	done
done

if [[ $SHARE == 1 ]]; then base=$RESULTS_DIR/$DATE_UTC-share-throughput; else base=$RESULTS_DIR/$DATE_UTC-throughput; fi
params=$(jq -n --arg topic "$TOPIC" --argjson records "$RECORDS" --argjson size "$SIZE" \
	--argjson partitions "$PARTITIONS" --argjson runs "$RUNS" --argjson keys "$KEYS" \
	--argjson batch_size "$BATCH_SIZE" --arg mb_args "$MB_ARGS" --arg mb_tuned_args "$MB_TUNED_ARGS" \
	--arg contenders "$CONTENDERS" --arg loadavg_end "$(cut -d' ' -f1-3 /proc/loadavg)" \
	--arg base_commit "${BASE_COMMIT:-}" --argjson share "$([[ $SHARE == 1 ]] && echo true || echo false)" \
	--arg share_heartbeat_ms "$SHARE_HEARTBEAT_MS" \
	'{topic: $topic, records: $records, size: $size, partitions: $partitions, runs: $runs, share: $share,
	  share_heartbeat_ms: $share_heartbeat_ms,
	  keys: $keys, python_batch_size: $batch_size, microbatch_args: $mb_args,
	  microbatch_tuned_args: $mb_tuned_args, contenders: $contenders, loadavg_at_end: $loadavg_end,
	  base_commit: $base_commit}')
"$PY" "$BENCH_DIR/lib/report.py" throughput --runs "$RUNS_FILE" --machine "$MACHINE" \
	--params "$params" --date "$DATE_UTC" --md "$base.md" --json "$base.json"
$created_topic && delete_topic "$TOPIC"
log "results: ${base#"$ROOT"/}.md and .json (logs in ${WORK#"$ROOT"/})"
