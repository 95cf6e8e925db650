#!/usr/bin/env bash
# cleanup.sh - remove what deploy.sh and load.sh created.
# Run `deploy/scripts/cleanup.sh --help` for details.
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
OVERLAYS_DIR=$(cd -- "$SCRIPT_DIR/../k8s/overlays" && pwd)

NAMESPACE=${MICROBATCH_NAMESPACE:-microbatch}
SECRET=microbatch-kafka
ALL=false
YES=false
OVERLAY=""
SELECTOR=app.kubernetes.io/part-of=microbatch

log() { printf 'cleanup: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

usage() {
	cat <<EOF
Usage: deploy/scripts/cleanup.sh [options] OVERLAY

Deletes, in this order:
  1. the ScaledObjects (KEDA then removes its HPA and stops scaling);
  2. the load Jobs made by load.sh;
  3. every other object of OVERLAY (msk-scram, external-scaler, plaintext or a
     directory) labelled $SELECTOR: Deployments, Services,
     ConfigMaps, the PodDisruptionBudget, the ServiceMonitor, ...
The namespace and the Secret '$SECRET' are kept unless --all is given.
Workers get their full grace period: each drains, commits and leaves the group.
Nothing on the Kafka side is deleted (topics, committed offsets, MSK).

Options:
  --namespace NS   [$NAMESPACE]
  --all            Also delete the Secret and the namespace '$NAMESPACE'
  --yes            Do not ask for confirmation
  -h, --help       Show this help
EOF
}

while (($#)); do
	case $1 in
	--namespace)
		NAMESPACE=${2:?--namespace needs a value}
		shift 2
		;;
	--all)
		ALL=true
		shift
		;;
	--yes | -y)
		YES=true
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
		[[ -z $OVERLAY ]] || die "one overlay at a time"
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
[[ $NAMESPACE =~ ^[a-z0-9]([a-z0-9-]*[a-z0-9])?$ ]] || die "--namespace: not a namespace name: $NAMESPACE"
command -v kubectl >/dev/null || die "kubectl is not installed"

rendered=$(kubectl kustomize "$OVERLAY_DIR") || die "kubectl kustomize $OVERLAY_DIR failed"
context=$(kubectl config current-context 2>/dev/null || echo "(none)")
known=$(kubectl api-resources --no-headers --request-timeout=15s 2>/dev/null | awk '{print $NF}') ||
	die "the cluster of context '$context' does not answer (kubectl api-resources failed)"
# Kinds of the overlay, minus the Namespace, the ScaledObject (done first) and
# kinds this cluster does not know (never applied, nothing to delete).
kinds=()
while read -r kind; do
	case $kind in Namespace | ScaledObject | '') continue ;; esac
	if grep -qx "$kind" <<<"$known"; then
		kinds+=("$kind")
	fi
done < <(sed -n 's/^kind: //p' <<<"$rendered" | sort -u)

what="ScaledObjects, load Jobs and ${kinds[*]:-nothing else} labelled $SELECTOR"
$ALL && what="$what, then Secret $SECRET and namespace $NAMESPACE"
if ! $YES; then
	[[ -t 0 ]] || die "not a terminal: pass --yes to confirm"
	read -r -p "Delete from context '$context', namespace '$NAMESPACE': $what? [y/N] " answer
	[[ $answer == [yY]* ]] || die "nothing deleted"
fi

if kubectl get crd scaledobjects.keda.sh >/dev/null 2>&1; then
	log "deleting ScaledObjects"
	kubectl -n "$NAMESPACE" delete scaledobject -l "$SELECTOR" --ignore-not-found --wait=true
fi
log "deleting load Jobs"
kubectl -n "$NAMESPACE" delete job -l app.kubernetes.io/component=load --ignore-not-found
if ((${#kinds[@]})); then
	list=$(
		IFS=,
		echo "${kinds[*]}"
	)
	log "deleting $list"
	kubectl -n "$NAMESPACE" delete "$list" -l "$SELECTOR" --ignore-not-found --wait=true
fi
if $ALL; then
	log "deleting Secret $SECRET and namespace $NAMESPACE"
	kubectl -n "$NAMESPACE" delete secret "$SECRET" --ignore-not-found
	kubectl delete namespace "$NAMESPACE" --ignore-not-found --wait=true
fi
log "done"
