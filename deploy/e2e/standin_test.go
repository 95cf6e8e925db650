package e2e

// The stand-in for a kubelet. The control plane has no nodes: the ReplicaSet
// controller creates pods that nobody runs. The stand-in watches the pods of
// one namespace and does for each what a kubelet would: builds the
// container's environment from the pod spec and the ConfigMaps and Secrets
// it names (failing as the kubelet does, with CreateContainerConfigError,
// when a key is missing), starts the container's command as a local
// `microbatch` process, runs the readiness probe against it, and writes the
// pod's status (Running, Ready) back to the API server. A pod that goes away
// (the HPA scaled down, cleanup.sh) gets SIGTERM, its grace period, then
// SIGKILL. So the number of processes is the number of pods, which the
// Deployment's spec.replicas decides.
//
// Images: with MICROBATCH_E2E_IMAGE, each container runs from the image the
// test command built, as user, root filesystem and volumes say
// (runtime_test.go); without it, every container runs the local binary with
// the container's args.
//
// What it does not emulate: pod networking (each container port is a local
// port; flags and variables that carry the port are rewritten to it),
// restarts with back-off (a process that exits is restarted after a fixed
// pause), and liveness probes.

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
)

type standIn struct {
	cs     kubernetes.Interface
	ns     string
	bin    string          // the microbatch binary every container runs, without an image
	image  *containerImage // the image every container runs from, if set
	logDir string
	// podDir holds each pod's volumes and, with an image, its root.
	podDir string
	// fixedPorts pins the local port of a container port, keyed
	// "<app.kubernetes.io/component>/<port name>": the external scaler's gRPC
	// port must be known before its pod exists (it is in the trigger).
	fixedPorts map[string]int
	logf       func(format string, args ...any)

	mu       sync.Mutex
	procs    map[types.UID]*podProcess
	problems map[string]string // pod name -> why it cannot start (as the kubelet reports it)
	// evidence is what /proc says of each image-run process (uid, root);
	// stopFailures the processes that did not exit 0 on SIGTERM.
	evidence     map[string]string
	stopFailures []string
	// dying are the processes of removed pods, between SIGTERM and their
	// exit: they still run, and their exit is still to be judged.
	dying   map[*podProcess]bool
	dyingWG sync.WaitGroup
	stopped chan struct{}
	cancel  context.CancelFunc
}

type podProcess struct {
	pod       string
	component string
	container corev1.Container
	grace     time.Duration
	env       []string
	args      []string
	ports     map[int32]int // container port -> local port
	logPath   string
	// With an image: the whole argv, the identity, the working directory and
	// the root filesystem's mounts.
	argv     []string
	uid, gid uint32
	workDir  string
	readOnly bool
	volumes  []podVolume

	cmd      *exec.Cmd
	exited   chan struct{}
	started  time.Time
	restarts int32
	ready    bool
	lastExit string
}

func startStandIn(cs kubernetes.Interface, ns, bin string, image *containerImage, logDir, podDir string, fixedPorts map[string]int, logf func(string, ...any)) *standIn {
	ctx, cancel := context.WithCancel(context.Background())
	s := &standIn{
		cs: cs, ns: ns, bin: bin, image: image, logDir: logDir, podDir: podDir, fixedPorts: fixedPorts, logf: logf,
		procs: map[types.UID]*podProcess{}, problems: map[string]string{}, evidence: map[string]string{},
		dying: map[*podProcess]bool{}, stopped: make(chan struct{}), cancel: cancel,
	}
	go s.loop(ctx)
	return s
}

// stop ends every process the stand-in started, each with its grace period.
func (s *standIn) stop() {
	s.cancel()
	<-s.stopped
	s.mu.Lock()
	procs := s.procs
	s.procs = map[types.UID]*podProcess{}
	s.mu.Unlock()
	for _, p := range procs {
		s.stopProcess(p)
	}
	s.dyingWG.Wait()
}

// running counts the live processes of pods with this component label,
// those of removed pods still draining included.
func (s *standIn) running(component string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, p := range s.procs {
		if p.component == component && p.cmd != nil && p.cmd.ProcessState == nil {
			n++
		}
	}
	for p := range s.dying {
		if p.component == component {
			n++
		}
	}
	return n
}

// stopProcess terminates p in the background; running counts it, and
// dyingWG waits for it, until it has exited.
func (s *standIn) stopProcess(p *podProcess) {
	s.mu.Lock()
	s.dying[p] = true
	s.mu.Unlock()
	s.dyingWG.Add(1)
	go func() {
		defer s.dyingWG.Done()
		s.terminate(p)
		s.mu.Lock()
		delete(s.dying, p)
		s.mu.Unlock()
	}()
}

// problemsText is what the stand-in could not run, one line per pod.
func (s *standIn) problemsText() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var lines []string
	for pod, why := range s.problems {
		lines = append(lines, fmt.Sprintf("pod %s: %s", pod, why))
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

// logsOf returns the log file paths of the processes with this component.
func (s *standIn) logsOf(component string) []string {
	matches, _ := filepath.Glob(filepath.Join(s.logDir, component+"-*.log"))
	sort.Strings(matches)
	return matches
}

func (s *standIn) loop(ctx context.Context) {
	defer close(s.stopped)
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for {
		s.sync(ctx)
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

func (s *standIn) sync(ctx context.Context) {
	pods, err := s.cs.CoreV1().Pods(s.ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		if ctx.Err() == nil && !apierrors.IsNotFound(err) {
			s.logf("stand-in: listing pods: %v", err)
		}
		return
	}
	live := map[types.UID]bool{}
	for i := range pods.Items {
		pod := &pods.Items[i]
		if pod.DeletionTimestamp != nil || pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
			continue
		}
		live[pod.UID] = true
		s.mu.Lock()
		p, ok := s.procs[pod.UID]
		s.mu.Unlock()
		if !ok {
			p, err = s.prepare(ctx, pod)
			if err != nil {
				s.reportConfigError(ctx, pod, err)
				continue
			}
			s.mu.Lock()
			s.procs[pod.UID] = p
			delete(s.problems, pod.Name)
			s.mu.Unlock()
		}
		s.tend(ctx, pod, p)
	}
	s.mu.Lock()
	var gone []*podProcess
	for uid, p := range s.procs {
		if !live[uid] {
			gone = append(gone, p)
			delete(s.procs, uid)
		}
	}
	s.mu.Unlock()
	for _, p := range gone {
		s.logf("stand-in: pod %s is gone: stopping its process (grace %s)", p.pod, p.grace)
		s.stopProcess(p)
	}
}

// prepare resolves what the kubelet resolves before starting a container.
func (s *standIn) prepare(ctx context.Context, pod *corev1.Pod) (*podProcess, error) {
	if len(pod.Spec.Containers) != 1 || len(pod.Spec.InitContainers) != 0 {
		return nil, fmt.Errorf("the stand-in runs pods of exactly one container, got %d (+%d init)",
			len(pod.Spec.Containers), len(pod.Spec.InitContainers))
	}
	c := pod.Spec.Containers[0]
	env, err := s.containerEnv(ctx, pod, c)
	if err != nil {
		return nil, err
	}
	p := &podProcess{
		pod:       pod.Name,
		component: pod.Labels["app.kubernetes.io/component"],
		container: c,
		grace:     30 * time.Second,
		ports:     map[int32]int{},
		logPath:   filepath.Join(s.logDir, fmt.Sprintf("%s-%s.log", pod.Labels["app.kubernetes.io/component"], pod.Name)),
	}
	if g := pod.Spec.TerminationGracePeriodSeconds; g != nil {
		p.grace = time.Duration(*g) * time.Second
	}
	for _, port := range c.Ports {
		local := s.fixedPorts[p.component+"/"+port.Name]
		if local == 0 {
			if local, err = freePort(); err != nil {
				return nil, err
			}
		}
		p.ports[port.ContainerPort] = local
	}
	// The pod's network, emulated: a variable or flag that carries a
	// container port carries its local port instead.
	for i, kv := range env {
		name, value, _ := strings.Cut(kv, "=")
		if n, err := strconv.Atoi(value); err == nil && strings.HasSuffix(name, "_PORT") {
			if local, ok := p.ports[int32(n)]; ok {
				env[i] = name + "=" + strconv.Itoa(local)
			}
		}
	}
	if p.volumes, err = s.volumes(pod, c); err != nil {
		return nil, err
	}
	portFlag := regexp.MustCompile(`^(--[a-z-]*port=)([0-9]+)$`)
	argv := append(append([]string{}, c.Command...), c.Args...)
	if s.image != nil {
		argv = s.image.argv(c)
	}
	for _, a := range argv {
		if m := portFlag.FindStringSubmatch(a); m != nil {
			n, _ := strconv.Atoi(m[2])
			if local, ok := p.ports[int32(n)]; ok {
				a = m[1] + strconv.Itoa(local)
			}
		}
		p.args = append(p.args, a)
	}
	if s.image != nil {
		p.argv, p.args = p.args, p.args[1:]
		if p.uid, p.gid, err = s.image.identity(pod, c); err != nil {
			return nil, err
		}
		p.workDir = s.image.config.WorkingDir
		if c.WorkingDir != "" {
			p.workDir = c.WorkingDir
		}
		p.readOnly = c.SecurityContext != nil && c.SecurityContext.ReadOnlyRootFilesystem != nil && *c.SecurityContext.ReadOnlyRootFilesystem
		// The runtime sets HOSTNAME to the pod's name (the UTS name is not
		// emulated).
		p.env = s.image.env(append([]string{"HOSTNAME=" + pod.Name}, env...), s.image.homeOf(p.uid))
		return p, nil
	}
	// No image: a path under a volume's mount path is its host directory.
	// Each value is rewritten once, by its longest mount path: a host
	// directory under /tmp must not be rewritten again by a /tmp mount.
	for i, kv := range env {
		name, value, _ := strings.Cut(kv, "=")
		var best *podVolume
		for j := range p.volumes {
			v := &p.volumes[j]
			if strings.HasPrefix(value, v.mountPath+"/") && (best == nil || len(v.mountPath) > len(best.mountPath)) {
				best = v
			}
		}
		if best != nil {
			env[i] = name + "=" + best.hostDir + strings.TrimPrefix(value, best.mountPath)
		}
	}
	if len(c.Command) > 0 {
		// The image's entrypoint is the binary; a command replaces it.
		if filepath.Base(c.Command[0]) != "microbatch" {
			return nil, fmt.Errorf("container %s: the stand-in runs only the microbatch binary, not %q", c.Name, c.Command[0])
		}
		p.args = p.args[1:]
	}
	p.env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.TempDir()}, env...)
	return p, nil
}

// containerEnv is the kubelet's rule: envFrom first, then env (later wins);
// a missing ConfigMap, Secret or key that is not optional stops the pod.
func (s *standIn) containerEnv(ctx context.Context, pod *corev1.Pod, c corev1.Container) ([]string, error) {
	values := map[string]string{}
	var order []string
	set := func(k, v string) {
		if _, ok := values[k]; !ok {
			order = append(order, k)
		}
		values[k] = v
	}
	for _, from := range c.EnvFrom {
		kind, name, opt := "ConfigMap", "", (*bool)(nil)
		switch {
		case from.ConfigMapRef != nil:
			name, opt = from.ConfigMapRef.Name, from.ConfigMapRef.Optional
		case from.SecretRef != nil:
			kind, name, opt = "Secret", from.SecretRef.Name, from.SecretRef.Optional
		default:
			continue
		}
		data, err := s.data(ctx, pod.Namespace, kind, name)
		if err != nil {
			if optional(opt) {
				continue
			}
			return nil, err
		}
		for k, v := range data {
			set(from.Prefix+k, v)
		}
	}
	for _, e := range c.Env {
		switch {
		case e.ValueFrom == nil:
			set(e.Name, e.Value)
		case e.ValueFrom.ConfigMapKeyRef != nil:
			ref := e.ValueFrom.ConfigMapKeyRef
			v, ok, err := s.keyRef(ctx, pod.Namespace, "ConfigMap", ref.Name, ref.Key, ref.Optional)
			if err != nil {
				return nil, err
			}
			if ok {
				set(e.Name, v)
			}
		case e.ValueFrom.SecretKeyRef != nil:
			ref := e.ValueFrom.SecretKeyRef
			v, ok, err := s.keyRef(ctx, pod.Namespace, "Secret", ref.Name, ref.Key, ref.Optional)
			if err != nil {
				return nil, err
			}
			if ok {
				set(e.Name, v)
			}
		case e.ValueFrom.FieldRef != nil:
			switch e.ValueFrom.FieldRef.FieldPath {
			case "metadata.name":
				set(e.Name, pod.Name)
			case "metadata.namespace":
				set(e.Name, pod.Namespace)
			default:
				return nil, fmt.Errorf("env %s: the stand-in does not resolve fieldRef %s", e.Name, e.ValueFrom.FieldRef.FieldPath)
			}
		default:
			return nil, fmt.Errorf("env %s: the stand-in does not resolve this valueFrom", e.Name)
		}
	}
	env := make([]string, 0, len(order))
	for _, k := range order {
		env = append(env, k+"="+values[k])
	}
	return env, nil
}

func optional(b *bool) bool { return b != nil && *b }

// data is a ConfigMap's or a Secret's data, by kind ("ConfigMap", "Secret").
func (s *standIn) data(ctx context.Context, ns, kind, name string) (map[string]string, error) {
	if kind == "ConfigMap" {
		cm, err := s.cs.CoreV1().ConfigMaps(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return nil, fmt.Errorf("configmap %q not found", name)
		}
		return cm.Data, nil
	}
	sec, err := s.cs.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("secret %q not found", name)
	}
	data := map[string]string{}
	for k, v := range sec.Data {
		data[k] = string(v)
	}
	return data, nil
}

// keyRef resolves one key as the kubelet does: ok is false when the
// reference is optional and the object or key is missing.
func (s *standIn) keyRef(ctx context.Context, ns, kind, name, key string, opt *bool) (string, bool, error) {
	data, err := s.data(ctx, ns, kind, name)
	if err != nil {
		if optional(opt) {
			return "", false, nil
		}
		return "", false, err
	}
	v, ok := data[key]
	if !ok {
		if optional(opt) {
			return "", false, nil
		}
		return "", false, fmt.Errorf("couldn't find key %s in %s %s/%s", key, kind, ns, name)
	}
	return v, true, nil
}

func (s *standIn) reportConfigError(ctx context.Context, pod *corev1.Pod, err error) {
	msg := err.Error()
	problem := "CreateContainerConfigError: " + msg
	s.mu.Lock()
	first := s.problems[pod.Name] != problem
	s.problems[pod.Name] = problem
	s.mu.Unlock()
	if !first {
		return
	}
	s.logf("stand-in: pod %s: CreateContainerConfigError: %s", pod.Name, msg)
	name := "container"
	if len(pod.Spec.Containers) > 0 {
		name = pod.Spec.Containers[0].Name
	}
	s.writeStatus(ctx, pod, func(st *corev1.PodStatus) {
		st.Phase = corev1.PodPending
		st.ContainerStatuses = []corev1.ContainerStatus{{
			Name:  name,
			Image: imageOf(pod),
			State: corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{
				Reason: "CreateContainerConfigError", Message: msg,
			}},
		}}
	})
}

func imageOf(pod *corev1.Pod) string {
	if len(pod.Spec.Containers) > 0 {
		return pod.Spec.Containers[0].Image
	}
	return ""
}

// tend starts or restarts the process, probes it and reports the status.
func (s *standIn) tend(ctx context.Context, pod *corev1.Pod, p *podProcess) {
	s.mu.Lock()
	needStart := p.cmd == nil
	exited := false
	if p.cmd != nil {
		select {
		case <-p.exited:
			exited = true
		default:
		}
	}
	s.mu.Unlock()
	if exited && time.Since(p.started) > 2*time.Second {
		s.mu.Lock()
		p.lastExit = p.cmd.ProcessState.String()
		p.restarts++
		p.cmd = nil
		needStart = true
		s.mu.Unlock()
		s.logf("stand-in: pod %s: process exited (%s): restarting", p.pod, p.lastExit)
	}
	if needStart {
		if err := s.launch(p); err != nil {
			s.logf("stand-in: pod %s: %v", p.pod, err)
			return
		}
	}
	ready := !exited && s.probe(p)
	if ready && s.image != nil {
		s.recordEvidence(p)
	}
	changed := ready != p.ready || pod.Status.Phase != corev1.PodRunning ||
		len(pod.Status.ContainerStatuses) == 0 || pod.Status.ContainerStatuses[0].RestartCount != p.restarts
	p.ready = ready
	if !changed {
		return
	}
	cond := corev1.ConditionFalse
	if ready {
		cond = corev1.ConditionTrue
	}
	now := metav1.Now()
	started := metav1.NewTime(p.started)
	s.writeStatus(ctx, pod, func(st *corev1.PodStatus) {
		st.Phase = corev1.PodRunning
		if st.StartTime == nil {
			st.StartTime = &started
		}
		st.Conditions = []corev1.PodCondition{
			{Type: corev1.PodInitialized, Status: corev1.ConditionTrue, LastTransitionTime: started},
			{Type: corev1.ContainersReady, Status: cond, LastTransitionTime: now},
			{Type: corev1.PodReady, Status: cond, LastTransitionTime: now},
		}
		t := true
		st.ContainerStatuses = []corev1.ContainerStatus{{
			Name: p.container.Name, Image: p.container.Image, Ready: ready, Started: &t,
			RestartCount: p.restarts,
			State:        corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: started}},
		}}
	})
}

func (s *standIn) launch(p *podProcess) error {
	f, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(s.bin, p.args...)
	var root *containerRoot
	if s.image != nil {
		dir := filepath.Join(s.podDir, fmt.Sprintf("%s-root-%d", p.pod, p.restarts))
		if root, err = s.image.mountRoot(dir, p.readOnly, p.volumes); err != nil {
			f.Close()
			return err
		}
		cmd = &exec.Cmd{Path: p.argv[0], Args: p.argv, Dir: p.workDir, SysProcAttr: &syscall.SysProcAttr{
			Chroot: root.root, Credential: &syscall.Credential{Uid: p.uid, Gid: p.gid},
		}}
	}
	cmd.Env = p.env
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		f.Close()
		if root != nil {
			root.unmount()
		}
		return fmt.Errorf("starting %s: %w", cmd.Path, err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		f.Close()
		if root != nil {
			root.unmount()
		}
		close(exited)
	}()
	s.mu.Lock()
	p.cmd, p.exited, p.started = cmd, exited, time.Now()
	s.mu.Unlock()
	how := ""
	if s.image != nil {
		how = fmt.Sprintf(" from the image as %d:%d, root read-only %v", p.uid, p.gid, p.readOnly)
	}
	s.logf("stand-in: pod %s: started `microbatch %s`%s (pid %d, ports %v)", p.pod, strings.Join(p.args, " "), how, cmd.Process.Pid, p.ports)
	return nil
}

// volumes resolves the container's volume mounts: emptyDir as a tmpfs (a
// host directory without an image), configMap and secret as their files.
func (s *standIn) volumes(pod *corev1.Pod, c corev1.Container) ([]podVolume, error) {
	byName := map[string]corev1.Volume{}
	for _, v := range pod.Spec.Volumes {
		byName[v.Name] = v
	}
	var out []podVolume
	for _, m := range c.VolumeMounts {
		v, ok := byName[m.Name]
		if !ok {
			return nil, fmt.Errorf("volume mount %s: no volume of that name", m.Name)
		}
		pv := podVolume{mountPath: m.MountPath, readOnly: m.ReadOnly}
		var files map[string]string
		switch {
		case v.EmptyDir != nil:
			pv.tmpfsSize = 256 << 20
			if v.EmptyDir.SizeLimit != nil {
				pv.tmpfsSize = v.EmptyDir.SizeLimit.Value()
			}
		case v.ConfigMap != nil:
			data, err := s.data(context.Background(), pod.Namespace, "ConfigMap", v.ConfigMap.Name)
			if err != nil {
				return nil, err
			}
			files, pv.readOnly = data, true
		case v.Secret != nil:
			data, err := s.data(context.Background(), pod.Namespace, "Secret", v.Secret.SecretName)
			if err != nil {
				return nil, err
			}
			files, pv.readOnly = data, true
		default:
			return nil, fmt.Errorf("volume %s: the stand-in mounts emptyDir, configMap and secret volumes only", m.Name)
		}
		if files != nil || s.image == nil {
			dir := filepath.Join(s.podDir, pod.Name+"-volumes", m.Name)
			if err := os.MkdirAll(dir, 0o755); err != nil {
				return nil, err
			}
			for k, val := range files {
				if err := os.WriteFile(filepath.Join(dir, k), []byte(val), 0o644); err != nil {
					return nil, err
				}
			}
			pv.hostDir = dir
		}
		out = append(out, pv)
	}
	return out, nil
}

// imageEvidence is what /proc said of each process run from the image.
func (s *standIn) imageEvidence() map[string]string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[string]string{}
	for k, v := range s.evidence {
		out[k] = v
	}
	return out
}

// stopProblems lists the processes that did not exit 0 on SIGTERM.
func (s *standIn) stopProblems() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string{}, s.stopFailures...)
}

// recordEvidence notes, once per pod, the uid and the root's flags that
// /proc shows for its process.
func (s *standIn) recordEvidence(p *podProcess) {
	s.mu.Lock()
	_, done := s.evidence[p.pod]
	cmd := p.cmd
	s.mu.Unlock()
	if done || cmd == nil {
		return
	}
	uid, ro, err := rootOf(cmd.Process.Pid)
	if err != nil {
		return // exited meanwhile: read it when the next process is ready
	}
	what := fmt.Sprintf("uid %s, root read-only %v", uid, ro)
	s.mu.Lock()
	s.evidence[p.pod] = what
	s.mu.Unlock()
}

// probe runs the container's readiness probe once (httpGet or grpc).
func (s *standIn) probe(p *podProcess) bool {
	rp := p.container.ReadinessProbe
	if rp == nil {
		return true
	}
	timeout := 3 * time.Second
	if rp.TimeoutSeconds > 0 {
		timeout = time.Duration(rp.TimeoutSeconds) * time.Second
	}
	switch {
	case rp.HTTPGet != nil:
		port := s.portOf(p, rp.HTTPGet.Port.String())
		if port == 0 {
			return false
		}
		client := http.Client{Timeout: timeout}
		resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d%s", port, rp.HTTPGet.Path))
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode >= 200 && resp.StatusCode < 400
	case rp.GRPC != nil:
		port := p.ports[rp.GRPC.Port]
		if port == 0 {
			return false
		}
		conn, err := grpc.NewClient(fmt.Sprintf("127.0.0.1:%d", port), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return false
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		service := ""
		if rp.GRPC.Service != nil {
			service = *rp.GRPC.Service
		}
		resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: service})
		return err == nil && resp.Status == healthpb.HealthCheckResponse_SERVING
	default:
		return true
	}
}

// portOf resolves a probe's port (a number or a container port's name).
func (s *standIn) portOf(p *podProcess, port string) int {
	if n, err := strconv.Atoi(port); err == nil {
		return p.ports[int32(n)]
	}
	for _, cp := range p.container.Ports {
		if cp.Name == port {
			return p.ports[cp.ContainerPort]
		}
	}
	return 0
}

func (s *standIn) writeStatus(ctx context.Context, pod *corev1.Pod, edit func(*corev1.PodStatus)) {
	for attempt := 0; attempt < 3; attempt++ {
		fresh, err := s.cs.CoreV1().Pods(pod.Namespace).Get(ctx, pod.Name, metav1.GetOptions{})
		if err != nil {
			return // gone
		}
		edit(&fresh.Status)
		if _, err = s.cs.CoreV1().Pods(pod.Namespace).UpdateStatus(ctx, fresh, metav1.UpdateOptions{}); err == nil {
			return
		} else if !apierrors.IsConflict(err) {
			if ctx.Err() == nil && !apierrors.IsNotFound(err) {
				s.logf("stand-in: pod %s: status update: %v", pod.Name, err)
			}
			return
		}
	}
}

// terminate is the kubelet's stop: SIGTERM, the grace period, SIGKILL.
func (s *standIn) terminate(p *podProcess) {
	s.mu.Lock()
	cmd, exited := p.cmd, p.exited
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	select {
	case <-exited:
		return // it exited before this stop: tend logged it
	default:
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
		if code := cmd.ProcessState.ExitCode(); code != 0 {
			s.mu.Lock()
			s.stopFailures = append(s.stopFailures, fmt.Sprintf("pod %s: %s on SIGTERM", p.pod, cmd.ProcessState))
			s.mu.Unlock()
		}
	case <-time.After(p.grace):
		s.logf("stand-in: pod %s: still running after its grace period %s: SIGKILL", p.pod, p.grace)
		_ = cmd.Process.Kill()
		<-exited
		s.mu.Lock()
		s.stopFailures = append(s.stopFailures, fmt.Sprintf("pod %s: still running after its grace period %s", p.pod, p.grace))
		s.mu.Unlock()
	}
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
