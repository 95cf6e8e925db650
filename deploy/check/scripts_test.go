package check

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
)

func scriptsDir(t *testing.T) string { return filepath.Join(repoRoot(t), "deploy", "scripts") }

func scripts(t *testing.T) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(scriptsDir(t), "*.sh"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no scripts in deploy/scripts: %v", err)
	}
	return files
}

// runScript runs a script with only the given environment (plus PATH).
func runScript(t *testing.T, env []string, script string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", append([]string{filepath.Join(scriptsDir(t), script)}, args...)...)
	cmd.Env = env
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code = 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("%s: %v", script, err)
	}
	return out.String(), errb.String(), code
}

func TestScriptsPassShellcheck(t *testing.T) {
	sc, err := exec.LookPath("shellcheck")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("shellcheck is not installed, and CI=true: install it (apt-get install -y shellcheck)")
		}
		t.Skip("shellcheck is not installed (apt-get install -y shellcheck); in CI (CI=true) this fails instead")
	}
	// The e2e's control-plane scripts and the image build too (the test
	// command runs them).
	e2e, _ := filepath.Glob(filepath.Join(repoRoot(t), "deploy", "e2e", "*.sh"))
	if len(e2e) == 0 {
		t.Error("no scripts in deploy/e2e")
	}
	image, _ := filepath.Glob(filepath.Join(repoRoot(t), "deploy", "image", "*.sh"))
	if len(image) == 0 {
		t.Error("no scripts in deploy/image")
	}
	e2e = append(e2e, image...)
	for _, s := range append(scripts(t), e2e...) {
		out, err := exec.Command(sc, "--external-sources", s).CombinedOutput()
		if err != nil {
			t.Errorf("shellcheck %s:\n%s", filepath.Base(s), out)
		}
	}
}

func TestScriptsHaveStrictModeAndHelp(t *testing.T) {
	for _, s := range scripts(t) {
		src := readFile(t, s)
		name := filepath.Base(s)
		if !strings.HasPrefix(src, "#!/usr/bin/env bash\n") || !strings.Contains(src, "set -euo pipefail") {
			t.Errorf("%s: want a bash shebang and set -euo pipefail", name)
		}
		if fi, err := os.Stat(s); err != nil || fi.Mode()&0o111 == 0 {
			t.Errorf("%s is not executable", name)
		}
		out, _, code := runScript(t, []string{"PATH=" + os.Getenv("PATH")}, name, "--help")
		if code != 0 || !strings.Contains(out, "Usage:") {
			t.Errorf("%s --help: exit %d, output %q", name, code, out)
		}
	}
}

// fakeBin makes a directory with commands that record being called and fail,
// to prove that a dry run calls none of them.
func fakeBin(t *testing.T, names ...string) (dir, marker string) {
	t.Helper()
	dir = t.TempDir()
	marker = filepath.Join(dir, "called")
	for _, n := range names {
		body := fmt.Sprintf("#!/bin/sh\necho %s \"$@\" >> %q\nexit 97\n", n, marker)
		if err := os.WriteFile(filepath.Join(dir, n), []byte(body), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir, marker
}

// Fixed inputs for setup-msk.sh.
var mskEnv = []string{
	"AWS_REGION=eu-west-1",
	"MSK_CLUSTER_NAME=microbatch-test",
	"MSK_SUBNET_IDS=subnet-0a1b2c3d4e5f60001,subnet-0a1b2c3d4e5f60002,subnet-0a1b2c3d4e5f60003",
	"MSK_SECURITY_GROUP_ID=sg-0a1b2c3d4e5f60010",
	"MSK_CLIENT_SECURITY_GROUP_ID=sg-0a1b2c3d4e5f60020",
}

func dryRunMSK(t *testing.T, extraEnv ...string) string {
	t.Helper()
	bin, marker := fakeBin(t, "aws", "kubectl")
	env := append(append([]string{"PATH=" + bin + ":/usr/bin:/bin"}, mskEnv...), extraEnv...)
	out, errOut, code := runScript(t, env, "setup-msk.sh", "--dry-run")
	if code != 0 {
		t.Fatalf("setup-msk.sh --dry-run: exit %d\n%s", code, errOut)
	}
	if b, err := os.ReadFile(marker); err == nil {
		t.Fatalf("setup-msk.sh --dry-run ran commands:\n%s", b)
	}
	return out
}

// awsCommands returns the printed `aws ...` lines, split into words.
func awsCommands(t *testing.T, out string) [][]string {
	t.Helper()
	var cmds [][]string
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "aws ") {
			cmds = append(cmds, shellWords(t, line))
		}
	}
	return cmds
}

// shellWords splits a line printed by setup-msk.sh (plain words and
// single-quoted words with '\” escapes).
func shellWords(t *testing.T, line string) []string {
	t.Helper()
	var words []string
	var cur strings.Builder
	inWord, inQuote := false, false
	for i := 0; i < len(line); i++ {
		c := line[i]
		switch {
		case inQuote && c == '\'':
			inQuote = false
		case inQuote:
			cur.WriteByte(c)
		case c == '\'':
			inQuote, inWord = true, true
		case c == '\\' && i+1 < len(line):
			i++
			cur.WriteByte(line[i])
			inWord = true
		case c == ' ':
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteByte(c)
			inWord = true
		}
	}
	if inQuote {
		t.Fatalf("unbalanced quote in %q", line)
	}
	if inWord {
		words = append(words, cur.String())
	}
	return words
}

func findCmd(cmds [][]string, service, op string) []string {
	for _, c := range cmds {
		if slices.Contains(c, service) && slices.Contains(c, op) {
			return c
		}
	}
	return nil
}

func flagValue(cmd []string, flag string) (string, bool) {
	for i, w := range cmd {
		if w == flag && i+1 < len(cmd) {
			return cmd[i+1], true
		}
		if v, ok := strings.CutPrefix(w, flag+"="); ok {
			return v, true
		}
	}
	return "", false
}

// printedFile returns the content of a file that a dry run prints as
// "# <tmpdir>/NAME:" followed by "#   " lines.
func printedFile(t *testing.T, out, name string) string {
	t.Helper()
	var b strings.Builder
	in := false
	for _, line := range strings.Split(out, "\n") {
		switch {
		case line == "# <tmpdir>/"+name+":":
			in = true
		case in && strings.HasPrefix(line, "#   "):
			b.WriteString(strings.TrimPrefix(line, "#   ") + "\n")
		default:
			in = false
		}
	}
	if b.Len() == 0 {
		t.Fatalf("the dry run does not print %s", name)
	}
	return b.String()
}

func TestSetupMSKDryRun(t *testing.T) {
	out := dryRunMSK(t)
	cmds := awsCommands(t, out)
	for _, c := range cmds {
		if r, _ := flagValue(c, "--region"); r != "eu-west-1" {
			t.Errorf("command without --region eu-west-1: %v", c)
		}
	}

	kms := findCmd(cmds, "kms", "create-key")
	if kms == nil {
		t.Error("no `aws kms create-key`")
	}
	if findCmd(cmds, "kms", "enable-key-rotation") == nil {
		t.Error("no `aws kms enable-key-rotation`")
	}

	sec := findCmd(cmds, "secretsmanager", "create-secret")
	if sec == nil {
		t.Fatal("no `aws secretsmanager create-secret`")
	}
	if name, _ := flagValue(sec, "--name"); !strings.HasPrefix(name, "AmazonMSK_") {
		t.Errorf("secret name %q lacks the AmazonMSK_ prefix MSK requires", name)
	}
	if k, ok := flagValue(sec, "--kms-key-id"); !ok || k == "" {
		t.Error("create-secret without --kms-key-id (MSK rejects secrets under the default key)")
	}
	if s, _ := flagValue(sec, "--secret-string"); !strings.HasPrefix(s, "file://") {
		t.Errorf("the secret must go to the AWS CLI in a file, not on the command line: --secret-string %q", s)
	}
	var scram struct{ Username, Password string }
	if err := json.Unmarshal([]byte(printedFile(t, out, "scram-secret.json")), &scram); err != nil {
		t.Errorf("scram-secret.json: %v", err)
	}
	if scram.Username != "microbatch" || scram.Password != "<generated>" {
		t.Errorf("scram-secret.json: %+v (the password must not appear in a dry run)", scram)
	}

	cc := findCmd(cmds, "kafka", "create-cluster-v2")
	if cc == nil {
		cc = findCmd(cmds, "kafka", "create-cluster")
	}
	if cc == nil {
		t.Fatal("no `aws kafka create-cluster-v2`")
	}
	if n, _ := flagValue(cc, "--cluster-name"); n != "microbatch-test" {
		t.Errorf("--cluster-name %q", n)
	}
	var prov struct {
		BrokerNodeGroupInfo struct {
			ClientSubnets  []string
			SecurityGroups []string
		}
		NumberOfBrokerNodes  int
		ClientAuthentication struct {
			Sasl struct {
				Scram struct{ Enabled bool }
				Iam   struct{ Enabled bool }
			}
			Unauthenticated struct{ Enabled bool }
		}
		EncryptionInfo struct {
			EncryptionInTransit struct {
				ClientBroker string
				InCluster    bool
			}
		}
	}
	dec := json.NewDecoder(strings.NewReader(printedFile(t, out, "provisioned.json")))
	if err := dec.Decode(&prov); err != nil {
		t.Fatalf("provisioned.json: %v", err)
	}
	ca := prov.ClientAuthentication
	if !ca.Sasl.Scram.Enabled || ca.Unauthenticated.Enabled || ca.Sasl.Iam.Enabled {
		t.Errorf("cluster authentication %+v: want SCRAM only", ca)
	}
	if et := prov.EncryptionInfo.EncryptionInTransit; et.ClientBroker != "TLS" || !et.InCluster {
		t.Errorf("encryption in transit %+v: want TLS everywhere (SCRAM needs TLS)", et)
	}
	if len(prov.BrokerNodeGroupInfo.ClientSubnets) != 3 || prov.NumberOfBrokerNodes != 3 ||
		prov.BrokerNodeGroupInfo.SecurityGroups[0] != "sg-0a1b2c3d4e5f60010" {
		t.Errorf("brokers: %+v, %d nodes", prov.BrokerNodeGroupInfo, prov.NumberOfBrokerNodes)
	}

	assoc := findCmd(cmds, "kafka", "batch-associate-scram-secret")
	if assoc == nil {
		t.Error("no `aws kafka batch-associate-scram-secret`")
	} else if v, _ := flagValue(assoc, "--secret-arn-list"); v == "" {
		t.Error("batch-associate-scram-secret without --secret-arn-list")
	}

	sg := findCmd(cmds, "ec2", "authorize-security-group-ingress")
	if sg == nil {
		t.Fatal("no `aws ec2 authorize-security-group-ingress`")
	}
	for flag, want := range map[string]string{"--port": "9096", "--protocol": "tcp",
		"--group-id": "sg-0a1b2c3d4e5f60010", "--source-group": "sg-0a1b2c3d4e5f60020"} {
		if v, _ := flagValue(sg, flag); v != want {
			t.Errorf("authorize-security-group-ingress %s %q, want %q", flag, v, want)
		}
	}
	if findCmd(cmds, "kafka", "get-bootstrap-brokers") == nil {
		t.Error("no `aws kafka get-bootstrap-brokers`")
	}
	// Order: the key before the secret, the secret and the cluster before the association.
	idx := func(c []string) int {
		return slices.IndexFunc(cmds, func(x []string) bool { return slices.Equal(x, c) })
	}
	if !(idx(kms) < idx(sec) && idx(sec) < idx(assoc) && idx(cc) < idx(assoc)) {
		t.Error("commands out of order: kms create-key, secretsmanager create-secret, kafka create-cluster-v2, then batch-associate-scram-secret")
	}
}

// --auth iam: IAM access control on port 9098, no secret, and the two
// policies made from the msk-iam overlay's documents for this cluster.
func TestSetupMSKIAMDryRun(t *testing.T) {
	out := dryRunMSK(t, "MSK_AUTH=iam", "KAFKA_TOPIC=orders", "CONSUMER_GROUP=orders-workers")
	cmds := awsCommands(t, out)
	for _, op := range [][2]string{{"kms", "create-key"}, {"secretsmanager", "create-secret"},
		{"secretsmanager", "get-random-password"}, {"kafka", "batch-associate-scram-secret"}} {
		if findCmd(cmds, op[0], op[1]) != nil {
			t.Errorf("--auth iam runs aws %s %s", op[0], op[1])
		}
	}
	var prov struct {
		ClientAuthentication struct {
			Sasl struct {
				Scram struct{ Enabled bool }
				Iam   struct{ Enabled bool }
			}
			Unauthenticated struct{ Enabled bool }
		}
	}
	if err := json.Unmarshal([]byte(printedFile(t, out, "provisioned.json")), &prov); err != nil {
		t.Fatalf("provisioned.json: %v", err)
	}
	if ca := prov.ClientAuthentication; !ca.Sasl.Iam.Enabled || ca.Sasl.Scram.Enabled || ca.Unauthenticated.Enabled {
		t.Errorf("cluster authentication %+v: want IAM only", ca)
	}
	sg := findCmd(cmds, "ec2", "authorize-security-group-ingress")
	if v, _ := flagValue(sg, "--port"); v != "9098" {
		t.Errorf("authorize-security-group-ingress --port %q, want MSK's IAM port 9098", v)
	}
	if q, _ := flagValue(findCmd(cmds, "kafka", "get-bootstrap-brokers"), "--query"); q != "BootstrapBrokerStringSaslIam" {
		t.Errorf("get-bootstrap-brokers --query %q, want BootstrapBrokerStringSaslIam", q)
	}
	var policies []string
	for _, c := range cmds {
		if slices.Contains(c, "create-policy") {
			name, _ := flagValue(c, "--policy-name")
			policies = append(policies, name)
			doc := printedFile(t, out, name+".json")
			for _, left := range []string{"REGION", "ACCOUNT_ID", "CLUSTER_NAME", "CLUSTER_UUID", "/TOPIC", "/GROUP"} {
				if strings.Contains(doc, left) {
					t.Errorf("%s: placeholder %s left in\n%s", name, left, doc)
				}
			}
			var pd struct{ Statement []struct{ Resource string } }
			if err := json.Unmarshal([]byte(doc), &pd); err != nil {
				t.Errorf("%s: %v", name, err)
			}
			for _, st := range pd.Statement {
				if !strings.HasPrefix(st.Resource, "arn:aws:kafka:eu-west-1:<account-id>:") ||
					!strings.Contains(st.Resource, "/microbatch-test/<cluster-uuid>") {
					t.Errorf("%s: resource %q is not of cluster microbatch-test in eu-west-1", name, st.Resource)
				}
			}
			if !strings.Contains(doc, "/orders\"") || !strings.Contains(doc, "/orders-workers\"") {
				t.Errorf("%s: not for topic orders and group orders-workers:\n%s", name, doc)
			}
		}
	}
	if !slices.Equal(policies, []string{"microbatch-microbatch-test-worker", "microbatch-microbatch-test-keda"}) {
		t.Errorf("policies %v", policies)
	}
	if !strings.Contains(printedFile(t, out, "microbatch-microbatch-test-worker.json"), "/orders.dlq\"") {
		t.Errorf("the workers' policy does not cover the dead-letter topic orders.dlq")
	}
}

func TestSetupMSKRejectsBadInput(t *testing.T) {
	bin, marker := fakeBin(t, "aws")
	path := "PATH=" + bin + ":/usr/bin:/bin"
	cases := map[string][]string{
		"no subnets":           {"AWS_REGION=eu-west-1", "MSK_SECURITY_GROUP_ID=sg-0a1b2c3d4e5f60010", "MSK_CLIENT_CIDR=10.0.0.0/16"},
		"one subnet":           {"AWS_REGION=eu-west-1", "MSK_SUBNET_IDS=subnet-0a1b2c3d4e5f60001", "MSK_SECURITY_GROUP_ID=sg-0a1b2c3d4e5f60010", "MSK_CLIENT_CIDR=10.0.0.0/16"},
		"bad subnet id":        {"AWS_REGION=eu-west-1", "MSK_SUBNET_IDS=subnet-1;rm,subnet-0a1b2c3d4e5f60002", "MSK_SECURITY_GROUP_ID=sg-0a1b2c3d4e5f60010", "MSK_CLIENT_CIDR=10.0.0.0/16"},
		"world-open cidr":      {"AWS_REGION=eu-west-1", "MSK_SUBNET_IDS=subnet-0a1b2c3d4e5f60001,subnet-0a1b2c3d4e5f60002", "MSK_SECURITY_GROUP_ID=sg-0a1b2c3d4e5f60010", "MSK_CLIENT_CIDR=0.0.0.0/0"},
		"no client":            {"AWS_REGION=eu-west-1", "MSK_SUBNET_IDS=subnet-0a1b2c3d4e5f60001,subnet-0a1b2c3d4e5f60002", "MSK_SECURITY_GROUP_ID=sg-0a1b2c3d4e5f60010"},
		"no region":            {"MSK_SUBNET_IDS=subnet-0a1b2c3d4e5f60001,subnet-0a1b2c3d4e5f60002", "MSK_SECURITY_GROUP_ID=sg-0a1b2c3d4e5f60010", "MSK_CLIENT_CIDR=10.0.0.0/16"},
		"unknown auth":         {"AWS_REGION=eu-west-1", "MSK_SUBNET_IDS=subnet-0a1b2c3d4e5f60001,subnet-0a1b2c3d4e5f60002", "MSK_SECURITY_GROUP_ID=sg-0a1b2c3d4e5f60010", "MSK_CLIENT_CIDR=10.0.0.0/16", "MSK_AUTH=kerberos"},
		"brokers not multiple": {"AWS_REGION=eu-west-1", "MSK_SUBNET_IDS=subnet-0a1b2c3d4e5f60001,subnet-0a1b2c3d4e5f60002", "MSK_SECURITY_GROUP_ID=sg-0a1b2c3d4e5f60010", "MSK_CLIENT_CIDR=10.0.0.0/16", "MSK_BROKERS=3"},
	}
	for name, env := range cases {
		_, errOut, code := runScript(t, append([]string{path}, env...), "setup-msk.sh", "--dry-run")
		if code != 2 || !strings.Contains(errOut, "error:") {
			t.Errorf("%s: exit %d, stderr %q; want exit 2 with an error", name, code, errOut)
		}
	}
	if b, err := os.ReadFile(marker); err == nil {
		t.Errorf("bad input reached the AWS CLI:\n%s", b)
	}
}

// TestSetupMSKCommandsValidate runs every command of the dry run through the
// real AWS CLI against a local stand-in endpoint (127.0.0.1): the CLI
// validates all parameters against the service model before it sends, so a
// wrong option, JSON field or type fails here. The stand-in answers every
// request with an error; the test then checks what would have reached AWS.
func TestSetupMSKCommandsValidate(t *testing.T) {
	awsPath, err := exec.LookPath("aws")
	if err != nil {
		t.Skip("the AWS CLI is not installed: parameter validation not run")
	}
	files := map[string][]string{
		"scram": {"scram-secret.json", "provisioned.json"},
		"iam":   {"provisioned.json", "microbatch-microbatch-test-worker.json", "microbatch-microbatch-test-keda.json"},
	}
	for _, auth := range []string{"scram", "iam"} {
		t.Run(auth, func(t *testing.T) { validateSetupMSK(t, awsPath, auth, files[auth]) })
	}
}

func validateSetupMSK(t *testing.T, awsPath, auth string, files []string) {
	out := dryRunMSK(t, "MSK_AUTH="+auth)
	dir := t.TempDir()
	ids := strings.NewReplacer("<generated>", "Abcdefgh12345678Abcdefgh12345678",
		"<account-id>", "111122223333", "<cluster-uuid>", "abcd1234-0123-4567-89ab-cdef01234567-1")
	for _, name := range files {
		content := ids.Replace(printedFile(t, out, name))
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	placeholders := strings.NewReplacer(
		"<tmpdir>", dir,
		"<kms-key-id>", "1234abcd-12ab-34cd-56ef-1234567890ab",
		"<secret-arn>", "arn:aws:secretsmanager:eu-west-1:111122223333:secret:AmazonMSK_microbatch-test-AbCdEf",
		"<cluster-arn>", "arn:aws:kafka:eu-west-1:111122223333:cluster/microbatch-test/abcd1234-0123-4567-89ab-cdef01234567-1",
	)

	type request struct{ method, path, body string }
	var mu sync.Mutex
	var reqs []request
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		reqs = append(reqs, request{r.Method, r.URL.Path, string(b)})
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusBadRequest)
		fmt.Fprint(w, `{"__type":"ValidationException","message":"local stand-in"}`)
	}))
	defer srv.Close()

	home := t.TempDir()
	env := []string{
		"PATH=" + os.Getenv("PATH"), "HOME=" + home,
		"AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE", "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
		"AWS_CONFIG_FILE=" + filepath.Join(home, "none"), "AWS_SHARED_CREDENTIALS_FILE=" + filepath.Join(home, "none"),
		"AWS_EC2_METADATA_DISABLED=true", "AWS_MAX_ATTEMPTS=1", "AWS_RETRY_MODE=standard", "AWS_PAGER=",
	}
	cmds := awsCommands(t, out)
	type result struct {
		cmd  []string
		out  string
		code int
	}
	results := make([]result, len(cmds))
	var wg sync.WaitGroup
	sem := make(chan struct{}, 2)
	for i, c := range cmds {
		args := []string{"--endpoint-url", srv.URL, "--cli-connect-timeout", "5"}
		for _, w := range c[1:] {
			args = append(args, placeholders.Replace(w))
		}
		wg.Add(1)
		go func(i int, args []string) {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, awsPath, args...)
			cmd.Env = env
			b, err := cmd.CombinedOutput()
			code := 0
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
			}
			results[i] = result{cmds[i], string(b), code}
		}(i, args)
	}
	wg.Wait()
	for _, r := range results {
		if strings.Contains(r.out, "Parameter validation failed") || strings.Contains(r.out, "Unknown options") ||
			strings.Contains(r.out, "usage: aws") || !strings.Contains(r.out, "local stand-in") {
			t.Errorf("%s:\n%s", strings.Join(r.cmd[:4], " "), r.out)
		}
	}
	if len(reqs) != len(cmds) {
		t.Errorf("%d commands, %d requests reached the stand-in", len(cmds), len(reqs))
	}
	// What create-cluster-v2 would send.
	var sent bool
	for _, r := range reqs {
		if r.method == "POST" && r.path == "/api/v2/clusters" {
			sent = true
			var body struct {
				ClusterName string `json:"clusterName"`
				Provisioned struct {
					ClientAuthentication struct {
						Sasl struct {
							Scram struct {
								Enabled bool `json:"enabled"`
							} `json:"scram"`
						} `json:"sasl"`
						Unauthenticated struct {
							Enabled bool `json:"enabled"`
						} `json:"unauthenticated"`
					} `json:"clientAuthentication"`
				} `json:"provisioned"`
			}
			if err := json.Unmarshal([]byte(r.body), &body); err != nil {
				t.Errorf("create-cluster-v2 body: %v", err)
			}
			if body.ClusterName != "microbatch-test" || body.Provisioned.ClientAuthentication.Sasl.Scram.Enabled != (auth == "scram") ||
				body.Provisioned.ClientAuthentication.Unauthenticated.Enabled {
				t.Errorf("create-cluster-v2 would send %s", r.body)
			}
		}
		if strings.Contains(r.body, "Action=AuthorizeSecurityGroupIngress") {
			form, _ := url.ParseQuery(r.body)
			port := map[string]string{"scram": "9096", "iam": "9098"}[auth]
			if form.Get("IpPermissions.1.FromPort") != port || form.Get("IpPermissions.1.ToPort") != port {
				t.Errorf("authorize-security-group-ingress would send %s", r.body)
			}
		}
	}
	if !sent {
		t.Error("create-cluster-v2 sent nothing")
	}
}

func TestLoadJobManifest(t *testing.T) {
	f := loadFacts(t)
	secret := loadSecretTemplate(t)
	bin, marker := fakeBin(t, "kubectl")
	env := []string{"PATH=" + bin + ":/usr/bin:/bin"}
	for name, args := range map[string][]string{
		"default":            {"--print"},
		"hot partitions":     {"--print", "--count", "5000", "--rate", "0", "--partitions", "0,3", "--topic", "events"},
		"plaintext no topic": {"--print", "--no-secret", "--no-create-topic", "--replication-factor", "1"},
	} {
		out, errOut, code := runScript(t, env, "load.sh", args...)
		if code != 0 {
			t.Fatalf("load.sh %v: exit %d\n%s", args, code, errOut)
		}
		objs, err := decodeAll([]byte(out))
		if err != nil {
			t.Fatalf("load.sh %v: %v\n%s", args, err, out)
		}
		if len(objs) != 1 || objs[0].Kind != "Job" {
			t.Fatalf("load.sh %v: want one Job", args)
		}
		job := objs[0].Obj.(*batchv1.Job)
		cms := map[string]*corev1.ConfigMap{"microbatch-config": {Data: map[string]string{}}}
		checkPodSpec(t, name+": Job", &job.Spec.Template, f, cms, secret, nil)
		if job.Namespace != namespace || job.Labels[partOfLabel] != "microbatch" || job.Labels["app.kubernetes.io/component"] != "load" {
			t.Errorf("%s: Job %s/%s labels %v (cleanup.sh deletes component=load)", name, job.Namespace, job.Name, job.Labels)
		}
		if job.Spec.BackoffLimit == nil || *job.Spec.BackoffLimit != 0 {
			t.Errorf("%s: a retried produce duplicates the load: backoffLimit must be 0", name)
		}
		prod := job.Spec.Template.Spec.Containers[0]
		if prod.Args[0] != "produce" {
			t.Errorf("%s: container runs %v", name, prod.Args)
		}
		if slices.Contains(args, "--partitions") && !slices.Contains(prod.Args, "--partitions") {
			t.Errorf("%s: --partitions not passed to produce", name)
		}
		if slices.Contains(args, "--no-secret") && len(prod.Env) != 0 {
			t.Errorf("%s: credentials set with --no-secret", name)
		}
		for _, ic := range job.Spec.Template.Spec.InitContainers {
			if !slices.Equal(ic.Args[:2], []string{"topic", "create"}) {
				t.Errorf("%s: init container %s runs %v", name, ic.Name, ic.Args)
			}
		}
	}
	if b, err := os.ReadFile(marker); err == nil {
		t.Errorf("load.sh --print ran kubectl:\n%s", b)
	}
}

func TestDeployRenderWithImage(t *testing.T) {
	if _, err := exec.LookPath("kubectl"); err != nil {
		t.Skip("kubectl is not installed: deploy.sh --render not run")
	}
	const image = "111122223333.dkr.ecr.eu-west-1.amazonaws.com/microbatch:1.2.3"
	env := []string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir(), "KUBECONFIG=/dev/null"}
	for _, o := range overlays {
		out, errOut, code := runScript(t, env, "deploy.sh", "--render", "--image", image, o)
		if code != 0 {
			t.Fatalf("deploy.sh --render %s: exit %d\n%s", o, code, errOut)
		}
		objs, err := decodeAll([]byte(out))
		if err != nil {
			t.Fatalf("deploy.sh --render %s: %v", o, err)
		}
		n := 0
		for _, d := range (rendered{objs: objs}).deployments() {
			for _, c := range d.Spec.Template.Spec.Containers {
				n++
				if c.Image != image {
					t.Errorf("%s: Deployment/%s runs %q, want %q", o, d.Name, c.Image, image)
				}
			}
		}
		if n == 0 {
			t.Errorf("%s: no containers rendered", o)
		}
	}
	_, errOut, code := runScript(t, env, "deploy.sh", "--render", "--image", "bad image;rm", "msk-scram")
	if code == 0 || !strings.Contains(errOut, "--image") {
		t.Errorf("deploy.sh accepted a bad --image: exit %d %q", code, errOut)
	}
}

var placeholderSecret = regexp.MustCompile(`(?i)(password|secret)[=:]\s*[A-Za-z0-9+/]{12,}`)

func TestNoSecretsInKit(t *testing.T) {
	root := repoRoot(t)
	check := func(p string) error {
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		for _, m := range placeholderSecret.FindAllString(string(b), -1) {
			t.Errorf("%s: looks like a credential: %q", p, m)
		}
		for _, bad := range []string{"/" + "work/", "/" + "root/", "/" + "tmp/"} {
			if strings.Contains(string(b), bad) {
				t.Errorf("%s contains a local path (%s)", p, bad)
			}
		}
		return nil
	}
	err := filepath.WalkDir(filepath.Join(root, "deploy"), func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || strings.HasSuffix(p, "_test.go") || strings.HasSuffix(p, "go.sum") {
			return err
		}
		return check(p)
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"docs/deploy.md", ".dockerignore"} {
		if err := check(filepath.Join(root, p)); err != nil {
			t.Error(err)
		}
	}
}

// The guide covers every overlay and script, and says what was not run.
func TestDocsCoverTheKit(t *testing.T) {
	root := repoRoot(t)
	doc := readFile(t, filepath.Join(root, "docs", "deploy.md"))
	readme := readFile(t, filepath.Join(root, "deploy", "README.md"))
	for _, o := range overlays {
		if !strings.Contains(doc, "`"+o+"`") || !strings.Contains(readme, o) {
			t.Errorf("overlay %s is not described in docs/deploy.md and deploy/README.md", o)
		}
	}
	for _, s := range scripts(t) {
		name := filepath.Base(s)
		if !strings.Contains(doc, name) || !strings.Contains(readme, name) {
			t.Errorf("script %s is not described in docs/deploy.md and deploy/README.md", name)
		}
	}
	for _, must := range []string{"no Kubernetes cluster", "no Docker engine", "no AWS", "deploy/image/build.sh", "allowIdleConsumers"} {
		if !strings.Contains(doc, must) {
			t.Errorf("docs/deploy.md does not say %q", must)
		}
	}
}
