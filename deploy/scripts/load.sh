#!/usr/bin/env bash
# load.sh - the customer demo: produce test records with `microbatch produce`
# as a Kubernetes Job in the workers' namespace, then watch KEDA scale.
# Run `deploy/scripts/load.sh --help` for details.
set -euo pipefail

NAMESPACE=${MICROBATCH_NAMESPACE:-microbatch}
DEPLOYMENT=microbatch
COUNT=10000
RATE=200
SIZE=100
KEYS=100
PARTITIONS=""
TOPIC=""
CREATE_TOPIC=true
TOPIC_PARTITIONS=8
REPLICATION_FACTOR=3
IMAGE=""
CONFIGMAP=""
SECRET=""
NO_SECRET=false
PRINT=false
WAIT=true
TIMEOUT=1800

log() { printf 'load: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

usage() {
	cat <<EOF
Usage: deploy/scripts/load.sh [options]

Runs 'microbatch produce' in a Job next to the workers: it connects to the
brokers with the workers' own ConfigMap and Secret, so it works against MSK
from inside the VPC. First (unless --no-create-topic) it creates the topic
and its dead-letter topic '<topic>.dlq' if they do not exist yet.

The image, ConfigMap and Secret are taken from deployment/$DEPLOYMENT, so
deploy first (deploy/scripts/deploy.sh). Then watch with monitor.sh.

Load:
  --count N               Records to produce [$COUNT]
  --rate R                Records per second, 0 = as fast as possible [$RATE]
  --size B                Value size in bytes [$SIZE]
  --keys K                Distinct keys, 0 = no keys [$KEYS]
  --partitions LIST       Aim every record at these partitions, e.g. 0,3
                          (a hot-partition burst)
  --topic T               Topic [the workers' KAFKA_TOPIC]
Topic creation:
  --no-create-topic       Do not create the topics
  --topic-partitions N    Partitions of a new topic [$TOPIC_PARTITIONS]
  --replication-factor N  Replication factor of a new topic [$REPLICATION_FACTOR; 1 on a
                          single-broker local Kafka]
Job:
  --namespace NS          [$NAMESPACE]
  --image IMAGE           [the workers' image]
  --configmap NAME        [the workers' ConfigMap]
  --secret NAME           [the workers' Secret, if they use one]
  --no-secret             No credentials (PLAINTEXT)
  --timeout S             Seconds to wait for the Job [$TIMEOUT]
  --no-wait               Create the Job and return
  --print                 Print the Job manifest and exit (needs no cluster)
  -h, --help              Show this help

Examples:
  deploy/scripts/load.sh --count 20000 --rate 500
  deploy/scripts/load.sh --count 5000 --rate 0 --partitions 0,3
EOF
}

number() { [[ $2 =~ ^[0-9]+$ ]] || die "$1: expected a whole number, got '$2'"; }

while (($#)); do
	case $1 in
	--count) COUNT=${2:?}; number "$1" "$COUNT"; shift 2 ;;
	--rate) RATE=${2:?}; number "$1" "$RATE"; shift 2 ;;
	--size) SIZE=${2:?}; number "$1" "$SIZE"; shift 2 ;;
	--keys) KEYS=${2:?}; number "$1" "$KEYS"; shift 2 ;;
	--partitions)
		PARTITIONS=${2:?}
		[[ $PARTITIONS =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--partitions: expected e.g. 0,3, got '$PARTITIONS'"
		shift 2
		;;
	--topic)
		TOPIC=${2:?}
		[[ $TOPIC =~ ^[A-Za-z0-9._-]{1,249}$ ]] || die "--topic: not a Kafka topic name: '$TOPIC'"
		shift 2
		;;
	--no-create-topic) CREATE_TOPIC=false; shift ;;
	--topic-partitions) TOPIC_PARTITIONS=${2:?}; number "$1" "$TOPIC_PARTITIONS"; shift 2 ;;
	--replication-factor) REPLICATION_FACTOR=${2:?}; number "$1" "$REPLICATION_FACTOR"; shift 2 ;;
	--namespace) NAMESPACE=${2:?}; shift 2 ;;
	--image) IMAGE=${2:?}; shift 2 ;;
	--configmap) CONFIGMAP=${2:?}; shift 2 ;;
	--secret) SECRET=${2:?}; shift 2 ;;
	--no-secret) NO_SECRET=true; shift ;;
	--timeout) TIMEOUT=${2:?}; number "$1" "$TIMEOUT"; shift 2 ;;
	--no-wait) WAIT=false; shift ;;
	--print) PRINT=true; shift ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; die "unknown argument: $1" ;;
	esac
done
[[ $NAMESPACE =~ ^[a-z0-9]([a-z0-9-]*[a-z0-9])?$ ]] || die "--namespace: not a namespace name: $NAMESPACE"

if ! $PRINT; then
	command -v kubectl >/dev/null || die "kubectl is not installed"
	jp() {
		kubectl -n "$NAMESPACE" get deployment "$DEPLOYMENT" -o "jsonpath=$1"
	}
	jp '{.metadata.name}' >/dev/null 2>&1 ||
		die "deployment $NAMESPACE/$DEPLOYMENT not found: deploy first (deploy/scripts/deploy.sh)"
	worker='{.spec.template.spec.containers[?(@.name=="worker")]'
	[[ -n $IMAGE ]] || IMAGE=$(jp "$worker.image}")
	[[ -n $CONFIGMAP ]] || CONFIGMAP=$(jp "$worker.envFrom[0].configMapRef.name}")
	if [[ -z $SECRET ]] && ! $NO_SECRET; then
		SECRET=$(jp "$worker.env[?(@.name==\"KAFKA_PASSWORD\")].valueFrom.secretKeyRef.name}")
	fi
	# With MSK IAM the Job signs its tokens with the workers' IAM role.
	SERVICE_ACCOUNT=$(jp '{.spec.template.spec.serviceAccountName}')
fi
[[ -n $IMAGE ]] || IMAGE=ghcr.io/microbatch/microbatch:0.1.0
[[ -n $CONFIGMAP ]] || CONFIGMAP=microbatch-config
if [[ -z $SECRET ]] && ! $NO_SECRET && $PRINT; then SECRET=microbatch-kafka; fi
if $NO_SECRET; then SECRET=""; fi
SERVICE_ACCOUNT=${SERVICE_ACCOUNT:-}
for v in IMAGE CONFIGMAP SECRET SERVICE_ACCOUNT; do
	[[ ${!v} =~ ^[A-Za-z0-9._/:@-]*$ ]] || die "$v: unexpected characters in '${!v}'"
done

JOB=microbatch-load-$(date +%Y%m%d-%H%M%S)
# Kubernetes expands $(KAFKA_TOPIC) in args from the container's environment.
# shellcheck disable=SC2016
topic_ref=${TOPIC:-'$(KAFKA_TOPIC)'}

# YAML for one container: name, then its args (one per line).
container() {
	local name=$1
	shift
	cat <<EOF
        - name: $name
          image: $IMAGE
          imagePullPolicy: IfNotPresent
          args:
EOF
	local a
	for a in "$@"; do
		printf '            - "%s"\n' "$a"
	done
	cat <<EOF
          envFrom:
            - configMapRef:
                name: $CONFIGMAP
EOF
	if [[ -n $SECRET ]]; then
		cat <<EOF
          env:
            - name: KAFKA_USERNAME
              valueFrom:
                secretKeyRef:
                  name: $SECRET
                  key: username
            - name: KAFKA_PASSWORD
              valueFrom:
                secretKeyRef:
                  name: $SECRET
                  key: password
EOF
	fi
	cat <<EOF
          resources:
            requests:
              cpu: 100m
              memory: 64Mi
            limits:
              cpu: "1"
              memory: 256Mi
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            runAsNonRoot: true
            capabilities:
              drop:
                - ALL
EOF
}

manifest() {
	cat <<EOF
apiVersion: batch/v1
kind: Job
metadata:
  name: $JOB
  namespace: $NAMESPACE
  labels:
    app.kubernetes.io/name: microbatch
    app.kubernetes.io/component: load
    app.kubernetes.io/part-of: microbatch
spec:
  # Producing again after a failure would duplicate the load: no retries.
  backoffLimit: 0
  activeDeadlineSeconds: $TIMEOUT
  ttlSecondsAfterFinished: 3600
  template:
    metadata:
      labels:
        app.kubernetes.io/name: microbatch
        app.kubernetes.io/component: load
        app.kubernetes.io/part-of: microbatch
    spec:
      restartPolicy: Never
      automountServiceAccountToken: false
      shareProcessNamespace: true
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        runAsGroup: 65532
        fsGroup: 65532
        seccompProfile:
          type: RuntimeDefault
EOF
	if [[ -n $SERVICE_ACCOUNT ]]; then
		echo "      serviceAccountName: $SERVICE_ACCOUNT"
	fi
	if $CREATE_TOPIC; then
		echo "      initContainers:"
		container create-topic topic create --topic "$topic_ref" \
			--partitions "$TOPIC_PARTITIONS" --replication-factor "$REPLICATION_FACTOR"
		container create-dlq-topic topic create --topic "$topic_ref.dlq" \
			--partitions "$TOPIC_PARTITIONS" --replication-factor "$REPLICATION_FACTOR"
	fi
	echo "      containers:"
	local args=(produce --topic "$topic_ref" --count "$COUNT" --rate "$RATE" --size "$SIZE" --keys "$KEYS" --quiet)
	if [[ -n $PARTITIONS ]]; then args+=(--partitions "$PARTITIONS"); fi
	container produce "${args[@]}"
}

if $PRINT; then
	manifest
	exit 0
fi

log "creating job/$JOB in $NAMESPACE: $COUNT records at ${RATE}/s (0 = unthrottled)"
manifest | kubectl create -f -
if ! $WAIT; then
	log "follow it with: kubectl -n $NAMESPACE logs -f job/$JOB"
	exit 0
fi

log "waiting for the pod to start"
deadline=$((SECONDS + 300))
while :; do
	phase=$(kubectl -n "$NAMESPACE" get pods -l "job-name=$JOB" -o jsonpath='{.items[0].status.phase}' 2>/dev/null || true)
	case $phase in
	Running | Succeeded | Failed) break ;;
	esac
	((SECONDS < deadline)) || die "the Job's pod did not start in 300 s: kubectl -n $NAMESPACE describe job/$JOB"
	sleep 2
done
kubectl -n "$NAMESPACE" logs -f "job/$JOB" --all-containers --prefix 2>&1 || true
kubectl -n "$NAMESPACE" wait --for=condition=complete "job/$JOB" --timeout="${TIMEOUT}s" >/dev/null 2>&1 ||
	die "job/$JOB did not complete: kubectl -n $NAMESPACE describe job/$JOB"
log "job/$JOB completed. Watch the workers catch up: deploy/scripts/monitor.sh --namespace $NAMESPACE"
