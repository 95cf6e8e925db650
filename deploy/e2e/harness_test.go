// Package e2e applies the deployment kit (deploy/k8s) to a local Kubernetes
// control plane with KEDA (cluster.sh) and checks that KEDA's own operator
// scales the workers on the local Kafka broker. See README.md.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
)

// env is what the tests need from the cluster and the machine.
type env struct {
	repo        string
	kubeconfig  string
	kubeBin     string // kubectl's directory, put first on PATH for the scripts
	hpaSync     time.Duration
	hpaWindow   time.Duration // the scale-down window of an HPA without a behavior
	clusterLogs string
	microbatch  string
	image       *containerImage   // every pod runs from it, when set (MICROBATCH_E2E_IMAGE)
	bootstrap   string            // PLAINTEXT listener
	scram       map[string]string // the SASL_SSL/SCRAM listener's client settings
	cs          kubernetes.Interface
	dyn         dynamic.Interface
	artifacts   string // logs of this run, kept after the test
}

var cluster *env

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	repo, err := filepath.Abs("../..")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	code := 1
	envFile := os.Getenv("E2E_CLUSTER_ENV")
	if envFile == "" {
		// Start our own cluster and stop it afterwards.
		state, err := os.MkdirTemp("", "microbatch-e2e-cluster-")
		if err != nil {
			fmt.Fprintln(os.Stderr, "e2e:", err)
			return 1
		}
		// KEDA's kafka scaler trusts the broker's CA as a cluster would
		// mount it: a directory given to the operator's --ca-dir.
		caDir, err := kafkaCADir(state)
		if err != nil {
			fmt.Fprintln(os.Stderr, "e2e:", err)
			return 1
		}
		clusterCmd := func(arg string) error {
			cmd := exec.Command("./cluster.sh", arg)
			cmd.Env = append(os.Environ(), "E2E_STATE_DIR="+state, "E2E_KEDA_CA_DIR="+caDir)
			cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
			return cmd.Run()
		}
		start := time.Now()
		if err := clusterCmd("start"); err != nil {
			fmt.Fprintf(os.Stderr, "e2e: cluster.sh start failed: %v (logs in %s/logs)\n", err, state)
			return 1
		}
		fmt.Fprintf(os.Stderr, "e2e: control plane up in %s\n", time.Since(start).Round(time.Second))
		defer func() {
			if err := clusterCmd("stop"); err != nil {
				fmt.Fprintln(os.Stderr, "e2e: cluster.sh stop:", err)
				return
			}
			// Keep the control plane's logs only when something failed.
			if code == 0 {
				_ = os.RemoveAll(state)
			} else {
				fmt.Fprintf(os.Stderr, "e2e: the control plane's logs: %s/logs\n", state)
			}
		}()
		envFile = filepath.Join(state, "env")
	}
	c, err := loadEnv(repo, envFile)
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		return 1
	}
	cluster = c
	code = m.Run()
	return code
}

// kafkaCADir copies the SCRAM listener's CA into a directory of its own.
func kafkaCADir(state string) (string, error) {
	scram, err := readEnvFile(os.Getenv("MICROBATCH_TEST_SCRAM_ENV"))
	if err != nil {
		return "", fmt.Errorf("MICROBATCH_TEST_SCRAM_ENV: %w", err)
	}
	ca, err := os.ReadFile(scram["KAFKA_SSL_CA_LOCATION"])
	if err != nil {
		return "", fmt.Errorf("the broker's CA (KAFKA_SSL_CA_LOCATION in MICROBATCH_TEST_SCRAM_ENV): %w", err)
	}
	dir := filepath.Join(state, "kafka-ca")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	return dir, os.WriteFile(filepath.Join(dir, "kafka-ca.crt"), ca, 0o644)
}

func loadEnv(repo, envFile string) (*env, error) {
	vars, err := readEnvFile(envFile)
	if err != nil {
		return nil, fmt.Errorf("cluster env %s: %w", envFile, err)
	}
	e := &env{
		repo: repo, kubeconfig: vars["KUBECONFIG"], kubeBin: vars["E2E_KUBE_BIN"],
		clusterLogs: vars["E2E_LOGS"],
	}
	sync, err := time.ParseDuration(vars["E2E_HPA_SYNC_SECONDS"] + "s")
	if err != nil {
		return nil, fmt.Errorf("E2E_HPA_SYNC_SECONDS in %s: %w", envFile, err)
	}
	e.hpaSync = sync
	window, err := time.ParseDuration(vars["E2E_HPA_DOWNSCALE_SECONDS"] + "s")
	if err != nil {
		return nil, fmt.Errorf("E2E_HPA_DOWNSCALE_SECONDS in %s (a cluster started by an older cluster.sh? stop it): %w", envFile, err)
	}
	e.hpaWindow = window
	e.microbatch = os.Getenv("MICROBATCH_BIN")
	if e.microbatch == "" {
		e.microbatch = filepath.Join(repo, "target", "debug", "microbatch")
	}
	if _, err := os.Stat(e.microbatch); err != nil {
		return nil, fmt.Errorf("the microbatch binary %s: %w (build it with `cargo build -p microbatch`, or set MICROBATCH_BIN)", e.microbatch, err)
	}
	// The image deploy/image/build.sh exported: the pods run from it, as
	// on a cluster. Without it (never under CI) they run the local binary.
	if dir := os.Getenv("MICROBATCH_E2E_IMAGE"); dir != "" {
		if e.image, err = loadImage(dir); err != nil {
			return nil, err
		}
	} else if os.Getenv("CI") == "true" {
		return nil, fmt.Errorf("MICROBATCH_E2E_IMAGE is not set: under CI the pods run from the image (deploy/image/build.sh --binary %s prints its directory)", e.microbatch)
	} else {
		fmt.Fprintln(os.Stderr, "e2e: MICROBATCH_E2E_IMAGE is not set: the pods run the local binary, not the image")
	}
	e.bootstrap = os.Getenv("MICROBATCH_TEST_BOOTSTRAP")
	if e.bootstrap == "" {
		e.bootstrap = "127.0.0.1:9092"
	}
	scramPath := os.Getenv("MICROBATCH_TEST_SCRAM_ENV")
	if scramPath == "" {
		return nil, fmt.Errorf("MICROBATCH_TEST_SCRAM_ENV is not set (the SCRAM listener's client settings; scripts/kafka-local.sh writes them)")
	}
	if e.scram, err = readEnvFile(scramPath); err != nil {
		return nil, fmt.Errorf("MICROBATCH_TEST_SCRAM_ENV: %w", err)
	}
	for _, k := range []string{"KAFKA_BOOTSTRAP_SERVERS", "KAFKA_USERNAME", "KAFKA_PASSWORD", "KAFKA_SSL_CA_LOCATION"} {
		if e.scram[k] == "" {
			return nil, fmt.Errorf("%s has no %s", scramPath, k)
		}
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", e.kubeconfig)
	if err != nil {
		return nil, err
	}
	if e.cs, err = kubernetes.NewForConfig(cfg); err != nil {
		return nil, err
	}
	if e.dyn, err = dynamic.NewForConfig(cfg); err != nil {
		return nil, err
	}
	e.artifacts = os.Getenv("E2E_ARTIFACTS")
	if e.artifacts == "" {
		e.artifacts = filepath.Join(repo, "target", "e2e")
	}
	return e, os.MkdirAll(e.artifacts, 0o755)
}

// readEnvFile reads KEY=VALUE lines (comments and blank lines skipped).
func readEnvFile(path string) (map[string]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	vars := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if k, v, ok := strings.Cut(line, "="); ok {
			vars[k] = v
		}
	}
	return vars, sc.Err()
}

// command runs a program with the cluster's kubeconfig and kubectl on PATH.
func (e *env) command(ctx context.Context, stdin string, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(),
		"KUBECONFIG="+e.kubeconfig,
		"PATH="+e.kubeBin+string(os.PathListSeparator)+os.Getenv("PATH"),
	)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// output runs a command and returns its combined output; the error quotes it.
func (e *env) output(ctx context.Context, stdin, name string, args ...string) (string, error) {
	var buf bytes.Buffer
	cmd := e.command(ctx, stdin, name, args...)
	cmd.Stdout, cmd.Stderr = &buf, &buf
	err := cmd.Run()
	if err != nil {
		return buf.String(), fmt.Errorf("%s %s: %w\n%s", filepath.Base(name), strings.Join(args, " "), err, buf.String())
	}
	return buf.String(), nil
}

func (e *env) kubectl(ctx context.Context, args ...string) (string, error) {
	return e.output(ctx, "", filepath.Join(e.kubeBin, "kubectl"), args...)
}

// kafka is how a test reaches the broker: the worker's variables.
type kafka map[string]string

func (e *env) plaintext() kafka {
	return kafka{"KAFKA_BOOTSTRAP_SERVERS": e.bootstrap, "KAFKA_SECURITY_PROTOCOL": "PLAINTEXT"}
}

func (e *env) scramKafka() kafka {
	k := kafka{}
	for key, v := range e.scram {
		k[key] = v
	}
	return k
}

// microbatch runs the binary with these Kafka settings in its environment
// (never on its command line: the password stays out of `ps`).
func (e *env) microbatchCmd(ctx context.Context, k kafka, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, e.microbatch, args...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.TempDir()}
	for key, v := range k {
		cmd.Env = append(cmd.Env, key+"="+v)
	}
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

func (e *env) runMicrobatch(ctx context.Context, k kafka, args ...string) (string, error) {
	var out, errOut bytes.Buffer
	cmd := e.microbatchCmd(ctx, k, args...)
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("microbatch %s: %w\n%s", strings.Join(args, " "), err, errOut.String())
	}
	return out.String(), nil
}

// lagJSON is `microbatch lag --json` with a policy.
type lagJSON struct {
	TotalLag int64 `json:"total_lag"`
	Policy   *struct {
		Name            string `json:"name"`
		DesiredReplicas int32  `json:"desired_replicas"`
		MetricValue     int64  `json:"metric_value"`
		Active          bool   `json:"active"`
		Reason          string `json:"reason"`
	} `json:"policy"`
}

// shareLagJSON is `microbatch lag --share-group --json`.
type shareLagJSON struct {
	TotalBacklog int64 `json:"total_backlog"`
	Members      int   `json:"members"`
}

// shareLag reads a share group's backlog and members as Kafka reports them.
func (e *env) shareLag(ctx context.Context, k kafka, topic, group string) (shareLagJSON, error) {
	out, err := e.runMicrobatch(ctx, k, "lag", "--topic", topic, "--share-group", group, "--json")
	var l shareLagJSON
	if err != nil {
		return l, err
	}
	if err := json.Unmarshal([]byte(strings.TrimSpace(out)), &l); err != nil {
		return l, fmt.Errorf("microbatch lag --share-group --json: %w: %q", err, out)
	}
	return l, nil
}

func (e *env) lag(ctx context.Context, k kafka, topic, group string, extra ...string) (lagJSON, error) {
	args := append([]string{"lag", "--topic", topic, "--group", group, "--json"}, extra...)
	out, err := e.runMicrobatch(ctx, k, args...)
	var l lagJSON
	if err != nil {
		return l, err
	}
	if err := json.Unmarshal([]byte(strings.TrimSpace(out)), &l); err != nil {
		return l, fmt.Errorf("microbatch lag --json: %w: %q", err, out)
	}
	return l, nil
}

// eventually retries check until it returns nil or the time is up; the
// error is check's last.
func eventually(ctx context.Context, within, every time.Duration, check func() error) error {
	deadline := time.Now().Add(within)
	for {
		err := check()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("after %s: %w", within, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %v)", ctx.Err(), err)
		case <-time.After(every):
		}
	}
}
