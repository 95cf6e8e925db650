//! The worker's own fetch queue against a real broker: partitions that come
//! back after a rebalance are fetched again (and one whose route was dropped
//! is routed again), headers still reach handlers
//! that read them, and `--max-records-held` bounds what is taken in.

use std::time::Duration;

use crate::harness::*;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;

const SIGTERM: i32 = 15;

fn assigned(port: u16) -> Option<f64> {
    worker_metric(port, "microbatch_assigned_partitions")
}

/// Partitions revoked from a worker and given back to it later are routed to
/// its fetch queue again (librdkafka clears the route when it stops fetching
/// a partition): records produced after they come back are all processed,
/// as the handler processes themselves recorded.
#[test]
fn partitions_given_back_after_a_rebalance_are_fetched_again() {
    let sc = Scenario::new("given-back", 4);
    let Scenario { dir, .. } = &sc;
    let (pa, pb) = (free_port(), free_port());
    let cmd = recording_handler(dir, HandlerBehaviour::default());
    let mut a = sc.exec_worker("a", pa, &cmd, &[]);
    wait_until(Duration::from_secs(60), "a owns all 4 partitions", || {
        assigned(pa) == Some(4.0)
    });
    sc.produce(2_000, &["--keys", "100"]);
    sc.wait_for_lag_zero(Duration::from_secs(120));

    let mut b = sc.exec_worker("b", pb, &cmd, &[]);
    wait_until(
        Duration::from_secs(60),
        "a and b share the partitions",
        || assigned(pa) == Some(2.0) && assigned(pb) == Some(2.0),
    );
    sc.produce(2_000, &["--keys", "100"]);
    sc.wait_for_lag_zero(Duration::from_secs(120));
    b.signal(SIGTERM);
    let status = b.wait_for_exit(Duration::from_secs(60)).expect("b exits");
    assert!(status.success(), "{}", b.stderr());
    wait_until(Duration::from_secs(60), "a owns all 4 again", || {
        assigned(pa) == Some(4.0)
    });

    sc.produce(2_000, &["--keys", "100"]);
    sc.wait_for_lag_zero(Duration::from_secs(120));
    let (_, metrics) = http_get(pa, "/metrics").expect("metrics answer");
    let assigns = labelled_metric(&metrics, "microbatch_rebalances_total{kind=\"assign\"}");
    assert!(assigns.unwrap_or(0.0) >= 2.0, "{metrics}");
    a.terminate();
    let (expected, _) = sc.assert_all_handled();
    assert_eq!(expected, 6_000);
}

/// A partition whose route librdkafka dropped (a fetch stop served after the
/// assignment routed it does that) is found and routed again: its records,
/// stranded in its own queue, reach the fetch queue, in order. Without the
/// check none would ever be read.
#[test]
fn a_partition_whose_route_was_dropped_is_found_and_routed_again() {
    use microbatch_core::fetch::{ConsumedRecord, FetchQueue};
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let sc = Scenario::new("reroute", 1);
    let topic = sc.topic.as_str();
    sc.produce(100, &[]);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker().bootstrap())
        .set("group.id", sc.group.as_str())
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut queue = FetchQueue::new(&consumer, 64);
    queue.route(&consumer, topic, 0);
    // What librdkafka's fetch stop does to the partition's queue.
    let name = std::ffi::CString::new(topic).unwrap();
    // SAFETY: a valid client and C string; the handle is released at once.
    unsafe {
        use rdkafka::bindings as rd;
        let pq = rd::rd_kafka_queue_get_partition(consumer.client().native_ptr(), name.as_ptr(), 0);
        assert!(!pq.is_null());
        rd::rd_kafka_queue_forward(pq, std::ptr::null_mut());
        rd::rd_kafka_queue_destroy(pq);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mut got = Vec::new();
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < until {
        let _ = consumer.poll(Duration::ZERO);
        queue.consume(Duration::from_millis(100), &mut got);
    }
    assert!(
        got.is_empty(),
        "records reached the fetch queue without a route"
    );
    assert!(
        queue.reroute(&consumer, topic, 0),
        "the stranded records were not found"
    );
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while got.len() < 100 && std::time::Instant::now() < until {
        let _ = consumer.poll(Duration::ZERO);
        queue.consume(Duration::from_millis(100), &mut got);
    }
    let offsets: Vec<i64> = got.iter().map(ConsumedRecord::offset).collect();
    assert_eq!(offsets, (0..100).collect::<Vec<i64>>());
    assert!(
        !queue.reroute(&consumer, topic, 0),
        "a routed partition was taken for a stranded one"
    );
    drop(got);
    drop(queue);
}

/// Record headers reach a handler that reads them (`exec`), byte for byte.
#[test]
fn headers_reach_an_exec_handler() {
    let sc = Scenario::new("headers", 2);
    let Scenario { dir, topic, .. } = &sc;
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", broker().bootstrap())
        .create()
        .expect("producer");
    for i in 0..50 {
        let (key, value, trace) = (format!("k{i}"), format!("v{i}"), format!("t-{i}"));
        let headers = OwnedHeaders::new().insert(Header {
            key: "trace",
            value: Some(&trace),
        });
        producer
            .send(
                BaseRecord::to(topic)
                    .key(&key)
                    .payload(&value)
                    .headers(headers),
            )
            .expect("enqueue");
    }
    producer.flush(Duration::from_secs(30)).expect("flush");

    let seen = dir.path("seen.jsonl");
    let cmd = python_handler(
        dir,
        "handler.py",
        format!(
            "import sys, json\nout = open({:?}, 'a')\nfor line in sys.stdin:\n    b = json.loads(line)\n    for r in b['records']:\n        out.write(json.dumps([r['value'], r['headers']]) + '\\n')\n    out.flush()\n    print(json.dumps({{'batch_id': b['batch_id'], 'failed': []}}), flush=True)\n",
            seen.display().to_string()
        ),
    );
    let port = free_port();
    let mut w = sc.exec_worker("w", port, &cmd, &[]);
    sc.wait_for_lag_zero(Duration::from_secs(120));
    w.terminate();
    let text = std::fs::read_to_string(&seen).expect("the handler wrote what it saw");
    let mut values = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let value = v[0].as_str().unwrap().to_string();
        let n = value.trim_start_matches('v');
        assert_eq!(v[1]["trace"], format!("t-{n}"), "{line}");
        values.push(value);
    }
    values.sort();
    values.dedup();
    assert_eq!(values.len(), 50, "{text}");
}

/// Past `--max-records-held` the worker stops taking records in: the number
/// held stays within the cap plus one burst (2,048) even though the
/// per-partition caps alone would allow four times the cap.
#[test]
fn the_held_cap_bounds_intake() {
    let sc = Scenario::new("held-cap", 4);
    let Scenario { dir, .. } = &sc;
    sc.produce(20_000, &["--keys", "200"]);
    let port = free_port();
    let cmd = recording_handler(
        dir,
        HandlerBehaviour {
            ms_per_record: 1,
            ..HandlerBehaviour::default()
        },
    );
    let mut w = sc.exec_worker(
        "w",
        port,
        &cmd,
        &[
            "--max-records",
            "50",
            "--max-records-per-partition",
            "2000",
            "--max-records-held",
            "2000",
        ],
    );
    let mut peak = 0.0f64;
    wait_until(Duration::from_secs(180), "lag 0", || {
        if let Some(held) = worker_metric(port, "microbatch_records_held") {
            peak = peak.max(held);
        }
        sc.total_lag() == 0
    });
    w.terminate();
    assert!(peak >= 2_000.0, "the cap was reached (peak {peak})");
    assert!(peak <= 4_048.0, "held stayed near the cap (peak {peak})");
    let (expected, _) = sc.assert_all_handled();
    assert_eq!(expected, 20_000);
}
