//! The brokers as the share consumer sees them: how to open a connection,
//! one open connection per broker and lane, metadata and the coordinator.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use kafka_protocol::messages::incremental_alter_configs_request::{
    AlterConfigsResource, AlterableConfig,
};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{DescribeConfigsRequest, DescribeConfigsResponse};
use kafka_protocol::messages::{
    FindCoordinatorRequest, FindCoordinatorResponse, MetadataRequest, MetadataResponse, TopicName,
};
use kafka_protocol::messages::{IncrementalAlterConfigsRequest, IncrementalAlterConfigsResponse};
use kafka_protocol::protocol::StrBytes;
use tokio::sync::Mutex;
use uuid::Uuid;

use super::wire::{Connection, Stream};
use super::ShareError;

/// Opens the byte stream to a broker (TCP, or TLS around it) and, once the
/// connection speaks Kafka, authenticates it.
#[async_trait]
pub trait Connector: Send + Sync + 'static {
    async fn connect(&self, addr: &str) -> Result<Box<dyn Stream>, ShareError>;
    /// SASL, run over the open connection before any other request, and
    /// again before the session it returns runs out (KIP-368).
    async fn authenticate(&self, _conn: &Connection) -> Result<Option<Duration>, ShareError> {
        Ok(None)
    }
}

/// PLAINTEXT: TCP, no authentication.
pub struct PlainTcp;

impl PlainTcp {
    pub async fn connect_tcp(&self, addr: &str) -> Result<tokio::net::TcpStream, ShareError> {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| ShareError::io(addr, e))?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

#[async_trait]
impl Connector for PlainTcp {
    async fn connect(&self, addr: &str) -> Result<Box<dyn Stream>, ShareError> {
        Ok(Box::new(self.connect_tcp(addr).await?))
    }
}

/// When to authenticate again: at 80% of the session, as Kafka's clients
/// do, so that a slow answer still lands inside it.
fn reauth_at(lifetime: Duration) -> std::time::Instant {
    std::time::Instant::now() + lifetime.mul_f64(0.8)
}

/// Connections are kept apart by what they carry: the coordinator's
/// heartbeats must not queue behind a long-polling fetch (a broker answers
/// one request per connection at a time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    Coordinator,
    Fetch,
}

/// A partition's leader as metadata last said.
#[derive(Debug, Clone)]
pub struct TopicMeta {
    pub name: Arc<str>,
    pub id: Uuid,
    /// partition -> leader node id (-1: none right now).
    pub leaders: HashMap<i32, i32>,
}

/// ConfigResource.Type.GROUP.
const GROUP_RESOURCE: i8 = 32;
/// DescribeConfigs' ConfigSource.GROUP_CONFIG: set for the group itself.
const GROUP_CONFIG_SOURCE: i8 = 8;

/// One of a group's configs (see [`Cluster::group_configs`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupConfig {
    pub name: String,
    pub value: Option<String>,
    /// Set for this group; otherwise the brokers' default.
    pub set_for_group: bool,
}

pub struct Cluster {
    connector: Arc<dyn Connector>,
    bootstrap: Vec<String>,
    client_id: String,
    request_timeout: Duration,
    conns: Mutex<HashMap<(String, Lane), Arc<Connection>>>,
    nodes: std::sync::Mutex<HashMap<i32, String>>,
}

impl Cluster {
    pub fn new(
        connector: Arc<dyn Connector>,
        bootstrap: Vec<String>,
        client_id: String,
        request_timeout: Duration,
    ) -> Self {
        Self {
            connector,
            bootstrap,
            client_id,
            request_timeout,
            conns: Mutex::default(),
            nodes: std::sync::Mutex::default(),
        }
    }

    /// An open connection to `addr` on `lane`, reused while it lives.
    pub async fn conn(&self, addr: &str, lane: Lane) -> Result<Arc<Connection>, ShareError> {
        let key = (addr.to_string(), lane);
        let open = self
            .conns
            .lock()
            .await
            .get(&key)
            .filter(|c| c.is_open())
            .cloned();
        if let Some(c) = open {
            if c.reauth_due() {
                // One task authenticates again; the others find it done.
                let _turn = c.reauth_turn().await;
                if c.reauth_due() {
                    match self.connector.authenticate(&c).await {
                        Ok(lifetime) => c.set_reauth(lifetime.map(reauth_at)),
                        Err(e) => {
                            self.forget(&c, lane).await;
                            return Err(e);
                        }
                    }
                }
            }
            return Ok(c);
        }
        let stream = tokio::time::timeout(self.request_timeout, self.connector.connect(addr))
            .await
            .map_err(|_| ShareError::Io {
                broker: addr.to_string(),
                reason: format!("no connection within {:?}", self.request_timeout),
            })??;
        let conn = Connection::open(
            addr.to_string(),
            stream,
            &self.client_id,
            self.request_timeout,
        )
        .await?;
        let lifetime = self.connector.authenticate(&conn).await?;
        conn.set_reauth(lifetime.map(reauth_at));
        let conn = Arc::new(conn);
        self.conns.lock().await.insert(key, conn.clone());
        Ok(conn)
    }

    /// Drops a connection that failed, so the next use opens a new one;
    /// only that one: another task may have opened its successor already.
    pub async fn forget(&self, conn: &Arc<Connection>, lane: Lane) {
        let mut conns = self.conns.lock().await;
        let key = (conn.addr().to_string(), lane);
        if conns.get(&key).is_some_and(|c| Arc::ptr_eq(c, conn)) {
            conns.remove(&key);
        }
    }

    /// Brokers a response named (a ShareFetch names the new leader's).
    pub fn learn_nodes(&self, nodes: impl Iterator<Item = (i32, String)>) {
        self.nodes.lock().expect("nodes").extend(nodes);
    }

    /// The address of a node metadata named.
    pub fn node(&self, id: i32) -> Option<String> {
        self.nodes.lock().expect("nodes").get(&id).cloned()
    }

    /// Whether `leader` (a partition's leader id, -1 for none) is a broker
    /// the metadata names: a partition led by anything else is offline.
    pub fn knows_leader(&self, leader: i32) -> bool {
        leader >= 0 && self.node(leader).is_some()
    }

    /// A connection to any broker: the known ones first, then bootstrap.
    async fn any(&self) -> Result<Arc<Connection>, ShareError> {
        let mut candidates: Vec<String> = self
            .nodes
            .lock()
            .expect("nodes")
            .values()
            .cloned()
            .collect();
        candidates.sort();
        candidates.extend(self.bootstrap.iter().cloned());
        let mut errors = Vec::new();
        for addr in candidates {
            match self.conn(&addr, Lane::Coordinator).await {
                Ok(c) => return Ok(c),
                Err(e) => errors.push(e.to_string()),
            }
        }
        Err(ShareError::NoBroker(errors.join("; ")))
    }

    /// Metadata for `topics`: ids and leaders; also learns the brokers.
    pub async fn metadata(&self, topics: &[String]) -> Result<Vec<TopicMeta>, ShareError> {
        let conn = self.any().await?;
        let request = MetadataRequest::default()
            .with_allow_auto_topic_creation(false)
            .with_topics(Some(
                topics
                    .iter()
                    .map(|t| {
                        MetadataRequestTopic::default()
                            .with_name(Some(TopicName(StrBytes::from_string(t.clone()))))
                    })
                    .collect(),
            ));
        let response: MetadataResponse = match conn.call(request).await {
            Ok(r) => r,
            Err(e) => {
                self.forget(&conn, Lane::Coordinator).await;
                return Err(e);
            }
        };
        // The brokers metadata names now replace those it named before: a
        // broker gone is not tried again.
        *self.nodes.lock().expect("nodes") = response
            .brokers
            .iter()
            .map(|b| (b.node_id.0, format!("{}:{}", b.host, b.port)))
            .collect();
        let mut out = Vec::new();
        for t in response.topics {
            let name = t.name.map(|n| n.0.to_string()).unwrap_or_default();
            if t.error_code != 0 {
                return Err(ShareError::broker(
                    "Metadata",
                    t.error_code,
                    Some(format!("topic {name}")),
                ));
            }
            out.push(TopicMeta {
                name: name.into(),
                id: t.topic_id,
                leaders: t
                    .partitions
                    .iter()
                    .map(|p| (p.partition_index, p.leader_id.0))
                    .collect(),
            });
        }
        Ok(out)
    }

    /// What this connection's principal may do with `topic` (KIP-430: the
    /// authorized operations Metadata returns when asked), as a bit field
    /// of ACL operation codes; `None` when the broker does not say (before
    /// Kafka 2.3) or the topic is missing.
    pub async fn topic_authorized_operations(
        &self,
        topic: &str,
    ) -> Result<Option<i32>, ShareError> {
        let conn = self.any().await?;
        let request = MetadataRequest::default()
            .with_allow_auto_topic_creation(false)
            .with_include_topic_authorized_operations(true)
            .with_topics(Some(vec![MetadataRequestTopic::default().with_name(Some(
                TopicName(StrBytes::from_string(topic.to_string())),
            ))]));
        let response: MetadataResponse = match conn.call(request).await {
            Ok(r) => r,
            Err(e) => {
                self.forget(&conn, Lane::Coordinator).await;
                return Err(e);
            }
        };
        Ok(response
            .topics
            .iter()
            .find(|t| t.error_code == 0 && t.name.as_ref().is_some_and(|n| n.0.as_str() == topic))
            .map(|t| t.topic_authorized_operations)
            // i32::MIN: not asked for, or not supported. A topic answered
            // without error is one the principal may DESCRIBE (code 8): a
            // field without that bit (a proxy that leaves it 0) says
            // nothing.
            .filter(|ops| *ops != i32::MIN && ops & (1 << 8) != 0))
    }

    /// The address of `group`'s coordinator.
    pub async fn coordinator(&self, group: &str) -> Result<String, ShareError> {
        let conn = self.any().await?;
        let key = StrBytes::from_string(group.to_string());
        let version = conn.version::<FindCoordinatorRequest>()?;
        // Version 4 and later ask for a list of keys, older ones for one.
        let request = if version >= 4 {
            FindCoordinatorRequest::default().with_coordinator_keys(vec![key])
        } else {
            FindCoordinatorRequest::default().with_key(key)
        }
        .with_key_type(0);
        let response: FindCoordinatorResponse = match conn.call_version(request, version).await {
            Ok(r) => r,
            Err(e) => {
                self.forget(&conn, Lane::Coordinator).await;
                return Err(e);
            }
        };
        // Version 4 and later answer in `coordinators`, older ones inline.
        let (code, message, host, port) = match response.coordinators.first() {
            Some(c) => (
                c.error_code,
                c.error_message.clone(),
                c.host.clone(),
                c.port,
            ),
            None => (
                response.error_code,
                response.error_message.clone(),
                response.host.clone(),
                response.port,
            ),
        };
        if code != 0 {
            return Err(ShareError::broker(
                "FindCoordinator",
                code,
                message.map(|m| m.to_string()),
            ));
        }
        Ok(format!("{host}:{port}"))
    }

    /// A group's configs (`share.*` for a share group) as the brokers
    /// answer them: name, value, and whether the group sets it (otherwise
    /// the brokers' `group.share.*` default applies). Sensitive values come
    /// back as `None`.
    pub async fn group_configs(&self, group: &str) -> Result<Vec<GroupConfig>, ShareError> {
        let conn = self.any().await?;
        let request = DescribeConfigsRequest::default().with_resources(vec![
            DescribeConfigsResource::default()
                .with_resource_type(GROUP_RESOURCE)
                .with_resource_name(StrBytes::from_string(group.to_string())),
        ]);
        let response: DescribeConfigsResponse = match conn.call(request).await {
            Ok(r) => r,
            Err(e) => {
                // A connection that timed out may still look open: the
                // next call opens another, or tries the next broker.
                self.forget(&conn, Lane::Coordinator).await;
                return Err(e);
            }
        };
        let mut configs = Vec::new();
        for r in response.results {
            if r.error_code != 0 {
                return Err(ShareError::broker(
                    "DescribeConfigs",
                    r.error_code,
                    Some(format!(
                        "group {group}: {}",
                        r.error_message.as_deref().unwrap_or("")
                    )),
                ));
            }
            configs.extend(r.configs.into_iter().map(|c| GroupConfig {
                name: c.name.to_string(),
                value: c.value.map(|v| v.to_string()),
                set_for_group: c.config_source == GROUP_CONFIG_SOURCE,
            }));
        }
        configs.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(configs)
    }

    /// Sets group configs (`share.auto.offset.reset`,
    /// `share.record.lock.duration.ms`), as `kafka-configs --entity-type
    /// groups` does. The group need not exist yet.
    pub async fn set_group_configs(
        &self,
        group: &str,
        configs: &[(&str, &str)],
    ) -> Result<(), ShareError> {
        const SET: i8 = 0;
        let conn = self.any().await?;
        let request = IncrementalAlterConfigsRequest::default().with_resources(vec![
            AlterConfigsResource::default()
                .with_resource_type(GROUP_RESOURCE)
                .with_resource_name(StrBytes::from_string(group.to_string()))
                .with_configs(
                    configs
                        .iter()
                        .map(|(k, v)| {
                            AlterableConfig::default()
                                .with_name(StrBytes::from_string(k.to_string()))
                                .with_config_operation(SET)
                                .with_value(Some(StrBytes::from_string(v.to_string())))
                        })
                        .collect(),
                ),
        ]);
        let response: IncrementalAlterConfigsResponse = match conn.call(request).await {
            Ok(r) => r,
            Err(e) => {
                self.forget(&conn, Lane::Coordinator).await;
                return Err(e);
            }
        };
        for r in response.responses {
            if r.error_code != 0 {
                return Err(ShareError::broker(
                    "IncrementalAlterConfigs",
                    r.error_code,
                    r.error_message.map(|m| format!("group {group}: {m}")),
                ));
            }
        }
        Ok(())
    }
}
