// keda-diff runs KEDA's own kafka scaler (github.com/kedacore/keda/v2,
// pkg/scalers) against a broker, so a test can compare its answers with
// microbatch's `keda` policy on the same lag states.
//
// Usage: keda-diff key=value...   (the trigger's metadata, as in a ScaledObject)
//
// It creates the scaler once, then answers each line read on stdin with one
// JSON line on stdout: {"metric_milli":N,"active":B} for a poll (the value
// GetMetricsAndActivity gives the HPA, in thousandths), or {"error":"..."}.
// A trigger KEDA refuses prints {"error":"..."} once and exits 0, so
// rejections can be compared too. Keeping one scaler across polls is what
// excludePersistentLag needs: it remembers the offsets of the previous poll.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/go-logr/logr"
	"github.com/kedacore/keda/v2/pkg/scalers"
	"github.com/kedacore/keda/v2/pkg/scalers/scalersconfig"
	logf "sigs.k8s.io/controller-runtime/pkg/log"
)

type answer struct {
	MetricMilli *int64 `json:"metric_milli,omitempty"`
	Active      *bool  `json:"active,omitempty"`
	Error       string `json:"error,omitempty"`
}

func main() {
	logf.SetLogger(logr.Discard())
	metadata := map[string]string{}
	auth := map[string]string{}
	for _, arg := range os.Args[1:] {
		key, value, ok := strings.Cut(arg, "=")
		if !ok {
			fmt.Fprintf(os.Stderr, "keda-diff: %q is not key=value\n", arg)
			os.Exit(2)
		}
		// Credentials go where KEDA reads them: a TriggerAuthentication.
		if key == "username" || key == "password" {
			auth[key] = value
		} else {
			metadata[key] = value
		}
	}
	out := json.NewEncoder(os.Stdout)
	config := &scalersconfig.ScalerConfig{
		ScalableObjectName:      "keda-diff",
		ScalableObjectNamespace: "default",
		ScalableObjectType:      "ScaledObject",
		TriggerType:             "kafka",
		TriggerMetadata:         metadata,
		AuthParams:              auth,
		ResolvedEnv:             map[string]string{},
		GlobalHTTPTimeout:       10 * time.Second,
	}
	ctx := context.Background()
	scaler, err := scalers.NewKafkaScaler(ctx, config)
	if err != nil {
		_ = out.Encode(answer{Error: err.Error()})
		return
	}
	defer scaler.Close(ctx)
	metricName := scaler.GetMetricSpecForScaling(ctx)[0].External.Metric.Name
	lines := bufio.NewScanner(os.Stdin)
	for lines.Scan() {
		metrics, active, err := scaler.GetMetricsAndActivity(ctx, metricName)
		if err != nil {
			_ = out.Encode(answer{Error: err.Error()})
			continue
		}
		milli := metrics[0].Value.MilliValue()
		_ = out.Encode(answer{MetricMilli: &milli, Active: &active})
	}
}
