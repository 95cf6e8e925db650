package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// Partitions of each test topic unless its overlay says: the kafka
// trigger caps replicas here (allowIdleConsumers "false"), so a burst
// scales 1 -> 4 workers.
const partitions = 4

// burst is the number of records produced at once: at 80 records/s per
// worker (the kit's 8 slots, batches of 10, 0.1 s per record) one worker
// needs about 40 s, longer than KEDA and the HPA need to react.
const burst = 3200

// session is one overlay deployed on the cluster, with its stand-in.
type session struct {
	t       *testing.T
	e       *env
	o       testOverlay
	dir     string
	standIn *standIn
	admin   kafka // the test's own Kafka client settings (topic, produce, lag)
}

func newSession(t *testing.T, o testOverlay, admin kafka, fixedPorts map[string]int) *session {
	t.Helper()
	e := cluster
	stamp := time.Now().Format("150405")
	o.topic = fmt.Sprintf("14-e2e-%s-%s", o.base, stamp)
	o.group = o.topic + "-workers"
	dir, err := o.write(e.repo, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	logDir := filepath.Join(e.artifacts, t.Name())
	_ = os.RemoveAll(logDir)
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		t.Fatal(err)
	}
	s := &session{t: t, e: e, o: o, dir: dir, admin: admin}
	s.standIn = startStandIn(e.cs, namespace, e.microbatch, e.image, logDir, t.TempDir(), fixedPorts, t.Logf)
	t.Cleanup(s.standIn.stop)
	return s
}

// deployKit makes the topic (and the Secret, when the overlay's workers use
// credentials), then deploys the overlay with deploy.sh; cleanup.sh runs
// when the test ends, whatever happened.
func deployKit(t *testing.T, o testOverlay, fixedPorts map[string]int, timeout time.Duration) (*session, error) {
	t.Helper()
	s := newSession(t, o, o.worker, fixedPorts)
	s.createTopic()
	if o.worker["KAFKA_PASSWORD"] != "" {
		ctx, cancel := s.ctx(time.Minute)
		defer cancel()
		if err := cluster.createSecret(ctx, o.worker); err != nil {
			t.Fatal(err)
		}
		if o.tls != nil {
			if err := o.tls.createSecrets(ctx, cluster); err != nil {
				t.Fatal(err)
			}
		}
	}
	t.Cleanup(s.down)
	return s, s.up(timeout)
}

func (s *session) ctx(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}

func (s *session) createTopic() {
	ctx, cancel := s.ctx(time.Minute)
	defer cancel()
	if _, err := s.e.runMicrobatch(ctx, s.admin, "topic", "create", "--topic", s.o.topic,
		"--partitions", strconv.Itoa(s.o.topicPartitions()), "--replication-factor", "1"); err != nil {
		s.t.Fatal(err)
	}
}

// up deploys the overlay and returns deploy.sh's error, if any, with the
// diagnosis of what is wrong.
func (s *session) up(timeout time.Duration) error {
	ctx, cancel := s.ctx(timeout + 2*time.Minute)
	defer cancel()
	start := time.Now()
	out, err := s.e.deploy(ctx, s.dir, timeout)
	s.t.Logf("deploy.sh %s (%s):\n%s", s.o.base, time.Since(start).Round(time.Second), indent(out))
	if err == nil {
		err = s.e.diagnose(ctx, s.standIn, s.o.tls)
		if err == nil {
			return nil
		}
		return fmt.Errorf("deploy.sh succeeded, but:\n%w", err)
	}
	if d := s.e.diagnose(ctx, s.standIn, s.o.tls); d != nil {
		return fmt.Errorf("deploy.sh failed:\n%w", d)
	}
	return fmt.Errorf("deploy.sh failed, and no cause was found:\n%s", out)
}

func (s *session) down() {
	ctx, cancel := s.ctx(3 * time.Minute)
	defer cancel()
	start := time.Now()
	out, err := s.e.cleanup(ctx, s.dir)
	s.t.Logf("cleanup.sh --all (%s):\n%s", time.Since(start).Round(time.Second), indent(out))
	if err != nil {
		s.t.Errorf("cleanup.sh: %v", err)
		return
	}
	if _, err := s.e.cs.CoreV1().Namespaces().Get(ctx, namespace, metav1.GetOptions{}); err == nil {
		s.t.Errorf("cleanup.sh --all: namespace %s still exists", namespace)
	}
	if err := eventually(ctx, time.Minute, time.Second, func() error {
		if n := s.standIn.running("worker") + s.standIn.running("scaler"); n > 0 {
			return fmt.Errorf("%d processes still run after cleanup.sh", n)
		}
		return nil
	}); err != nil {
		s.t.Error(err)
	}
	// Every pod the HPA or cleanup.sh removed drained and exited 0.
	for _, p := range s.standIn.stopProblems() {
		s.t.Errorf("%s", p)
	}
	s.checkImageRun(false)
}

// checkImageRun: with an image, every pod ran from it as the kit's
// securityContext says (user 65532, read-only root), as /proc showed;
// some did, if some had to.
func (s *session) checkImageRun(someMust bool) {
	if s.e.image == nil {
		return
	}
	// The image itself runs as 65532, not only the pods' securityContext.
	if u, _, _ := strings.Cut(s.e.image.config.User, ":"); u != "65532" {
		s.t.Errorf("the image's USER is %q, want 65532", s.e.image.config.User)
	}
	evidence := s.standIn.imageEvidence()
	if someMust && len(evidence) == 0 {
		s.t.Errorf("no pod was seen running from the image")
	}
	for pod, what := range evidence {
		if someMust { // once per test: down() checks again, silently
			s.t.Logf("pod %s ran from the image: %s", pod, what)
		}
		if what != "uid 65532, root read-only true" {
			s.t.Errorf("pod %s: %s, want uid 65532 and a read-only root", pod, what)
		}
	}
}

// checkKeda checks what KEDA made of the ScaledObject: Ready, its HPA, and
// the external metric served through the aggregation layer.
func (s *session) checkKeda() (metricName string) {
	t := s.t
	ctx, cancel := s.ctx(2 * time.Minute)
	defer cancel()
	so, err := s.e.dyn.Resource(scaledObjects).Namespace(namespace).Get(ctx, "microbatch", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ready, msg := condition(so, "Ready")
	t.Logf("ScaledObject %s/microbatch: Ready=%s (%s)", namespace, ready, msg)
	if ready != "True" {
		t.Fatalf("ScaledObject not Ready: %s", msg)
	}
	hpaName, _, _ := unstructured.NestedString(so.Object, "status", "hpaName")
	if hpaName == "" {
		t.Fatal("ScaledObject has no status.hpaName")
	}
	hpa, err := s.e.cs.AutoscalingV2().HorizontalPodAutoscalers(namespace).Get(ctx, hpaName, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("the HPA KEDA names: %v", err)
	}
	owner := "none"
	for _, r := range hpa.OwnerReferences {
		if r.Kind == "ScaledObject" && r.Name == "microbatch" {
			owner = r.Kind + "/" + r.Name
		}
	}
	if owner == "none" {
		t.Fatalf("HPA %s is not owned by ScaledObject microbatch: %v", hpaName, hpa.OwnerReferences)
	}
	t.Logf("HPA %s created by KEDA (owner %s), target %s/%s, %d..%d replicas, metric %s",
		hpaName, owner, hpa.Spec.ScaleTargetRef.Kind, hpa.Spec.ScaleTargetRef.Name,
		*hpa.Spec.MinReplicas, hpa.Spec.MaxReplicas, hpa.Spec.Metrics[0].External.Metric.Name)
	metricName = hpa.Spec.Metrics[0].External.Metric.Name
	// The metric through the aggregator, the adapter and the operator, which
	// reads the lag with the trigger's settings (and the TriggerAuthentication's
	// credentials, for SCRAM).
	var value string
	if err := eventually(ctx, time.Minute, 2*time.Second, func() error {
		v, err := s.externalMetric(ctx, metricName)
		value = v
		return err
	}); err != nil {
		t.Fatalf("external metric %s: %v", metricName, err)
	}
	t.Logf("external.metrics.k8s.io %s = %s", metricName, value)
	return metricName
}

func (s *session) externalMetric(ctx context.Context, name string) (string, error) {
	raw, err := s.e.kubectl(ctx, "get", "--raw", fmt.Sprintf(
		"/apis/external.metrics.k8s.io/v1beta1/namespaces/%s/%s?labelSelector=scaledobject.keda.sh%%2Fname%%3Dmicrobatch", namespace, name))
	if err != nil {
		return "", err
	}
	var list struct {
		Items []struct {
			Value string `json:"value"`
		} `json:"items"`
	}
	if err := json.Unmarshal([]byte(raw), &list); err != nil || len(list.Items) == 0 {
		return "", fmt.Errorf("unexpected answer %q (%v)", raw, err)
	}
	return list.Items[0].Value, nil
}

// sample is one step of the timeline.
type sample struct {
	at        time.Duration // since the burst
	replicas  int32         // the Deployment's spec.replicas (what the HPA or KEDA set)
	running   int           // the stand-in's worker processes
	hpaWant   int32         // the HPA's status.desiredReplicas
	lag       int64
	predicted int32 // `microbatch lag --policy keda` (kafka trigger) at this step; -1 if none
	members   int   // a share group's members, as the broker counts them; -1 for a consumer group
}

func (s *session) replicas(ctx context.Context) (int32, int32, error) {
	d, err := s.e.cs.AppsV1().Deployments(namespace).Get(ctx, "microbatch", metav1.GetOptions{})
	if err != nil {
		return 0, 0, err
	}
	var want int32 = -1
	if hpa, err := s.e.cs.AutoscalingV2().HorizontalPodAutoscalers(namespace).Get(ctx, "keda-hpa-microbatch", metav1.GetOptions{}); err == nil {
		want = hpa.Status.DesiredReplicas
	}
	return *d.Spec.Replicas, want, nil
}

// kedaPolicyArgs turns the applied kafka trigger into `microbatch lag`
// flags: the prediction uses exactly what KEDA was given.
func (s *session) kedaPolicyArgs(ctx context.Context) []string {
	so, err := s.e.dyn.Resource(scaledObjects).Namespace(namespace).Get(ctx, "microbatch", metav1.GetOptions{})
	if err != nil {
		s.t.Fatal(err)
	}
	triggers, _, _ := unstructured.NestedSlice(so.Object, "spec", "triggers")
	meta, _ := triggers[0].(map[string]any)["metadata"].(map[string]any)
	minR, _, _ := unstructured.NestedInt64(so.Object, "spec", "minReplicaCount")
	maxR, _, _ := unstructured.NestedInt64(so.Object, "spec", "maxReplicaCount")
	args := []string{"--policy", "keda",
		"--lag-threshold", fmt.Sprint(meta["lagThreshold"]),
		"--activation-lag-threshold", fmt.Sprint(meta["activationLagThreshold"]),
		"--offset-reset-policy", fmt.Sprint(meta["offsetResetPolicy"]),
		"--min", strconv.FormatInt(minR, 10), "--max", strconv.FormatInt(maxR, 10)}
	if meta["allowIdleConsumers"] == "true" {
		args = append(args, "--allow-idle-consumers")
	}
	// A behavior spelled out selects the HPA's other scale-up algorithm.
	if _, set, _ := unstructured.NestedMap(so.Object, "spec", "advanced", "horizontalPodAutoscalerConfig", "behavior"); set {
		args = append(args, "--hpa-behavior")
	}
	return args
}

// produce sends n records to the topic at once.
func (s *session) produce(n int) {
	ctx, cancel := s.ctx(2 * time.Minute)
	defer cancel()
	if _, err := s.e.runMicrobatch(ctx, s.admin, "produce", "--topic", s.o.topic,
		"--count", strconv.Itoa(n), "--rate", "0", "--keys", "64", "--quiet"); err != nil {
		s.t.Fatal(err)
	}
}

// watch samples the timeline every second until done says stop or the
// time is up; predict adds the keda policy's answer. With kick, one step is
// taken first, then kick runs (the burst), and times count from it.
func (s *session) watch(within time.Duration, predict bool, kick func(), done func([]sample) bool) ([]sample, error) {
	ctx, cancel := s.ctx(within + time.Minute)
	defer cancel()
	var policyArgs []string
	if predict {
		policyArgs = s.kedaPolicyArgs(ctx)
	}
	start := time.Now()
	var steps []sample
	for time.Since(start) < within {
		r, want, err := s.replicas(ctx)
		if err != nil {
			return steps, err
		}
		st := sample{at: time.Since(start), replicas: r, running: s.standIn.running("worker"), hpaWant: want, predicted: -1, members: -1}
		if s.o.share() {
			l, err := s.e.shareLag(ctx, s.admin, s.o.topic, s.o.group)
			if err != nil {
				return steps, err
			}
			st.lag, st.members = l.TotalBacklog, l.Members
		} else {
			args := append([]string{}, policyArgs...)
			if predict {
				args = append(args, "--replicas", strconv.Itoa(int(r)))
			}
			l, err := s.e.lag(ctx, s.admin, s.o.topic, s.o.group, args...)
			if err != nil {
				return steps, err
			}
			st.lag = l.TotalLag
			if l.Policy != nil {
				st.predicted = l.Policy.DesiredReplicas
			}
		}
		steps = append(steps, st)
		if kick != nil {
			// The step before the burst: what the HPA may still act on
			// during its first sync period after it.
			kicked := time.Now()
			kick()
			kick = nil
			steps[0].at = -kicked.Sub(start)
			start = kicked
			continue
		}
		if done(steps) {
			return steps, nil
		}
		time.Sleep(time.Second)
	}
	return steps, fmt.Errorf("not done after %s", within)
}

func timeline(steps []sample) string {
	var b strings.Builder
	fmt.Fprintf(&b, "| t (s) | lag | keda policy predicts | Deployment replicas (HPA/KEDA) | HPA desired | worker processes |\n|---|---|---|---|---|---|\n")
	for _, st := range steps {
		pred := "-"
		if st.predicted >= 0 {
			pred = strconv.Itoa(int(st.predicted))
		}
		fmt.Fprintf(&b, "| %.0f | %d | %s | %d | %d | %d |\n", st.at.Seconds(), st.lag, pred, st.replicas, st.hpaWant, st.running)
	}
	return b.String()
}

// prediction is a replica count some policy asked for at a moment.
type prediction struct {
	at       time.Duration
	replicas int32
}

// predictionsOf are the keda policy's answers recorded in the steps.
func predictionsOf(steps []sample) []prediction {
	var ps []prediction
	for _, st := range steps {
		if st.predicted >= 0 {
			ps = append(ps, prediction{st.at, st.predicted})
		}
	}
	return ps
}

// agreement checks each step's replicas against the predictions: the HPA
// sets replicas at its syncs from a metric read at that moment, so the
// replicas at t must lie between the smallest and the largest prediction
// made within one sync period before t (and, for a scale-down, within the
// scale-down window before that, since the HPA keeps the highest
// recommendation of that window), allowing one sampling step. Steps at zero
// replicas are KEDA's (de)activation, not the HPA's, and are not checked.
func agreement(steps []sample, preds []prediction, sync, window time.Duration) (exact, checked int, bad []string) {
	slack := 2 * time.Second
	for _, st := range steps {
		if st.replicas == 0 {
			continue
		}
		lo, hi, latest := int32(1<<30), int32(-1), int32(-1)
		for _, p := range preds {
			if p.at <= st.at+slack {
				if p.at >= st.at-sync-slack {
					lo, hi = min(lo, p.replicas), max(hi, p.replicas)
				}
				if p.at >= st.at-sync-window-slack {
					hi = max(hi, p.replicas)
				}
			}
			if p.at <= st.at {
				latest = p.replicas
			}
		}
		if hi < 0 {
			continue
		}
		checked++
		if st.replicas == latest {
			exact++
		}
		if st.replicas < lo || st.replicas > hi {
			bad = append(bad, fmt.Sprintf("t=%.0fs: replicas %d, predictions within the period: %d..%d",
				st.at.Seconds(), st.replicas, lo, hi))
		}
	}
	return exact, checked, bad
}

// kafkaTriggerScenario: a burst raises replicas through KEDA's kafka
// trigger, the stand-in's workers drain it, the replicas fall back.
func (s *session) kafkaTriggerScenario() {
	t := s.t
	minR := int32(s.o.minReplica)
	// Before the burst: the minimum, and as many processes as replicas.
	if _, err := s.watch(90*time.Second, false, nil, func(st []sample) bool {
		l := st[len(st)-1]
		return l.replicas == minR && l.running == int(minR)
	}); err != nil {
		t.Fatalf("before the burst, replicas did not settle at %d: %v", minR, err)
	}
	// The HPA KEDA made has a behavior exactly when the ScaledObject has
	// one: which of the HPA's two algorithms the preview must follow.
	window := time.Duration(scaleDownWindowSecs) * time.Second
	{
		ctx, cancel := s.ctx(30 * time.Second)
		hpa, err := s.e.cs.AutoscalingV2().HorizontalPodAutoscalers(namespace).Get(ctx, "keda-hpa-microbatch", metav1.GetOptions{})
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		switch {
		case s.o.withoutBehavior && hpa.Spec.Behavior != nil:
			t.Fatalf("the ScaledObject has no behavior, yet KEDA's HPA has one: %+v", *hpa.Spec.Behavior)
		case !s.o.withoutBehavior && hpa.Spec.Behavior == nil:
			t.Fatal("the ScaledObject spells out a behavior, yet KEDA's HPA has none")
		case s.o.withoutBehavior:
			window = s.e.hpaWindow
			t.Logf("HPA without a behavior: scale-up at most max(2 x current, 4) per sync, the controller's scale-down window %s", window)
		default:
			t.Logf("HPA with a behavior: scale-up at most max(+100%%, +4) per period, scale-down window %s", window)
		}
	}
	var peak int32
	var peakAt, drainedAt, backAt time.Duration
	steps, err := s.watch(4*time.Minute, true, func() {
		s.produce(burst)
		t.Logf("burst: %d records produced at once", burst)
	}, func(st []sample) bool {
		l := st[len(st)-1]
		if l.replicas > peak {
			peak, peakAt = l.replicas, l.at
		}
		if peak > minR && l.lag == 0 && drainedAt == 0 {
			drainedAt = l.at
		}
		if drainedAt > 0 && l.replicas == minR && l.running == int(minR) {
			backAt = l.at
			return true
		}
		return false
	})
	table := timeline(steps)
	t.Logf("timeline (t from the burst):\n%s", table)
	writeArtifact(t, "timeline.md", table)
	if err != nil {
		t.Fatalf("the burst was not scaled up, drained and scaled back: %v", err)
	}
	t.Logf("replicas rose to %d at +%.0fs; lag drained at +%.0fs; back to %d at +%.0fs (scale-down window %.0fs, HPA sync %s)",
		peak, peakAt.Seconds(), drainedAt.Seconds(), minR, backAt.Seconds(), window.Seconds(), s.e.hpaSync)
	if want := int32(s.o.topicPartitions()); peak != want {
		t.Errorf("peak replicas %d, want %d (the partition cap of the kafka trigger)", peak, want)
	}
	for _, st := range steps {
		if st.running > int(st.replicas)+int(peak) { // sanity: never more processes than pods could be
			t.Errorf("t=%.0fs: %d processes for %d replicas", st.at.Seconds(), st.running, st.replicas)
		}
	}
	// Without a behavior the HPA's first step is at most max(2 x current,
	// 4): from 1 that is 4 on 8 partitions, where the behavior algorithm
	// allows 5.
	if s.o.withoutBehavior {
		want := min(max(2*minR, 4), int32(s.o.topicPartitions()))
		for _, st := range steps {
			if st.replicas > minR {
				if st.replicas != want {
					t.Errorf("the HPA's first step went from %d to %d replicas, want %d (no behavior)", minR, st.replicas, want)
				}
				break
			}
		}
	}
	exact, checked, bad := agreement(steps, predictionsOf(steps), s.e.hpaSync, window)
	t.Logf("keda policy vs the real HPA: %d of %d steps equal to the latest prediction; %d outside one sync period", exact, checked, len(bad))
	for _, b := range bad {
		t.Errorf("keda policy and HPA disagree: %s", b)
	}
}

func (s *session) checkMonitor() {
	ctx, cancel := s.ctx(time.Minute)
	defer cancel()
	// --local: `microbatch lag` on this machine, with the test's Kafka
	// settings (there is no kubelet to exec into a pod).
	cmd := s.e.command(ctx, "", filepath.Join(s.e.repo, "deploy", "scripts", "monitor.sh"), "--once", "--local")
	for k, v := range s.admin {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	cmd.Env = append(cmd.Env, "KAFKA_TOPIC="+s.o.topic, "CONSUMER_GROUP="+s.o.group,
		"PATH="+s.e.kubeBin+":"+filepath.Dir(s.e.microbatch)+":"+os.Getenv("PATH"))
	out, err := cmd.CombinedOutput()
	s.t.Logf("monitor.sh --once --local:\n%s", indent(string(out)))
	if err != nil {
		s.t.Fatalf("monitor.sh: %v", err)
	}
	for _, want := range []string{"keda-hpa-microbatch", "s0-", "== microbatch lag", s.o.topic} {
		if !strings.Contains(string(out), want) {
			s.t.Errorf("monitor.sh output lacks %q", want)
		}
	}
	if strings.Contains(string(out), "has no external metric yet") || strings.Contains(string(out), "not available") {
		s.t.Errorf("monitor.sh could not read KEDA's metric")
	}
}

func writeArtifact(t *testing.T, name, text string) {
	path := filepath.Join(cluster.artifacts, t.Name(), name)
	_ = os.MkdirAll(filepath.Dir(path), 0o755)
	if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
		t.Error(err)
	}
}

func indent(s string) string {
	return "    " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n    ")
}

// TestPlaintextOverlay: the kit's plaintext overlay, KEDA's kafka trigger,
// the kit's behavior (the HPA's behavior algorithm).
func TestPlaintextOverlay(t *testing.T) {
	s, err := deployKit(t, testOverlay{base: "plaintext", worker: cluster.plaintext(), minReplica: 1}, nil, 3*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	s.checkKeda()
	s.kafkaTriggerScenario()
	s.checkMonitor()
	s.checkImageRun(true)
}

// TestMskScramOverlay: the msk-scram overlay against the SASL_SSL/SCRAM-SHA-512
// listener; KEDA reads the credentials through the TriggerAuthentication.
// Its ScaledObject has no behavior (as most users write theirs): the keda
// preview follows the HPA's older algorithm step by step, on 8 partitions,
// where the two algorithms part at the first step (1 -> 4 without a
// behavior, 1 -> 5 with one; 4 partitions would cap both alike).
func TestMskScramOverlay(t *testing.T) {
	o := testOverlay{base: "msk-scram", worker: cluster.scramKafka(), minReplica: 1, withoutBehavior: true, partitions: 8}
	s, err := deployKit(t, o, nil, 3*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	s.checkKeda()
	s.kafkaTriggerScenario()
	s.checkMonitor()
	s.checkImageRun(true)
}

// scalerLog is one JSON log line of `microbatch scaler`.
type scalerLog struct {
	Timestamp time.Time      `json:"timestamp"`
	Fields    map[string]any `json:"fields"`
	Raw       string         `json:"-"`
}

func readScalerLog(paths []string) []scalerLog {
	var lines []scalerLog
	for _, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			var l scalerLog
			if json.Unmarshal(sc.Bytes(), &l) == nil {
				l.Raw = sc.Text()
				lines = append(lines, l)
			}
		}
		f.Close()
	}
	return lines
}

func (l scalerLog) message() string { return fmt.Sprint(l.Fields["message"]) }

// TestExternalScalerOverlay: KEDA's operator calls `microbatch scaler`
// (a local process, run by the stand-in from the overlay's scaler
// Deployment) over gRPC; the replicas follow its rate policy, and
// StreamIsActive wakes the workers from zero.
func TestExternalScalerOverlay(t *testing.T) {
	port, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	o := testOverlay{base: "external-scaler", worker: cluster.scramKafka(), minReplica: 0, scalerAddr: fmt.Sprintf("127.0.0.1:%d", port)}
	s, err := deployKit(t, o, map[string]int{"scaler/grpc": port}, 3*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	s.checkKeda()

	// Idle, minReplicaCount 0: KEDA scales the workers to zero after the cooldown.
	steps, err := s.watch(2*time.Minute, false, nil, func(st []sample) bool {
		l := st[len(st)-1]
		return l.replicas == 0 && l.running == 0
	})
	if err != nil {
		t.Fatalf("idle workers were not scaled to zero: %v\n%s", err, timeline(steps))
	}
	t.Logf("idle: scaled to zero at +%.0fs (cooldown %ds)", steps[len(steps)-1].at.Seconds(), cooldownSeconds)

	var burstAt time.Time
	var woke, peak time.Duration
	var top int32
	awake := false
	steps, err = s.watch(5*time.Minute, false, func() {
		burstAt = time.Now()
		s.produce(burst)
		t.Logf("burst: %d records produced at once", burst)
	}, func(st []sample) bool {
		l := st[len(st)-1]
		if l.replicas > 0 && !awake {
			awake, woke = true, l.at
		}
		if l.replicas > top {
			top, peak = l.replicas, l.at
		}
		return top > 1 && l.lag == 0 && l.replicas == 0 && l.running == 0
	})
	table := timeline(steps)
	writeArtifact(t, "timeline.md", table)
	t.Logf("timeline (t from the burst):\n%s", table)
	if err != nil {
		t.Fatalf("the burst did not wake, scale up, drain and return to zero: %v", err)
	}
	t.Logf("woke from zero at +%.0fs; peak %d replicas at +%.0fs; back to zero at +%.0fs",
		woke.Seconds(), top, peak.Seconds(), steps[len(steps)-1].at.Seconds())

	if steps[0].replicas != 0 {
		t.Errorf("the workers were not at zero when the burst came (%d replicas)", steps[0].replicas)
	}
	// The scaler's own log: each KEDA call, and the metric values it gave.
	logs := readScalerLog(s.standIn.logsOf("scaler"))
	calls := map[string]int{}
	var metrics []scalerLog
	for _, l := range logs {
		m := l.message()
		for _, c := range []string{"GetMetricSpec", "GetMetrics", "StreamIsActive", "StreamIsActive: pushed", "IsActive"} {
			if m == c {
				calls[c]++
			}
		}
		if m == "GetMetrics" {
			metrics = append(metrics, l)
		}
	}
	t.Logf("scaler log: calls by KEDA %v", calls)
	for _, c := range []string{"GetMetricSpec", "GetMetrics", "StreamIsActive"} {
		if calls[c] == 0 {
			t.Errorf("the scaler's log shows no %s call", c)
		}
	}
	// The wake from zero came through the stream: the scaler pushed
	// "active" after the burst and before the first replica.
	pushed := false
	for _, l := range logs {
		if l.message() == "StreamIsActive: pushed" && l.Fields["active"] == true &&
			l.Timestamp.After(burstAt.Add(-time.Second)) && l.Timestamp.Before(burstAt.Add(woke+time.Second)) {
			pushed = true
			t.Logf("StreamIsActive pushed active at +%.1fs; the first replica came at +%.0fs",
				l.Timestamp.Sub(burstAt).Seconds(), woke.Seconds())
		}
	}
	if !pushed {
		t.Errorf("no StreamIsActive push of active=true between the burst and the wake at +%.0fs", woke.Seconds())
	}
	// The first lines of each kind, as the scaler wrote them.
	shown := map[string]int{}
	for _, l := range logs {
		m := l.message()
		if calls[m] > 0 && shown[m] < 2 {
			shown[m]++
			t.Logf("scaler: %s", l.Raw)
		}
	}
	// The replicas follow the rate policy: the values the scaler gave KEDA
	// (GetMetrics: the HPA's sync, and the operator's own loop) are the
	// predictions, and the same rule as for the keda policy applies.
	var preds []prediction
	for _, m := range metrics {
		v, _ := m.Fields["value"].(float64)
		preds = append(preds, prediction{m.Timestamp.Sub(burstAt), int32(v)})
	}
	exact, checked, bad := agreement(steps, preds, cluster.hpaSync, scaleDownWindowSecs*time.Second)
	t.Logf("rate policy vs the real HPA: %d of %d steps equal to the scaler's latest metric; %d outside one sync period", exact, checked, len(bad))
	if checked == 0 {
		t.Error("no step to compare with the scaler's metric")
	}
	for _, b := range bad {
		t.Errorf("rate policy and HPA disagree: %s", b)
	}
	s.checkImageRun(true)
}

// TestShareGroupOverlay: the share-group overlay, workers in a share group
// on 4 partitions, scaled by KEDA's operator through `microbatch scaler`
// on the group's backlog: a burst takes the Deployment past the partition
// count, the broker counts more members than partitions, the backlog
// drains and the replicas return to the minimum.
func TestShareGroupOverlay(t *testing.T) {
	port, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	o := testOverlay{base: "share-group", worker: cluster.scramKafka(), minReplica: 1, scalerAddr: fmt.Sprintf("127.0.0.1:%d", port)}
	s, err := deployKit(t, o, map[string]int{"scaler/grpc": port}, 3*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	s.checkKeda()
	// Three bursts' worth: at the scaler's first guess (50/s per replica,
	// at most doubling per 15 s) the count passes 4 before one worker
	// (80/s) and its helpers have drained it.
	const records = 3 * burst
	var top int32
	var peak time.Duration
	mostMembers := 0
	steps, err := s.watch(6*time.Minute, false, func() {
		s.produce(records)
		t.Logf("burst: %d records produced at once", records)
	}, func(st []sample) bool {
		l := st[len(st)-1]
		if l.replicas > top {
			top, peak = l.replicas, l.at
		}
		mostMembers = max(mostMembers, l.members)
		return top > partitions && l.lag == 0 && l.replicas == int32(o.minReplica) && l.running == o.minReplica
	})
	table := shareTimeline(steps)
	writeArtifact(t, "timeline.md", table)
	t.Logf("timeline (t from the burst):\n%s", table)
	if err != nil {
		t.Fatalf("the burst was not scaled past the partitions, drained and scaled back: %v", err)
	}
	t.Logf("peak %d replicas at +%.0fs on %d partitions; the broker counted up to %d members; back to %d at +%.0fs",
		top, peak.Seconds(), partitions, mostMembers, o.minReplica, steps[len(steps)-1].at.Seconds())
	if mostMembers <= partitions {
		t.Errorf("the broker never counted more members (%d) than partitions (%d)", mostMembers, partitions)
	}
	s.checkImageRun(true)
}

// shareTimeline: the steps of a share-group session.
func shareTimeline(steps []sample) string {
	var b strings.Builder
	fmt.Fprintf(&b, "| t (s) | backlog | share-group members | Deployment replicas (HPA/KEDA) | HPA desired | worker processes |\n|---|---|---|---|---|---|\n")
	for _, st := range steps {
		fmt.Fprintf(&b, "| %.0f | %d | %d | %d | %d | %d |\n", st.at.Seconds(), st.lag, st.members, st.replicas, st.hpaWant, st.running)
	}
	return b.String()
}

// TestBrokenManifests: a deliberately broken overlay makes the e2e fail
// with a message that names what is broken.
func TestBrokenManifests(t *testing.T) {
	cases := []struct {
		name  string
		o     func(port int) testOverlay
		wants []string
	}{
		{"wrong Secret key in the TriggerAuthentication", func(int) testOverlay {
			return testOverlay{base: "msk-scram", minReplica: 1, triggerAuthPasswordKey: "passwd"}
		}, []string{"TriggerAuthentication microbatch/microbatch-kafka", `no key "passwd"`}},
		{"wrong Secret key in the worker's env", func(int) testOverlay {
			return testOverlay{base: "msk-scram", minReplica: 1, podPasswordKey: "passwd"}
		}, []string{"CreateContainerConfigError", "couldn't find key passwd in Secret microbatch/microbatch-kafka"}},
		{"wrong scaler address", func(port int) testOverlay {
			// A port nothing listens on (the scaler itself runs on port).
			wrong, err := freePort()
			if err != nil || wrong == port {
				panic(fmt.Sprintf("no second free port: %v", err))
			}
			return testOverlay{base: "external-scaler", minReplica: 1, scalerAddr: fmt.Sprintf("127.0.0.1:%d", wrong)}
		}, []string{"scalerAddress 127.0.0.1:"}},
	}
	for _, c := range cases {
		t.Run(strings.ReplaceAll(c.name, " ", "_"), func(t *testing.T) {
			port, err := freePort()
			if err != nil {
				t.Fatal(err)
			}
			o := c.o(port)
			o.worker = cluster.scramKafka()
			_, err = deployKit(t, o, map[string]int{"scaler/grpc": port}, 40*time.Second)
			if err == nil {
				t.Fatalf("deploying the broken overlay (%s) passed", c.name)
			}
			t.Logf("the e2e fails as it should:\n%s", indent(err.Error()))
			for _, w := range c.wants {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("the failure does not name it: want %q in it", w)
				}
			}
		})
	}
}
