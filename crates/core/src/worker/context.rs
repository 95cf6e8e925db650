//! The consumer's context: librdkafka's callbacks (logs, errors,
//! statistics, rebalances) reach the adapter here.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::statistics::Statistics;

use crate::telemetry::{KindLabel, PartitionLabel, Telemetry};
use microbatch_kafka::LogThrottle;

use super::adapter::Adapter;

/// Consumer callbacks: rebalances reach the pipeline here; errors and
/// statistics feed readiness and metrics.
pub(super) struct WorkerContext {
    pub(super) adapter: Mutex<Option<Adapter>>,
    pub(super) telemetry: Arc<Telemetry>,
    pub(super) topic: String,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) error_throttle: LogThrottle,
    pub(super) oauth: microbatch_kafka::aws_iam::OauthHook,
}

impl WorkerContext {
    pub(super) fn with_adapter<R>(&self, f: impl FnOnce(&mut Adapter) -> R) -> Option<R> {
        let mut guard = self.adapter.lock().expect("adapter lock poisoned");
        guard.as_mut().map(f)
    }
}

impl ClientContext for WorkerContext {
    microbatch_kafka::delegate_oauth_token!(oauth);

    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        microbatch_kafka::client::forward_log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let kind = match error.rdkafka_error_code() {
            Some(RDKafkaErrorCode::Authentication) => "authentication",
            Some(RDKafkaErrorCode::AllBrokersDown) => "all_brokers_down",
            Some(RDKafkaErrorCode::BrokerTransportFailure) => "transport",
            Some(RDKafkaErrorCode::SSL) => "tls",
            _ => "other",
        };
        self.telemetry
            .metrics
            .client_errors
            .get_or_create(&KindLabel { kind })
            .inc();
        let refusal = microbatch_kafka::client::Refusal::of(&error, reason);
        match kind {
            "authentication" => self
                .telemetry
                .readiness
                .set_error(format!("{kind}: {reason}")),
            // With the fix when the brokers' certificate did not verify.
            "tls" => self.telemetry.readiness.set_error(match &refusal {
                Some(refusal) => format!("{kind}: {refusal}"),
                None => format!("{kind}: {reason}"),
            }),
            "all_brokers_down" => self
                .telemetry
                .readiness
                .set_error_unless_known(format!("{kind}: {reason}")),
            _ => {}
        }
        if let Some(suppressed) = self.error_throttle.allow(Instant::now()) {
            match refusal {
                Some(refusal) => tracing::error!(kind, suppressed, "{refusal}"),
                None => tracing::error!(kind, suppressed, "kafka client error: {reason}"),
            }
        }
    }

    fn stats(&self, stats: Statistics) {
        let brokers_up = stats
            .brokers
            .values()
            .any(|b| b.state == "UP" && b.nodeid >= 0);
        if brokers_up {
            self.telemetry.readiness.set_brokers_up(true);
            self.error_throttle.reset();
        }
        if let Some(cgrp) = &stats.cgrp {
            // A member stays joined through a rebalance (join states other
            // than `init`), so readiness does not flap while partitions move.
            self.telemetry
                .readiness
                .set_joined(cgrp.state == "up" && cgrp.join_state != "init");
        }
        if let Some(topic) = stats.topics.get(&self.topic) {
            for (p, part) in &topic.partitions {
                if *p < 0 || part.consumer_lag < 0 {
                    continue;
                }
                self.telemetry
                    .metrics
                    .partition_lag
                    .get_or_create(&PartitionLabel {
                        topic: self.topic.clone(),
                        partition: *p,
                    })
                    .set(part.consumer_lag);
            }
        }
    }
}

impl ConsumerContext for WorkerContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            // Before librdkafka starts fetching them; see `fetch`.
            Rebalance::Assign(tpl) => {
                self.with_adapter(|a| {
                    for elem in tpl.elements_for_topic(&self.topic) {
                        a.fetch.route(consumer, &self.topic, elem.partition());
                    }
                });
            }
            Rebalance::Revoke(tpl) if consumer.assignment_lost() => {
                self.telemetry
                    .metrics
                    .rebalances
                    .get_or_create(&KindLabel { kind: "lost" })
                    .inc();
                tracing::warn!(
                    partitions = tpl.count(),
                    "partitions lost (session timed out or fenced); dropping them without a commit"
                );
                self.with_adapter(|a| a.lose(tpl));
            }
            Rebalance::Revoke(tpl) => {
                self.telemetry
                    .metrics
                    .rebalances
                    .get_or_create(&KindLabel { kind: "revoke" })
                    .inc();
                tracing::info!(
                    partitions = tpl.count(),
                    "partitions revoked; finishing their in-flight batches"
                );
                let started = Instant::now();
                self.with_adapter(|a| a.revoke(consumer, tpl, &self.stop));
                self.telemetry
                    .metrics
                    .rebalance_seconds
                    .get_or_create(&KindLabel { kind: "revoke" })
                    .inc_by(started.elapsed().as_secs_f64());
            }
            Rebalance::Error(_) => {}
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                self.telemetry
                    .metrics
                    .rebalances
                    .get_or_create(&KindLabel { kind: "assign" })
                    .inc();
                let list: Vec<i32> = tpl
                    .elements_for_topic(&self.topic)
                    .iter()
                    .map(|e| e.partition())
                    .collect();
                tracing::info!(partitions = ?list, "partitions assigned");
                // An assignment proves the group is joined; statistics
                // (twice a second) keep readiness current after that.
                self.telemetry.readiness.set_joined(true);
                let started = Instant::now();
                self.with_adapter(|a| {
                    a.pipeline.handle_assign(&list);
                    a.execute(consumer);
                    // A fetch stop served since `pre_rebalance` clears a route.
                    a.check_routes(consumer);
                });
                self.telemetry
                    .metrics
                    .rebalance_seconds
                    .get_or_create(&KindLabel { kind: "assign" })
                    .inc_by(started.elapsed().as_secs_f64());
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}
