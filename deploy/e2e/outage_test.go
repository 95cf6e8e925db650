package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// downstream is the workers' HTTP endpoint (their http handler POSTs each
// batch to it): it takes perRecord per record and keeps every record it
// was given, so what reached it is read from its own records. Stopped, its
// port refuses connections, as a downstream that is down does.
type downstream struct {
	t         *testing.T
	addr      string
	perRecord time.Duration

	mu      sync.Mutex
	seen    map[[2]int64]int // (partition, offset) -> times given
	batches int
	srv     *http.Server
}

func startDownstream(t *testing.T, perRecord time.Duration) *downstream {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	d := &downstream{t: t, addr: ln.Addr().String(), perRecord: perRecord, seen: map[[2]int64]int{}}
	d.serve(ln)
	t.Cleanup(d.stop)
	return d
}

func (d *downstream) url() string { return "http://" + d.addr + "/batches" }

func (d *downstream) serve(ln net.Listener) {
	srv := &http.Server{Handler: http.HandlerFunc(d.handle), ReadHeaderTimeout: 10 * time.Second}
	d.mu.Lock()
	d.srv = srv
	d.mu.Unlock()
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.t.Logf("downstream: %v", err)
		}
	}()
}

func (d *downstream) handle(w http.ResponseWriter, r *http.Request) {
	var batch struct {
		Records []struct {
			Partition int64 `json:"partition"`
			Offset    int64 `json:"offset"`
		} `json:"records"`
	}
	if err := json.NewDecoder(r.Body).Decode(&batch); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	time.Sleep(d.perRecord * time.Duration(len(batch.Records)))
	// Stopped meanwhile: the worker saw this batch fail, so it was not
	// delivered.
	if r.Context().Err() != nil {
		return
	}
	d.mu.Lock()
	for _, rec := range batch.Records {
		d.seen[[2]int64{rec.Partition, rec.Offset}]++
	}
	d.batches++
	d.mu.Unlock()
	w.WriteHeader(http.StatusNoContent)
}

// stop closes the listener and every connection: new ones are refused.
func (d *downstream) stop() {
	d.mu.Lock()
	srv := d.srv
	d.srv = nil
	d.mu.Unlock()
	if srv != nil {
		_ = srv.Close()
	}
}

// restart listens again on the same port.
func (d *downstream) restart() {
	var ln net.Listener
	var err error
	for i := 0; i < 50; i++ {
		if ln, err = net.Listen("tcp", d.addr); err == nil {
			d.serve(ln)
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	d.t.Fatalf("downstream: listening again on %s: %v", d.addr, err)
}

// records: distinct records given, and how many were given more than once.
func (d *downstream) records() (distinct, again int) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, n := range d.seen {
		if n > 1 {
			again++
		}
	}
	return len(d.seen), again
}

// The outage test's load: 100 records/s for 90 s, the downstream down
// from 20 s to 65 s into it.
const (
	outageRate     = 100
	outageLoad     = 90 * time.Second
	outageDownFrom = 20 * time.Second
	outageDownFor  = 45 * time.Second
)

// TestExternalScalerOutage: KEDA's operator scales the workers through
// `microbatch scaler` (the rate policy) under steady load while their HTTP
// downstream refuses connections for 45 s. No replica is added while it is
// down (the Deployment's replicas, and every value the scaler gave KEDA),
// the scaler names the hold, the backlog drains once the downstream is
// back, and every record produced reaches it (its own records).
func TestExternalScalerOutage(t *testing.T) {
	port, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	// 40 ms a record: a worker's 8 slots do under 200 records/s, so one
	// replica serves the load, while the backlog of the outage asks for
	// the partition cap (4): held while the downstream is down, granted
	// once it answers.
	down := startDownstream(t, 40*time.Millisecond)
	o := testOverlay{base: "external-scaler", worker: cluster.scramKafka(), minReplica: 1,
		scalerAddr: fmt.Sprintf("127.0.0.1:%d", port), handlerURL: down.url()}
	s, err := deployKit(t, o, map[string]int{"scaler/grpc": port}, 3*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	s.checkKeda()

	count := int(outageRate * outageLoad / time.Second)
	produced := make(chan error, 1)
	var loadDone atomic.Bool
	ctx, cancel := s.ctx(outageLoad + 2*time.Minute)
	defer cancel()
	var loadStart time.Time
	var downAt, upAt time.Time
	steps, err := s.watch(outageLoad+3*time.Minute, false, func() {
		loadStart = time.Now()
		go func() {
			_, err := s.e.runMicrobatch(ctx, s.admin, "produce", "--topic", s.o.topic,
				"--count", strconv.Itoa(count), "--rate", strconv.Itoa(outageRate), "--keys", "64", "--quiet")
			loadDone.Store(true)
			produced <- err
		}()
	}, func(st []sample) bool {
		elapsed := time.Since(loadStart)
		switch {
		case downAt.IsZero() && elapsed >= outageDownFrom:
			down.stop()
			downAt = time.Now()
			t.Logf("downstream down at +%.0fs", elapsed.Seconds())
		case !downAt.IsZero() && upAt.IsZero() && elapsed >= outageDownFrom+outageDownFor:
			down.restart()
			upAt = time.Now()
			t.Logf("downstream back at +%.0fs", elapsed.Seconds())
		}
		l := st[len(st)-1]
		return !upAt.IsZero() && loadDone.Load() && l.lag == 0
	})
	table := timeline(steps)
	writeArtifact(t, "timeline.md", table)
	t.Logf("timeline (t from the start of the load):\n%s", table)
	if err != nil {
		t.Fatalf("the load was not drained after the outage: %v", err)
	}
	if err := <-produced; err != nil {
		t.Fatal(err)
	}

	// The replicas while the downstream was down: never above the count
	// when it went down.
	downFrom, downTo := downAt.Sub(loadStart), upAt.Sub(loadStart)
	var atDown int32 = -1
	var most int32
	for _, st := range steps {
		if st.at >= downFrom && atDown < 0 {
			atDown = st.replicas
		}
		if st.at >= downFrom && st.at <= downTo {
			most = max(most, st.replicas)
		}
	}
	t.Logf("replicas: %d when the downstream went down, at most %d while it was", atDown, most)
	if most > atDown {
		t.Errorf("replicas rose from %d to %d while the downstream was down", atDown, most)
	}

	// What the scaler answered KEDA meanwhile: never more, and the hold
	// named as the bound once it began.
	held := 0
	var asked []string
	for _, l := range readScalerLog(s.standIn.logsOf("scaler")) {
		if l.message() != "GetMetrics" || l.Timestamp.Before(downAt) || l.Timestamp.After(upAt) {
			continue
		}
		v, ok := l.Fields["value"].(float64)
		if !ok {
			t.Fatalf("a GetMetrics line without a value: %s", l.Raw)
		}
		asked = append(asked, fmt.Sprintf("%.0f", v))
		if int32(v) > atDown {
			t.Errorf("the scaler asked KEDA for %.0f replicas while the downstream was down: %s", v, l.Raw)
		}
		if l.Fields["bound_by"] == "outage_hold" {
			held++
		}
	}
	t.Logf("the scaler's answers while the downstream was down: %v (%d bound by outage_hold)", asked, held)
	if len(asked) == 0 {
		t.Error("the scaler's log shows no GetMetrics while the downstream was down")
	}
	if held == 0 {
		t.Error("no answer while the downstream was down was bound by outage_hold")
	}

	// Nothing lost: every record produced reached the downstream (its own
	// records), once the workers drained the backlog.
	distinct, again := down.records()
	t.Logf("the downstream was given %d distinct records of %d produced (%d more than once)", distinct, count, again)
	if distinct != count {
		t.Errorf("the downstream has %d distinct records, want %d", distinct, count)
	}
	// Once it answers, the hold lets go: the backlog asks for more.
	var askedAfter float64
	for _, l := range readScalerLog(s.standIn.logsOf("scaler")) {
		if l.message() == "GetMetrics" && l.Timestamp.After(upAt) {
			v, _ := l.Fields["value"].(float64)
			askedAfter = max(askedAfter, v)
		}
	}
	if int32(askedAfter) <= atDown {
		t.Errorf("after the downstream came back the scaler asked for at most %.0f replicas: the hold did not let go", askedAfter)
	}
	var peakAfter int32
	for _, st := range steps {
		if st.at > downTo {
			peakAfter = max(peakAfter, st.replicas)
			if st.lag < outageRate {
				t.Logf("backlog under %d records %.0f s after the downstream came back, with up to %d replicas",
					outageRate, (st.at - downTo).Seconds(), peakAfter)
				break
			}
		}
	}
}
