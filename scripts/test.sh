#!/usr/bin/env bash
# Every check the project has, on a fresh machine: starts a real Kafka broker
# (scripts/kafka-local.sh), then formatting, lints and all tests against it.
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

started_kafka=false
if ! scripts/kafka-local.sh status >/dev/null 2>&1; then
	scripts/kafka-local.sh start
	started_kafka=true
fi
cleanup() {
	if $started_kafka; then scripts/kafka-local.sh stop || true; fi
}
trap cleanup EXIT

export MICROBATCH_TEST_BOOTSTRAP="127.0.0.1:${KAFKA_PLAINTEXT_PORT:-9092}"
export MICROBATCH_TEST_SCRAM_ENV="$PWD/.kafka-local/scram.env"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
echo "== cargo test"
cargo test --all-targets --no-fail-fast "$@"
if [ -d deploy/check ]; then
	echo "== deploy/check (kustomize overlays, manifests, scripts)"
	(cd deploy/check && go test ./...)
fi
