// Package check tests the deployment kit in deploy/: it renders every
// kustomize overlay in-process, decodes every document strictly as its
// Kubernetes type, and checks the manifests, scripts, Dockerfile and
// dashboards against what the `microbatch` binary really reads and serves,
// as parsed from the Rust sources in crates/ (so the two stay in step).
//
// Run: cd deploy/check && go test ./...
package check

import (
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// repoRoot is the repository root (deploy/check is two levels down).
func repoRoot(t testing.TB) string {
	t.Helper()
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "Cargo.toml")); err != nil {
		t.Fatalf("repository root not found from %s: %v", root, err)
	}
	return root
}

func readFile(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// binaryFacts is what the Rust sources say the binary reads and serves.
type binaryFacts struct {
	// Environment variables read through clap's `env = "..."`, with the file.
	envVars map[string]string
	// Long flags (without "--") of every command.
	longFlags map[string]bool
	// Subcommand names (clap Subcommand enum variants, kebab-cased).
	subcommands map[string]bool
	// HEALTHZ, READYZ, METRICS -> path.
	routes map[string]string
	// Exposed metric series names (with _total, _bucket, ... suffixes).
	metrics map[string]bool
	// Histogram base names (CloudWatch's agent drops histograms).
	histograms map[string]bool
	// Defaults of `microbatch run` the manifests depend on.
	defaultHTTPPort    int
	defaultDrainMillis int
	// Trigger metadata keys `microbatch scaler` reads (crates/scaling/src/scaler.rs
	// and the KEDA options in keda_trigger.rs).
	scalerKeys []string
}

var (
	factsOnce sync.Once
	facts     *binaryFacts
	factsErr  string
)

func loadFacts(t testing.TB) *binaryFacts {
	t.Helper()
	root := repoRoot(t)
	factsOnce.Do(func() {
		f, err := parseFacts(root)
		if err != "" {
			factsErr = err
			return
		}
		facts = f
	})
	if factsErr != "" {
		t.Fatal(factsErr)
	}
	return facts
}

var (
	argAttrStart = regexp.MustCompile(`#\[arg\(`)
	envAttr      = regexp.MustCompile(`\benv\s*=\s*"([A-Za-z0-9_]+)"`)
	longAttr     = regexp.MustCompile(`\blong\s*=\s*"([a-z0-9-]+)"`)
	longWord     = regexp.MustCompile(`(^|[\s,(])long\s*(,|$)`)
	fieldAfter   = regexp.MustCompile(`^(?:\s*(?:#\[[^\n]*\]|///[^\n]*|//[^\n]*))*\s*(?:pub(?:\([^)]*\))?\s+)?([a-z_][a-z0-9_]*)\s*:`)
	routeConst   = regexp.MustCompile(`pub const (HEALTHZ|READYZ|METRICS): &str = "([^"]+)";`)
	metricsField = regexp.MustCompile(`pub ([a-z_]+): (Counter|Gauge|Histogram|Family<[A-Za-z]+, (Counter|Gauge|Histogram)(?:<f64, AtomicU64>)?>)(?:<f64, AtomicU64>)?,`)
	registerCall = regexp.MustCompile(`(?s)\.register\(\s*"([a-z_]+)",\s*"[^"]*",\s*m\.([a-z_]+)\.clone\(\)`)
	prefixCall   = regexp.MustCompile(`sub_registry_with_prefix\("([a-z_]+)"\)`)
	subcmdEnum   = regexp.MustCompile(`(?s)#\[derive\([^)]*Subcommand[^)]*\)\](?:\s*(?:#\[[^\n]*\]|//[^\n]*))*\s*pub enum \w+\s*\{(.*?)\n\}`)
	variant      = regexp.MustCompile(`(?m)^\s*([A-Z][A-Za-z0-9]*)\s*(?:\(|\{|,)`)
	httpDefault  = regexp.MustCompile(`DEFAULT_HTTP_PORT:\s*u16\s*=\s*([0-9_]+);`)
	scalerKey    = regexp.MustCompile(`\b(?:get|parse|flag|number)\(\s*meta,\s*"([A-Za-z]+)"`)
	drainDefault = regexp.MustCompile(`DRAIN_TIMEOUT_MS:\s*u64\s*=\s*([0-9_]+);`)
)

func kebab(s string) string { return strings.ReplaceAll(s, "_", "-") }

func camelToKebab(s string) string {
	var b strings.Builder
	for i, r := range s {
		if r >= 'A' && r <= 'Z' {
			if i > 0 {
				b.WriteByte('-')
			}
			r += 'a' - 'A'
		}
		b.WriteRune(r)
	}
	return b.String()
}

// attrEnd returns the index just past the `)]` closing an attribute that
// starts at s[0:] = "#[arg(", skipping string literals.
func attrEnd(s string) int {
	depth := 0
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '"':
			for i++; i < len(s) && s[i] != '"'; i++ {
				if s[i] == '\\' {
					i++
				}
			}
		case '(', '[':
			depth++
		case ')', ']':
			depth--
			if depth == 0 {
				return i + 1
			}
		}
	}
	return len(s)
}

func parseFacts(root string) (*binaryFacts, string) {
	f := &binaryFacts{
		envVars:     map[string]string{},
		longFlags:   map[string]bool{},
		subcommands: map[string]bool{},
		routes:      map[string]string{},
		metrics:     map[string]bool{},
		histograms:  map[string]bool{},
	}
	err := filepath.WalkDir(filepath.Join(root, "crates"), func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == "target" || d.Name() == "tests") {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".rs") {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		src := string(b)
		rel, _ := filepath.Rel(root, path)
		if !strings.HasPrefix(filepath.ToSlash(rel), "crates/cli/src/") {
			return nil
		}
		for _, loc := range argAttrStart.FindAllStringIndex(src, -1) {
			end := loc[0] + attrEnd(src[loc[0]+1:]) + 1
			attr := src[loc[0]:end]
			if m := envAttr.FindStringSubmatch(attr); m != nil {
				f.envVars[m[1]] = rel
			}
			field := fieldAfter.FindStringSubmatch(src[end:])
			if m := longAttr.FindStringSubmatch(attr); m != nil {
				f.longFlags[m[1]] = true
			} else if longWord.MatchString(attr[len("#[arg("):len(attr)-2]) && field != nil {
				f.longFlags[kebab(field[1])] = true
			}
		}
		for _, e := range subcmdEnum.FindAllStringSubmatch(src, -1) {
			for _, v := range variant.FindAllStringSubmatch(e[1], -1) {
				f.subcommands[camelToKebab(v[1])] = true
			}
		}
		return nil
	})
	if err != nil {
		return nil, err.Error()
	}
	seen := map[string]bool{}
	scalerSources := readFileNoT(filepath.Join(root, "crates", "scaling", "src", "scaler.rs")) +
		readFileNoT(filepath.Join(root, "crates", "scaling", "src", "keda_trigger.rs"))
	for _, m := range scalerKey.FindAllStringSubmatch(scalerSources, -1) {
		if !seen[m[1]] {
			seen[m[1]] = true
			f.scalerKeys = append(f.scalerKeys, m[1])
		}
	}
	sort.Strings(f.scalerKeys)
	// clap adds these to every command.
	f.longFlags["help"] = true
	f.longFlags["version"] = true

	httpRs := filepath.Join(root, "crates", "core", "src", "http.rs")
	b, err := os.ReadFile(httpRs)
	if err != nil {
		return nil, err.Error()
	}
	for _, m := range routeConst.FindAllStringSubmatch(string(b), -1) {
		f.routes[m[1]] = m[2]
	}

	tel, err := os.ReadFile(filepath.Join(root, "crates", "core", "src", "telemetry.rs"))
	if err != nil {
		return nil, err.Error()
	}
	prefix := ""
	if m := prefixCall.FindStringSubmatch(string(tel)); m != nil {
		prefix = m[1] + "_"
	}
	kinds := map[string]string{}
	for _, m := range metricsField.FindAllStringSubmatch(string(tel), -1) {
		kind := m[2]
		if m[3] != "" {
			kind = m[3]
		}
		kinds[m[1]] = kind
	}
	for _, m := range registerCall.FindAllStringSubmatch(string(tel), -1) {
		name := prefix + m[1]
		switch kinds[m[2]] {
		case "Counter":
			f.metrics[name+"_total"] = true
		case "Histogram":
			f.histograms[name] = true
			for _, s := range []string{"_bucket", "_sum", "_count"} {
				f.metrics[name+s] = true
			}
		case "Gauge":
			f.metrics[name] = true
		default:
			return nil, "telemetry.rs: cannot tell the type of metric field " + m[2]
		}
	}

	run := readFileNoT(filepath.Join(root, "crates", "cli", "src", "cmd", "run.rs"))
	if m := httpDefault.FindStringSubmatch(run); m != nil {
		f.defaultHTTPPort, _ = strconv.Atoi(strings.ReplaceAll(m[1], "_", ""))
	}
	// The worker's defaults live in the library (crates/core/src/config.rs).
	workerDefaults := readFileNoT(filepath.Join(root, "crates", "core", "src", "config.rs"))
	if m := drainDefault.FindStringSubmatch(workerDefaults); m != nil {
		f.defaultDrainMillis, _ = strconv.Atoi(strings.ReplaceAll(m[1], "_", ""))
	}

	// If the parsers found nothing, the sources moved: fail loudly rather
	// than check the manifests against an empty list.
	switch {
	case len(f.envVars) < 10:
		return nil, "found fewer than 10 `env = \"...\"` attributes in crates/cli/src: has the CLI moved?"
	case len(f.longFlags) < 10:
		return nil, "found fewer than 10 long flags in crates/cli/src"
	case !f.subcommands["run"]:
		return nil, "no `run` subcommand found in crates/cli/src"
	case len(f.routes) != 3:
		return nil, "crates/core/src/http.rs: expected the constants HEALTHZ, READYZ and METRICS"
	case len(f.metrics) < 10:
		return nil, "crates/core/src/telemetry.rs: found fewer than 10 metrics"
	case f.defaultHTTPPort == 0 || f.defaultDrainMillis == 0:
		return nil, "cannot find the defaults of --http-port (crates/cli/src/cmd/run.rs) and --drain-timeout-ms (crates/core/src/config.rs)"
	}
	return f, ""
}

func readFileNoT(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	return string(b)
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func TestSourceFactsAreFound(t *testing.T) {
	f := loadFacts(t)
	for _, env := range []string{"KAFKA_BOOTSTRAP_SERVERS", "KAFKA_TOPIC", "CONSUMER_GROUP", "BATCH_SIZE",
		"PROCESS_TIME_SECONDS", "MICROBATCH_HTTP_PORT", "MICROBATCH_DRAIN_TIMEOUT_MS", "MICROBATCH_LOG_FORMAT"} {
		if _, ok := f.envVars[env]; !ok {
			t.Errorf("the CLI does not read %s any more (known: %v)", env, sortedKeys(f.envVars))
		}
	}
	for _, flag := range []string{"http-port", "drain-timeout-ms", "topic", "group", "count", "rate", "config"} {
		if !f.longFlags[flag] {
			t.Errorf("no --%s flag found", flag)
		}
	}
	t.Logf("%d env vars, %d flags, subcommands %v, routes %v, %d metric series, scaler keys %v",
		len(f.envVars), len(f.longFlags), sortedKeys(f.subcommands), f.routes, len(f.metrics), f.scalerKeys)
}
