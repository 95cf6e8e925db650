package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// The namespace every overlay deploys to.
const namespace = "microbatch"

var (
	scaledObjects = schema.GroupVersionResource{Group: "keda.sh", Version: "v1alpha1", Resource: "scaledobjects"}
	triggerAuths  = schema.GroupVersionResource{Group: "keda.sh", Version: "v1alpha1", Resource: "triggerauthentications"}
)

// Shortened for the test (the kit's values are 300 s): KEDA's cooldown
// (scale to zero) and the HPA's scale-down window.
const (
	cooldownSeconds     = 10
	scaleDownWindowSecs = 10
	pollingSeconds      = 5
)

// Where the pods find the broker's CA: a ConfigMap volume.
const (
	caMountPath = "/etc/microbatch/kafka-ca"
	caFile      = "ca.pem"
)

// testOverlay is a kustomization on top of one of the kit's overlays that
// points it at the local broker and a topic of its own, the way a user's
// own overlay would: the kit's overlay is a resource, unchanged.
type testOverlay struct {
	base       string // plaintext, msk-scram, external-scaler or share-group
	topic      string
	group      string
	worker     kafka  // the workers' Kafka settings (ConfigMap + Secret)
	scalerAddr string // external-scaler: the trigger's scalerAddress
	minReplica int
	// Deliberate breakage, for the tests that must fail.
	triggerAuthPasswordKey string // the key the TriggerAuthentication reads the password from
	podPasswordKey         string // the key the worker's KAFKA_PASSWORD comes from
	// external-scaler: a second trigger on the same ScaledObject, the keda
	// policy on this topic (its metric is the topic's lag).
	secondTopic string
	// external-scaler: KEDA calls the scaler over TLS with a client
	// certificate (the scaler's and KEDA's Secrets come from scalerTLS).
	tls *scalerTLS
	// The ScaledObject spells out no behavior (the kit's does), as most
	// users' do not: the HPA then takes its other scale-up algorithm, and
	// the controller's own scale-down window.
	withoutBehavior bool
	// The topic's partitions; 0: the tests' usual 4.
	partitions int
	// The workers' handler POSTs batches here (the http handler) instead
	// of the kit's simulated one.
	handlerURL string
}

func (o testOverlay) topicPartitions() int {
	if o.partitions > 0 {
		return o.partitions
	}
	return partitions
}

// The Secrets of a scaler served over TLS: the scaler's certificate, key
// and the CA its clients must be signed by; KEDA's client certificate, key
// and the CA of the scaler's certificate (a TriggerAuthentication's
// caCert, tlsClientCert, tlsClientKey).
const (
	scalerTLSSecret = "microbatch-scaler-tls"
	kedaTLSSecret   = "keda-scaler-client"
	scalerTLSMount  = "/etc/microbatch/scaler-tls"
)

// behaviorPatch shortens the kit's scale-down window for the test, or
// takes the behavior away.
func behaviorPatch(without bool) string {
	if without {
		return `{"op": "remove", "path": "/spec/advanced/horizontalPodAutoscalerConfig/behavior"}`
	}
	return fmt.Sprintf(`{"op": "replace", "path": "/spec/advanced/horizontalPodAutoscalerConfig/behavior/scaleDown/stabilizationWindowSeconds", "value": %d}`, scaleDownWindowSecs)
}

// share: the workers join a share group (the share-group overlay).
func (o testOverlay) share() bool { return o.base == "share-group" }

// external: KEDA asks `microbatch scaler` (external-scaler and the overlays
// built on it).
func (o testOverlay) external() bool { return o.base == "external-scaler" || o.share() }

// write renders the kustomization into dir and returns dir.
func (o testOverlay) write(repo, dir string) (string, error) {
	rel, err := filepath.Rel(dir, filepath.Join(repo, "deploy", "k8s", "overlays", o.base))
	if err != nil {
		return "", err
	}
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	p("apiVersion: kustomize.config.k8s.io/v1beta1")
	p("kind: Kustomization")
	p("resources:\n  - %s", rel)
	if o.tls != nil {
		p("  - scaler-tls-auth.yaml")
	}
	p("configMapGenerator:\n  - name: microbatch-config\n    behavior: merge\n    literals:")
	groupVar, groupKey := "CONSUMER_GROUP", "consumerGroup"
	if o.share() {
		groupVar, groupKey = "SHARE_GROUP", "shareGroup"
	}
	p("      - KAFKA_TOPIC=%s\n      - %s=%s", o.topic, groupVar, o.group)
	p("      - KAFKA_BOOTSTRAP_SERVERS=%s", o.worker["KAFKA_BOOTSTRAP_SERVERS"])
	// A private CA reaches the pods as a user's would: a ConfigMap mounted
	// as a volume, its path in KAFKA_SSL_CA_LOCATION.
	ca := o.worker["KAFKA_SSL_CA_LOCATION"]
	if ca != "" {
		p("      - KAFKA_SSL_CA_LOCATION=%s/%s", caMountPath, caFile)
	}
	// A scale-down's SIGTERM drains within this; the pods' grace is 45 s.
	p("      - MICROBATCH_DRAIN_TIMEOUT_MS=5000")
	if o.handlerURL != "" {
		p("      - MICROBATCH_HANDLER=http\n      - MICROBATCH_URL=%s", o.handlerURL)
	}
	if ca != "" {
		p("  - name: kafka-ca\n    namespace: %s\n    files:\n      - %s\n    options:\n      disableNameSuffixHash: true", namespace, caFile)
	}
	p("patches:")
	so := []string{
		fmt.Sprintf(`{"op": "replace", "path": "/spec/pollingInterval", "value": %d}`, pollingSeconds),
		fmt.Sprintf(`{"op": "replace", "path": "/spec/cooldownPeriod", "value": %d}`, cooldownSeconds),
		fmt.Sprintf(`{"op": "replace", "path": "/spec/minReplicaCount", "value": %d}`, o.minReplica),
		behaviorPatch(o.withoutBehavior),
		// The kit's overlays copy these from the ConfigMap with replacements
		// that ran before this layer changed it: copy them again.
		fmt.Sprintf(`{"op": "replace", "path": "/spec/triggers/0/metadata/topic", "value": %q}`, o.topic),
		fmt.Sprintf(`{"op": "replace", "path": "/spec/triggers/0/metadata/%s", "value": %q}`, groupKey, o.group),
	}
	if o.secondTopic != "" {
		auth := ""
		if o.tls != nil {
			auth = `, "authenticationRef": {"name": "microbatch-scaler-tls"}`
		}
		so = append(so, fmt.Sprintf(`{"op": "add", "path": "/spec/triggers/-", "value": {"type": "external", "name": "second-topic", "metadata": {"scalerAddress": %q, "topic": %q, "consumerGroup": %q, "offsetResetPolicy": "earliest", "policy": "keda", "lagThreshold": "1000", "activationLagThreshold": "1", "allowIdleConsumers": "false"}%s}}`,
			o.scalerAddr, o.secondTopic, o.group, auth))
	}
	if o.tls != nil {
		so = append(so, `{"op": "add", "path": "/spec/triggers/0/authenticationRef", "value": {"name": "microbatch-scaler-tls"}}`)
	}
	if o.external() {
		so = append(so, fmt.Sprintf(`{"op": "replace", "path": "/spec/triggers/0/metadata/scalerAddress", "value": %q}`, o.scalerAddr),
			// Drain a burst within 10 s instead of 60: the test's burst then
			// asks for more than one replica.
			`{"op": "replace", "path": "/spec/triggers/0/metadata/targetDrainSeconds", "value": "10"}`,
			// external-push: KEDA keeps StreamIsActive open and wakes the
			// workers from zero when the scaler pushes "active", instead of
			// polling IsActive every pollingInterval. The metric calls
			// (GetMetricSpec, GetMetrics) are the same for both types.
			`{"op": "replace", "path": "/spec/triggers/0/type", "value": "external-push"}`)
	} else {
		so = append(so, fmt.Sprintf(`{"op": "replace", "path": "/spec/triggers/0/metadata/bootstrapServers", "value": %q}`, o.worker["KAFKA_BOOTSTRAP_SERVERS"]))
	}
	p("  - target: {group: keda.sh, kind: ScaledObject, name: microbatch}\n    patch: |-\n      [%s]", strings.Join(so, ", "))
	if ca != "" {
		deployments := map[string]string{"microbatch": "worker"} // Deployment -> container
		if o.external() {
			deployments["microbatch-scaler"] = "scaler"
		}
		for d, container := range deployments {
			p(`  - patch: |-
      apiVersion: apps/v1
      kind: Deployment
      metadata:
        name: %s
      spec:
        template:
          spec:
            volumes:
              - name: kafka-ca
                configMap:
                  name: kafka-ca
            containers:
              - name: %s
                volumeMounts:
                  - name: kafka-ca
                    mountPath: %s
                    readOnly: true`, d, container, caMountPath)
		}
	}
	if o.external() {
		// The scaler logs each call KEDA makes (debug), and re-checks lag
		// for StreamIsActive every second.
		p(`  - target: {group: apps, kind: Deployment, name: microbatch-scaler}
    patch: |-
      [{"op": "add", "path": "/spec/template/spec/containers/0/env/-", "value": {"name": "MICROBATCH_LOG", "value": "info,microbatch_scaling=debug"}},
       {"op": "add", "path": "/spec/template/spec/containers/0/env/-", "value": {"name": "MICROBATCH_STREAM_INTERVAL_MS", "value": "1000"}}]`)
		if ca != "" {
			p(`  - target: {group: apps, kind: Deployment, name: microbatch-scaler}
    patch: |-
      [{"op": "add", "path": "/spec/template/spec/containers/0/env/-", "value": {"name": "KAFKA_SSL_CA_LOCATION", "value": "%s/%s"}}]`, caMountPath, caFile)
		}
	}
	if o.tls != nil {
		// The scaler serves gRPC over TLS only to clients with a certificate
		// its CA signed (files of a Secret volume, named in its environment);
		// the kubelet's gRPC probe speaks plain text, so readiness asks
		// /healthz (as the kit's comment says to).
		p(`  - target: {group: apps, kind: Deployment, name: microbatch-scaler}
    patch: |-
      [{"op": "add", "path": "/spec/template/spec/containers/0/env/-", "value": {"name": "MICROBATCH_TLS_CERT", "value": "%[1]s/tls.crt"}},
       {"op": "add", "path": "/spec/template/spec/containers/0/env/-", "value": {"name": "MICROBATCH_TLS_KEY", "value": "%[1]s/tls.key"}},
       {"op": "add", "path": "/spec/template/spec/containers/0/env/-", "value": {"name": "MICROBATCH_TLS_CLIENT_CA", "value": "%[1]s/ca.crt"}},
       {"op": "replace", "path": "/spec/template/spec/containers/0/readinessProbe", "value": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 2}}]`, scalerTLSMount)
		p(`  - patch: |-
      apiVersion: apps/v1
      kind: Deployment
      metadata:
        name: microbatch-scaler
      spec:
        template:
          spec:
            volumes:
              - name: scaler-tls
                secret:
                  secretName: %s
            containers:
              - name: scaler
                volumeMounts:
                  - name: scaler-tls
                    mountPath: %s
                    readOnly: true`, scalerTLSSecret, scalerTLSMount)
	}
	if o.triggerAuthPasswordKey != "" {
		p(`  - target: {group: keda.sh, kind: TriggerAuthentication, name: microbatch-kafka}
    patch: |-
      [{"op": "replace", "path": "/spec/secretTargetRef/1/key", "value": %q}]`, o.triggerAuthPasswordKey)
	}
	if o.podPasswordKey != "" {
		p(`  - target: {group: apps, kind: Deployment, name: microbatch}
    patch: |-
      apiVersion: apps/v1
      kind: Deployment
      metadata:
        name: microbatch
      spec:
        template:
          spec:
            containers:
              - name: worker
                env:
                  - name: KAFKA_PASSWORD
                    valueFrom:
                      secretKeyRef:
                        name: microbatch-kafka
                        key: %s`, o.podPasswordKey)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	if o.tls != nil {
		auth := fmt.Sprintf(`apiVersion: keda.sh/v1alpha1
kind: TriggerAuthentication
metadata:
  name: microbatch-scaler-tls
  namespace: %s
spec:
  secretTargetRef:
    - parameter: caCert
      name: %s
      key: ca.crt
    - parameter: tlsClientCert
      name: %s
      key: tls.crt
    - parameter: tlsClientKey
      name: %s
      key: tls.key
`, namespace, kedaTLSSecret, kedaTLSSecret, kedaTLSSecret)
		if err := os.WriteFile(filepath.Join(dir, "scaler-tls-auth.yaml"), []byte(auth), 0o644); err != nil {
			return "", err
		}
	}
	if ca != "" {
		pem, err := os.ReadFile(ca)
		if err != nil {
			return "", fmt.Errorf("the broker's CA: %w", err)
		}
		if err := os.WriteFile(filepath.Join(dir, caFile), pem, 0o644); err != nil {
			return "", err
		}
	}
	return dir, os.WriteFile(filepath.Join(dir, "kustomization.yaml"), []byte(b.String()), 0o644)
}

// createSecret makes the namespace and the Secret as docs/deploy.md step 4
// does: the password through stdin, never on a command line.
func (e *env) createSecret(ctx context.Context, k kafka) error {
	kubectl := filepath.Join(e.kubeBin, "kubectl")
	ns, err := e.output(ctx, "", kubectl, "create", "namespace", namespace, "--dry-run=client", "-o", "yaml")
	if err != nil {
		return err
	}
	if _, err := e.output(ctx, ns, kubectl, "apply", "-f", "-"); err != nil {
		return err
	}
	_, err = e.output(ctx, k["KAFKA_PASSWORD"], kubectl, "-n", namespace, "create", "secret", "generic", "microbatch-kafka",
		"--from-literal=username="+k["KAFKA_USERNAME"], "--from-file=password=/dev/stdin")
	return err
}

// deploy runs deploy.sh on the overlay directory, as a user would.
func (e *env) deploy(ctx context.Context, dir string, timeout time.Duration) (string, error) {
	return e.output(ctx, "", filepath.Join(e.repo, "deploy", "scripts", "deploy.sh"),
		"--timeout", fmt.Sprintf("%ds", int(timeout.Seconds())), dir)
}

func (e *env) cleanup(ctx context.Context, dir string) (string, error) {
	return e.output(ctx, "", filepath.Join(e.repo, "deploy", "scripts", "cleanup.sh"), "--yes", "--all", dir)
}

// diagnose says what keeps a deployed overlay from working, naming the
// object and field: what KEDA reports on the ScaledObject, and the checks
// KEDA does not make itself (it reads a missing Secret key as an empty
// string, and reports an unreachable scaler only as a failed call).
// With tls, the scaler is asked over TLS with KEDA's client certificate.
func (e *env) diagnose(ctx context.Context, si *standIn, tls *scalerTLS) error {
	var problems []string
	sos, err := e.dyn.Resource(scaledObjects).Namespace(namespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("listing ScaledObjects: %w", err)
	}
	for _, so := range sos.Items {
		if ready, msg := condition(&so, "Ready"); ready != "True" {
			problems = append(problems, fmt.Sprintf("ScaledObject %s/%s is not Ready (%s): %s", namespace, so.GetName(), ready, msg))
		}
		triggers, _, _ := unstructured.NestedSlice(so.Object, "spec", "triggers")
		for i, t := range triggers {
			tm, _ := t.(map[string]any)
			if tm["type"] != "external" && tm["type"] != "external-push" {
				continue
			}
			addr, _, _ := unstructured.NestedString(tm, "metadata", "scalerAddress")
			health := grpcServing
			if tls != nil {
				health = func(ctx context.Context, addr string) error { return tls.healthOverTLS(ctx, addr, true) }
			}
			if err := health(ctx, addr); err != nil {
				problems = append(problems, fmt.Sprintf("ScaledObject %s/%s: trigger %d: scalerAddress %s: %v", namespace, so.GetName(), i, addr, err))
			}
		}
	}
	tas, err := e.dyn.Resource(triggerAuths).Namespace(namespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		return fmt.Errorf("listing TriggerAuthentications: %w", err)
	}
	for _, ta := range tas.Items {
		refs, _, _ := unstructured.NestedSlice(ta.Object, "spec", "secretTargetRef")
		for _, r := range refs {
			rm, _ := r.(map[string]any)
			name, key, param := fmt.Sprint(rm["name"]), fmt.Sprint(rm["key"]), fmt.Sprint(rm["parameter"])
			sec, err := e.cs.CoreV1().Secrets(namespace).Get(ctx, name, metav1.GetOptions{})
			switch {
			case apierrors.IsNotFound(err):
				problems = append(problems, fmt.Sprintf("TriggerAuthentication %s/%s: parameter %s: Secret %s does not exist", namespace, ta.GetName(), param, name))
			case err != nil:
				return err
			case len(sec.Data[key]) == 0:
				problems = append(problems, fmt.Sprintf("TriggerAuthentication %s/%s: parameter %s: Secret %s has no key %q (keys: %s)",
					namespace, ta.GetName(), param, name, key, strings.Join(keysOf(sec.Data), ", ")))
			}
		}
	}
	if p := si.problemsText(); p != "" {
		problems = append(problems, p)
	}
	if len(problems) == 0 {
		return nil
	}
	return fmt.Errorf("%s", strings.Join(problems, "\n"))
}

func keysOf(m map[string][]byte) []string {
	var keys []string
	for k := range m {
		keys = append(keys, k)
	}
	return keys
}

// condition returns a status condition's status and message.
func condition(obj *unstructured.Unstructured, kind string) (string, string) {
	conds, _, _ := unstructured.NestedSlice(obj.Object, "status", "conditions")
	for _, c := range conds {
		cm, _ := c.(map[string]any)
		if cm["type"] == kind {
			return fmt.Sprint(cm["status"]), fmt.Sprint(cm["message"])
		}
	}
	return "missing", "no " + kind + " condition yet"
}

// grpcServing asks the standard gRPC health service at addr.
func grpcServing(ctx context.Context, addr string) error {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
	if err != nil {
		return fmt.Errorf("no gRPC health service answers: %v", err)
	}
	if resp.Status != healthpb.HealthCheckResponse_SERVING {
		return fmt.Errorf("health: %s", resp.Status)
	}
	return nil
}
