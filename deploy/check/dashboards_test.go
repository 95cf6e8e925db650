package check

import (
	"encoding/json"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

func dashboardsDir(t *testing.T) string { return filepath.Join(repoRoot(t), "deploy", "dashboards") }

var metricName = regexp.MustCompile(`\bmicrobatch_[a-z_]+\b`)

// The series the issue asks the Grafana dashboard to show.
var wantInGrafana = []string{
	"microbatch_records_processed_total", "microbatch_batch_duration_seconds_bucket", "microbatch_partition_lag",
	"microbatch_records_held", "microbatch_slots_busy", "microbatch_paused_partitions",
	"microbatch_records_dead_lettered_total", "microbatch_commits_total", "microbatch_rebalances_total",
	"microbatch_circuit_open", "microbatch_ready", "microbatch_assigned_partitions",
	"kube_deployment_status_replicas", "keda_scaler_metrics_value",
}

func TestGrafanaDashboard(t *testing.T) {
	f := loadFacts(t)
	var dash struct {
		Title      string `json:"title"`
		UID        string `json:"uid"`
		Templating struct {
			List []struct {
				Name string `json:"name"`
			} `json:"list"`
		} `json:"templating"`
		Panels []struct {
			ID         int    `json:"id"`
			Type       string `json:"type"`
			Title      string `json:"title"`
			Datasource *struct {
				UID string `json:"uid"`
			} `json:"datasource"`
			GridPos struct{ H, W, X, Y int } `json:"gridPos"`
			Targets []struct {
				Expr  string `json:"expr"`
				RefID string `json:"refId"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal([]byte(readFile(t, filepath.Join(dashboardsDir(t), "grafana-microbatch.json"))), &dash); err != nil {
		t.Fatalf("grafana-microbatch.json: %v", err)
	}
	if dash.UID == "" || dash.Title == "" {
		t.Error("dashboard needs a title and a uid")
	}
	vars := map[string]bool{}
	for _, v := range dash.Templating.List {
		vars[v.Name] = true
	}
	var all strings.Builder
	ids := map[int]bool{}
	for _, p := range dash.Panels {
		if ids[p.ID] {
			t.Errorf("panel id %d used twice", p.ID)
		}
		ids[p.ID] = true
		if p.GridPos.W <= 0 || p.GridPos.X+p.GridPos.W > 24 {
			t.Errorf("panel %q: gridPos %+v outside the 24-column grid", p.Title, p.GridPos)
		}
		if p.Type == "row" {
			continue
		}
		if p.Datasource == nil || p.Datasource.UID != "${datasource}" {
			t.Errorf("panel %q: datasource must be the ${datasource} variable", p.Title)
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			all.WriteString(tg.Expr + "\n")
			if strings.Count(tg.Expr, "(") != strings.Count(tg.Expr, ")") || strings.Count(tg.Expr, "{") != strings.Count(tg.Expr, "}") {
				t.Errorf("panel %q: unbalanced query %q", p.Title, tg.Expr)
			}
			for _, v := range regexp.MustCompile(`\$([a-z]+)`).FindAllStringSubmatch(tg.Expr, -1) {
				if !vars[v[1]] {
					t.Errorf("panel %q: undefined variable $%s", p.Title, v[1])
				}
			}
			for _, m := range metricName.FindAllString(tg.Expr, -1) {
				if !f.metrics[m] {
					t.Errorf("panel %q queries %s, which the binary does not export (crates/core/src/telemetry.rs)", p.Title, m)
				}
			}
		}
	}
	for _, m := range wantInGrafana {
		if !strings.Contains(all.String(), m) {
			t.Errorf("no panel shows %s", m)
		}
	}
}

func TestCloudWatchDashboard(t *testing.T) {
	f := loadFacts(t)
	var dash struct {
		Widgets []struct {
			Type       string          `json:"type"`
			X          int             `json:"x"`
			Y          int             `json:"y"`
			Width      int             `json:"width"`
			Height     int             `json:"height"`
			Properties json.RawMessage `json:"properties"`
		} `json:"widgets"`
	}
	raw := readFile(t, filepath.Join(dashboardsDir(t), "cloudwatch-dashboard.json"))
	if err := json.Unmarshal([]byte(raw), &dash); err != nil {
		t.Fatalf("cloudwatch-dashboard.json: %v", err)
	}
	// The agent config: which of our metrics reach CloudWatch, with which dimensions.
	exported := cloudWatchAgentMetrics(t, f)

	// MSK metric -> its dimension names (AWS docs, "Amazon MSK metrics").
	msk := map[string][]string{
		"SumOffsetLag":        {"Cluster Name", "Consumer Group", "Topic"},
		"MaxOffsetLag":        {"Cluster Name", "Consumer Group", "Topic"},
		"EstimatedMaxTimeLag": {"Cluster Name", "Consumer Group", "Topic"},
		"CpuUser":             {"Cluster Name", "Broker ID"},
		"CpuSystem":           {"Cluster Name", "Broker ID"},
	}
	seen := map[string]bool{}
	for i, w := range dash.Widgets {
		if w.Width <= 0 || w.Height <= 0 || w.X+w.Width > 24 {
			t.Errorf("widget %d: x %d width %d height %d outside the 24-column grid", i, w.X, w.Width, w.Height)
		}
		if w.Type == "text" {
			continue
		}
		if w.Type != "metric" {
			t.Errorf("widget %d: type %q", i, w.Type)
			continue
		}
		var p struct {
			Title   string            `json:"title"`
			Region  string            `json:"region"`
			Stat    string            `json:"stat"`
			Period  int               `json:"period"`
			Metrics []json.RawMessage `json:"metrics"`
		}
		if err := json.Unmarshal(w.Properties, &p); err != nil {
			t.Fatalf("widget %d: %v", i, err)
		}
		if p.Region == "" || p.Title == "" || p.Period%60 != 0 || p.Period == 0 {
			t.Errorf("widget %d (%q): needs a title, a region and a period in whole minutes", i, p.Title)
		}
		for _, m := range p.Metrics {
			var row []any
			if err := json.Unmarshal(m, &row); err != nil {
				t.Fatalf("widget %q: %v", p.Title, err)
			}
			if len(row) == 1 { // a metric math expression
				continue
			}
			var words []string
			for _, x := range row {
				if s, ok := x.(string); ok {
					words = append(words, s)
				}
			}
			if len(words) < 2 || len(words)%2 != 0 {
				t.Errorf("widget %q: metric %v: want namespace, name and dimension pairs", p.Title, row)
				continue
			}
			ns, name := words[0], words[1]
			var dims []string
			for j := 2; j < len(words); j += 2 {
				dims = append(dims, words[j])
			}
			seen[name] = true
			switch ns {
			case "AWS/Kafka":
				want, ok := msk[name]
				if !ok {
					t.Errorf("widget %q: unexpected MSK metric %s", p.Title, name)
				} else if !slices.Equal(dims, want) {
					t.Errorf("widget %q: %s dimensions %v, MSK publishes %v", p.Title, name, dims, want)
				}
			case "ContainerInsights/Prometheus":
				if f.histograms[strings.TrimSuffix(strings.TrimSuffix(name, "_bucket"), "_count")] {
					t.Errorf("widget %q: %s is a histogram, which the CloudWatch agent drops", p.Title, name)
				}
				if !f.metrics[name] {
					t.Errorf("widget %q: %s is not exported by the binary", p.Title, name)
				}
				want, ok := exported[name]
				if !ok {
					t.Errorf("widget %q: %s is not selected in cloudwatch-agent-prometheus.yaml", p.Title, name)
				} else if !slices.Equal(dims, want) {
					t.Errorf("widget %q: %s dimensions %v, the agent sends %v", p.Title, name, dims, want)
				}
			default:
				t.Errorf("widget %q: namespace %s", p.Title, ns)
			}
		}
	}
	for _, m := range []string{"SumOffsetLag", "MaxOffsetLag", "EstimatedMaxTimeLag", "CpuUser", "CpuSystem"} {
		if !seen[m] {
			t.Errorf("the CloudWatch dashboard lacks %s", m)
		}
	}
}

// cloudWatchAgentMetrics returns metric name -> dimensions from the agent's
// metric_declaration (the selectors are anchored literal names).
func cloudWatchAgentMetrics(t *testing.T, f *binaryFacts) map[string][]string {
	t.Helper()
	objs, err := decodeAll([]byte(readFile(t, filepath.Join(dashboardsDir(t), "cloudwatch-agent-prometheus.yaml"))))
	if err != nil {
		t.Fatalf("cloudwatch-agent-prometheus.yaml: %v", err)
	}
	var agentJSON, promYAML string
	for _, o := range objs {
		cm := o.Obj.(*corev1.ConfigMap)
		if v, ok := cm.Data["cwagentconfig.json"]; ok {
			agentJSON = v
		}
		if v, ok := cm.Data["prometheus.yaml"]; ok {
			promYAML = v
		}
	}
	var cfg struct {
		Logs struct {
			MetricsCollected struct {
				Prometheus struct {
					PrometheusConfigPath string `json:"prometheus_config_path"`
					EMFProcessor         struct {
						MetricDeclaration []struct {
							SourceLabels    []string   `json:"source_labels"`
							LabelMatcher    string     `json:"label_matcher"`
							Dimensions      [][]string `json:"dimensions"`
							MetricSelectors []string   `json:"metric_selectors"`
						} `json:"metric_declaration"`
					} `json:"emf_processor"`
				} `json:"prometheus"`
			} `json:"metrics_collected"`
		} `json:"logs"`
	}
	dec := json.NewDecoder(strings.NewReader(agentJSON))
	if err := dec.Decode(&cfg); err != nil {
		t.Fatalf("cwagentconfig.json: %v", err)
	}
	var prom struct {
		ScrapeConfigs []struct {
			JobName string `json:"job_name"`
		} `json:"scrape_configs"`
	}
	if err := yaml.Unmarshal([]byte(promYAML), &prom); err != nil {
		t.Fatalf("prometheus.yaml: %v", err)
	}
	jobs := map[string]bool{}
	for _, s := range prom.ScrapeConfigs {
		jobs[s.JobName] = true
	}
	out := map[string][]string{}
	for _, d := range cfg.Logs.MetricsCollected.Prometheus.EMFProcessor.MetricDeclaration {
		job := strings.Trim(d.LabelMatcher, "^$")
		if !jobs[job] {
			t.Errorf("metric_declaration matches job %q, which prometheus.yaml does not scrape", job)
		}
		for _, sel := range d.MetricSelectors {
			name := strings.Trim(sel, "^$")
			if !f.metrics[name] {
				t.Errorf("cwagentconfig.json selects %s, which the binary does not export", name)
			}
			for base := range f.histograms {
				if strings.HasPrefix(name, base) {
					t.Errorf("cwagentconfig.json selects %s: histograms are dropped by the agent", name)
				}
			}
			out[name] = d.Dimensions[0]
		}
	}
	return out
}
