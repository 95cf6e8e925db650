//! Admin helpers: topic lookup, creation with settings, deletion, and
//! what a principal may do with a topic (KIP-430).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};

use crate::aws_iam::WithTokens;
use crate::client::{ClientError, QuietContext};
use crate::config::KafkaConfig;

/// An admin client for `kafka`.
pub fn admin_client(
    kafka: &KafkaConfig,
) -> Result<WithTokens<AdminClient<QuietContext>>, ClientError> {
    Ok(kafka.create_client(&kafka.client_config(), QuietContext::new(kafka))?)
}

/// The ACL operations a principal may perform on a topic, as the broker
/// reports them (KIP-430): a bit per Kafka `AclOperation` code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicOperations(pub i32);

impl TopicOperations {
    /// Kafka's `AclOperation` codes that apply to topics.
    const NAMES: [(u32, &'static str); 9] = [
        (2, "ALL"),
        (3, "READ"),
        (4, "WRITE"),
        (5, "CREATE"),
        (6, "DELETE"),
        (7, "ALTER"),
        (8, "DESCRIBE"),
        (10, "DESCRIBE_CONFIGS"),
        (11, "ALTER_CONFIGS"),
    ];
    const ALL: u32 = 2;
    const WRITE: u32 = 4;

    fn has(&self, code: u32) -> bool {
        self.0 & (1 << code) != 0
    }

    /// Whether producing to the topic is allowed.
    pub fn allows_write(&self) -> bool {
        self.has(Self::WRITE) || self.has(Self::ALL)
    }

    /// The operations allowed, by name.
    pub fn names(&self) -> Vec<&'static str> {
        Self::NAMES
            .iter()
            .filter(|(code, _)| self.has(*code))
            .map(|(_, name)| *name)
            .collect()
    }
}

/// What this configuration's principal may do with `topic`, asked of the
/// broker (Metadata with its authorized operations, KIP-430); `Ok(None)`
/// when the broker does not say (no answer for the topic, a broker before
/// Kafka 2.3, librdkafka's mock). Through the project's own protocol
/// client, since librdkafka's Rust binding does not ask.
pub async fn topic_operations(
    kafka: &KafkaConfig,
    topic: &str,
    timeout: Duration,
) -> Result<Option<TopicOperations>, String> {
    let connector = crate::share::security::connector(kafka).map_err(|e| e.to_string())?;
    // Each broker gets a part of the time: a first bootstrap broker that
    // drops packets must not use all of it.
    let cluster = crate::share::cluster::Cluster::new(
        connector,
        kafka.bootstrap_list(),
        "microbatch-acl-check".into(),
        (timeout / 3).max(Duration::from_secs(1)),
    );
    tokio::time::timeout(timeout, cluster.topic_authorized_operations(topic))
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
        .map(|ops| ops.map(TopicOperations))
        .map_err(|e| e.to_string())
}

/// Kafka's default `max.message.bytes` for a topic that does not set it
/// (the broker's `message.max.bytes`, 1 MiB + 12 bytes of batch overhead).
pub const KAFKA_DEFAULT_MAX_MESSAGE_BYTES: i64 = 1_048_588;

/// What the cluster says of an existing topic, for another topic that must
/// hold its records (a dead-letter topic). `None`: not readable here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicSettings {
    /// Replicas of its first partition.
    pub replication_factor: Option<i32>,
    /// Brokers in the cluster.
    pub brokers: Option<i32>,
    /// Its `max.message.bytes`, set or inherited from the broker.
    pub max_message_bytes: Option<i64>,
    /// Its `min.insync.replicas`, set or inherited from the broker.
    pub min_insync_replicas: Option<i32>,
}

/// Reads [`TopicSettings`] of `topic`: the replication from the metadata,
/// the rest from DescribeConfigs, which a principal without
/// DESCRIBE_CONFIGS on the topic may not read (those fields stay `None`).
pub async fn topic_settings(
    kafka: &KafkaConfig,
    topic: &str,
    timeout: Duration,
) -> Result<TopicSettings, ClientError> {
    let admin = std::sync::Arc::new(admin_client(kafka)?);
    let mut settings = TopicSettings::default();
    let (client, name) = (admin.clone(), topic.to_string());
    let metadata =
        tokio::task::spawn_blocking(move || client.inner().fetch_metadata(Some(&name), timeout))
            .await
            .map_err(|e| ClientError::Unreachable {
                servers: kafka.bootstrap_servers.clone(),
                reason: e.to_string(),
            })?
            .map_err(|e| ClientError::classify(e, &kafka.bootstrap_servers))?;
    settings.brokers = Some(metadata.brokers().len() as i32);
    settings.replication_factor = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .and_then(|t| t.partitions().first())
        .map(|p| p.replicas().len() as i32);
    let opts = AdminOptions::new().request_timeout(Some(timeout));
    let described = admin
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &opts)
        .await
        .map_err(|e| e.to_string())
        .and_then(|results| match results.into_iter().next() {
            Some(Ok(resource)) => Ok(resource),
            Some(Err(code)) => Err(code.to_string()),
            None => Err("no answer".into()),
        });
    match described {
        Ok(resource) => {
            let value = |name: &str| resource.get(name).and_then(|e| e.value.clone());
            settings.max_message_bytes = value("max.message.bytes").and_then(|v| v.parse().ok());
            settings.min_insync_replicas =
                value("min.insync.replicas").and_then(|v| v.parse().ok());
        }
        Err(reason) => tracing::warn!(
            topic,
            %reason,
            "could not read the topic's configs (DescribeConfigs; grant DESCRIBE_CONFIGS, or on MSK \
             kafka-cluster:DescribeTopicDynamicConfiguration): its max.message.bytes and \
             min.insync.replicas are taken as the broker's defaults"
        ),
    }
    Ok(settings)
}

/// Creates a topic through the admin API; an existing topic is not an error.
pub async fn create_topic(
    kafka: &KafkaConfig,
    topic: &str,
    partitions: i32,
    replication: i32,
    timeout: Duration,
) -> Result<bool, ClientError> {
    create_topic_with(kafka, topic, partitions, replication, &[], timeout).await
}

/// [`create_topic`] with topic configs (`max.message.bytes`, ...).
pub async fn create_topic_with(
    kafka: &KafkaConfig,
    topic: &str,
    partitions: i32,
    replication: i32,
    configs: &[(&'static str, String)],
    timeout: Duration,
) -> Result<bool, ClientError> {
    let admin = admin_client(kafka)?;
    let mut new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(replication));
    for (key, value) in configs {
        new_topic = new_topic.set(key, value);
    }
    let opts = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    let results = admin
        .create_topics(&[new_topic], &opts)
        .await
        .map_err(|e| ClientError::classify(e, &kafka.bootstrap_servers))?;
    match results.into_iter().next() {
        Some(Ok(_)) => Ok(true),
        Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => Ok(false),
        Some(Err((_, code))) => Err(ClientError::classify(
            KafkaError::AdminOp(code),
            &kafka.bootstrap_servers,
        )),
        None => Ok(false),
    }
}

/// Deletes a topic. `Ok(false)`: there was no such topic.
pub async fn delete_topic(
    kafka: &KafkaConfig,
    topic: &str,
    timeout: Duration,
) -> Result<bool, ClientError> {
    let admin = admin_client(kafka)?;
    let opts = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    let results = admin
        .delete_topics(&[topic], &opts)
        .await
        .map_err(|e| ClientError::classify(e, &kafka.bootstrap_servers))?;
    match results.into_iter().next() {
        Some(Ok(_)) => Ok(true),
        Some(Err((_, RDKafkaErrorCode::UnknownTopicOrPartition))) | None => Ok(false),
        Some(Err((_, code))) => Err(ClientError::classify(
            KafkaError::AdminOp(code),
            &kafka.bootstrap_servers,
        )),
    }
}

/// Deletes groups, consumer or share groups alike (DeleteGroups serves
/// both on Kafka 4.2+). Each group's answer: `Ok(true)` deleted, `Ok(false)`
/// there was none, `Err` the broker's reason (a group with members is
/// `NonEmptyGroup`).
pub async fn delete_groups(
    kafka: &KafkaConfig,
    groups: &[&str],
    timeout: Duration,
) -> Result<Vec<(String, Result<bool, RDKafkaErrorCode>)>, ClientError> {
    let admin = admin_client(kafka)?;
    let opts = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    let results = admin
        .delete_groups(groups, &opts)
        .await
        .map_err(|e| ClientError::classify(e, &kafka.bootstrap_servers))?;
    Ok(results
        .into_iter()
        .map(|r| match r {
            Ok(group) => (group, Ok(true)),
            Err((group, RDKafkaErrorCode::GroupIdNotFound)) => (group, Ok(false)),
            Err((group, code)) => (group, Err(code)),
        })
        .collect())
}

/// How long one metadata lookup of a topic may take.
pub const TOPIC_LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// What the metadata says of a topic.
pub enum TopicState {
    Exists,
    Missing,
    Denied(String),
}

/// Looks topics up in the cluster's metadata; one client for every try, so
/// an authentication failure it saw is reported, not just "no answer".
pub struct TopicLookup {
    client: std::sync::Arc<WithTokens<BaseConsumer<QuietContext>>>,
}

impl TopicLookup {
    pub fn new(kafka: &KafkaConfig) -> KafkaResult<Self> {
        let client = kafka.create_client(&kafka.client_config(), QuietContext::new(kafka))?;
        Ok(Self {
            client: std::sync::Arc::new(client),
        })
    }

    /// The topic's state and partition count; `Err` says why the metadata
    /// could not be read within [`TOPIC_LOOKUP_TIMEOUT`].
    pub async fn state(&self, topic: &str) -> Result<(TopicState, usize), String> {
        let client = self.client.clone();
        let name = topic.to_string();
        tokio::task::spawn_blocking(move || {
            let metadata = client
                .fetch_metadata(Some(&name), TOPIC_LOOKUP_TIMEOUT)
                .map_err(|e| {
                    // Errors reach the context only when the client is polled.
                    let _ = client.poll(Duration::from_millis(100));
                    match client.context().refusal() {
                        Some(refusal) => refusal.to_string(),
                        None => e.to_string(),
                    }
                })?;
            let Some(t) = metadata.topics().iter().find(|t| t.name() == name) else {
                return Ok((TopicState::Missing, 0));
            };
            let partitions = t.partitions().len();
            let state = match t.error().map(RDKafkaErrorCode::from) {
                None if partitions > 0 => TopicState::Exists,
                None
                | Some(RDKafkaErrorCode::UnknownTopicOrPartition)
                | Some(RDKafkaErrorCode::UnknownTopic) => TopicState::Missing,
                Some(RDKafkaErrorCode::TopicAuthorizationFailed) => {
                    TopicState::Denied("TOPIC_AUTHORIZATION_FAILED".into())
                }
                Some(code) => return Err(code.to_string()),
            };
            Ok((state, partitions))
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_operations_read_as_kafka_codes() {
        let ops = TopicOperations((1 << 3) | (1 << 8));
        assert!(!ops.allows_write());
        assert_eq!(ops.names(), ["READ", "DESCRIBE"]);
        assert!(TopicOperations(1 << 4).allows_write());
        assert!(TopicOperations(1 << 2).allows_write(), "ALL");
        assert!(TopicOperations(0).names().is_empty());
    }
}
