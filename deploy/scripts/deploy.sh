#!/usr/bin/env bash
# deploy.sh - apply a microbatch kustomize overlay to the current kubectl
# context, after checking what it needs, and wait until it is up.
# Run `deploy/scripts/deploy.sh --help` for details.
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
OVERLAYS_DIR=$(cd -- "$SCRIPT_DIR/../k8s/overlays" && pwd)

# The image name the base kustomization sets; --image replaces it.
DEFAULT_IMAGE_NAME=ghcr.io/microbatch/microbatch
NAMESPACE=${MICROBATCH_NAMESPACE:-microbatch}
SECRET=microbatch-kafka
IMAGE=""
TIMEOUT=300s
DRY_RUN=false
RENDER=false
OVERLAY=""

log() { printf 'deploy: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

usage() {
	cat <<EOF
Usage: deploy/scripts/deploy.sh [options] OVERLAY

Renders the kustomize overlay OVERLAY (msk-scram, external-scaler, plaintext,
or a directory), checks the cluster of the current kubectl context, applies
the overlay and waits for the rollout and for the ScaledObject to be ready.

Checks before anything is applied:
  - kubectl is installed and the cluster answers;
  - the CRDs the overlay uses exist: KEDA's ScaledObject and
    TriggerAuthentication, Prometheus Operator's ServiceMonitor;
  - KEDA's external metrics API is registered;
  - the Secret '$SECRET' exists in namespace '$NAMESPACE' with non-empty,
    non-placeholder keys 'username' and 'password' (when the overlay uses it).

Options:
  --image IMAGE      Run this image instead of the overlay's
                     (e.g. 111122223333.dkr.ecr.us-east-1.amazonaws.com/microbatch:0.1.0)
  --namespace NS     Namespace the overlay deploys to [$NAMESPACE]
  --timeout DUR      How long to wait for each rollout [$TIMEOUT]
  --dry-run          Run every check, then 'kubectl apply --dry-run=server';
                     change nothing
  --render           Print what would be applied (with --image applied) and
                     exit; needs kubectl but no cluster
  -h, --help         Show this help

Create the Secret first (once; see deploy/k8s/base/secret.template.yaml):
  kubectl create namespace $NAMESPACE
  kubectl -n $NAMESPACE create secret generic $SECRET \\
      --from-literal=username=USER --from-file=password=/dev/stdin
EOF
}

while (($#)); do
	case $1 in
	--image)
		IMAGE=${2:?--image needs a value}
		shift 2
		;;
	--namespace)
		NAMESPACE=${2:?--namespace needs a value}
		shift 2
		;;
	--timeout)
		TIMEOUT=${2:?--timeout needs a value}
		shift 2
		;;
	--dry-run)
		DRY_RUN=true
		shift
		;;
	--render)
		RENDER=true
		shift
		;;
	-h | --help)
		usage
		exit 0
		;;
	-*)
		usage >&2
		die "unknown option: $1"
		;;
	*)
		[[ -z $OVERLAY ]] || die "one overlay at a time (got '$OVERLAY' and '$1')"
		OVERLAY=$1
		shift
		;;
	esac
done

[[ -n $OVERLAY ]] || {
	usage >&2
	exit 2
}
if [[ -d $OVERLAYS_DIR/$OVERLAY ]]; then
	OVERLAY_DIR=$OVERLAYS_DIR/$OVERLAY
elif [[ -d $OVERLAY ]]; then
	OVERLAY_DIR=$OVERLAY
else
	die "no overlay '$OVERLAY' (known: $(cd "$OVERLAYS_DIR" && echo *))"
fi
if [[ -n $IMAGE && ! $IMAGE =~ ^[A-Za-z0-9][A-Za-z0-9._/:@-]*$ ]]; then
	die "--image: not an image reference: $IMAGE"
fi
[[ $NAMESPACE =~ ^[a-z0-9]([a-z0-9-]*[a-z0-9])?$ ]] || die "--namespace: not a namespace name: $NAMESPACE"

command -v kubectl >/dev/null || die "kubectl is not installed (https://kubernetes.io/docs/tasks/tools/)"

# Render first: a broken overlay fails here, before the cluster is touched.
rendered=$(kubectl kustomize "$OVERLAY_DIR") || die "kubectl kustomize $OVERLAY_DIR failed"
if [[ -n $IMAGE ]]; then
	rendered=$(sed -E "s#^([[:space:]]*image: )${DEFAULT_IMAGE_NAME//./\\.}([:@][^[:space:]]*)?\$#\\1${IMAGE}#" <<<"$rendered")
	grep -q "image: ${IMAGE}\$" <<<"$rendered" || die "--image: found no '$DEFAULT_IMAGE_NAME' image to replace"
fi
if $RENDER; then
	printf '%s\n' "$rendered"
	exit 0
fi
grep -q "^  namespace: ${NAMESPACE}\$" <<<"$rendered" ||
	die "the overlay does not deploy to namespace '$NAMESPACE' (use --namespace)"
kinds=$(sed -n 's/^kind: //p' <<<"$rendered" | sort -u)
has_kind() { grep -qx "$1" <<<"$kinds"; }
# Names of the Deployments (kustomize prints keys sorted: metadata.name is the
# first two-space "name:" after "kind:").
names_of() { awk -v k="kind: $1" '/^---/{f=0} $0==k{f=1} f && /^  name: /{print $2; f=0}' <<<"$rendered"; }
deployments=$(names_of Deployment)
scaledobjects=$(names_of ScaledObject)

context=$(kubectl config current-context 2>/dev/null || echo "(none)")
log "context: $context; overlay: $OVERLAY_DIR; namespace: $NAMESPACE"
kubectl version --request-timeout=15s >/dev/null 2>&1 ||
	die "the cluster of context '$context' does not answer (kubectl version failed)"

need_crd() {
	kubectl get crd "$1" >/dev/null 2>&1 || die "CRD $1 is missing: $2"
}
keda_hint="install KEDA 2.x first: helm repo add kedacore https://kedacore.github.io/charts && helm install keda kedacore/keda -n keda --create-namespace"
if has_kind ScaledObject; then need_crd scaledobjects.keda.sh "$keda_hint"; fi
if has_kind TriggerAuthentication; then need_crd triggerauthentications.keda.sh "$keda_hint"; fi
if has_kind ServiceMonitor; then
	need_crd servicemonitors.monitoring.coreos.com \
		"install Prometheus Operator (e.g. the kube-prometheus-stack chart), or use an overlay without a ServiceMonitor"
fi
if has_kind ScaledObject; then
	available=$(kubectl get apiservice v1beta1.external.metrics.k8s.io \
		-o jsonpath='{.status.conditions[?(@.type=="Available")].status}' 2>/dev/null || true)
	[[ $available == True ]] ||
		die "KEDA's metrics API (apiservice v1beta1.external.metrics.k8s.io) is not available; is keda-operator-metrics-apiserver running?"
fi

if grep -q "name: ${SECRET}\$" <<<"$rendered"; then
	if ! kubectl -n "$NAMESPACE" get secret "$SECRET" >/dev/null 2>&1; then
		die "Secret $NAMESPACE/$SECRET is missing. Create it first:
  kubectl create namespace $NAMESPACE --dry-run=client -o yaml | kubectl apply -f -
  kubectl -n $NAMESPACE create secret generic $SECRET --from-literal=username=USER --from-file=password=/dev/stdin"
	fi
	for key in username password; do
		value=$(kubectl -n "$NAMESPACE" get secret "$SECRET" -o "jsonpath={.data.$key}" | base64 -d 2>/dev/null || true)
		[[ -n $value ]] || die "Secret $NAMESPACE/$SECRET has no key '$key' (or it is empty)"
		[[ $value != REPLACE_ME ]] || die "Secret $NAMESPACE/$SECRET: key '$key' is still the template's placeholder"
	done
	unset value
fi

if $DRY_RUN; then
	log "dry run: kubectl apply --dry-run=server"
	kubectl apply --dry-run=server -f - <<<"$rendered"
	exit 0
fi

log "applying"
kubectl apply -f - <<<"$rendered"

for d in $deployments; do
	log "waiting for deployment/$d"
	kubectl -n "$NAMESPACE" rollout status "deployment/$d" --timeout="$TIMEOUT"
done
for so in $scaledobjects; do
	log "waiting for scaledobject/$so to be Ready"
	kubectl -n "$NAMESPACE" wait --for=condition=Ready "scaledobject/$so" --timeout="$TIMEOUT"
done
kubectl -n "$NAMESPACE" get scaledobject,hpa,deployment,pods -l app.kubernetes.io/part-of=microbatch 2>/dev/null ||
	kubectl -n "$NAMESPACE" get deployment,pods
log "done. Watch it with: deploy/scripts/monitor.sh --namespace $NAMESPACE"
