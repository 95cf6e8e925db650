package e2e

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// scalerTLS: a CA, the scaler's certificate for 127.0.0.1 and KEDA's
// client certificate, all PEM, made for one test.
type scalerTLS struct {
	caPEM, serverCert, serverKey, clientCert, clientKey []byte
}

func newScalerTLS() (*scalerTLS, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "e2e scaler CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return nil, err
	}
	leaf := func(serial int64, name string, usage x509.ExtKeyUsage, ips []net.IP) ([]byte, []byte, error) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, nil, err
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial),
			Subject:      pkix.Name{CommonName: name},
			NotBefore:    now.Add(-time.Hour),
			NotAfter:     now.Add(24 * time.Hour),
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{usage},
			IPAddresses:  ips,
			DNSNames:     []string{"localhost", "microbatch-scaler.microbatch.svc"},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			return nil, nil, err
		}
		keyDER, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return nil, nil, err
		}
		return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
			pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), nil
	}
	t := &scalerTLS{caPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})}
	if t.serverCert, t.serverKey, err = leaf(2, "microbatch-scaler", x509.ExtKeyUsageServerAuth, []net.IP{net.ParseIP("127.0.0.1")}); err != nil {
		return nil, err
	}
	if t.clientCert, t.clientKey, err = leaf(3, "keda-operator", x509.ExtKeyUsageClientAuth, nil); err != nil {
		return nil, err
	}
	return t, nil
}

// createSecrets makes the scaler's Secret (its certificate, key and the CA
// of its clients) and KEDA's (its client certificate, key and the CA of
// the scaler's certificate), as a user would with kubectl create secret.
func (t *scalerTLS) createSecrets(ctx context.Context, e *env) error {
	for name, data := range map[string]map[string][]byte{
		scalerTLSSecret: {"tls.crt": t.serverCert, "tls.key": t.serverKey, "ca.crt": t.caPEM},
		kedaTLSSecret:   {"tls.crt": t.clientCert, "tls.key": t.clientKey, "ca.crt": t.caPEM},
	} {
		sec := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: namespace}, Data: data}
		if _, err := e.cs.CoreV1().Secrets(namespace).Create(ctx, sec, metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("secret %s: %w", name, err)
		}
	}
	return nil
}

// healthOverTLS asks the scaler's gRPC health service over TLS, with
// KEDA's client certificate or without one.
func (t *scalerTLS) healthOverTLS(ctx context.Context, addr string, withClientCert bool) error {
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(t.caPEM)
	cfg := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	if withClientCert {
		pair, err := tls.X509KeyPair(t.clientCert, t.clientKey)
		if err != nil {
			return err
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err = healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	return err
}

// TestExternalScalerTwoTriggersOverTLS: one ScaledObject with two external
// triggers on two topics, KEDA's operator calling `microbatch scaler` over
// TLS with a client certificate (a TriggerAuthentication's caCert,
// tlsClientCert, tlsClientKey). Through the aggregator and KEDA, each
// trigger's metric is its own topic's: the second (the keda policy,
// lagThreshold 1000) reads exactly the records produced to its topic,
// which no worker consumes, while the workers drain the first. The scaler
// refuses callers without a client certificate, and plain text.
func TestExternalScalerTwoTriggersOverTLS(t *testing.T) {
	port, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	certs, err := newScalerTLS()
	if err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	stamp := time.Now().Format("150405")
	second := fmt.Sprintf("14-e2e-second-%s", stamp)
	o := testOverlay{base: "external-scaler", worker: cluster.scramKafka(), minReplica: 1, scalerAddr: addr,
		secondTopic: second, tls: certs}
	// The second topic and its records exist before KEDA first asks.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if _, err := cluster.runMicrobatch(ctx, o.worker, "topic", "create", "--topic", second,
		"--partitions", strconv.Itoa(partitions), "--replication-factor", "1"); err != nil {
		t.Fatal(err)
	}
	const onSecond = 300
	if _, err := cluster.runMicrobatch(ctx, o.worker, "produce", "--topic", second,
		"--count", strconv.Itoa(onSecond), "--rate", "0", "--quiet"); err != nil {
		t.Fatal(err)
	}
	s, err := deployKit(t, o, map[string]int{"scaler/grpc": port}, 3*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	s.checkKeda()

	// Both triggers' metrics through the aggregator, the adapter and the
	// operator (which reached the scaler over TLS with its certificate).
	hpaCtx, hpaCancel := s.ctx(2 * time.Minute)
	defer hpaCancel()
	hpas, err := s.e.cs.AutoscalingV2().HorizontalPodAutoscalers(namespace).List(hpaCtx, metav1.ListOptions{})
	if err != nil || len(hpas.Items) != 1 {
		t.Fatalf("one HPA expected: %v (%v)", hpas, err)
	}
	metrics := hpas.Items[0].Spec.Metrics
	if len(metrics) != 2 {
		t.Fatalf("the HPA has %d metrics, want one per trigger", len(metrics))
	}
	var secondMetric string
	for _, m := range metrics {
		if strings.Contains(m.External.Metric.Name, second) {
			secondMetric = m.External.Metric.Name
		}
	}
	if secondMetric == "" {
		t.Fatalf("no metric names the second topic %s: %v", second, metrics)
	}
	s.produce(burst)
	var values map[string]string
	if err := eventually(hpaCtx, 90*time.Second, 2*time.Second, func() error {
		values = map[string]string{}
		for _, m := range metrics {
			v, err := s.externalMetric(hpaCtx, m.External.Metric.Name)
			if err != nil {
				return err
			}
			values[m.External.Metric.Name] = v
		}
		if values[secondMetric] != strconv.Itoa(onSecond) {
			return fmt.Errorf("second trigger's metric %s, want %d: %v", values[secondMetric], onSecond, values)
		}
		return nil
	}); err != nil {
		t.Fatalf("the triggers' metrics through KEDA: %v", err)
	}
	t.Logf("external metrics through KEDA over TLS: %v", values)

	// The scaler held a state per trigger: its log has GetMetrics for both
	// metric names, each with its own lag: the first sees the burst on its
	// topic, the second only ever the 300 on its own.
	var lags map[string][]float64
	if err := eventually(hpaCtx, 60*time.Second, 2*time.Second, func() error {
		lags = map[string][]float64{}
		for _, l := range readScalerLog(s.standIn.logsOf("scaler")) {
			if l.message() == "GetMetrics" {
				name := fmt.Sprint(l.Fields["metric"])
				lag, _ := l.Fields["lag"].(float64)
				lags[name] = append(lags[name], lag)
			}
		}
		for name, seen := range lags {
			if !strings.Contains(name, second) && slices.Max(seen) > onSecond {
				return nil
			}
		}
		return fmt.Errorf("the first trigger has not read the burst on its topic: %v", lags)
	}); err != nil {
		t.Fatal(err)
	}
	if len(lags) != 2 {
		t.Fatalf("the scaler's log shows GetMetrics for %d trigger(s), want 2: %v", len(lags), lags)
	}
	for name, seen := range lags {
		if strings.Contains(name, second) {
			for _, l := range seen {
				if l != onSecond {
					t.Errorf("the second trigger read lag %v, not its topic's %d: %v", l, onSecond, seen)
				}
			}
		}
	}
	t.Logf("lag per trigger in the scaler's GetMetrics: %v", lags)

	// Only callers with a certificate its CA signed get an answer.
	if err := certs.healthOverTLS(hpaCtx, addr, true); err != nil {
		t.Errorf("with KEDA's client certificate: %v", err)
	}
	if err := certs.healthOverTLS(hpaCtx, addr, false); err == nil {
		t.Error("the scaler answered a TLS caller without a client certificate")
	}
	if err := grpcServing(hpaCtx, addr); err == nil {
		t.Error("the scaler answered plain-text gRPC")
	}
}
