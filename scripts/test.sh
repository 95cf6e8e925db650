#!/usr/bin/env bash
# Every check the project has, on a fresh machine: installs the system
# packages the tests use (when run as root with apt), starts a real Kafka
# broker (scripts/kafka-local.sh), then formatting, lints and all tests
# against it, and the deployment kit's checks.
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Build: libssl-dev zlib1g-dev pkg-config (librdkafka); Kafka: openssl unzip
# (and Java 17+ with Maven); tests: shellcheck, chromium (report rendering),
# tmux (terminal dashboard); the schema tests: curl (the registry's
# script), python3-venv (confluent-kafka's serializers); the image: podman
# mmdebstrap python3.
packages=(libssl-dev zlib1g-dev pkg-config openssl unzip shellcheck chromium tmux curl python3-venv podman mmdebstrap python3)
missing=()
for pkg in "${packages[@]}"; do
	dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
		echo "== installing ${missing[*]}"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
	else
		echo "note: missing packages ${missing[*]}; tests that need them skip (or fail with CI=true)" >&2
	fi
fi

started_kafka=false
if ! scripts/kafka-local.sh status >/dev/null 2>&1; then
	scripts/kafka-local.sh start
	started_kafka=true
fi
# A real schema registry (Apicurio, Java 21+, fetched once and cached
# outside the clone) for the schema tests.
started_registry=false
if ! scripts/registry-local.sh status >/dev/null 2>&1; then
	scripts/registry-local.sh start >/dev/null
	started_registry=true
fi
cleanup() {
	if $started_registry; then scripts/registry-local.sh stop || true; fi
	if $started_kafka; then scripts/kafka-local.sh stop || true; fi
}
trap cleanup EXIT

# confluent-kafka's own serializers write the schema tests' records: a
# venv cached outside the clone, keyed by its requirements.
requirements=crates/cli/tests/it/schemas/requirements.txt
venv="${XDG_CACHE_HOME:-$HOME/.cache}/microbatch-test-python/$(sha256sum "$requirements" | cut -c1-16)"
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$requirements" "$venv/.requirements"; then
	echo "== creating the serializers' Python venv"
	rm -rf "$venv"
	python3 -m venv "$venv"
	"$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
	cp "$requirements" "$venv/.requirements"
fi
export MICROBATCH_TEST_PYTHON="$venv/bin/python"
MICROBATCH_TEST_SCHEMA_REGISTRY=$(scripts/registry-local.sh url)
export MICROBATCH_TEST_SCHEMA_REGISTRY

export MICROBATCH_TEST_BOOTSTRAP="127.0.0.1:${KAFKA_PLAINTEXT_PORT:-9092}"
export MICROBATCH_TEST_SCRAM_ENV="$PWD/.kafka-local/scram.env"
export MICROBATCH_TEST_MSK_IAM_ENV="$PWD/.kafka-local/msk-iam.env"
if [ ! -s "$MICROBATCH_TEST_MSK_IAM_ENV" ]; then
	echo "note: $MICROBATCH_TEST_MSK_IAM_ENV is missing: the running broker predates the MSK_IAM listener;" \
		"restart it (scripts/kafka-local.sh stop; scripts/kafka-local.sh start)" >&2
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings
echo "== cargo test"
cargo test --all-targets --no-fail-fast "$@"
# The tests that rebalance a group, again under KIP-848 (the broker's
# assignor, incremental revocations only).
echo "== cargo test (rebalancing tests, --group-protocol consumer)"
MICROBATCH_TEST_GROUP_PROTOCOL=consumer cargo test -p microbatch --no-fail-fast --test chaos "$@"
MICROBATCH_TEST_GROUP_PROTOCOL=consumer cargo test -p microbatch --no-fail-fast --test it "$@" -- \
	edges:: delivery:: fetch:: supervise:: worker:: lag::members_are_counted_per_topic
echo "== deploy/check (kustomize overlays, manifests, scripts)"
(cd deploy/check && go test -count=1 ./...)
# The image: deploy/Dockerfile's runtime stage, on a base made from Debian
# packages, around the binary the tests built (deploy/image/build.sh; the
# whole Dockerfile is built the same way without --binary).
echo "== deploy/image (deploy/Dockerfile with podman, around target/debug/microbatch)"
cargo build --locked -p microbatch
e2e_env=() e2e_wrap=()
if [ "$(id -u)" = 0 ] && command -v podman >/dev/null && command -v mmdebstrap >/dev/null; then
	e2e_env=("MICROBATCH_E2E_IMAGE=$(deploy/image/build.sh --binary target/debug/microbatch)")
	# The pods' mounts live in a mount namespace of the test's own: none
	# outlives it, whatever happens to the test.
	e2e_wrap=(unshare --mount --propagation private)
elif [ "${CI:-}" = true ]; then
	echo "the image needs root, podman and mmdebstrap (apt-get install podman mmdebstrap), and CI=true" >&2
	exit 1
else
	echo "note: the image is not built (it needs root, podman and mmdebstrap): the e2e pods run the local binary" >&2
fi
# The kit applied to a local control plane (etcd, kube-apiserver,
# kube-controller-manager, KEDA), built once from source and cached outside
# the clone (deploy/e2e/README.md); every pod runs from the image.
echo "== deploy/e2e (the overlays on a live control plane, scaled by KEDA)"
deploy/e2e/build.sh
(cd deploy/e2e && env "${e2e_env[@]}" "${e2e_wrap[@]}" go test -v -count=1 -timeout 45m ./...)
