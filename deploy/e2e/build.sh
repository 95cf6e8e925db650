#!/usr/bin/env bash
# build.sh - build the local control plane from source, once: etcd,
# kube-apiserver, kube-controller-manager, kubectl, KEDA's operator and
# metrics adapter. Each part is built by its own small Go module under
# deploy/e2e/build/ and cached outside the clone, keyed by its version, its
# go.mod/go.sum and the Go version, so a second run builds nothing.
#
# Usage: deploy/e2e/build.sh [--print-dir]
#   --print-dir  print the directory holding the binaries and exit 0 if all
#                are built (exit 1 if not); build nothing
# Environment: MICROBATCH_E2E_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/microbatch-e2e),
#              E2E_BUILD_NICE (default 10): niceness of the Go builds.
set -euo pipefail

E2E_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
CACHE=${MICROBATCH_E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/microbatch-e2e}
NICE=${E2E_BUILD_NICE:-10}

log() { printf 'e2e build: %s\n' "$*" >&2; }

# The version each module pins, read from its go.mod: one source.
pinned() { awk -v m="$2" '$1 == "require" && $2 == m {print $3} $1 == m {print $2}' "$E2E_DIR/build/$1/go.mod" | head -n1; }
K8S_VERSION=$(pinned kubernetes k8s.io/kubernetes)
KEDA_VERSION=$(pinned keda github.com/kedacore/keda/v2)
ETCD_VERSION=$(pinned etcd go.etcd.io/etcd/server/v3)
GO_VERSION=$(go env GOVERSION)
# Prometheus Operator's ServiceMonitor CRD (the msk-scram and external-scaler
# overlays have a ServiceMonitor; deploy.sh checks for its CRD). Only the CRD
# is used, taken from the operator's Go module.
PROMETHEUS_OPERATOR_VERSION=v0.85.0

# key NAME VERSION: the cache directory of one module's binaries.
key_dir() {
	local sum
	sum=$(cat "$E2E_DIR/build/$1/go.mod" "$E2E_DIR/build/$1/go.sum" | sha256sum | cut -c1-12)
	printf '%s/%s-%s-%s-%s\n' "$CACHE" "$1" "$2" "$GO_VERSION" "$sum"
}

# The binaries of each module, as "name=package".
kubernetes_bins=(
	kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver
	kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager
	kubectl=k8s.io/kubernetes/cmd/kubectl
)
keda_bins=(
	keda-operator=github.com/kedacore/keda/v2/cmd/operator
	keda-adapter=github.com/kedacore/keda/v2/cmd/adapter
)
etcd_bins=(etcd=go.etcd.io/etcd/server/v3)

# Kubernetes' binaries report v0.0.0-master unless their version variables
# are set; clients (kubectl version, KEDA) read the server's version.
kubernetes_ldflags() {
	local v=${K8S_VERSION#v} flags="-s -w" pkg
	for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		flags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=${v%%.*}"
		flags+=" -X $pkg.gitMinor=$(cut -d. -f2 <<<"$v") -X $pkg.gitTreeState=clean"
		flags+=" -X $pkg.buildDate=1970-01-01T00:00:00Z"
	done
	printf '%s\n' "$flags"
}
keda_ldflags() { printf '%s\n' "-s -w -X github.com/kedacore/keda/v2/version.Version=${KEDA_VERSION#v}"; }
etcd_ldflags() { printf '%s\n' "-s -w"; }

built() { # module version bins...
	local dir
	dir=$(key_dir "$1" "$2")
	shift 2
	local spec
	for spec in "$@"; do [[ -x $dir/bin/${spec%%=*} ]] || return 1; done
}

build_module() { # module version ldflags bins...
	local module=$1 version=$2 ldflags=$3
	shift 3
	local dir tmp start spec pkgs=()
	dir=$(key_dir "$module" "$version")
	if built "$module" "$version" "$@"; then
		log "$module $version: cached in $dir"
		return 0
	fi
	for spec in "$@"; do pkgs+=("${spec#*=}"); done
	tmp="$dir.tmp.$$"
	rm -rf "$tmp"
	mkdir -p "$tmp/bin"
	log "$module $version: building ${pkgs[*]} (log: $dir.log)"
	start=$SECONDS
	for spec in "$@"; do
		# One `go build` per binary (to name it); the build cache shares the rest.
		(cd "$E2E_DIR/build/$module" &&
			CGO_ENABLED=0 nice -n "$NICE" go build -trimpath -ldflags "$ldflags" \
				-o "$tmp/bin/${spec%%=*}" "${spec#*=}") >>"$dir.log" 2>&1 || {
			tail -n 30 "$dir.log" >&2
			log "$module $version: building ${spec#*=} failed (log: $dir.log)"
			return 1
		}
		log "$module $version: ${spec%%=*} built at +$((SECONDS - start)) s"
	done
	printf '%s %s built in %d s with %s\n' "$module" "$version" "$((SECONDS - start))" "$GO_VERSION" >"$tmp/BUILD"
	rm -rf "$dir"
	mv "$tmp" "$dir"
	log "$module $version: built in $((SECONDS - start)) s"
}

bin_dir_of() { printf '%s/bin\n' "$(key_dir "$1" "$2")"; }

if [[ ${1:-} == --print-dir ]]; then
	built etcd "$ETCD_VERSION" "${etcd_bins[@]}" &&
		built kubernetes "$K8S_VERSION" "${kubernetes_bins[@]}" &&
		built keda "$KEDA_VERSION" "${keda_bins[@]}" || exit 1
	[[ -d $(key_dir keda "$KEDA_VERSION")/crd && -d $CACHE/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION/crd ]] || exit 1
	printf 'ETCD_BIN=%s\nKUBE_BIN=%s\nKEDA_BIN=%s\nKEDA_CRDS=%s\nSERVICEMONITOR_CRDS=%s\n' \
		"$(bin_dir_of etcd "$ETCD_VERSION")" "$(bin_dir_of kubernetes "$K8S_VERSION")" \
		"$(bin_dir_of keda "$KEDA_VERSION")" "$(key_dir keda "$KEDA_VERSION")/crd" \
		"$CACHE/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION/crd"
	exit 0
fi

mkdir -p "$CACHE"
build_module etcd "$ETCD_VERSION" "$(etcd_ldflags)" "${etcd_bins[@]}"
build_module kubernetes "$K8S_VERSION" "$(kubernetes_ldflags)" "${kubernetes_bins[@]}"
build_module keda "$KEDA_VERSION" "$(keda_ldflags)" "${keda_bins[@]}"
# KEDA's CRDs come from the same module as its binaries.
crds=$(key_dir keda "$KEDA_VERSION")/crd
if [[ ! -d $crds ]]; then
	src=$(cd "$E2E_DIR/build/keda" && go list -m -f '{{.Dir}}' github.com/kedacore/keda/v2)
	mkdir -p "$crds.tmp.$$"
	cp "$src"/config/crd/bases/*.yaml "$crds.tmp.$$/"
	chmod -R u+w "$crds.tmp.$$"
	mv "$crds.tmp.$$" "$crds"
fi
crds=$CACHE/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION/crd
if [[ ! -d $crds ]]; then
	src=$(GOFLAGS=-mod=mod go mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" |
		sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
	[[ -n $src ]] || {
		log "could not download github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION"
		exit 1
	}
	mkdir -p "$crds.tmp.$$"
	cp "$src/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml" "$crds.tmp.$$/"
	chmod -R u+w "$crds.tmp.$$"
	mv "$crds.tmp.$$" "$crds"
fi
"$0" --print-dir
