//! Share-group membership: ShareGroupHeartbeat with the group coordinator,
//! in a task of its own. The broker assigns partitions; the task publishes
//! the assignment, rejoins when fenced, and leaves when asked.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kafka_protocol::messages::{
    GroupId, ShareGroupHeartbeatRequest, ShareGroupHeartbeatResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;
use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use super::cluster::{Cluster, Lane};
use super::ShareError;

/// What the member knows of its place in the group.
#[derive(Debug, Clone, Default)]
pub struct MemberState {
    /// 0 until the coordinator accepts the member.
    pub epoch: i32,
    /// topic id -> partitions this member may fetch from.
    pub assignment: BTreeMap<Uuid, Vec<i32>>,
    /// Set when membership failed for good (authorization, a broker
    /// without share groups): the consumer reports it and stops.
    pub fatal: Option<ShareError>,
}

pub struct Membership {
    state: watch::Receiver<MemberState>,
    leave: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// How long to wait before asking again after a retriable error.
const RETRY_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A member that holds no partition asks again this often, for at most
/// [`UNASSIGNED_QUICK_FOR`]: the coordinator answers a join with an empty
/// assignment and computes the member's partitions apart (at most every
/// `group.share.assignment.interval.ms`, 1 s by default), so at the
/// broker's heartbeat interval (5 s by default) every new member stayed
/// idle that long.
const UNASSIGNED_WAIT: Duration = Duration::from_millis(200);

/// How long a member without partitions asks at [`UNASSIGNED_WAIT`] before
/// it keeps to the broker's interval (a member whose topic has no
/// partitions, or is gone, holds none for good).
const UNASSIGNED_QUICK_FOR: Duration = Duration::from_secs(5);

/// How long to wait before the next heartbeat: the broker's `interval`,
/// or [`UNASSIGNED_WAIT`] while the member holds no partition and has
/// held none for less than [`UNASSIGNED_QUICK_FOR`] (`since`: when it last
/// held one, or joined; set here).
fn heartbeat_wait(
    interval: Duration,
    holds_partitions: bool,
    since: &mut Option<Instant>,
    now: Instant,
) -> Duration {
    if holds_partitions {
        *since = None;
        return interval;
    }
    let since = *since.get_or_insert(now);
    if now.saturating_duration_since(since) < UNASSIGNED_QUICK_FOR {
        UNASSIGNED_WAIT.min(interval)
    } else {
        interval
    }
}

impl Membership {
    pub fn start(
        cluster: Arc<Cluster>,
        group: String,
        member_id: String,
        topics: Vec<String>,
    ) -> Self {
        let (tx, rx) = watch::channel(MemberState::default());
        let (leave_tx, leave_rx) = oneshot::channel();
        let task = tokio::spawn(run(cluster, group, member_id, topics, tx, leave_rx));
        Self {
            state: rx,
            leave: Some(leave_tx),
            task: Some(task),
        }
    }

    pub fn state(&self) -> watch::Receiver<MemberState> {
        self.state.clone()
    }

    /// Leaves the group (epoch -1) and waits for the coordinator's answer,
    /// at most `within`.
    pub async fn leave(&mut self, within: Duration) {
        if let Some(tx) = self.leave.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(within, task).await;
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

fn request(
    group: &str,
    member_id: &str,
    epoch: i32,
    topics: Option<&[String]>,
) -> ShareGroupHeartbeatRequest {
    ShareGroupHeartbeatRequest::default()
        .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
        .with_member_id(StrBytes::from_string(member_id.to_string()))
        .with_member_epoch(epoch)
        .with_subscribed_topic_names(topics.map(|t| {
            t.iter()
                .map(|n| TopicName(StrBytes::from_string(n.clone())))
                .collect()
        }))
}

async fn run(
    cluster: Arc<Cluster>,
    group: String,
    member_id: String,
    topics: Vec<String>,
    state: watch::Sender<MemberState>,
    mut leave: oneshot::Receiver<()>,
) {
    let mut coordinator: Option<String> = None;
    let mut epoch = 0;
    let mut backoff = RETRY_BACKOFF;
    let mut holds_partitions = false;
    let mut unassigned_since = None;
    loop {
        let outcome = heartbeat(
            &cluster,
            &group,
            &member_id,
            epoch,
            &topics,
            &mut coordinator,
        )
        .await;
        let wait = match outcome {
            Ok(response) => {
                tracing::trace!(
                    group,
                    epoch = response.member_epoch,
                    interval_ms = response.heartbeat_interval_ms,
                    assigned = response.assignment.is_some(),
                    "share group heartbeat answered"
                );
                backoff = RETRY_BACKOFF;
                epoch = response.member_epoch;
                let interval =
                    Duration::from_millis(response.heartbeat_interval_ms.max(100) as u64);
                if let Some(assignment) = response.assignment {
                    let mut map: BTreeMap<Uuid, Vec<i32>> = BTreeMap::new();
                    for tp in assignment.topic_partitions {
                        let mut parts = tp.partitions;
                        parts.sort_unstable();
                        map.insert(tp.topic_id, parts);
                    }
                    let partitions: usize = map.values().map(Vec::len).sum();
                    holds_partitions = partitions > 0;
                    tracing::debug!(group, epoch, partitions, "share group: assignment");
                    state.send_if_modified(|s| {
                        let changed = s.epoch != epoch || s.assignment != map;
                        s.epoch = epoch;
                        s.assignment = map;
                        changed
                    });
                } else {
                    // Only a change wakes a poll waiting for one.
                    state.send_if_modified(|s| std::mem::replace(&mut s.epoch, epoch) != epoch);
                }
                heartbeat_wait(
                    interval,
                    holds_partitions,
                    &mut unassigned_since,
                    Instant::now(),
                )
            }
            Err(HeartbeatError::Rejoin(why)) => {
                tracing::info!(group, %why, "share group: rejoining");
                // A join refused as such waits like any retry; a member
                // fenced after it joined rejoins at once.
                let wait = if epoch == 0 {
                    let wait = backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    wait
                } else {
                    Duration::ZERO
                };
                epoch = 0;
                holds_partitions = false;
                // A rejoin asks quickly again, however long it held none.
                unassigned_since = None;
                state.send_modify(|s| {
                    s.epoch = 0;
                    s.assignment.clear();
                });
                wait
            }
            Err(HeartbeatError::Retry(e)) => {
                tracing::debug!(group, error = %e, "share group heartbeat: retrying");
                coordinator = None;
                let wait = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                wait
            }
            Err(HeartbeatError::Fatal(e)) => {
                tracing::error!(group, error = %e, "share group membership failed");
                state.send_modify(|s| {
                    s.fatal = Some(e);
                    s.assignment.clear();
                });
                return;
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = &mut leave => {
                if epoch > 0 {
                    // Leaving hands this member's share back at once rather
                    // than after the session timeout.
                    let _ = heartbeat(&cluster, &group, &member_id, -1, &topics, &mut coordinator).await;
                }
                state.send_modify(|s| s.assignment.clear());
                return;
            }
        }
    }
}

enum HeartbeatError {
    Rejoin(ResponseError),
    Retry(ShareError),
    Fatal(ShareError),
}

async fn heartbeat(
    cluster: &Cluster,
    group: &str,
    member_id: &str,
    epoch: i32,
    topics: &[String],
    coordinator: &mut Option<String>,
) -> Result<ShareGroupHeartbeatResponse, HeartbeatError> {
    let addr = match coordinator {
        Some(a) => a.clone(),
        None => {
            let a = cluster.coordinator(group).await.map_err(classify)?;
            *coordinator = Some(a.clone());
            a
        }
    };
    let conn = cluster
        .conn(&addr, Lane::Coordinator)
        .await
        .map_err(HeartbeatError::Retry)?;
    // The subscription goes with every join; after that, only changes do.
    let subscription = (epoch == 0).then_some(topics);
    let response = match conn
        .call(request(group, member_id, epoch, subscription))
        .await
    {
        Ok(r) => r,
        Err(e) => {
            cluster.forget(&conn, Lane::Coordinator).await;
            return Err(classify(e));
        }
    };
    match ResponseError::try_from_code(response.error_code) {
        None => Ok(response),
        Some(ResponseError::UnknownMemberId | ResponseError::FencedMemberEpoch) if epoch >= 0 => {
            Err(HeartbeatError::Rejoin(
                ResponseError::try_from_code(response.error_code).expect("error"),
            ))
        }
        Some(_) => Err(classify(ShareError::broker(
            "ShareGroupHeartbeat",
            response.error_code,
            response.error_message.map(|m| m.to_string()),
        ))),
    }
}

fn classify(e: ShareError) -> HeartbeatError {
    if e.is_retriable() {
        HeartbeatError::Retry(e)
    } else {
        HeartbeatError::Fatal(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Without partitions a member asks again every 200 ms for 5 s, then
    /// at the broker's interval; with partitions, at the interval; the
    /// quick asks start over when it holds none again.
    #[test]
    fn a_member_without_partitions_asks_again_soon() {
        let interval = ms(5_000);
        let t0 = Instant::now();
        let mut since = None;
        assert_eq!(heartbeat_wait(interval, false, &mut since, t0), ms(200));
        assert_eq!(
            heartbeat_wait(interval, false, &mut since, t0 + ms(4_900)),
            ms(200)
        );
        assert_eq!(
            heartbeat_wait(interval, false, &mut since, t0 + ms(5_000)),
            interval,
            "no partitions for good: at the interval"
        );
        assert_eq!(
            heartbeat_wait(interval, true, &mut since, t0 + ms(6_000)),
            interval
        );
        assert_eq!(
            heartbeat_wait(interval, false, &mut since, t0 + ms(20_000)),
            ms(200),
            "partitions gone: quick again"
        );
        // Never past a short interval.
        let mut since = None;
        assert_eq!(heartbeat_wait(ms(50), false, &mut since, t0), ms(50));
    }
}
