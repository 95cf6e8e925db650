#!/usr/bin/env bash
# cluster.sh - a local Kubernetes control plane with KEDA, on 127.0.0.1 only:
# etcd, kube-apiserver, kube-controller-manager, KEDA's operator and its
# metrics adapter (registered as the external.metrics.k8s.io APIService).
# No kubelet and no scheduler: pods stay unscheduled; the e2e test's stand-in
# runs them as local processes.
#
# Usage: deploy/e2e/cluster.sh start|stop|status|env
#   start   build what is missing (build.sh), make certificates, start all,
#           wait until the APIService is Available
#   stop    stop what start started (by the PIDs it wrote), nothing else
#   status  exit 0 if every part started is still running
#   env     print the running cluster's settings (KUBECONFIG=..., kubectl's
#           directory, the HPA sync period, the log directory)
# Environment:
#   E2E_STATE_DIR   where state, certificates and logs go [deploy/e2e/.cluster]
#   E2E_PORT_BASE   first of the 8 local ports used [27100]
#   E2E_HPA_SYNC_SECONDS  the HPA controller's sync period [5] (Kubernetes: 15)
#   E2E_HPA_DOWNSCALE_SECONDS  the scale-down window of an HPA without a
#                   behavior [20] (Kubernetes: 300)
#   E2E_KEDA_CA_DIR a directory of CA certificates KEDA's scalers trust for
#                   TLS (KEDA's --ca-dir, e.g. the Kafka broker's CA)
set -euo pipefail

E2E_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
STATE=${E2E_STATE_DIR:-$E2E_DIR/.cluster}
BASE=${E2E_PORT_BASE:-27100}
if ! [[ $BASE =~ ^[0-9]+$ ]] || ((BASE <= 1024 || BASE >= 65500)); then
	echo "cluster: E2E_PORT_BASE: expected a port number, got '$BASE'" >&2
	exit 2
fi
ETCD_PORT=$BASE
ETCD_PEER_PORT=$((BASE + 1))
APISERVER_PORT=$((BASE + 2))
OPERATOR_METRICS_PORT=$((BASE + 3))
OPERATOR_PROBE_PORT=$((BASE + 4))
OPERATOR_GRPC_PORT=$((BASE + 5))
ADAPTER_PORT=$((BASE + 6))
ADAPTER_METRICS_PORT=$((BASE + 7))
ALL_PORTS=("$ETCD_PORT" "$ETCD_PEER_PORT" "$APISERVER_PORT" "$OPERATOR_METRICS_PORT"
	"$OPERATOR_PROBE_PORT" "$OPERATOR_GRPC_PORT" "$ADAPTER_PORT" "$ADAPTER_METRICS_PORT")
# Start order; stop goes backwards.
PARTS=(etcd kube-apiserver kube-controller-manager keda-operator keda-adapter)
# The HPA controller's sync period (the default is 15 s): one source for the
# test, which reads it from the env file.
HPA_SYNC_SECONDS=${E2E_HPA_SYNC_SECONDS:-5}
# The window an HPA without a behavior keeps its highest recommendation
# (the controller's flag; with a behavior the ScaledObject sets it).
HPA_DOWNSCALE_SECONDS=${E2E_HPA_DOWNSCALE_SECONDS:-20}

log() { printf 'cluster: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

# A part runs if its PID file names a live process of its own binary (a PID
# reused by another program is never signalled).
running() {
	local pid
	[[ -f $STATE/pids/$1 ]] || return 1
	pid=$(cat "$STATE/pids/$1")
	[[ $(readlink "/proc/$pid/exe" 2>/dev/null) == */"$1" ]]
}

stop_part() {
	local part=$1 pid i
	[[ -f $STATE/pids/$part ]] || return 0
	pid=$(cat "$STATE/pids/$part")
	if running "$part"; then
		kill -TERM "$pid" 2>/dev/null || true
		for i in $(seq 1 50); do
			running "$part" || break
			sleep 0.2
		done
		if running "$part"; then
			log "$part ($pid) did not stop in 10 s: SIGKILL"
			kill -KILL "$pid" 2>/dev/null || true
		fi
	fi
	rm -f "$STATE/pids/$part"
}

cmd_stop() {
	local i
	for ((i = ${#PARTS[@]} - 1; i >= 0; i--)); do stop_part "${PARTS[i]}"; done
	log "stopped"
}

cmd_status() {
	local part ok=0
	for part in "${PARTS[@]}"; do
		if running "$part"; then
			printf '%-24s running (pid %s)\n' "$part" "$(cat "$STATE/pids/$part")"
		else
			printf '%-24s not running\n' "$part"
			ok=1
		fi
	done
	return $ok
}

# start_part NAME CMD...: run in the background, its output in logs/NAME.log.
start_part() {
	local part=$1
	shift
	"$@" >"$STATE/logs/$part.log" 2>&1 &
	echo $! >"$STATE/pids/$part"
}

# wait_for PART SECONDS CMD...: retry CMD until it succeeds, while PART runs.
wait_for() {
	local part=$1 seconds=$2 deadline
	shift 2
	deadline=$((SECONDS + seconds))
	until "$@" >/dev/null 2>&1; do
		if ! running "$part"; then
			tail -n 20 "$STATE/logs/$part.log" >&2
			die "$part exited (log: $STATE/logs/$part.log)"
		fi
		((SECONDS < deadline)) || die "$part not ready after ${seconds} s (log: $STATE/logs/$part.log)"
		sleep 0.5
	done
}

# sign NAME SUBJECT EXT: a key and a certificate signed by the cluster CA.
sign() {
	local name=$1 subject=$2 ext=$3 ca=${4:-ca}
	openssl req -new -newkey rsa:2048 -nodes -keyout "$PKI/$name.key" -subj "$subject" \
		-out "$PKI/$name.csr" 2>/dev/null
	printf '%s\n' "$ext" >"$PKI/$name.ext"
	openssl x509 -req -in "$PKI/$name.csr" -CA "$PKI/$ca.crt" -CAkey "$PKI/$ca.key" \
		-CAcreateserial -days 2 -sha256 -extfile "$PKI/$name.ext" -out "$PKI/$name.crt" 2>/dev/null
	rm -f "$PKI/$name.csr" "$PKI/$name.ext"
}

make_pki() {
	PKI=$STATE/pki
	rm -rf "$PKI"
	mkdir -p "$PKI"
	local ca
	for ca in ca front-proxy-ca; do
		openssl req -x509 -newkey rsa:2048 -nodes -keyout "$PKI/$ca.key" -out "$PKI/$ca.crt" \
			-days 2 -subj "/CN=microbatch-e2e-$ca" 2>/dev/null
	done
	sign apiserver /CN=kube-apiserver "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default.svc
extendedKeyUsage=serverAuth"
	sign admin "/O=system:masters/CN=microbatch-e2e-admin" "extendedKeyUsage=clientAuth"
	sign front-proxy-client /CN=front-proxy-client "extendedKeyUsage=clientAuth" front-proxy-ca
	# KEDA's operator and adapter share one pair, as KEDA's own cert rotation
	# makes it: the operator's gRPC server, the adapter's client of it, and
	# the adapter's HTTPS for the aggregator (which checks the Service name).
	sign keda "/CN=keda-operator" "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:keda-operator.keda.svc,DNS:keda-metrics-apiserver.keda.svc
extendedKeyUsage=serverAuth,clientAuth"
	mkdir -p "$PKI/keda"
	cp "$PKI/ca.crt" "$PKI/keda/ca.crt"
	cp "$PKI/keda.crt" "$PKI/keda/tls.crt"
	cp "$PKI/keda.key" "$PKI/keda/tls.key"
	openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
	openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
}

write_kubeconfig() {
	cat >"$STATE/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: microbatch-e2e
    cluster:
      server: https://127.0.0.1:$APISERVER_PORT
      certificate-authority: $STATE/pki/ca.crt
users:
  - name: admin
    user:
      client-certificate: $STATE/pki/admin.crt
      client-key: $STATE/pki/admin.key
contexts:
  - name: microbatch-e2e
    context:
      cluster: microbatch-e2e
      user: admin
current-context: microbatch-e2e
EOF
}

# The adapter as KEDA's chart registers it, but its Service is an
# ExternalName pointing at this machine: the aggregator then dials
# localhost:<port> (a Service's endpoints may not be loopback addresses).
apiservice_manifest() {
	cat <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: keda
---
apiVersion: v1
kind: Service
metadata:
  name: keda-metrics-apiserver
  namespace: keda
spec:
  type: ExternalName
  externalName: localhost
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata:
  name: v1beta1.external.metrics.k8s.io
spec:
  group: external.metrics.k8s.io
  version: v1beta1
  groupPriorityMinimum: 100
  versionPriority: 100
  service:
    name: keda-metrics-apiserver
    namespace: keda
    port: $ADAPTER_PORT
  caBundle: $(base64 -w0 "$STATE/pki/ca.crt")
EOF
}

cmd_start() {
	local bins
	bins=$("$E2E_DIR/build.sh") || die "build failed"
	eval "$bins"
	local part port
	for part in "${PARTS[@]}"; do
		! running "$part" || die "$part is already running (pid $(cat "$STATE/pids/$part")); run '$0 stop' first"
	done
	for port in "${ALL_PORTS[@]}"; do
		! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null ||
			die "port $port is in use (set E2E_PORT_BASE to use others)"
	done
	mkdir -p "$STATE/logs" "$STATE/pids"
	rm -rf "$STATE/etcd"
	make_pki
	write_kubeconfig
	local kubectl=("$KUBE_BIN/kubectl" --kubeconfig "$STATE/kubeconfig")
	# Whatever stops start half-way stops what it had started.
	trap 'log "start failed; logs in $STATE/logs"; cmd_stop' EXIT

	log "etcd on 127.0.0.1:$ETCD_PORT"
	# No fsync: a throw-away store for tests on a shared disk.
	start_part etcd "$ETCD_BIN/etcd" --name e2e --data-dir "$STATE/etcd" \
		--listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
		--advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
		--listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
		--initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
		--initial-cluster "e2e=http://127.0.0.1:$ETCD_PEER_PORT" \
		--unsafe-no-fsync --log-level warn
	wait_for etcd 30 curl -fsS "http://127.0.0.1:$ETCD_PORT/health"

	log "kube-apiserver on 127.0.0.1:$APISERVER_PORT"
	local pki=$STATE/pki
	start_part kube-apiserver "$KUBE_BIN/kube-apiserver" \
		--etcd-servers "http://127.0.0.1:$ETCD_PORT" \
		--bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$APISERVER_PORT" \
		--tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
		--client-ca-file "$pki/ca.crt" --authorization-mode RBAC \
		--service-account-issuer https://kubernetes.default.svc \
		--service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
		--service-cluster-ip-range 10.96.0.0/16 --endpoint-reconciler-type none \
		--requestheader-client-ca-file "$pki/front-proxy-ca.crt" \
		--requestheader-allowed-names front-proxy-client \
		--requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
		--requestheader-extra-headers-prefix X-Remote-Extra- \
		--proxy-client-cert-file "$pki/front-proxy-client.crt" \
		--proxy-client-key-file "$pki/front-proxy-client.key" \
		--profiling=false --v 1
	wait_for kube-apiserver 120 "${kubectl[@]}" get --raw /readyz

	log "kube-controller-manager (HPA sync every ${HPA_SYNC_SECONDS} s)"
	start_part kube-controller-manager "$KUBE_BIN/kube-controller-manager" \
		--kubeconfig "$STATE/kubeconfig" --secure-port 0 --leader-elect=false \
		--controllers deployment-controller,replicaset-controller,horizontal-pod-autoscaler-controller,garbage-collector-controller,namespace-controller,serviceaccount-controller,serviceaccount-token-controller,disruption-controller,root-ca-certificate-publisher-controller \
		--service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
		--horizontal-pod-autoscaler-sync-period "${HPA_SYNC_SECONDS}s" \
		--horizontal-pod-autoscaler-downscale-stabilization "${HPA_DOWNSCALE_SECONDS}s" \
		--profiling=false --v 1
	# Its ServiceAccount controller makes every namespace's "default" account.
	wait_for kube-controller-manager 120 "${kubectl[@]}" -n default get serviceaccount default

	log "KEDA's CRDs, Prometheus Operator's ServiceMonitor CRD, KEDA's namespace and APIService"
	"${kubectl[@]}" apply --server-side -f "$KEDA_CRDS" -f "$SERVICEMONITOR_CRDS" >/dev/null
	apiservice_manifest | "${kubectl[@]}" apply -f - >/dev/null
	"${kubectl[@]}" wait --for condition=Established --timeout 60s -f "$KEDA_CRDS" -f "$SERVICEMONITOR_CRDS" >/dev/null

	local keda_ca=${E2E_KEDA_CA_DIR:-$STATE/no-ca}
	mkdir -p "$keda_ca"
	local keda_env=(env KUBECONFIG="$STATE/kubeconfig" WATCH_NAMESPACE="" POD_NAMESPACE=keda
		KEDA_CLUSTER_OBJECT_NAMESPACE=keda)
	log "keda-operator (gRPC metrics service on 127.0.0.1:$OPERATOR_GRPC_PORT)"
	start_part keda-operator "${keda_env[@]}" "$KEDA_BIN/keda-operator" \
		--metrics-bind-address "127.0.0.1:$OPERATOR_METRICS_PORT" \
		--health-probe-bind-address "127.0.0.1:$OPERATOR_PROBE_PORT" \
		--metrics-service-bind-address "127.0.0.1:$OPERATOR_GRPC_PORT" \
		--cert-dir "$pki/keda" --ca-dir "$keda_ca" --leader-elect=false \
		--zap-log-level info --zap-encoder console
	wait_for keda-operator 120 curl -fsS "http://127.0.0.1:$OPERATOR_PROBE_PORT/readyz"

	log "keda-adapter on 127.0.0.1:$ADAPTER_PORT"
	start_part keda-adapter "${keda_env[@]}" "$KEDA_BIN/keda-adapter" \
		--secure-port "$ADAPTER_PORT" --bind-address 127.0.0.1 \
		--cert-dir "$pki/keda" --tls-cert-file "$pki/keda/tls.crt" --tls-private-key-file "$pki/keda/tls.key" \
		--authentication-kubeconfig "$STATE/kubeconfig" --authorization-kubeconfig "$STATE/kubeconfig" \
		--lister-kubeconfig "$STATE/kubeconfig" \
		--metrics-service-address "127.0.0.1:$OPERATOR_GRPC_PORT" --port "$ADAPTER_METRICS_PORT" \
		--zap-log-level info --zap-encoder console
	wait_for keda-adapter 120 "${kubectl[@]}" get --raw /apis/external.metrics.k8s.io/v1beta1
	"${kubectl[@]}" wait --for condition=Available --timeout 60s apiservice/v1beta1.external.metrics.k8s.io >/dev/null
	trap - EXIT

	cat >"$STATE/env" <<EOF
KUBECONFIG=$STATE/kubeconfig
E2E_KUBECTL=$KUBE_BIN/kubectl
E2E_KUBE_BIN=$KUBE_BIN
E2E_HPA_SYNC_SECONDS=$HPA_SYNC_SECONDS
E2E_HPA_DOWNSCALE_SECONDS=$HPA_DOWNSCALE_SECONDS
E2E_LOGS=$STATE/logs
EOF
	log "ready: export KUBECONFIG=$STATE/kubeconfig (logs in $STATE/logs)"
}

case ${1:-} in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
env) cat "$STATE/env" ;;
-h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
*)
	sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
	exit 2
	;;
esac
