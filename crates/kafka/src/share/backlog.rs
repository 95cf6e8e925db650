//! A share group's backlog on a topic, as the broker reports it: per
//! partition the share-partition start offset (DescribeShareGroupOffsets)
//! and the high watermark (ListOffsets), and the group's members
//! (ShareGroupDescribe).
//!
//! Backlog is the broker's own lag (KIP-1226, DescribeShareGroupOffsets
//! v1, Kafka 4.2+): the records of the partition not yet finished, in
//! flight ones included. `kafka-protocol` 0.18 encodes only v0, so v1 is
//! encoded here ([`v1`]). Against a broker without v1 the backlog is the
//! high watermark minus the persisted start offset, which can overstate it:
//! the start offset the broker persists can stay behind records already
//! acknowledged (measured on 4.3.2: a partition whose 47 records were all
//! accepted still showed start offset 0, while the broker's lag was 0).
//! [`ShareBacklog::backlog_source`] says which figure a reading is.

use std::sync::Arc;
use std::time::Duration;

use kafka_protocol::messages::describe_share_group_offsets_request::{
    DescribeShareGroupOffsetsRequestGroup, DescribeShareGroupOffsetsRequestTopic,
};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::{
    BrokerId, DescribeShareGroupOffsetsRequest, DescribeShareGroupOffsetsResponse, GroupId,
    ListOffsetsRequest, ListOffsetsResponse, ShareGroupDescribeRequest, ShareGroupDescribeResponse,
    TopicName,
};
use kafka_protocol::protocol::StrBytes;
use serde::Serialize;

use super::cluster::{Cluster, Connector, Lane};
use super::ShareError;

/// The broker's lag (DescribeShareGroupOffsets v1).
pub const SOURCE_BROKER_LAG: &str = "broker_lag";
/// The fallback for brokers without v1.
pub const SOURCE_START_OFFSET: &str = "high_watermark_minus_start_offset";

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PartitionBacklog {
    pub partition: i32,
    /// The share-partition start offset; `None` before the group has state
    /// for the partition (no member has fetched from it yet).
    pub start_offset: Option<i64>,
    /// The log start offset (what `earliest` starts a new group at).
    pub low: i64,
    /// The high watermark read after the group's offsets.
    pub high: i64,
    /// The high watermark read before them: records arriving between the
    /// two reads may or may not be in the backlog, so what is done lies
    /// between `high_before - backlog` and `high - backlog`.
    #[serde(skip)]
    pub high_before: i64,
    /// The broker's lag, or `high - start_offset` (see `backlog_source`);
    /// `None` when the broker has no state for the partition yet.
    pub backlog: Option<i64>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ShareBacklog {
    pub share_group: String,
    pub topic: String,
    /// Members of the group that subscribe to the topic.
    pub members: usize,
    /// The sum over partitions whose backlog is known.
    pub total_backlog: i64,
    /// Partitions whose backlog is unknown (no state at the broker yet):
    /// `total_backlog` does not count them, so it is a floor, not zero,
    /// while this is above 0.
    pub partitions_unknown: usize,
    /// Partitions without a leader that answers (their broker down or
    /// unreachable, no replica in its place): not in `partitions` nor in
    /// `total_backlog`, which is then a floor. A scaler makes no decision
    /// on such a reading.
    pub partitions_offline: Vec<i32>,
    pub backlog_source: &'static str,
    pub partitions: Vec<PartitionBacklog>,
    /// Whether the brokers know the group (ShareGroupDescribe did not
    /// answer GroupIdNotFound): a mistyped name reads as an empty group.
    #[serde(skip)]
    pub exists: bool,
}

/// The pure part: a partition's backlog from the broker's answer (`-1`
/// meaning unknown, for the start and for the lag; no lag from a v0
/// answer) and the high watermark.
pub fn partition_backlog(
    partition: i32,
    start: i64,
    lag: Option<i64>,
    high: i64,
) -> PartitionBacklog {
    partition_backlog_between(partition, start, lag, 0, high, high)
}

/// [`partition_backlog`] with the log start offset and the high watermark
/// read before and after the group's offsets.
pub fn partition_backlog_between(
    partition: i32,
    start: i64,
    lag: Option<i64>,
    low: i64,
    high_before: i64,
    high: i64,
) -> PartitionBacklog {
    let start_offset = (start >= 0).then_some(start);
    let backlog = match lag {
        Some(lag) => (lag >= 0).then_some(lag),
        None => start_offset.map(|s| high.saturating_sub(s).max(0)),
    };
    PartitionBacklog {
        partition,
        start_offset,
        low,
        high,
        high_before: high_before.min(high),
        backlog,
    }
}

/// Reads `group`'s backlog on `topic`.
pub async fn read(
    connector: Arc<dyn Connector>,
    bootstrap: Vec<String>,
    group: &str,
    topic: &str,
    timeout: Duration,
) -> Result<ShareBacklog, ShareError> {
    let cluster = Cluster::new(connector, bootstrap, "microbatch-lag".into(), timeout);
    let meta = topic_meta(&cluster, topic).await?;
    // A partition without a leader has no high watermark to read: it is
    // left out and named, and the rest are read.
    let (mut led, mut partitions_offline) = split_offline(&cluster, &meta.leaders);

    // The high watermark before and after the group's offsets bound what
    // is done (see PartitionBacklog::high_before). A leader that does not
    // answer leaves its partitions out as if offline.
    let (lows, unanswered) = list_offsets(&cluster, &led, topic, EARLIEST).await?;
    led.retain(|p, _| !unanswered.contains(p));
    partitions_offline.extend(unanswered);
    let (highs_before, unanswered) = list_offsets(&cluster, &led, topic, LATEST).await?;
    led.retain(|p, _| !unanswered.contains(p));
    partitions_offline.extend(unanswered);
    let mut partitions: Vec<i32> = led.keys().copied().collect();
    partitions.sort_unstable();
    let coordinator = cluster.coordinator(group).await?;
    let conn = cluster.conn(&coordinator, Lane::Coordinator).await?;
    let gid = GroupId(StrBytes::from_string(group.to_string()));
    let request = DescribeShareGroupOffsetsRequest::default().with_groups(vec![
        DescribeShareGroupOffsetsRequestGroup::default()
            .with_group_id(gid.clone())
            .with_topics(Some(vec![DescribeShareGroupOffsetsRequestTopic::default()
                .with_topic_name(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partitions(partitions.clone())])),
    ]);
    // partition -> (start offset, the broker's lag when it gives one)
    let mut starts: std::collections::HashMap<i32, (i64, Option<i64>)> = Default::default();
    let source = if conn.version::<v1::Request>().is_ok() {
        let answer = conn.call(v1::Request(request)).await?;
        for g in answer.groups {
            check(g.error_code, g.error_message, topic)?;
            for p in g.partitions {
                let message = p
                    .error_message
                    .map(|m| format!("partition {}: {m}", p.partition));
                check(p.error_code, message, topic)?;
                starts.insert(p.partition, (p.start_offset, Some(p.lag)));
            }
        }
        SOURCE_BROKER_LAG
    } else {
        let offsets: DescribeShareGroupOffsetsResponse = conn.call(request).await?;
        for g in offsets.groups {
            check(g.error_code, g.error_message.map(|m| m.to_string()), topic)?;
            for t in g.topics {
                for p in t.partitions {
                    let message = p
                        .error_message
                        .map(|m| format!("partition {}: {m}", p.partition_index));
                    check(p.error_code, message, topic)?;
                    starts.insert(p.partition_index, (p.start_offset, None));
                }
            }
        }
        SOURCE_START_OFFSET
    };

    let described: ShareGroupDescribeResponse = conn
        .call(ShareGroupDescribeRequest::default().with_group_ids(vec![gid]))
        .await?;
    // Members that subscribe to this topic: a group can read other topics
    // with other Deployments. A group the broker cannot describe is an
    // error, not no members.
    let mut members = 0;
    let mut exists = false;
    for g in &described.groups {
        // No member has joined yet: none.
        let not_found = kafka_protocol::ResponseError::GroupIdNotFound.code();
        if g.error_code == not_found {
            continue;
        }
        exists = true;
        if g.error_code != 0 {
            return Err(ShareError::broker(
                "ShareGroupDescribe",
                g.error_code,
                g.error_message.as_ref().map(|m| m.to_string()),
            ));
        }
        members += g
            .members
            .iter()
            .filter(|m| {
                m.subscribed_topic_names
                    .iter()
                    .any(|t| t.0.as_str() == topic)
            })
            .count();
    }

    let (highs, unanswered) = list_offsets(&cluster, &led, topic, LATEST).await?;
    partitions.retain(|p| !unanswered.contains(p));
    partitions_offline.extend(unanswered);
    partitions_offline.sort_unstable();
    let partitions: Vec<PartitionBacklog> = partitions
        .into_iter()
        .map(|p| {
            let (start, lag) = starts.get(&p).copied().unwrap_or((-1, Some(-1)));
            let offset = |of: &std::collections::HashMap<i32, i64>, what: &str| {
                of.get(&p).copied().ok_or_else(|| {
                    ShareError::NoBroker(format!("ListOffsets gave no {what} for {topic}-{p}"))
                })
            };
            Ok(partition_backlog_between(
                p,
                start,
                lag,
                offset(&lows, "log start offset")?,
                offset(&highs_before, "high watermark")?,
                offset(&highs, "high watermark")?,
            ))
        })
        .collect::<Result<_, ShareError>>()?;
    Ok(ShareBacklog {
        share_group: group.to_string(),
        topic: topic.to_string(),
        members,
        total_backlog: partitions
            .iter()
            .filter_map(|p| p.backlog)
            .fold(0i64, i64::saturating_add),
        partitions_unknown: partitions.iter().filter(|p| p.backlog.is_none()).count(),
        partitions_offline,
        backlog_source: source,
        partitions,
        exists,
    })
}

/// `leaders` split into the partitions whose leader is in the metadata and
/// the others (offline: their broker is down and no replica took over),
/// in partition order.
fn split_offline(
    cluster: &Cluster,
    leaders: &std::collections::HashMap<i32, i32>,
) -> (std::collections::HashMap<i32, i32>, Vec<i32>) {
    let (led, offline): (
        std::collections::HashMap<i32, i32>,
        std::collections::HashMap<i32, i32>,
    ) = leaders
        .iter()
        .map(|(&p, &leader)| (p, leader))
        .partition(|&(_, leader)| cluster.knows_leader(leader));
    let mut offline: Vec<i32> = offline.into_keys().collect();
    offline.sort_unstable();
    (led, offline)
}

/// One partition of a topic: its leader and the offsets its log spans.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PartitionOffsets {
    pub partition: i32,
    /// The leader's node id; `None` while the partition has none (offline).
    pub leader: Option<i32>,
    /// The log start offset; `None` without a leader to ask.
    pub low: Option<i64>,
    /// The high watermark; `None` without a leader to ask.
    pub high: Option<i64>,
}

/// Every partition of `topic` with its leader, log start offset and high
/// watermark, in partition order, and the partitions whose offsets could
/// not be read. A partition without a leader (offline), or whose leader
/// does not answer, is listed without them rather than failing the rest.
pub async fn topic_offsets(
    connector: Arc<dyn Connector>,
    bootstrap: Vec<String>,
    topic: &str,
    timeout: Duration,
) -> Result<(Vec<PartitionOffsets>, Vec<i32>), ShareError> {
    let cluster = Cluster::new(connector, bootstrap, "microbatch-topic".into(), timeout);
    let meta = topic_meta(&cluster, topic).await?;
    let (led, mut not_read) = split_offline(&cluster, &meta.leaders);
    // A leader that does not answer leaves its partitions' offsets unknown.
    let (lows, unanswered) = list_offsets(&cluster, &led, topic, EARLIEST).await?;
    not_read.extend(unanswered);
    let (highs, unanswered) = list_offsets(&cluster, &led, topic, LATEST).await?;
    not_read.extend(unanswered);
    not_read.sort_unstable();
    not_read.dedup();
    let mut partitions: Vec<PartitionOffsets> = meta
        .leaders
        .keys()
        .map(|&partition| PartitionOffsets {
            partition,
            leader: led.get(&partition).copied(),
            low: lows.get(&partition).copied(),
            high: highs.get(&partition).copied(),
        })
        .collect();
    partitions.sort_by_key(|p| p.partition);
    Ok((partitions, not_read))
}

/// A share group's configs on the brokers (see [`Cluster::group_configs`]).
pub async fn group_configs(
    connector: Arc<dyn Connector>,
    bootstrap: Vec<String>,
    group: &str,
    timeout: Duration,
) -> Result<Vec<super::cluster::GroupConfig>, ShareError> {
    Cluster::new(connector, bootstrap, "microbatch-topic".into(), timeout)
        .group_configs(group)
        .await
}

async fn topic_meta(
    cluster: &Cluster,
    topic: &str,
) -> Result<super::cluster::TopicMeta, ShareError> {
    cluster
        .metadata(&[topic.to_string()])
        .await?
        .pop()
        .ok_or_else(|| ShareError::Config(format!("no metadata for topic {topic}")))
}

/// ListOffsets' timestamps for the log start and the high watermark.
const EARLIEST: i64 = -2;
const LATEST: i64 = -1;

/// Every partition's offset at `timestamp`, asked of its leader, and the
/// partitions whose leader did not answer: it could not be reached (killed,
/// cut off, not yet fenced by the controller) or no longer leads them.
/// Those are left out rather than failing the rest; a refusal (an ACL, a
/// failed authentication) is an error.
async fn list_offsets(
    cluster: &Cluster,
    leaders: &std::collections::HashMap<i32, i32>,
    topic: &str,
    timestamp: i64,
) -> Result<(std::collections::HashMap<i32, i64>, Vec<i32>), ShareError> {
    let mut by_leader: std::collections::BTreeMap<i32, Vec<i32>> = Default::default();
    for (&p, &leader) in leaders {
        by_leader.entry(leader).or_default().push(p);
    }
    let mut offsets = std::collections::HashMap::new();
    let mut unanswered = Vec::new();
    for (leader, parts) in by_leader {
        let Some(addr) = cluster.node(leader) else {
            unanswered.extend(parts);
            continue;
        };
        let response = match list_offsets_of(cluster, &addr, &parts, topic, timestamp).await {
            Ok(response) => response,
            Err(e) if e.is_transport() => {
                tracing::debug!(error = %e, leader, "ListOffsets: the leader did not answer");
                unanswered.extend(parts);
                continue;
            }
            Err(e) => return Err(e),
        };
        for t in response.topics {
            for p in t.partitions {
                let error = kafka_protocol::ResponseError::try_from_code(p.error_code);
                match error {
                    None => {
                        offsets.insert(p.partition_index, p.offset);
                    }
                    // Leadership moving: this leader has no answer now.
                    Some(
                        kafka_protocol::ResponseError::NotLeaderOrFollower
                        | kafka_protocol::ResponseError::LeaderNotAvailable
                        | kafka_protocol::ResponseError::FencedLeaderEpoch
                        | kafka_protocol::ResponseError::UnknownLeaderEpoch
                        | kafka_protocol::ResponseError::ReplicaNotAvailable,
                    ) => unanswered.push(p.partition_index),
                    Some(_) => {
                        return Err(ShareError::broker(
                            "ListOffsets",
                            p.error_code,
                            Some(format!("{topic}-{}", p.partition_index)),
                        ))
                    }
                }
            }
        }
    }
    unanswered.sort_unstable();
    Ok((offsets, unanswered))
}

/// One ListOffsets request to the leader at `addr`.
async fn list_offsets_of(
    cluster: &Cluster,
    addr: &str,
    parts: &[i32],
    topic: &str,
    timestamp: i64,
) -> Result<ListOffsetsResponse, ShareError> {
    let conn = cluster.conn(addr, Lane::Fetch).await?;
    let result = conn
        .call(
            ListOffsetsRequest::default()
                .with_replica_id(BrokerId(-1))
                .with_topics(vec![ListOffsetsTopic::default()
                    .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                    .with_partitions(
                        parts
                            .iter()
                            .map(|&p| {
                                ListOffsetsPartition::default()
                                    .with_partition_index(p)
                                    .with_current_leader_epoch(-1)
                                    .with_timestamp(timestamp)
                            })
                            .collect(),
                    )]),
        )
        .await;
    if result.is_err() {
        cluster.forget(&conn, Lane::Fetch).await;
    }
    result
}

fn check(code: i16, message: Option<String>, topic: &str) -> Result<(), ShareError> {
    if code == 0 {
        return Ok(());
    }
    Err(ShareError::broker(
        "DescribeShareGroupOffsets",
        code,
        Some(format!("{topic}: {}", message.unwrap_or_default())),
    ))
}

/// DescribeShareGroupOffsets v1 (KIP-1226): the request is v0's on the
/// wire; the answer adds `Lag` (int64) after each partition's leader epoch.
pub mod v1 {
    use bytes::Buf;
    use kafka_protocol::messages::DescribeShareGroupOffsetsRequest;
    use kafka_protocol::protocol::buf::{ByteBuf, ByteBufMut};
    use kafka_protocol::protocol::{Decodable, Encodable};

    super::super::hand_encoded::client_message!(Request, Response, 90, 1..=1);

    pub struct Request(pub DescribeShareGroupOffsetsRequest);

    #[derive(Debug, Default, PartialEq, Eq)]
    pub struct Response {
        pub groups: Vec<Group>,
    }

    #[derive(Debug, Default, PartialEq, Eq)]
    pub struct Group {
        pub group_id: String,
        /// Flattened over the group's topics (one topic is asked for).
        pub partitions: Vec<Partition>,
        pub error_code: i16,
        pub error_message: Option<String>,
    }

    #[derive(Debug, Default, PartialEq, Eq)]
    pub struct Partition {
        pub partition: i32,
        pub start_offset: i64,
        pub leader_epoch: i32,
        /// -1: unknown (the broker has no state for it yet).
        pub lag: i64,
        pub error_code: i16,
        pub error_message: Option<String>,
    }

    impl Encodable for Request {
        fn encode<B: ByteBufMut>(&self, buf: &mut B, _: i16) -> anyhow::Result<()> {
            self.0.encode(buf, 0)
        }
        fn compute_size(&self, _: i16) -> anyhow::Result<usize> {
            self.0.compute_size(0)
        }
    }

    fn need<B: ByteBuf>(buf: &B, n: usize) -> anyhow::Result<()> {
        anyhow::ensure!(buf.remaining() >= n, "cut short");
        Ok(())
    }
    fn varint<B: ByteBuf>(buf: &mut B) -> anyhow::Result<u32> {
        let mut value = 0u32;
        for shift in (0..35).step_by(7) {
            need(buf, 1)?;
            let b = buf.get_u8();
            value |= u32::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        anyhow::bail!("varint too long")
    }
    /// A compact length: `varint - 1`, `None` for null.
    fn length<B: ByteBuf>(buf: &mut B) -> anyhow::Result<Option<usize>> {
        Ok(varint(buf)?.checked_sub(1).map(|n| n as usize))
    }
    fn string<B: ByteBuf>(buf: &mut B) -> anyhow::Result<Option<String>> {
        let Some(n) = length(buf)? else {
            return Ok(None);
        };
        need(buf, n)?;
        let bytes = buf.copy_to_bytes(n);
        Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
    }
    fn skip_tags<B: ByteBuf>(buf: &mut B) -> anyhow::Result<()> {
        for _ in 0..varint(buf)? {
            varint(buf)?;
            let size = varint(buf)? as usize;
            need(buf, size)?;
            buf.advance(size);
        }
        Ok(())
    }
    /// An array's length, bounded by what the answer could hold, so a
    /// hostile count cannot make us allocate or loop.
    fn array<B: ByteBuf>(buf: &mut B, min_item: usize) -> anyhow::Result<usize> {
        let n = length(buf)?.unwrap_or(0);
        anyhow::ensure!(
            n.saturating_mul(min_item) <= buf.remaining(),
            "an array of {n} longer than the answer"
        );
        Ok(n)
    }

    impl Decodable for Response {
        fn decode<B: ByteBuf>(buf: &mut B, _: i16) -> anyhow::Result<Self> {
            need(buf, 4)?;
            let _throttle = buf.get_i32();
            let mut out = Response::default();
            for _ in 0..array(buf, 4)? {
                let mut group = Group {
                    group_id: string(buf)?.unwrap_or_default(),
                    ..Group::default()
                };
                for _ in 0..array(buf, 18)? {
                    let _topic = string(buf)?;
                    need(buf, 16)?;
                    buf.advance(16); // topic id
                    for _ in 0..array(buf, 28)? {
                        need(buf, 26)?;
                        let partition = buf.get_i32();
                        let start_offset = buf.get_i64();
                        let leader_epoch = buf.get_i32();
                        let lag = buf.get_i64();
                        let error_code = buf.get_i16();
                        let error_message = string(buf)?;
                        skip_tags(buf)?;
                        group.partitions.push(Partition {
                            partition,
                            start_offset,
                            leader_epoch,
                            lag,
                            error_code,
                            error_message,
                        });
                    }
                    skip_tags(buf)?;
                }
                need(buf, 2)?;
                group.error_code = buf.get_i16();
                group.error_message = string(buf)?;
                skip_tags(buf)?;
                out.groups.push(group);
            }
            skip_tags(buf)?;
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::protocol::Decodable;

    #[test]
    fn backlog_is_the_brokers_lag_or_high_minus_start() {
        assert_eq!(partition_backlog(0, 0, Some(0), 47).backlog, Some(0));
        assert_eq!(partition_backlog(0, 0, Some(-1), 47).backlog, None);
        assert_eq!(partition_backlog(0, 10, None, 25).backlog, Some(15));
        assert_eq!(partition_backlog(0, 30, None, 25).backlog, Some(0));
        let unknown = partition_backlog(3, -1, None, 25);
        assert_eq!((unknown.start_offset, unknown.backlog), (None, None));
    }

    /// A v1 answer laid out as Kafka 4.3's generated code writes it.
    #[test]
    fn decodes_a_v1_answer_and_refuses_one_cut_short() {
        let mut b: Vec<u8> = Vec::new();
        b.extend(0i32.to_be_bytes()); // throttle
        b.extend([2, 2, b'g']); // one group, "g"
        b.extend([2, 2, b't']); // one topic, "t"
        b.extend([7u8; 16]); // topic id
        b.push(2); // one partition
        b.extend(3i32.to_be_bytes());
        b.extend(10i64.to_be_bytes());
        b.extend(0i32.to_be_bytes());
        b.extend(5i64.to_be_bytes());
        b.extend(0i16.to_be_bytes());
        b.extend([0, 0]); // null message, partition tags
        b.push(0); // topic tags
        b.extend(0i16.to_be_bytes());
        b.extend([0, 0, 0]); // null message, group tags, top tags
        let got = v1::Response::decode(&mut bytes::Bytes::from(b.clone()), 1).unwrap();
        assert_eq!(got.groups[0].group_id, "g");
        let p = &got.groups[0].partitions[0];
        assert_eq!(
            (p.partition, p.start_offset, p.lag, p.error_code),
            (3, 10, 5, 0)
        );
        for cut in 0..b.len() {
            assert!(v1::Response::decode(&mut bytes::Bytes::from(b[..cut].to_vec()), 1).is_err());
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_answers_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = v1::Response::decode(&mut bytes::Bytes::from(data), 1);
        }
    }
}
