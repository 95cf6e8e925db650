package check

import (
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
)

const (
	namespace       = "microbatch"
	partOfLabel     = "app.kubernetes.io/part-of"
	secretTemplate  = "deploy/k8s/base/secret.template.yaml"
	workerName      = "microbatch"
	scalerName      = "microbatch-scaler"
	scaledObject    = "microbatch"
	dockerfileUser  = 65532 // USER in deploy/Dockerfile (checked there too)
	overlaysDirName = "deploy/k8s/overlays"
)

// Every overlay the kit ships (the test fails if a directory is added
// without being listed here, so each gets its specific checks).
var overlays = []string{"msk-scram", "msk-iam", "external-scaler", "plaintext", "share-group"}

// KEDA kafka trigger metadata keys (keda.sh docs, scalers/apache-kafka).
var kafkaTriggerKeys = []string{
	"bootstrapServers", "consumerGroup", "topic", "lagThreshold", "activationLagThreshold",
	"offsetResetPolicy", "allowIdleConsumers", "scaleToZeroOnInvalidOffset", "excludePersistentLag",
	"limitToPartitionsWithLag", "ensureEvenDistributionOfPartitions", "version", "partitionLimitation",
	"sasl", "saslTokenProvider", "tls", "unsafeSsl", "awsRegion",
}

// Metadata keys of our external scaler (`microbatch scaler`) as designed;
// once crates/scaling/src/scaler.rs exists, the keys it reads are used instead.
var externalTriggerKeys = []string{
	"scalerAddress", "topic", "consumerGroup", "policy", "lagThreshold", "activationLagThreshold",
	"targetDrainSeconds", "slotsPerPartition", "slotsPerReplica", "ratePerReplica", "minReplicas",
	"maxReplicas", "allowIdleConsumers",
}

// render builds a kustomization in-process, as `kustomize build` does.
func render(t *testing.T, dir string) []byte {
	t.Helper()
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	res, err := k.Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	out, err := res.AsYaml()
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// rendered is one overlay's output, indexed.
type rendered struct {
	objs []object
}

func (r rendered) all(kind string) []object {
	var out []object
	for _, o := range r.objs {
		if o.Kind == kind {
			out = append(out, o)
		}
	}
	return out
}

func (r rendered) get(kind, name string) (object, bool) {
	for _, o := range r.objs {
		if o.Kind == kind && o.Name == name {
			return o, true
		}
	}
	return object{}, false
}

func (r rendered) deployments() []*appsv1.Deployment {
	var out []*appsv1.Deployment
	for _, o := range r.all("Deployment") {
		out = append(out, o.Obj.(*appsv1.Deployment))
	}
	return out
}

// secretTemplateKeys decodes the Secret template strictly.
func loadSecretTemplate(t *testing.T) *corev1.Secret {
	t.Helper()
	root := repoRoot(t)
	objs, err := decodeAll([]byte(readFile(t, filepath.Join(root, secretTemplate))))
	if err != nil {
		t.Fatalf("%s: %v", secretTemplate, err)
	}
	if len(objs) != 1 || objs[0].Kind != "Secret" {
		t.Fatalf("%s: want exactly one Secret", secretTemplate)
	}
	return objs[0].Obj.(*corev1.Secret)
}

func TestSecretTemplate(t *testing.T) {
	s := loadSecretTemplate(t)
	if s.Name != "microbatch-kafka" || s.Namespace != namespace {
		t.Errorf("Secret template is %s/%s, want %s/microbatch-kafka", s.Namespace, s.Name, namespace)
	}
	if len(s.Data) > 0 {
		t.Errorf("Secret template must use stringData placeholders, not data")
	}
	for _, k := range []string{"username", "password"} {
		if _, ok := s.StringData[k]; !ok {
			t.Errorf("Secret template lacks key %q", k)
		}
	}
	for k, v := range s.StringData {
		if v != "REPLACE_ME" {
			t.Errorf("Secret template key %q must hold the placeholder REPLACE_ME, not a value", k)
		}
	}
	// It must not be applied with the kustomization (it would overwrite the
	// real credentials with placeholders).
	base := readFile(t, filepath.Join(repoRoot(t), "deploy/k8s/base/kustomization.yaml"))
	if strings.Contains(stripComments(base), "secret.template.yaml") {
		t.Errorf("base/kustomization.yaml lists the Secret template as a resource")
	}
}

func TestStrictDecodingRejectsUnknownFields(t *testing.T) {
	bad := map[string]string{
		"misspelt container field": `apiVersion: apps/v1
kind: Deployment
metadata: {name: x}
spec:
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      containers: [{name: c, image: i, ports: [{containerport: 80}]}]`,
		"unknown ScaledObject field": `apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {name: x}
spec:
  scaleTargetRef: {name: x}
  maxReplicas: 3
  triggers: []`,
		"duplicate key": `apiVersion: v1
kind: ConfigMap
metadata: {name: x}
data: {A: "1", A: "2"}`,
		"wrong apiVersion": `apiVersion: policy/v1beta1
kind: PodDisruptionBudget
metadata: {name: x}`,
		"unknown TriggerAuthentication field": `apiVersion: keda.sh/v1alpha1
kind: TriggerAuthentication
metadata: {name: x}
spec:
  secretTargetRef: [{parameter: p, name: n, key: k, optional: true}]`,
	}
	for name, doc := range bad {
		if _, err := decodeStrict([]byte(doc)); err == nil {
			t.Errorf("%s: decoded without error", name)
		}
	}
}

func TestOverlaysAreListed(t *testing.T) {
	root := repoRoot(t)
	entries, err := filepath.Glob(filepath.Join(root, overlaysDirName, "*", "kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var found []string
	for _, e := range entries {
		found = append(found, filepath.Base(filepath.Dir(e)))
	}
	slices.Sort(found)
	want := slices.Clone(overlays)
	slices.Sort(want)
	if !slices.Equal(found, want) {
		t.Errorf("overlays on disk %v, listed in the test %v", found, want)
	}
}

func TestOverlays(t *testing.T) {
	f := loadFacts(t)
	secret := loadSecretTemplate(t)
	root := repoRoot(t)
	for _, name := range append([]string{"../base"}, overlays...) {
		t.Run(strings.TrimPrefix(name, "../"), func(t *testing.T) {
			out := render(t, filepath.Join(root, overlaysDirName, name))
			objs, err := decodeAll(out)
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			r := rendered{objs: objs}
			checkCommon(t, r, f, secret)
			switch name {
			case "msk-scram":
				checkMSKScram(t, r)
			case "msk-iam":
				checkMSKIAM(t, r, filepath.Join(root, overlaysDirName, name))
			case "external-scaler":
				checkExternalScaler(t, r)
			case "share-group":
				checkExternalScaler(t, r)
				checkShareGroup(t, r)
			case "plaintext":
				checkPlaintext(t, r)
			}
		})
	}
}

// checkCommon holds for every overlay.
func checkCommon(t *testing.T, r rendered, f *binaryFacts, secret *corev1.Secret) {
	t.Helper()
	seen := map[string]bool{}
	for _, o := range r.objs {
		id := o.Kind + "/" + o.Name
		if seen[id] {
			t.Errorf("%s appears twice", id)
		}
		seen[id] = true
		for _, msg := range validation.IsDNS1123Subdomain(o.Name) {
			t.Errorf("%s: name: %s", id, msg)
		}
		if o.Kind == "Namespace" {
			if o.Name != namespace {
				t.Errorf("Namespace %s, want %s", o.Name, namespace)
			}
		} else if o.Namespace != namespace {
			t.Errorf("%s is in namespace %q, want %q", id, o.Namespace, namespace)
		}
		checkLabels(t, id, o.Labels)
		// cleanup.sh deletes by this label.
		if o.Labels[partOfLabel] != "microbatch" {
			t.Errorf("%s lacks label %s=microbatch", id, partOfLabel)
		}
		if o.Kind == "Secret" {
			t.Errorf("%s: no overlay may render a Secret (it would overwrite the real credentials)", id)
		}
	}
	if len(r.all("Namespace")) != 1 {
		t.Errorf("want exactly one Namespace")
	}

	cms := map[string]*corev1.ConfigMap{}
	for _, o := range r.all("ConfigMap") {
		cms[o.Name] = o.Obj.(*corev1.ConfigMap)
	}
	sas := map[string]bool{}
	for _, o := range r.all("ServiceAccount") {
		sas[o.Name] = true
	}

	worker, ok := r.get("Deployment", workerName)
	if !ok {
		t.Fatalf("no Deployment %s", workerName)
	}
	wd := worker.Obj.(*appsv1.Deployment)
	workerEnv := checkPodSpec(t, "Deployment/"+wd.Name, &wd.Spec.Template, f, cms, secret, sas)
	checkWorker(t, wd, workerEnv, f)
	for _, d := range r.deployments() {
		if d.Name == workerName {
			continue
		}
		checkPodSpec(t, "Deployment/"+d.Name, &d.Spec.Template, f, cms, secret, sas)
	}
	for _, d := range r.deployments() {
		sel, err := metav1.LabelSelectorAsSelector(d.Spec.Selector)
		if err != nil || !sel.Matches(labels.Set(d.Spec.Template.Labels)) {
			t.Errorf("Deployment/%s: selector does not match its pod template labels", d.Name)
		}
		if d.Spec.Template.Labels[partOfLabel] != "microbatch" {
			t.Errorf("Deployment/%s: pod template lacks %s", d.Name, partOfLabel)
		}
	}

	// Services: each selects exactly one Deployment's pods, on ports it has.
	services := map[string]*corev1.Service{}
	for _, o := range r.all("Service") {
		s := o.Obj.(*corev1.Service)
		services[s.Name] = s
		var targets []*appsv1.Deployment
		for _, d := range r.deployments() {
			if len(s.Spec.Selector) > 0 && labels.SelectorFromSet(s.Spec.Selector).Matches(labels.Set(d.Spec.Template.Labels)) {
				targets = append(targets, d)
			}
		}
		if len(targets) != 1 {
			t.Errorf("Service/%s selects %d Deployments, want 1", s.Name, len(targets))
			continue
		}
		for _, p := range s.Spec.Ports {
			if !hasContainerPort(&targets[0].Spec.Template.Spec, p.TargetPort) {
				t.Errorf("Service/%s port %s: targetPort %s is no container port of Deployment/%s",
					s.Name, p.Name, p.TargetPort.String(), targets[0].Name)
			}
			for _, msg := range validation.IsValidPortName(p.Name) {
				t.Errorf("Service/%s port name %q: %s", s.Name, p.Name, msg)
			}
		}
	}
	if _, ok := services[workerName]; !ok {
		t.Errorf("no Service %s for the workers", workerName)
	}

	// PodDisruptionBudget: covers the workers, and lets one go at a time.
	pdbs := r.all("PodDisruptionBudget")
	if len(pdbs) != 1 {
		t.Errorf("want 1 PodDisruptionBudget, got %d", len(pdbs))
	}
	for _, o := range pdbs {
		p := o.Obj.(*policyv1.PodDisruptionBudget)
		sel, err := metav1.LabelSelectorAsSelector(p.Spec.Selector)
		if err != nil || !sel.Matches(labels.Set(wd.Spec.Template.Labels)) {
			t.Errorf("PodDisruptionBudget/%s does not select the worker pods", p.Name)
		}
		if p.Spec.MaxUnavailable == nil || p.Spec.MinAvailable != nil {
			t.Errorf("PodDisruptionBudget/%s: use maxUnavailable (minAvailable blocks drains at 1 replica)", p.Name)
		}
	}

	// ServiceMonitor: selects our Services, on ports they have, at /metrics.
	for _, o := range r.all("ServiceMonitor") {
		sm := o.Obj.(*ServiceMonitor)
		sel, err := metav1.LabelSelectorAsSelector(&sm.Spec.Selector)
		if err != nil {
			t.Errorf("ServiceMonitor/%s: %v", sm.Name, err)
			continue
		}
		if !sm.Spec.NamespaceSelector.Any && !slices.Contains(sm.Spec.NamespaceSelector.MatchNames, namespace) {
			t.Errorf("ServiceMonitor/%s does not look in namespace %s", sm.Name, namespace)
		}
		var matched []*corev1.Service
		for _, s := range services {
			if sel.Matches(labels.Set(s.Labels)) {
				matched = append(matched, s)
			}
		}
		if !slices.ContainsFunc(matched, func(s *corev1.Service) bool { return s.Name == workerName }) {
			t.Errorf("ServiceMonitor/%s does not select Service/%s", sm.Name, workerName)
		}
		for _, ep := range sm.Spec.Endpoints {
			if ep.Path != f.routes["METRICS"] {
				t.Errorf("ServiceMonitor/%s: path %q, the binary serves metrics at %q", sm.Name, ep.Path, f.routes["METRICS"])
			}
			for _, s := range matched {
				if !slices.ContainsFunc(s.Spec.Ports, func(p corev1.ServicePort) bool { return p.Name == ep.Port }) {
					t.Errorf("ServiceMonitor/%s: Service/%s has no port named %q", sm.Name, s.Name, ep.Port)
				}
			}
			checkPromDuration(t, "ServiceMonitor/"+sm.Name+" interval", ep.Interval)
			checkPromDuration(t, "ServiceMonitor/"+sm.Name+" scrapeTimeout", ep.ScrapeTimeout)
		}
	}

	// ScaledObject: targets the worker Deployment, watches its group.
	sos := r.all("ScaledObject")
	if len(sos) != 1 {
		t.Fatalf("want 1 ScaledObject, got %d", len(sos))
	}
	so := sos[0].Obj.(*ScaledObject)
	ref := so.Spec.ScaleTargetRef
	if ref == nil || ref.Name != wd.Name || (ref.Kind != "" && ref.Kind != "Deployment") ||
		(ref.APIVersion != "" && ref.APIVersion != "apps/v1") {
		t.Errorf("ScaledObject/%s does not target Deployment/%s", so.Name, wd.Name)
	}
	if wd.Spec.Replicas != nil {
		t.Errorf("Deployment/%s sets replicas: each kubectl apply would reset what the HPA chose", wd.Name)
	}
	minR, maxR := int32(1), int32(100) // KEDA's defaults
	if so.Spec.MinReplicaCount != nil {
		minR = *so.Spec.MinReplicaCount
	}
	if so.Spec.MaxReplicaCount != nil {
		maxR = *so.Spec.MaxReplicaCount
	}
	if minR < 1 || minR > maxR {
		t.Errorf("ScaledObject/%s: replicas %d..%d (min must be >= 1: with 0 the kafka scaler can lose the topic, see KEDA's docs)", so.Name, minR, maxR)
	}
	if len(so.Spec.Triggers) != 1 {
		t.Fatalf("ScaledObject/%s: want 1 trigger, got %d", so.Name, len(so.Spec.Triggers))
	}
	cfg := workerEnv
	trig := so.Spec.Triggers[0]
	md := trig.Metadata
	// A share group's workers read SHARE_GROUP, and its trigger names it
	// as shareGroup; a worker given both groups refuses to start.
	groupKey, groupVar := "consumerGroup", "CONSUMER_GROUP"
	if _, share := md["shareGroup"]; share {
		groupKey, groupVar = "shareGroup", "SHARE_GROUP"
		if md["consumerGroup"] != "" || cfg["CONSUMER_GROUP"] != "" {
			t.Errorf("a share-group trigger beside consumerGroup %q / CONSUMER_GROUP %q: one group only",
				md["consumerGroup"], cfg["CONSUMER_GROUP"])
		}
	}
	for _, k := range []string{"topic", groupKey} {
		want := map[string]string{"topic": cfg["KAFKA_TOPIC"], groupKey: cfg[groupVar]}[k]
		if md[k] == "" || md[k] != want {
			t.Errorf("trigger %s %q, the workers use %q", k, md[k], want)
		}
	}
	for _, k := range []string{"lagThreshold", "activationLagThreshold"} {
		if v, ok := md[k]; ok {
			if n, err := strconv.Atoi(v); err != nil || n < 0 {
				t.Errorf("trigger %s %q: want a whole number", k, v)
			}
		}
	}
	if v, ok := md["allowIdleConsumers"]; ok && v != "true" && v != "false" {
		t.Errorf("trigger allowIdleConsumers %q: want \"true\" or \"false\"", v)
	}
	protocol := cfg["KAFKA_SECURITY_PROTOCOL"]
	switch trig.Type {
	case "kafka":
		checkKeys(t, "kafka trigger", md, kafkaTriggerKeys)
		if md["bootstrapServers"] != cfg["KAFKA_BOOTSTRAP_SERVERS"] {
			t.Errorf("trigger bootstrapServers %q, the workers use %q", md["bootstrapServers"], cfg["KAFKA_BOOTSTRAP_SERVERS"])
		}
		if md["offsetResetPolicy"] != cfg["MICROBATCH_OFFSET_RESET"] {
			t.Errorf("trigger offsetResetPolicy %q, the workers' MICROBATCH_OFFSET_RESET %q: KEDA would count lag differently",
				md["offsetResetPolicy"], cfg["MICROBATCH_OFFSET_RESET"])
		}
		wantTLS := protocol == "SSL" || protocol == "SASL_SSL"
		if (md["tls"] == "enable") != wantTLS {
			t.Errorf("trigger tls %q with KAFKA_SECURITY_PROTOCOL %s", md["tls"], protocol)
		}
		wantSASL := map[string]string{"SCRAM-SHA-512": "scram_sha512", "SCRAM-SHA-256": "scram_sha256", "PLAIN": "plaintext",
			"AWS_MSK_IAM": "oauthbearer", "": "scram_sha512"}[cfg["KAFKA_SASL_MECHANISM"]]
		// MSK IAM: KEDA signs its own tokens, for the workers' region.
		if cfg["KAFKA_SASL_MECHANISM"] == "AWS_MSK_IAM" {
			if md["saslTokenProvider"] != "aws_msk_iam" || md["awsRegion"] != cfg["AWS_REGION"] || cfg["AWS_REGION"] == "" {
				t.Errorf("trigger saslTokenProvider %q awsRegion %q; the workers use AWS_MSK_IAM in %q",
					md["saslTokenProvider"], md["awsRegion"], cfg["AWS_REGION"])
			}
		} else if md["saslTokenProvider"] != "" {
			t.Errorf("trigger saslTokenProvider %q, but the workers use %s", md["saslTokenProvider"], cfg["KAFKA_SASL_MECHANISM"])
		}
		if strings.HasPrefix(protocol, "SASL_") {
			if md["sasl"] != wantSASL {
				t.Errorf("trigger sasl %q, the workers use %s", md["sasl"], cfg["KAFKA_SASL_MECHANISM"])
			}
			if trig.AuthenticationRef == nil {
				t.Errorf("SASL trigger without authenticationRef")
			}
		} else if md["sasl"] != "" && md["sasl"] != "none" {
			t.Errorf("trigger sasl %q with KAFKA_SECURITY_PROTOCOL %s", md["sasl"], protocol)
		}
	case "external":
		allowed := externalTriggerKeys
		if len(f.scalerKeys) > 0 {
			allowed = append([]string{"scalerAddress"}, f.scalerKeys...)
		}
		checkKeys(t, "external trigger", md, allowed)
		if v, ok := md["offsetResetPolicy"]; ok && v != cfg["MICROBATCH_OFFSET_RESET"] {
			t.Errorf("external trigger offsetResetPolicy %q, the workers' MICROBATCH_OFFSET_RESET %q", v, cfg["MICROBATCH_OFFSET_RESET"])
		}
		if len(f.scalerKeys) > 0 && slices.Contains(f.scalerKeys, "offsetResetPolicy") && md["offsetResetPolicy"] == "" {
			t.Errorf("external trigger: set offsetResetPolicy (the scaler's default may differ from the workers' %q)", cfg["MICROBATCH_OFFSET_RESET"])
		}
		checkExternalTrigger(t, r, so, md, cfg, services, f)
	default:
		t.Errorf("unexpected trigger type %q", trig.Type)
	}

	// TriggerAuthentication: used, and every Secret key it names exists in
	// the Secret template.
	tas := r.all("TriggerAuthentication")
	if trig.AuthenticationRef != nil {
		if _, ok := r.get("TriggerAuthentication", trig.AuthenticationRef.Name); !ok {
			t.Errorf("trigger authenticationRef %q: no such TriggerAuthentication", trig.AuthenticationRef.Name)
		}
	}
	for _, o := range tas {
		ta := o.Obj.(*TriggerAuthentication)
		if trig.AuthenticationRef == nil || trig.AuthenticationRef.Name != ta.Name {
			t.Errorf("TriggerAuthentication/%s is not used by the trigger", ta.Name)
		}
		awsIdentity := ta.Spec.PodIdentity != nil && ta.Spec.PodIdentity.Provider == "aws"
		if len(ta.Spec.SecretTargetRef) == 0 && !awsIdentity {
			t.Errorf("TriggerAuthentication/%s reads no Secret and uses no AWS pod identity", ta.Name)
		}
		if awsIdentity != (cfg["KAFKA_SASL_MECHANISM"] == "AWS_MSK_IAM") {
			t.Errorf("TriggerAuthentication/%s: podIdentity aws goes with AWS_MSK_IAM, the workers use %q",
				ta.Name, cfg["KAFKA_SASL_MECHANISM"])
		}
		for _, s := range ta.Spec.SecretTargetRef {
			if s.Name != secret.Name {
				t.Errorf("TriggerAuthentication/%s reads Secret %q; the template is %q", ta.Name, s.Name, secret.Name)
			}
			if _, ok := secret.StringData[s.Key]; !ok {
				t.Errorf("TriggerAuthentication/%s: key %q is not in the Secret template (%s)", ta.Name, s.Key, secretTemplate)
			}
			if !slices.Contains([]string{"username", "password", "sasl", "tls", "ca", "cert", "key", "keyPassword"}, s.Parameter) {
				t.Errorf("TriggerAuthentication/%s: %q is no kafka scaler auth parameter", ta.Name, s.Parameter)
			}
		}
	}
}

func checkKeys(t *testing.T, what string, md map[string]string, allowed []string) {
	t.Helper()
	for k := range md {
		if !slices.Contains(allowed, k) {
			t.Errorf("%s: unknown metadata key %q", what, k)
		}
	}
}

var promDuration = regexp.MustCompile(`^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$`)

func checkPromDuration(t *testing.T, what, v string) {
	t.Helper()
	if v != "" && !promDuration.MatchString(v) {
		t.Errorf("%s %q is not a Prometheus duration", what, v)
	}
}

func checkLabels(t *testing.T, id string, l map[string]string) {
	t.Helper()
	for k, v := range l {
		for _, msg := range validation.IsQualifiedName(k) {
			t.Errorf("%s: label key %q: %s", id, k, msg)
		}
		for _, msg := range validation.IsValidLabelValue(v) {
			t.Errorf("%s: label %s value %q: %s", id, k, v, msg)
		}
	}
}

func hasContainerPort(spec *corev1.PodSpec, p intstr.IntOrString) bool {
	for _, c := range spec.Containers {
		for _, cp := range c.Ports {
			if (p.Type == intstr.String && cp.Name == p.StrVal) || (p.Type == intstr.Int && cp.ContainerPort == p.IntVal) {
				return true
			}
		}
	}
	return false
}

func containerPort(c *corev1.Container, p intstr.IntOrString) (int32, bool) {
	for _, cp := range c.Ports {
		if (p.Type == intstr.String && cp.Name == p.StrVal) || (p.Type == intstr.Int && cp.ContainerPort == p.IntVal) {
			return cp.ContainerPort, true
		}
	}
	return 0, false
}

// checkPodSpec checks what holds for every pod the kit runs, and returns the
// environment of its first container as the binary would see it (ConfigMap
// values resolved; Secret values as "<secret>").
func checkPodSpec(t *testing.T, id string, tpl *corev1.PodTemplateSpec, f *binaryFacts,
	cms map[string]*corev1.ConfigMap, secret *corev1.Secret, sas map[string]bool) map[string]string {
	t.Helper()
	spec := &tpl.Spec
	checkLabels(t, id+" pod template", tpl.Labels)
	if spec.ServiceAccountName != "" && sas != nil && !sas[spec.ServiceAccountName] {
		t.Errorf("%s: ServiceAccount %q is not in the overlay", id, spec.ServiceAccountName)
	}
	if spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
		t.Errorf("%s: automountServiceAccountToken must be false (the binary never calls the Kubernetes API)", id)
	}
	if spec.ShareProcessNamespace == nil || !*spec.ShareProcessNamespace {
		t.Errorf("%s: shareProcessNamespace must be true (the pause process, PID 1, reaps orphaned handler processes)", id)
	}
	psc := spec.SecurityContext
	if psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot {
		t.Errorf("%s: pod securityContext.runAsNonRoot must be true", id)
	}
	if psc == nil || psc.RunAsUser == nil || *psc.RunAsUser != dockerfileUser {
		t.Errorf("%s: pod securityContext.runAsUser must be %d (the image's USER)", id, dockerfileUser)
	}
	if psc == nil || psc.SeccompProfile == nil || psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault {
		t.Errorf("%s: seccompProfile RuntimeDefault is required by the restricted Pod Security Standard", id)
	}
	if len(spec.InitContainers)+len(spec.Containers) == 0 {
		t.Fatalf("%s: no containers", id)
	}
	var firstEnv map[string]string
	for _, c := range append(slices.Clone(spec.InitContainers), spec.Containers...) {
		cid := id + " container " + c.Name
		env := checkContainer(t, cid, &c, f, cms, secret)
		if firstEnv == nil && slices.ContainsFunc(spec.Containers, func(x corev1.Container) bool { return x.Name == c.Name }) {
			firstEnv = env
		}
	}
	return firstEnv
}

func checkContainer(t *testing.T, cid string, c *corev1.Container, f *binaryFacts,
	cms map[string]*corev1.ConfigMap, secret *corev1.Secret) map[string]string {
	t.Helper()
	for _, msg := range validation.IsDNS1123Label(c.Name) {
		t.Errorf("%s: name: %s", cid, msg)
	}
	// The image: fully named (a bare "microbatch" means an images: entry
	// is missing in the layer that added this container).
	if !strings.Contains(c.Image, "/") || !(strings.Contains(c.Image, ":") || strings.Contains(c.Image, "@")) {
		t.Errorf("%s: image %q is not a full reference with a tag", cid, c.Image)
	}
	if len(c.Command) > 0 {
		t.Errorf("%s: sets command; the image's entrypoint is the binary", cid)
	}
	checkArgs(t, cid, c.Args, f)

	sc := c.SecurityContext
	switch {
	case sc == nil:
		t.Errorf("%s: no securityContext", cid)
	default:
		if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
			t.Errorf("%s: allowPrivilegeEscalation must be false", cid)
		}
		if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
			t.Errorf("%s: readOnlyRootFilesystem must be true", cid)
		}
		if sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") || len(sc.Capabilities.Add) > 0 {
			t.Errorf("%s: capabilities must drop ALL and add none", cid)
		}
		if sc.Privileged != nil && *sc.Privileged {
			t.Errorf("%s: privileged", cid)
		}
	}
	for _, res := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
		req, okR := c.Resources.Requests[res]
		lim, okL := c.Resources.Limits[res]
		if !okR || !okL {
			t.Errorf("%s: %s request and limit are both required", cid, res)
			continue
		}
		if req.Cmp(lim) > 0 {
			t.Errorf("%s: %s request %s exceeds the limit %s", cid, res, req.String(), lim.String())
		}
	}

	// The environment, as the process will see it.
	env := map[string]string{}
	for _, ef := range c.EnvFrom {
		switch {
		case ef.ConfigMapRef != nil:
			cm, ok := cms[ef.ConfigMapRef.Name]
			if !ok {
				if cms != nil {
					t.Errorf("%s: envFrom ConfigMap %q is not in the overlay", cid, ef.ConfigMapRef.Name)
				}
				continue
			}
			for k, v := range cm.Data {
				env[ef.Prefix+k] = v
			}
		case ef.SecretRef != nil:
			t.Errorf("%s: envFrom a Secret hides which variables it sets; use secretKeyRef", cid)
		}
	}
	for _, e := range c.Env {
		switch {
		case e.ValueFrom == nil:
			env[e.Name] = e.Value
		case e.ValueFrom.SecretKeyRef != nil:
			ref := e.ValueFrom.SecretKeyRef
			if ref.Name != secret.Name {
				t.Errorf("%s: env %s reads Secret %q; the template is %q", cid, e.Name, ref.Name, secret.Name)
			} else if _, ok := secret.StringData[ref.Key]; !ok {
				t.Errorf("%s: env %s reads key %q, not in the Secret template", cid, e.Name, ref.Key)
			}
			env[e.Name] = "<secret>"
		case e.ValueFrom.ConfigMapKeyRef != nil:
			ref := e.ValueFrom.ConfigMapKeyRef
			if cms != nil {
				cm, ok := cms[ref.Name]
				if !ok {
					t.Errorf("%s: env %s reads ConfigMap %q, not in the overlay", cid, e.Name, ref.Name)
					continue
				}
				v, ok := cm.Data[ref.Key]
				if !ok {
					t.Errorf("%s: env %s reads key %q, not in ConfigMap %s", cid, e.Name, ref.Key, ref.Name)
				}
				env[e.Name] = v
			} else {
				env[e.Name] = "<configmap>"
			}
		default:
			env[e.Name] = "<field>"
		}
	}
	for name := range env {
		if _, ok := f.envVars[name]; !ok {
			t.Errorf("%s: sets %s, which the binary does not read (crates/cli/src has no env = %q)", cid, name, name)
		}
		for _, msg := range validation.IsEnvVarName(name) {
			t.Errorf("%s: env %s: %s", cid, name, msg)
		}
	}
	// The binary refuses credentials it would not send, and needs both with
	// SASL, except with AWS_MSK_IAM, whose identity is the pod's IAM role.
	if p, ok := env["KAFKA_SECURITY_PROTOCOL"]; ok && p != "<configmap>" {
		_, hasUser := env["KAFKA_USERNAME"]
		_, hasPass := env["KAFKA_PASSWORD"]
		wantCredentials := strings.HasPrefix(p, "SASL_") && env["KAFKA_SASL_MECHANISM"] != "AWS_MSK_IAM"
		if wantCredentials != (hasUser && hasPass) || hasUser != hasPass {
			t.Errorf("%s: KAFKA_SECURITY_PROTOCOL=%s with username set %v, password set %v", cid, p, hasUser, hasPass)
		}
		if !slices.Contains([]string{"PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"}, p) {
			t.Errorf("%s: KAFKA_SECURITY_PROTOCOL %q", cid, p)
		}
	}
	if v, ok := env["KAFKA_BOOTSTRAP_SERVERS"]; ok && v != "<configmap>" {
		for _, hp := range strings.Split(v, ",") {
			if _, port, err := net.SplitHostPort(strings.TrimSpace(hp)); err != nil || port == "" {
				t.Errorf("%s: KAFKA_BOOTSTRAP_SERVERS entry %q is not host:port", cid, hp)
			}
		}
	}

	// Probes hit routes the binary serves, on a port the container has.
	for what, p := range map[string]*corev1.Probe{"liveness": c.LivenessProbe, "readiness": c.ReadinessProbe, "startup": c.StartupProbe} {
		if p == nil {
			continue
		}
		switch {
		case p.HTTPGet != nil:
			if !slices.Contains([]string{f.routes["HEALTHZ"], f.routes["READYZ"]}, p.HTTPGet.Path) {
				t.Errorf("%s: %s probe path %q is not /healthz or /readyz of the binary (%v)", cid, what, p.HTTPGet.Path, f.routes)
			}
			if _, ok := containerPort(c, p.HTTPGet.Port); !ok {
				t.Errorf("%s: %s probe port %s is not a container port", cid, what, p.HTTPGet.Port.String())
			}
		case p.GRPC != nil:
			if _, ok := containerPort(c, intstr.FromInt32(p.GRPC.Port)); !ok {
				t.Errorf("%s: %s gRPC probe port %d is not a container port", cid, what, p.GRPC.Port)
			}
		default:
			t.Errorf("%s: %s probe must be httpGet or grpc (the image has no shell for exec)", cid, what)
		}
	}
	if c.LivenessProbe != nil && c.LivenessProbe.HTTPGet != nil && c.LivenessProbe.HTTPGet.Path == f.routes["READYZ"] {
		t.Errorf("%s: liveness on /readyz would restart pods whenever the brokers are away", cid)
	}
	return env
}

// checkArgs: leading words are subcommands the binary has; flags are known.
func checkArgs(t *testing.T, cid string, args []string, f *binaryFacts) {
	t.Helper()
	if len(args) == 0 {
		t.Errorf("%s: no args; name the subcommand explicitly", cid)
		return
	}
	i := 0
	for ; i < len(args) && !strings.HasPrefix(args[i], "-"); i++ {
		if !f.subcommands[args[i]] {
			if i == 0 && args[i] == "scaler" {
				t.Logf("%s: `microbatch scaler` is not in crates/cli/src yet; its flags are not checked", cid)
				return
			}
			if i == 0 {
				t.Errorf("%s: subcommand %q does not exist (known: %v)", cid, args[i], sortedKeys(f.subcommands))
			}
			break
		}
	}
	for _, a := range args[i:] {
		if !strings.HasPrefix(a, "--") {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		if !f.longFlags[name] {
			t.Errorf("%s: flag --%s is not one the binary has", cid, name)
		}
	}
}

// checkWorker: what the worker Deployment must do beyond any pod.
func checkWorker(t *testing.T, d *appsv1.Deployment, env map[string]string, f *binaryFacts) {
	t.Helper()
	spec := &d.Spec.Template.Spec
	c := &spec.Containers[0]
	if len(c.Args) == 0 || c.Args[0] != "run" {
		t.Errorf("Deployment/%s: the worker runs `microbatch run`, got args %v", d.Name, c.Args)
	}
	// The HTTP port: probes, Service and scrape annotations agree with it.
	port := f.defaultHTTPPort
	if v, ok := env["MICROBATCH_HTTP_PORT"]; ok {
		n, err := strconv.Atoi(v)
		if err != nil {
			t.Fatalf("MICROBATCH_HTTP_PORT %q", v)
		}
		port = n
	}
	p, ok := containerPort(c, intstr.FromString("http"))
	if !ok || int(p) != port {
		t.Errorf("Deployment/%s: container port \"http\" is %d, the binary listens on %d", d.Name, p, port)
	}
	if c.LivenessProbe == nil || c.LivenessProbe.HTTPGet == nil || c.LivenessProbe.HTTPGet.Path != f.routes["HEALTHZ"] {
		t.Errorf("Deployment/%s: liveness must be httpGet %s", d.Name, f.routes["HEALTHZ"])
	}
	if c.ReadinessProbe == nil || c.ReadinessProbe.HTTPGet == nil || c.ReadinessProbe.HTTPGet.Path != f.routes["READYZ"] {
		t.Errorf("Deployment/%s: readiness must be httpGet %s", d.Name, f.routes["READYZ"])
	}
	ann := d.Spec.Template.Annotations
	if ann["prometheus.io/scrape"] == "true" {
		if ann["prometheus.io/port"] != strconv.Itoa(port) || ann["prometheus.io/path"] != f.routes["METRICS"] {
			t.Errorf("Deployment/%s: prometheus.io annotations %v do not match port %d path %s", d.Name, ann, port, f.routes["METRICS"])
		}
	}
	// SIGKILL must not come before the drain deadline.
	drain := f.defaultDrainMillis
	if v, ok := env["MICROBATCH_DRAIN_TIMEOUT_MS"]; ok {
		n, err := strconv.Atoi(v)
		if err != nil {
			t.Fatalf("MICROBATCH_DRAIN_TIMEOUT_MS %q", v)
		}
		drain = n
	}
	grace := int64(30)
	if spec.TerminationGracePeriodSeconds != nil {
		grace = *spec.TerminationGracePeriodSeconds
	}
	if grace*1000 < int64(drain)+5000 {
		t.Errorf("Deployment/%s: terminationGracePeriodSeconds %d does not leave 5 s past the drain deadline of %d ms",
			d.Name, grace, drain)
	}
	if env["MICROBATCH_LOG_FORMAT"] != "json" {
		t.Errorf("Deployment/%s: MICROBATCH_LOG_FORMAT %q, want json in Kubernetes", d.Name, env["MICROBATCH_LOG_FORMAT"])
	}
	group := "CONSUMER_GROUP"
	if env["SHARE_GROUP"] != "" {
		group = "SHARE_GROUP"
	}
	for _, k := range []string{"KAFKA_BOOTSTRAP_SERVERS", "KAFKA_SECURITY_PROTOCOL", "KAFKA_TOPIC", group,
		"BATCH_SIZE", "PROCESS_TIME_SECONDS", "MICROBATCH_OFFSET_RESET", "MICROBATCH_CONCURRENCY", "MICROBATCH_ORDERING"} {
		if env[k] == "" {
			t.Errorf("Deployment/%s: %s is not set", d.Name, k)
		}
	}
	if d.Spec.Strategy.RollingUpdate == nil || d.Spec.Strategy.RollingUpdate.MaxUnavailable == nil ||
		d.Spec.Strategy.RollingUpdate.MaxUnavailable.String() != "0" {
		t.Errorf("Deployment/%s: rolling updates should keep maxUnavailable 0", d.Name)
	}
	// Spread over zones and nodes.
	keys := map[string]bool{}
	for _, tsc := range spec.TopologySpreadConstraints {
		keys[tsc.TopologyKey] = true
		sel, err := metav1.LabelSelectorAsSelector(tsc.LabelSelector)
		if err != nil || !sel.Matches(labels.Set(d.Spec.Template.Labels)) {
			t.Errorf("Deployment/%s: topology spread on %s does not select its own pods", d.Name, tsc.TopologyKey)
		}
	}
	if !keys["topology.kubernetes.io/zone"] || !keys["kubernetes.io/hostname"] {
		t.Errorf("Deployment/%s: spread over zones and hosts, got %v", d.Name, keys)
	}
}

func checkExternalTrigger(t *testing.T, r rendered, so *ScaledObject, md, cfg map[string]string,
	services map[string]*corev1.Service, f *binaryFacts) {
	t.Helper()
	addr := md["scalerAddress"]
	host, portS, err := net.SplitHostPort(addr)
	if err != nil {
		t.Errorf("external trigger scalerAddress %q: %v", addr, err)
		return
	}
	parts := strings.Split(host, ".")
	if len(parts) < 3 || parts[2] != "svc" || parts[1] != namespace {
		t.Errorf("scalerAddress %q: want <service>.%s.svc[.cluster.local]:<port>", addr, namespace)
		return
	}
	svc, ok := services[parts[0]]
	if !ok {
		t.Errorf("scalerAddress %q: no Service %q in the overlay", addr, parts[0])
		return
	}
	port, _ := strconv.Atoi(portS)
	if !slices.ContainsFunc(svc.Spec.Ports, func(p corev1.ServicePort) bool { return int(p.Port) == port && p.Name == "grpc" }) {
		t.Errorf("scalerAddress %q: Service/%s has no grpc port %d", addr, svc.Name, port)
	}
	if p := md["policy"]; p != "keda" && p != "rate" {
		t.Errorf("external trigger policy %q: want keda or rate", p)
	}
	for _, k := range []string{"targetDrainSeconds", "slotsPerPartition", "slotsPerReplica", "minReplicas", "maxReplicas", "lagThreshold", "activationLagThreshold"} {
		if v, ok := md[k]; ok {
			if _, err := strconv.Atoi(v); err != nil {
				t.Errorf("external trigger %s %q: want a whole number", k, v)
			}
		}
	}
	if v, ok := md["ratePerReplica"]; ok {
		if _, err := strconv.ParseFloat(v, 64); err != nil {
			t.Errorf("external trigger ratePerReplica %q: want a number", v)
		}
	}
	if so.Spec.MinReplicaCount != nil && md["minReplicas"] != "" && md["minReplicas"] != fmt.Sprint(*so.Spec.MinReplicaCount) {
		t.Errorf("external trigger minReplicas %s, ScaledObject minReplicaCount %d", md["minReplicas"], *so.Spec.MinReplicaCount)
	}
	if so.Spec.MaxReplicaCount != nil && md["maxReplicas"] != "" && md["maxReplicas"] != fmt.Sprint(*so.Spec.MaxReplicaCount) {
		t.Errorf("external trigger maxReplicas %s, ScaledObject maxReplicaCount %d", md["maxReplicas"], *so.Spec.MaxReplicaCount)
	}
	// Slots: what the workers really run.
	slotsPerPartition := cfg["MICROBATCH_CONCURRENCY"]
	if cfg["MICROBATCH_ORDERING"] == "partition" {
		slotsPerPartition = "1"
	}
	if md["slotsPerPartition"] != slotsPerPartition || md["slotsPerReplica"] != cfg["MICROBATCH_CONCURRENCY"] {
		t.Errorf("external trigger slots %s per partition, %s per replica; the workers run ordering %s, concurrency %s",
			md["slotsPerPartition"], md["slotsPerReplica"], cfg["MICROBATCH_ORDERING"], cfg["MICROBATCH_CONCURRENCY"])
	}
	if trig := so.Spec.Triggers[0]; trig.AuthenticationRef != nil {
		t.Errorf("external trigger: the scaler reads Kafka credentials from its own environment; no authenticationRef")
	}
	if f.subcommands["scaler"] && len(f.scalerKeys) == 0 {
		t.Errorf("`microbatch scaler` exists, but no trigger metadata keys were found in crates/scaling/src/scaler.rs")
	}
}

func checkMSKScram(t *testing.T, r rendered) {
	t.Helper()
	so := r.all("ScaledObject")[0].Obj.(*ScaledObject)
	md := so.Spec.Triggers[0].Metadata
	want := map[string]string{"lagThreshold": "3", "activationLagThreshold": "1", "sasl": "scram_sha512",
		"tls": "enable", "allowIdleConsumers": "false"}
	for k, v := range want {
		if md[k] != v {
			t.Errorf("msk-scram: trigger %s %q, want %q (the replaced system's set-up)", k, md[k], v)
		}
	}
	if so.Spec.Triggers[0].Type != "kafka" {
		t.Errorf("msk-scram: trigger type %q, want kafka", so.Spec.Triggers[0].Type)
	}
	if *so.Spec.MinReplicaCount != 1 || *so.Spec.MaxReplicaCount != 24 {
		t.Errorf("msk-scram: replicas %d..%d, want 1..24", *so.Spec.MinReplicaCount, *so.Spec.MaxReplicaCount)
	}
	for _, hp := range strings.Split(md["bootstrapServers"], ",") {
		if _, port, _ := net.SplitHostPort(hp); port != "9096" {
			t.Errorf("msk-scram: broker %q is not on MSK's SASL/SCRAM port 9096", hp)
		}
	}
	cm := r.all("ConfigMap")[0].Obj.(*corev1.ConfigMap)
	if cm.Data["KAFKA_SECURITY_PROTOCOL"] != "SASL_SSL" || cm.Data["KAFKA_SASL_MECHANISM"] != "SCRAM-SHA-512" {
		t.Errorf("msk-scram: workers must use SASL_SSL with SCRAM-SHA-512")
	}
	if _, ok := cm.Data["KAFKA_SSL_CA_LOCATION"]; ok {
		t.Errorf("msk-scram: KAFKA_SSL_CA_LOCATION must stay unset (MSK's certificates verify against the system CAs)")
	}
	if len(r.all("TriggerAuthentication")) != 1 {
		t.Errorf("msk-scram: want the TriggerAuthentication")
	}
}

// The IAM actions the worker's role needs, per kind of resource.
var mskIAMWorkerActions = map[string][]string{
	"cluster": {"kafka-cluster:Connect", "kafka-cluster:WriteDataIdempotently"},
	"topic":   {"kafka-cluster:DescribeTopic", "kafka-cluster:ReadData", "kafka-cluster:WriteData"},
	"group":   {"kafka-cluster:DescribeGroup", "kafka-cluster:AlterGroup"},
}

// KEDA's operator reads lag only.
var mskIAMKedaActions = map[string][]string{
	"cluster": {"kafka-cluster:Connect"},
	"topic":   {"kafka-cluster:DescribeTopic"},
	"group":   {"kafka-cluster:DescribeGroup"},
}

var mskResourceARN = regexp.MustCompile(`^arn:aws:kafka:REGION:ACCOUNT_ID:(cluster|topic|group)/CLUSTER_NAME/CLUSTER_UUID(/[A-Za-z0-9._-]+)?$`)

// checkIAMPolicy: a valid policy document granting `want` on MSK resources
// of the right kind, and nothing with a wildcard action or resource.
func checkIAMPolicy(t *testing.T, path string, want map[string][]string, forbidden []string) {
	t.Helper()
	var doc struct {
		Version   string
		Statement []struct {
			Sid      string
			Effect   string
			Action   []string
			Resource string
		}
	}
	dec := json.NewDecoder(strings.NewReader(readFile(t, path)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&doc); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	if doc.Version != "2012-10-17" {
		t.Errorf("%s: Version %q, want 2012-10-17", path, doc.Version)
	}
	granted := map[string]map[string]bool{}
	for _, st := range doc.Statement {
		m := mskResourceARN.FindStringSubmatch(st.Resource)
		if st.Effect != "Allow" || m == nil {
			t.Errorf("%s: statement %s: want Allow on an MSK cluster, topic or group ARN, got %s %q", path, st.Sid, st.Effect, st.Resource)
			continue
		}
		if (m[1] == "cluster") != (m[2] == "") {
			t.Errorf("%s: statement %s: resource %q", path, st.Sid, st.Resource)
		}
		for _, a := range st.Action {
			if strings.Contains(a, "*") || slices.Contains(forbidden, a) {
				t.Errorf("%s: statement %s grants %s", path, st.Sid, a)
			}
			if granted[m[1]] == nil {
				granted[m[1]] = map[string]bool{}
			}
			granted[m[1]][a] = true
		}
	}
	for kind, actions := range want {
		for _, a := range actions {
			if !granted[kind][a] {
				t.Errorf("%s: no %s on a %s", path, a, kind)
			}
		}
	}
}

func checkMSKIAM(t *testing.T, r rendered, dir string) {
	t.Helper()
	so := r.all("ScaledObject")[0].Obj.(*ScaledObject)
	md := so.Spec.Triggers[0].Metadata
	want := map[string]string{"lagThreshold": "3", "activationLagThreshold": "1", "sasl": "oauthbearer",
		"saslTokenProvider": "aws_msk_iam", "tls": "enable", "allowIdleConsumers": "false"}
	for k, v := range want {
		if md[k] != v {
			t.Errorf("msk-iam: trigger %s %q, want %q", k, md[k], v)
		}
	}
	for _, hp := range strings.Split(md["bootstrapServers"], ",") {
		if _, port, _ := net.SplitHostPort(hp); port != "9098" {
			t.Errorf("msk-iam: broker %q is not on MSK's IAM port 9098", hp)
		}
	}
	cm := r.all("ConfigMap")[0].Obj.(*corev1.ConfigMap)
	if cm.Data["KAFKA_SECURITY_PROTOCOL"] != "SASL_SSL" || cm.Data["KAFKA_SASL_MECHANISM"] != "AWS_MSK_IAM" {
		t.Errorf("msk-iam: workers must use SASL_SSL with AWS_MSK_IAM")
	}
	if !regexp.MustCompile(`^[a-z]{2}(-[a-z]+)+-[0-9]+$`).MatchString(cm.Data["AWS_REGION"]) {
		t.Errorf("msk-iam: AWS_REGION %q", cm.Data["AWS_REGION"])
	}
	// No password anywhere: no Secret reference in any pod.
	for _, d := range r.deployments() {
		for _, c := range d.Spec.Template.Spec.Containers {
			for _, e := range c.Env {
				if e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil {
					t.Errorf("msk-iam: Deployment/%s reads Secret key %s into %s", d.Name, e.ValueFrom.SecretKeyRef.Key, e.Name)
				}
			}
		}
		if sc := d.Spec.Template.Spec.SecurityContext; d.Name == workerName && (sc == nil || sc.FSGroup == nil) {
			t.Errorf("msk-iam: the non-root worker needs fsGroup to read the projected web identity token")
		}
	}
	sa, ok := r.get("ServiceAccount", workerName)
	if !ok {
		t.Fatalf("msk-iam: no ServiceAccount %s", workerName)
	}
	role := sa.Obj.(*corev1.ServiceAccount).Annotations["eks.amazonaws.com/role-arn"]
	if !regexp.MustCompile(`^arn:aws:iam::[0-9]{12}:role/[A-Za-z0-9+=,.@_-]+$`).MatchString(role) {
		t.Errorf("msk-iam: ServiceAccount role-arn annotation %q is no IAM role ARN", role)
	}
	tas := r.all("TriggerAuthentication")
	if len(tas) != 1 {
		t.Fatalf("msk-iam: want the TriggerAuthentication")
	}
	ta := tas[0].Obj.(*TriggerAuthentication)
	if ta.Spec.PodIdentity == nil || ta.Spec.PodIdentity.Provider != "aws" || len(ta.Spec.SecretTargetRef) != 0 {
		t.Errorf("msk-iam: TriggerAuthentication must use podIdentity aws and no Secret")
	}
	checkIAMPolicy(t, filepath.Join(dir, "iam-policy.json"), mskIAMWorkerActions, nil)
	checkIAMPolicy(t, filepath.Join(dir, "keda-iam-policy.json"), mskIAMKedaActions,
		[]string{"kafka-cluster:ReadData", "kafka-cluster:WriteData", "kafka-cluster:AlterGroup"})
}

// checkShareGroup: the workers join a share group (no ordering, no
// consumer group), and the trigger scales on its backlog past the
// partition count.
func checkShareGroup(t *testing.T, r rendered) {
	t.Helper()
	cm := r.all("ConfigMap")[0].Obj.(*corev1.ConfigMap)
	if cm.Data["SHARE_GROUP"] == "" {
		t.Errorf("share-group: the workers get no SHARE_GROUP")
	}
	if _, ok := cm.Data["CONSUMER_GROUP"]; ok {
		t.Errorf("share-group: CONSUMER_GROUP is left in the ConfigMap (a worker given both refuses to start)")
	}
	if o := cm.Data["MICROBATCH_ORDERING"]; o != "none" {
		t.Errorf("share-group: MICROBATCH_ORDERING %q; a share group orders nothing, and the worker refuses key and partition", o)
	}
	so := r.all("ScaledObject")[0].Obj.(*ScaledObject)
	md := so.Spec.Triggers[0].Metadata
	if md["shareGroup"] != cm.Data["SHARE_GROUP"] {
		t.Errorf("share-group: trigger shareGroup %q, the workers' SHARE_GROUP %q", md["shareGroup"], cm.Data["SHARE_GROUP"])
	}
	if so.Spec.MaxReplicaCount == nil || *so.Spec.MaxReplicaCount <= 8 {
		t.Errorf("share-group: maxReplicaCount should pass the 8 partitions of the kit's topic")
	}
	if md["maxReplicas"] != strconv.Itoa(int(*so.Spec.MaxReplicaCount)) {
		t.Errorf("share-group: trigger maxReplicas %q, ScaledObject maxReplicaCount %d", md["maxReplicas"], *so.Spec.MaxReplicaCount)
	}
}

func checkExternalScaler(t *testing.T, r rendered) {
	t.Helper()
	d, ok := r.get("Deployment", scalerName)
	if !ok {
		t.Fatalf("external-scaler: no Deployment %s", scalerName)
	}
	sd := d.Obj.(*appsv1.Deployment)
	c := sd.Spec.Template.Spec.Containers[0]
	if len(c.Args) == 0 || c.Args[0] != "scaler" {
		t.Errorf("external-scaler: the scaler runs `microbatch scaler`, got %v", c.Args)
	}
	if _, ok := containerPort(&c, intstr.FromString("grpc")); !ok {
		t.Errorf("external-scaler: no grpc port")
	}
	if c.ReadinessProbe == nil || c.ReadinessProbe.GRPC == nil {
		t.Errorf("external-scaler: readiness should use the standard gRPC health service")
	}
	if _, ok := r.get("Service", scalerName); !ok {
		t.Errorf("external-scaler: no Service %s", scalerName)
	}
	so := r.all("ScaledObject")[0].Obj.(*ScaledObject)
	if so.Spec.Triggers[0].Type != "external" {
		t.Errorf("external-scaler: trigger type %q, want external", so.Spec.Triggers[0].Type)
	}
	if len(r.all("TriggerAuthentication")) != 0 {
		t.Errorf("external-scaler: a TriggerAuthentication is left over")
	}
	// The scaler reads Kafka with the workers' connection settings.
	wd, _ := r.get("Deployment", workerName)
	cm := r.all("ConfigMap")[0].Obj.(*corev1.ConfigMap)
	_ = wd
	env := map[string]bool{}
	for _, e := range c.Env {
		env[e.Name] = true
	}
	for _, k := range []string{"KAFKA_BOOTSTRAP_SERVERS", "KAFKA_SECURITY_PROTOCOL", "KAFKA_USERNAME", "KAFKA_PASSWORD"} {
		if !env[k] {
			t.Errorf("external-scaler: the scaler lacks %s", k)
		}
	}
	if cm.Data["KAFKA_SECURITY_PROTOCOL"] != "SASL_SSL" {
		t.Errorf("external-scaler: builds on msk-scram, want SASL_SSL")
	}
	checkScalerNetworkPolicy(t, r, sd)
}

// checkScalerNetworkPolicy: a NetworkPolicy selects the scaler's pods and
// admits its gRPC port (a group's lag) only from KEDA's namespace.
func checkScalerNetworkPolicy(t *testing.T, r rendered, sd *appsv1.Deployment) {
	t.Helper()
	o, ok := r.get("NetworkPolicy", scalerName)
	if !ok {
		t.Fatalf("external-scaler: no NetworkPolicy %s: any pod could read any group's lag", scalerName)
	}
	np := o.Obj.(*networkingv1.NetworkPolicy)
	for k, v := range np.Spec.PodSelector.MatchLabels {
		if sd.Spec.Template.Labels[k] != v {
			t.Errorf("external-scaler: the NetworkPolicy selects %s=%s, not the scaler's pods", k, v)
		}
	}
	if len(np.Spec.PodSelector.MatchLabels) == 0 {
		t.Errorf("external-scaler: the NetworkPolicy selects every pod")
	}
	grpcRules := 0
	for _, rule := range np.Spec.Ingress {
		for _, p := range rule.Ports {
			if p.Port == nil || (p.Port.String() != "grpc" && p.Port.String() != "9090") {
				continue
			}
			grpcRules++
			if len(rule.From) == 0 {
				t.Errorf("external-scaler: the gRPC port is open to every pod")
			}
			for _, peer := range rule.From {
				if peer.NamespaceSelector == nil || peer.NamespaceSelector.MatchLabels["kubernetes.io/metadata.name"] != "keda" || peer.PodSelector != nil || peer.IPBlock != nil {
					t.Errorf("external-scaler: the gRPC port admits %+v, want only KEDA's namespace", peer)
				}
			}
		}
		if len(rule.Ports) == 0 {
			t.Errorf("external-scaler: a NetworkPolicy rule admits every port")
		}
	}
	if grpcRules != 1 {
		t.Errorf("external-scaler: %d rules for the gRPC port, want 1", grpcRules)
	}
}

func checkPlaintext(t *testing.T, r rendered) {
	t.Helper()
	cm := r.all("ConfigMap")[0].Obj.(*corev1.ConfigMap)
	if cm.Data["KAFKA_SECURITY_PROTOCOL"] != "PLAINTEXT" {
		t.Errorf("plaintext: KAFKA_SECURITY_PROTOCOL %q", cm.Data["KAFKA_SECURITY_PROTOCOL"])
	}
	if len(r.all("TriggerAuthentication")) != 0 || len(r.all("ServiceMonitor")) != 0 {
		t.Errorf("plaintext: want no TriggerAuthentication and no ServiceMonitor")
	}
	so := r.all("ScaledObject")[0].Obj.(*ScaledObject)
	if so.Spec.Triggers[0].AuthenticationRef != nil {
		t.Errorf("plaintext: trigger has an authenticationRef")
	}
}
