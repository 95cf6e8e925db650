package check

import (
	"bytes"
	"errors"
	"fmt"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"
)

// The CRDs below are minimal but faithful Go forms of their published
// schemas: every field that exists has its real name and type, so a strict
// decode rejects a misspelt or misplaced field exactly as the API server's
// structural schema would prune or reject it. Fields the kit never uses are
// left out (a strict decode then rejects them too: add them here first).

// KEDA v2, keda.sh/v1alpha1 (apis/keda/v1alpha1/scaledobject_types.go,
// scaletriggers_types.go).
type ScaledObject struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              ScaledObjectSpec `json:"spec"`
}

type ScaledObjectSpec struct {
	ScaleTargetRef        *ScaleTarget    `json:"scaleTargetRef"`
	PollingInterval       *int32          `json:"pollingInterval,omitempty"`
	InitialCooldownPeriod *int32          `json:"initialCooldownPeriod,omitempty"`
	CooldownPeriod        *int32          `json:"cooldownPeriod,omitempty"`
	IdleReplicaCount      *int32          `json:"idleReplicaCount,omitempty"`
	MinReplicaCount       *int32          `json:"minReplicaCount,omitempty"`
	MaxReplicaCount       *int32          `json:"maxReplicaCount,omitempty"`
	Advanced              *AdvancedConfig `json:"advanced,omitempty"`
	Triggers              []ScaleTriggers `json:"triggers"`
	Fallback              *Fallback       `json:"fallback,omitempty"`
}

type ScaleTarget struct {
	Name                   string `json:"name"`
	APIVersion             string `json:"apiVersion,omitempty"`
	Kind                   string `json:"kind,omitempty"`
	EnvSourceContainerName string `json:"envSourceContainerName,omitempty"`
}

type AdvancedConfig struct {
	HorizontalPodAutoscalerConfig *HorizontalPodAutoscalerConfig `json:"horizontalPodAutoscalerConfig,omitempty"`
	RestoreToOriginalReplicaCount bool                           `json:"restoreToOriginalReplicaCount,omitempty"`
	ScalingModifiers              *ScalingModifiers              `json:"scalingModifiers,omitempty"`
}

type HorizontalPodAutoscalerConfig struct {
	Behavior *autoscalingv2.HorizontalPodAutoscalerBehavior `json:"behavior,omitempty"`
	Name     string                                         `json:"name,omitempty"`
}

type ScalingModifiers struct {
	Formula          string `json:"formula,omitempty"`
	Target           string `json:"target,omitempty"`
	ActivationTarget string `json:"activationTarget,omitempty"`
	MetricType       string `json:"metricType,omitempty"`
}

type Fallback struct {
	FailureThreshold int32  `json:"failureThreshold"`
	Replicas         int32  `json:"replicas"`
	Behavior         string `json:"behavior,omitempty"`
}

type ScaleTriggers struct {
	Type              string             `json:"type"`
	Name              string             `json:"name,omitempty"`
	UseCachedMetrics  bool               `json:"useCachedMetrics,omitempty"`
	Metadata          map[string]string  `json:"metadata"`
	AuthenticationRef *AuthenticationRef `json:"authenticationRef,omitempty"`
	MetricType        string             `json:"metricType,omitempty"`
}

type AuthenticationRef struct {
	Name string `json:"name"`
	Kind string `json:"kind,omitempty"`
}

// KEDA v2 TriggerAuthentication (triggerauthentication_types.go), the
// secret, config map and environment sources.
type TriggerAuthentication struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              TriggerAuthenticationSpec `json:"spec"`
}

type TriggerAuthenticationSpec struct {
	PodIdentity        *AuthPodIdentity  `json:"podIdentity,omitempty"`
	SecretTargetRef    []AuthTargetRef   `json:"secretTargetRef,omitempty"`
	ConfigMapTargetRef []AuthTargetRef   `json:"configMapTargetRef,omitempty"`
	Env                []AuthEnvironment `json:"env,omitempty"`
}

type AuthPodIdentity struct {
	Provider      string  `json:"provider"`
	IdentityID    *string `json:"identityId,omitempty"`
	RoleArn       *string `json:"roleArn,omitempty"`
	IdentityOwner *string `json:"identityOwner,omitempty"`
}

type AuthTargetRef struct {
	Parameter string `json:"parameter"`
	Name      string `json:"name"`
	Key       string `json:"key"`
}

type AuthEnvironment struct {
	Parameter     string `json:"parameter"`
	Name          string `json:"name"`
	ContainerName string `json:"containerName,omitempty"`
}

// Prometheus Operator, monitoring.coreos.com/v1 (servicemonitor_types.go,
// endpoint and relabeling types).
type ServiceMonitor struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`
	Spec              ServiceMonitorSpec `json:"spec"`
}

type ServiceMonitorSpec struct {
	JobLabel          string               `json:"jobLabel,omitempty"`
	TargetLabels      []string             `json:"targetLabels,omitempty"`
	PodTargetLabels   []string             `json:"podTargetLabels,omitempty"`
	Endpoints         []Endpoint           `json:"endpoints"`
	Selector          metav1.LabelSelector `json:"selector"`
	NamespaceSelector NamespaceSelector    `json:"namespaceSelector,omitempty"`
	SampleLimit       *uint64              `json:"sampleLimit,omitempty"`
	TargetLimit       *uint64              `json:"targetLimit,omitempty"`
}

type NamespaceSelector struct {
	Any        bool     `json:"any,omitempty"`
	MatchNames []string `json:"matchNames,omitempty"`
}

type Endpoint struct {
	Port              string              `json:"port,omitempty"`
	TargetPort        *intstr.IntOrString `json:"targetPort,omitempty"`
	Path              string              `json:"path,omitempty"`
	Scheme            string              `json:"scheme,omitempty"`
	Params            map[string][]string `json:"params,omitempty"`
	Interval          string              `json:"interval,omitempty"`
	ScrapeTimeout     string              `json:"scrapeTimeout,omitempty"`
	HonorLabels       bool                `json:"honorLabels,omitempty"`
	HonorTimestamps   *bool               `json:"honorTimestamps,omitempty"`
	MetricRelabelings []RelabelConfig     `json:"metricRelabelings,omitempty"`
	Relabelings       []RelabelConfig     `json:"relabelings,omitempty"`
}

type RelabelConfig struct {
	SourceLabels []string `json:"sourceLabels,omitempty"`
	Separator    *string  `json:"separator,omitempty"`
	TargetLabel  string   `json:"targetLabel,omitempty"`
	Regex        string   `json:"regex,omitempty"`
	Modulus      uint64   `json:"modulus,omitempty"`
	Replacement  *string  `json:"replacement,omitempty"`
	Action       string   `json:"action,omitempty"`
}

// object is one decoded document.
type object struct {
	Kind, APIVersion, Name, Namespace string
	Labels                            map[string]string
	Obj                               any
}

// kinds maps each kind the kit may contain to its apiVersion and a decoder
// target. Anything else is an error.
var kinds = map[string]struct {
	apiVersion string
	new        func() any
}{
	"Namespace":             {"v1", func() any { return &corev1.Namespace{} }},
	"ConfigMap":             {"v1", func() any { return &corev1.ConfigMap{} }},
	"Secret":                {"v1", func() any { return &corev1.Secret{} }},
	"ServiceAccount":        {"v1", func() any { return &corev1.ServiceAccount{} }},
	"Service":               {"v1", func() any { return &corev1.Service{} }},
	"Deployment":            {"apps/v1", func() any { return &appsv1.Deployment{} }},
	"Job":                   {"batch/v1", func() any { return &batchv1.Job{} }},
	"PodDisruptionBudget":   {"policy/v1", func() any { return &policyv1.PodDisruptionBudget{} }},
	"ScaledObject":          {"keda.sh/v1alpha1", func() any { return &ScaledObject{} }},
	"TriggerAuthentication": {"keda.sh/v1alpha1", func() any { return &TriggerAuthentication{} }},
	"ServiceMonitor":        {"monitoring.coreos.com/v1", func() any { return &ServiceMonitor{} }},
	"NetworkPolicy":         {"networking.k8s.io/v1", func() any { return &networkingv1.NetworkPolicy{} }},
}

// decodeStrict decodes one YAML document as its kind's Go type: duplicate
// keys, unknown fields and case-mismatched fields are errors, as with the
// API server's strict field validation (the same sigs.k8s.io/json decoder).
func decodeStrict(doc []byte) (object, error) {
	var o object
	js, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return o, err
	}
	var tm metav1.TypeMeta
	if err := kjson.UnmarshalCaseSensitivePreserveInts(js, &tm); err != nil {
		return o, err
	}
	k, ok := kinds[tm.Kind]
	if !ok {
		return o, fmt.Errorf("unexpected kind %q", tm.Kind)
	}
	if tm.APIVersion != k.apiVersion {
		return o, fmt.Errorf("%s: apiVersion %q, want %q", tm.Kind, tm.APIVersion, k.apiVersion)
	}
	target := k.new()
	strict, err := kjson.UnmarshalStrict(js, target)
	if err != nil {
		return o, fmt.Errorf("%s: %w", tm.Kind, err)
	}
	if len(strict) > 0 {
		return o, fmt.Errorf("%s: %w", tm.Kind, errors.Join(strict...))
	}
	meta := metaOf(target)
	return object{Kind: tm.Kind, APIVersion: tm.APIVersion, Name: meta.Name,
		Namespace: meta.Namespace, Labels: meta.Labels, Obj: target}, nil
}

func metaOf(o any) *metav1.ObjectMeta {
	switch v := o.(type) {
	case *corev1.Namespace:
		return &v.ObjectMeta
	case *corev1.ConfigMap:
		return &v.ObjectMeta
	case *corev1.Secret:
		return &v.ObjectMeta
	case *corev1.ServiceAccount:
		return &v.ObjectMeta
	case *corev1.Service:
		return &v.ObjectMeta
	case *appsv1.Deployment:
		return &v.ObjectMeta
	case *batchv1.Job:
		return &v.ObjectMeta
	case *policyv1.PodDisruptionBudget:
		return &v.ObjectMeta
	case *ScaledObject:
		return &v.ObjectMeta
	case *TriggerAuthentication:
		return &v.ObjectMeta
	case *ServiceMonitor:
		return &v.ObjectMeta
	case *networkingv1.NetworkPolicy:
		return &v.ObjectMeta
	}
	panic(fmt.Sprintf("no metadata for %T", o))
}

// splitDocs splits a multi-document YAML stream.
func splitDocs(stream []byte) [][]byte {
	var docs [][]byte
	for _, d := range bytes.Split(append([]byte("\n"), stream...), []byte("\n---")) {
		d = bytes.TrimLeft(d, "\n")
		if strings.TrimSpace(stripComments(string(d))) == "" {
			continue
		}
		docs = append(docs, d)
	}
	return docs
}

func stripComments(s string) string {
	var b strings.Builder
	for _, line := range strings.Split(s, "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "#") {
			continue
		}
		b.WriteString(line)
		b.WriteByte('\n')
	}
	return b.String()
}

func decodeAll(stream []byte) ([]object, error) {
	var objs []object
	for i, doc := range splitDocs(stream) {
		o, err := decodeStrict(doc)
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", i+1, err)
		}
		objs = append(objs, o)
	}
	return objs, nil
}
