//! A native Rust handler that panics fails its batch like any error: the
//! batch is retried and its partition goes on (a panic used to leave its
//! lane in flight for ever). Against the real broker named by
//! MICROBATCH_TEST_BOOTSTRAP (scripts/test.sh); with CI=true it must run.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use microbatch_core::config::{BatchLimits, WorkerConfig};
use microbatch_core::KafkaConfig;
use microbatch_core::{Batch, BatchOutcome, Handler, Telemetry, Worker};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// Panics the first time it sees offset 3; records what it finished.
#[derive(Default)]
struct PanicsOnce {
    finished: Mutex<Vec<i64>>,
    panicked: Mutex<bool>,
}

#[async_trait]
impl Handler for PanicsOnce {
    async fn handle(&self, batch: &Batch) -> BatchOutcome {
        if batch.offsets().any(|o| o == 3) {
            let mut panicked = self.panicked.lock().unwrap();
            if !*panicked {
                *panicked = true;
                drop(panicked);
                panic!("the handler fell over on offset 3");
            }
        }
        self.finished.lock().unwrap().extend(batch.offsets());
        BatchOutcome::Success
    }
}

fn bootstrap() -> Option<String> {
    match std::env::var("MICROBATCH_TEST_BOOTSTRAP") {
        Ok(b) if !b.is_empty() => Some(b),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true needs MICROBATCH_TEST_BOOTSTRAP (run scripts/test.sh)"
            );
            None
        }
    }
}

fn committed(bootstrap: &str, topic: &str, group: &str) -> Option<i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()
        .ok()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let tpl = c.committed_offsets(tpl, Duration::from_secs(5)).ok()?;
    match tpl.find_partition(topic, 0)?.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_fails_its_batch_and_the_partition_goes_on() {
    let Some(bootstrap) = bootstrap() else {
        eprintln!("skipped: no MICROBATCH_TEST_BOOTSTRAP");
        return;
    };
    let stamp = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let topic = format!("native-panic-{stamp}");
    let group = format!("native-panic-g-{stamp}");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap()
        .into_iter()
        .for_each(|r| {
            r.expect("topic created");
        });
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .unwrap();
    for i in 0..10 {
        let value = format!("v{i}");
        producer
            .send(
                FutureRecord::<(), _>::to(&topic).payload(&value),
                Duration::from_secs(10),
            )
            .await
            .expect("produced");
    }

    let mut config = WorkerConfig::new(KafkaConfig::plaintext(&bootstrap), &topic, &group);
    config.batch = BatchLimits::new(1, 1 << 20, Duration::from_millis(10)).unwrap();
    config.commit_interval = Duration::from_millis(100);
    config.retry.initial = Duration::from_millis(10);
    let handler = Arc::new(PanicsOnce::default());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let worker = Worker::new(config, handler.clone(), Arc::new(Telemetry::default()));
    let run = tokio::spawn(worker.run(async move {
        let _ = stop_rx.await;
    }));
    let deadline = Instant::now() + Duration::from_secs(60);
    let (b, t, g) = (bootstrap.clone(), topic.clone(), group.clone());
    loop {
        let (b, t, g) = (b.clone(), t.clone(), g.clone());
        let at = tokio::task::spawn_blocking(move || committed(&b, &t, &g))
            .await
            .unwrap();
        if at == Some(10) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the partition stalled at {at:?} after the panic"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = stop_tx.send(());
    run.await.unwrap().expect("the worker stops cleanly");
    assert!(*handler.panicked.lock().unwrap(), "the handler did panic");
    let mut finished = handler.finished.lock().unwrap().clone();
    finished.sort_unstable();
    finished.dedup();
    assert_eq!(
        finished,
        (0..10).collect::<Vec<_>>(),
        "every record finished, 3 on its retry"
    );
    let _ = admin.delete_topics(&[&topic], &AdminOptions::new()).await;
}
