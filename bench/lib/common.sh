# shellcheck shell=bash
# Shared set-up for bench/*.sh: paths, the microbatch binary, the local Kafka
# broker, the Python venv and a description of the machine. Sourced, not run.
# Variables set here are used by the scripts that source it.
# shellcheck disable=SC2034

BENCH_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=$(cd -- "$BENCH_DIR/.." && pwd)
KAFKA_LOCAL=$ROOT/scripts/kafka-local.sh
BOOTSTRAP=${BENCH_BOOTSTRAP:-127.0.0.1:9092}
RESULTS_DIR=${RESULTS_DIR:-$BENCH_DIR/results}
VENV=${BENCH_VENV:-$BENCH_DIR/.venv}
PY=$VENV/bin/python
# A unique suffix for topic and group names of this invocation.
STAMP=$(date -u +%Y%m%d-%H%M%S)-$$
# The date the results are filed under.
DATE_UTC=$(date -u +%Y-%m-%dT%H%M%SZ)

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# MICROBATCH_BIN overrides the binary; by default the project's own release
# build, built here if it is missing.
resolve_binary() {
	if [[ -n ${MICROBATCH_BIN:-} ]]; then
		[[ -x $MICROBATCH_BIN ]] || die "MICROBATCH_BIN=$MICROBATCH_BIN is not an executable"
		MB=$MICROBATCH_BIN
	else
		MB=$ROOT/target/release/microbatch
		if [[ ! -x $MB ]]; then
			log "building $MB (cargo build --release -p microbatch)"
			(cd "$ROOT" && cargo build --release -p microbatch) || die "cargo build failed"
		fi
	fi
	export MB
}

# Starts the local broker unless it runs already. Remembers whether we started
# it, so stop_kafka_if_ours can leave a broker someone else uses alone.
KAFKA_STARTED_HERE=0
ensure_kafka() {
	if [[ $BOOTSTRAP != 127.0.0.1:9092 ]]; then
		log "using the broker at $BOOTSTRAP (not starting one)"
		return
	fi
	if "$KAFKA_LOCAL" status >/dev/null 2>&1; then
		log "Kafka is already running"
	elif (: >/dev/tcp/127.0.0.1/9092) 2>/dev/null; then
		log "a broker already listens on 127.0.0.1:9092 (not started by scripts/kafka-local.sh of this checkout); using it"
	else
		log "starting Kafka (scripts/kafka-local.sh start)"
		"$KAFKA_LOCAL" start >&2 || die "could not start Kafka"
		KAFKA_STARTED_HERE=1
	fi
}

# BENCH_STOP_KAFKA=1 stops the broker at the end if this script started it.
stop_kafka_if_ours() {
	if [[ $KAFKA_STARTED_HERE == 1 && ${BENCH_STOP_KAFKA:-0} == 1 ]]; then
		log "stopping the Kafka broker this script started"
		"$KAFKA_LOCAL" stop >&2 || true
	fi
}

# The Python venv with confluent-kafka (bench/requirements.txt).
ensure_venv() {
	local marker=$VENV/.requirements
	if [[ -x $PY ]] && cmp -s "$BENCH_DIR/requirements.txt" "$marker"; then
		return
	fi
	log "creating the Python venv in ${VENV#"$ROOT"/}"
	command -v python3 >/dev/null || die "python3 is required"
	python3 -m venv "$VENV" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
	"$PY" -m pip install --quiet --disable-pip-version-check -r "$BENCH_DIR/requirements.txt" ||
		die "pip install failed"
	cp "$BENCH_DIR/requirements.txt" "$marker"
}

create_topic() { # topic partitions
	"$MB" topic create --bootstrap-servers "$BOOTSTRAP" --topic "$1" --partitions "$2" >&2
}

# Benchmark topics hold millions of records; a broker that keeps them all
# grows by gigabytes a run. BENCH_KEEP_TOPICS=1 keeps them for a look.
delete_topic() { # topic
	[[ ${BENCH_KEEP_TOPICS:-0} == 1 ]] && return 0
	"$MB" topic delete --bootstrap-servers "$BOOTSTRAP" --topic "$1" >&2 ||
		log "warning: could not delete topic $1"
}

produce() { # topic count size keys [more produce flags]
	local topic=$1 count=$2 size=$3 keys=$4
	shift 4
	"$MB" produce --bootstrap-servers "$BOOTSTRAP" --topic "$topic" --count "$count" \
		--size "$size" --keys "$keys" --quiet "$@"
}

# The commit the tested binary was built from, as far as we can tell:
# BENCH_COMMIT if set; else the checkout's (with -dirty for local changes) when
# the default binary is used; else unknown.
binary_commit() {
	if [[ -n ${BENCH_COMMIT:-} ]]; then
		echo "$BENCH_COMMIT"
	elif [[ -z ${MICROBATCH_BIN:-} ]]; then
		git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown
	else
		echo "unknown (MICROBATCH_BIN)"
	fi
}

# One JSON object describing the machine and its load.
machine_json() {
	local model mem_kib load kernel
	model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
	mem_kib=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
	load=$(cut -d' ' -f1-3 /proc/loadavg)
	kernel=$(uname -r)
	jq -n --arg model "$model" --arg nproc "$(nproc)" --arg mem_kib "$mem_kib" \
		--arg load "$load" --arg kernel "$kernel" \
		--arg mb_version "$("$MB" --version 2>/dev/null || echo unknown)" \
		--arg commit "$(binary_commit)" \
		'{cpu_model: $model, nproc: ($nproc|tonumber), mem_gib: (($mem_kib|tonumber)/1048576*10|round/10),
		  loadavg_at_start: $load, kernel: $kernel, microbatch_version: $mb_version, git_commit: $commit}'
}

need_tools() {
	local t
	for t in "$@"; do
		command -v "$t" >/dev/null 2>&1 || die "'$t' is required"
	done
}
