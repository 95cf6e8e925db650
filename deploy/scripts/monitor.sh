#!/usr/bin/env bash
# monitor.sh - watch a microbatch deployment: ScaledObject, HPA, pods, the
# metric KEDA feeds the HPA, and the group's lag per partition.
# Run `deploy/scripts/monitor.sh --help` for details.
set -euo pipefail

NAMESPACE=${MICROBATCH_NAMESPACE:-microbatch}
SCALEDOBJECT=microbatch
DEPLOYMENT=microbatch
INTERVAL=5
ONCE=false
LOCAL=false
LAG_ARGS=()

log() { printf 'monitor: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

usage() {
	cat <<EOF
Usage: deploy/scripts/monitor.sh [options] [-- LAG_OPTIONS...]

Every INTERVAL seconds: the ScaledObject, the HPA KEDA made for it, the pods,
the value of the external metric KEDA serves to the HPA, and
'microbatch lag' (committed offset, high watermark and lag per partition).

'microbatch lag' runs inside a worker pod by default (kubectl exec; the image
needs no shell for that): the pod already has the brokers, credentials, topic
and group in its environment, and it reaches MSK from inside the VPC.

Options:
  --namespace NS     [$NAMESPACE]
  --interval S       Seconds between refreshes [$INTERVAL]
  --once             Print once and exit
  --local            Run the 'microbatch' on this machine's PATH instead; it
                     reads KAFKA_BOOTSTRAP_SERVERS, KAFKA_TOPIC, CONSUMER_GROUP,
                     KAFKA_USERNAME, ... from this shell's environment
  -h, --help         Show this help
  -- LAG_OPTIONS     Passed to 'microbatch lag', e.g.
                     -- --policy keda --lag-threshold 3 --replicas 8

Example:
  deploy/scripts/monitor.sh --once -- --policy keda --lag-threshold 3 --max 24
EOF
}

while (($#)); do
	case $1 in
	--namespace)
		NAMESPACE=${2:?--namespace needs a value}
		shift 2
		;;
	--interval)
		INTERVAL=${2:?--interval needs a value}
		shift 2
		;;
	--once)
		ONCE=true
		shift
		;;
	--local)
		LOCAL=true
		shift
		;;
	-h | --help)
		usage
		exit 0
		;;
	--)
		shift
		LAG_ARGS=("$@")
		break
		;;
	*)
		usage >&2
		die "unknown argument: $1"
		;;
	esac
done
[[ $INTERVAL =~ ^[1-9][0-9]*$ ]] || die "--interval: expected whole seconds, got '$INTERVAL'"

command -v kubectl >/dev/null || die "kubectl is not installed"
if $LOCAL; then
	command -v microbatch >/dev/null || die "--local: no 'microbatch' on PATH"
fi

section() { printf '\n== %s\n' "$*"; }

external_metric() {
	local name raw
	if ! name=$(kubectl -n "$NAMESPACE" get scaledobject "$SCALEDOBJECT" \
		-o jsonpath='{.status.externalMetricNames[0]}' 2>/dev/null); then
		name=""
	fi
	if [[ -z $name ]]; then
		echo "(ScaledObject $SCALEDOBJECT has no external metric yet)"
		return
	fi
	raw=$(kubectl get --raw \
		"/apis/external.metrics.k8s.io/v1beta1/namespaces/$NAMESPACE/$name?labelSelector=scaledobject.keda.sh%2Fname%3D$SCALEDOBJECT" 2>&1) || {
		echo "$name: not available: $raw"
		return
	}
	printf '%s = %s\n' "$name" "$(grep -o '"value":"[^"]*"' <<<"$raw" | head -n1 | cut -d'"' -f4)"
}

lag() {
	if $LOCAL; then
		microbatch lag ${LAG_ARGS[@]+"${LAG_ARGS[@]}"} 2>&1 || true
	else
		kubectl -n "$NAMESPACE" exec "deployment/$DEPLOYMENT" -c worker -- \
			/usr/local/bin/microbatch lag --log-format text ${LAG_ARGS[@]+"${LAG_ARGS[@]}"} 2>&1 || true
	fi
}

show() {
	local context
	context=$(kubectl config current-context 2>/dev/null) || context=none
	printf '%s  context=%s namespace=%s\n' "$(date '+%F %T')" "$context" "$NAMESPACE"
	section "ScaledObject"
	kubectl -n "$NAMESPACE" get scaledobject 2>&1 || true
	section "HPA (made by KEDA)"
	kubectl -n "$NAMESPACE" get hpa 2>&1 || true
	section "Pods"
	kubectl -n "$NAMESPACE" get pods -l app.kubernetes.io/part-of=microbatch -o wide 2>&1 || true
	section "Metric KEDA serves to the HPA"
	external_metric
	section "microbatch lag"
	lag
}

if $ONCE; then
	show
	exit 0
fi
trap 'exit 0' INT TERM
while true; do
	out=$(show)
	if [[ -t 1 ]]; then printf '\033[2J\033[H'; fi
	printf '%s\n' "$out"
	sleep "$INTERVAL"
done
