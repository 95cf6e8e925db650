//! Share-group faults a healthy broker does not show on demand, injected
//! between the share client and the real broker: every byte goes to the
//! broker and back through [`FaultyConnector`], which can fail a ShareFetch
//! without sending it, garble record batches, hide the broker's newer
//! versions of an API, make a partition leaderless, drop the answers to
//! some APIs (a broker cut off), and checks that SASL never shares a
//! connection with another request. [`FaultyProxy`] puts the same between
//! a whole worker process and the broker. The broker keeps the truth: what
//! the group has left is read with Kafka's own share-groups tool, dead
//! letters by another client.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::{
    ApiVersionsResponse, BrokerId, FetchRequest, FindCoordinatorResponse, MetadataResponse,
    ResponseHeader, ShareFetchResponse,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};
use kafka_protocol::ResponseError;
use microbatch_kafka::share::backlog::{self, SOURCE_BROKER_LAG, SOURCE_START_OFFSET};
use microbatch_kafka::share::cluster::{Cluster, Connector, Lane, PlainTcp};
use microbatch_kafka::share::wire::{Connection, Stream};
use microbatch_kafka::share::{
    AckOutcome, AckType, ShareConsumer, ShareConsumerConfig, ShareError, ShareRecord,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::harness::{
    all_records, audited, command, create_topic, dead_lettered, logging_handler, produce,
    read_topic, share_group_lag, share_group_offsets_column, spawn_member_with, unique,
    wait_for_share_backlog_zero, wait_until, Scenario,
};
use crate::share::real_broker;

const FETCH: i16 = 1;
const FIND_COORDINATOR: i16 = 10;
const SASL_HANDSHAKE: i16 = 17;
const API_VERSIONS: i16 = 18;
const SASL_AUTHENTICATE: i16 = 36;
const METADATA: i16 = 3;
const SHARE_FETCH: i16 = 78;
const SHARE_ACKNOWLEDGE: i16 = 79;
const DESCRIBE_SHARE_GROUP_OFFSETS: i16 = 90;

/// What the connector does to the traffic, set by the test as it goes. One
/// fault at a time: the first that applies to an answer wins.
#[derive(Default)]
struct Faults {
    /// ShareFetch requests still to be failed: not sent to the broker (it
    /// never sees them, as when it fails before applying anything) and
    /// answered UNKNOWN_SERVER_ERROR for the whole request.
    fail_share_fetches: usize,
    /// ShareFetch answers with records still to be garbled: every batch's
    /// magic byte set to one no Kafka writes.
    garble_share_fetches: usize,
    /// Partitions whose records are garbled in every ShareFetch answer.
    garble_partitions: HashSet<i32>,
    /// An offset whose batch is garbled in every ShareFetch answer (only
    /// that batch; the others in the answer are left alone).
    garble_offset: Option<i64>,
    /// Where the answers say the brokers are (host, port): set by a
    /// [`FaultyProxy`] to itself.
    advertise: Option<(String, i32)>,
    /// API key -> the highest version the broker is said to speak.
    cap_versions: HashMap<i16, i16>,
    /// APIs whose answers are dropped, as by a broker cut off.
    dropping: HashSet<i16>,
    /// Partitions the Metadata answers say have no leader.
    leaderless: HashSet<i32>,
    /// Partitions the next ShareFetch answer says this broker no longer
    /// leads (what it acquired for them is not handed out: it comes back
    /// when the lock runs out); later answers are left as they are.
    not_leader_once: HashSet<i32>,
    /// Every request seen: API key, version, when.
    requests: Vec<(i16, i16, Instant)>,
    /// When answers were dropped, by API key.
    dropped: Vec<(i16, Instant)>,
    /// ShareFetch requests failed, and partitions garbled.
    failed: usize,
    garbled: Vec<i32>,
    /// Answers the connector could not read (passed on as they were).
    errors: Vec<String>,
    /// Requests sent and not answered yet, by API key.
    in_flight: HashMap<i16, usize>,
    /// SASL requests sent beside another request on their connection, or
    /// the other way round (KIP-368 forbids both).
    violations: Vec<String>,
    /// SaslHandshakes after a connection served other requests.
    reauthentications: usize,
}

impl Faults {
    fn count(&self, key: i16, from: Instant, to: Instant) -> usize {
        self.requests
            .iter()
            .filter(|(k, _, at)| *k == key && *at >= from && *at <= to)
            .count()
    }
}

/// Opens connections with `inner` (TCP, or TLS and SASL) and puts itself
/// between the client and what `inner` opened.
#[derive(Clone)]
struct FaultyConnector(Arc<Mutex<Faults>>, Arc<dyn Connector>);

impl Default for FaultyConnector {
    fn default() -> Self {
        Self::around(Arc::new(PlainTcp))
    }
}

impl FaultyConnector {
    fn around(inner: Arc<dyn Connector>) -> Self {
        Self(Arc::default(), inner)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Faults) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn is_sasl(key: i16) -> bool {
    key == SASL_HANDSHAKE || key == SASL_AUTHENTICATE
}

#[async_trait]
impl Connector for FaultyConnector {
    async fn connect(&self, addr: &str) -> Result<Box<dyn Stream>, ShareError> {
        let broker = self.1.connect(addr).await?;
        let (client, ours) = tokio::io::duplex(1 << 20);
        self.pipe(ours, broker);
        Ok(Box::new(client))
    }

    async fn authenticate(&self, conn: &Connection) -> Result<Option<Duration>, ShareError> {
        self.1.authenticate(conn).await
    }
}

impl FaultyConnector {
    /// Carries frames between `client` and `broker`, with the faults.
    fn pipe(&self, client: impl Stream, broker: Box<dyn Stream>) {
        let (mut from_client, mut to_client) = tokio::io::split(client);
        let (mut from_broker, mut to_broker) = tokio::io::split(broker);
        // Frames for the client; None: the broker closed, so close the
        // client's side too (it sees the end, as from a real socket).
        let (answers, mut to_send) = tokio::sync::mpsc::unbounded_channel::<Option<Bytes>>();
        tokio::spawn(async move {
            while let Some(Some(frame)) = to_send.recv().await {
                if write_frame(&mut to_client, &frame).await.is_err() {
                    break;
                }
            }
            let _ = to_client.shutdown().await;
        });
        // correlation id -> (API key, version) of the requests on the way.
        let asked: Arc<Mutex<HashMap<i32, (i16, i16)>>> = Arc::default();
        let (faults, asked_too, failing) = (self.clone(), asked.clone(), answers.clone());
        tokio::spawn(async move {
            // A request other than ApiVersions and SASL went: SASL from now
            // on is authenticating again (KIP-368).
            let mut served = false;
            while let Ok(Some(frame)) = read_frame(&mut from_client).await {
                let key = i16::from_be_bytes([frame[0], frame[1]]);
                let version = i16::from_be_bytes([frame[2], frame[3]]);
                let id = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
                // SASL never shares the connection with another request.
                let in_flight: Vec<i16> = asked_too.lock().unwrap().values().map(|v| v.0).collect();
                let clash = in_flight.iter().any(|&k| is_sasl(k) != is_sasl(key));
                let fail = faults.with(|f| {
                    f.requests.push((key, version, Instant::now()));
                    if clash {
                        f.violations
                            .push(format!("API {key} sent while {in_flight:?} were in flight"));
                    }
                    if key == SASL_HANDSHAKE && served {
                        f.reauthentications += 1;
                    }
                    *f.in_flight.entry(key).or_default() += 1;
                    let fail = key == SHARE_FETCH && f.fail_share_fetches > 0;
                    if fail {
                        f.fail_share_fetches -= 1;
                        f.failed += 1;
                    }
                    fail
                });
                served |= !is_sasl(key) && key != API_VERSIONS;
                if fail {
                    faults.with(|f| *f.in_flight.entry(key).or_default() -= 1);
                    let failed = ShareFetchResponse::default()
                        .with_error_code(ResponseError::UnknownServerError.code())
                        .with_error_message(Some("injected by the test".into()));
                    // v2's answer is v1's.
                    let _ = failing.send(Some(
                        encode(id, &failed, version.min(1)).expect("a failed ShareFetch answer"),
                    ));
                    continue;
                }
                asked_too.lock().unwrap().insert(id, (key, version));
                if write_frame(&mut to_broker, &frame).await.is_err() {
                    break;
                }
            }
        });
        let faults = self.clone();
        tokio::spawn(async move {
            while let Ok(Some(frame)) = read_frame(&mut from_broker).await {
                let id = response_id(&frame);
                let Some((key, version)) = asked.lock().unwrap().remove(&id) else {
                    break;
                };
                faults.with(|f| *f.in_flight.entry(key).or_default() -= 1);
                if let Some(answer) = faults.with(|f| alter(f, key, version, frame)) {
                    let _ = answers.send(Some(answer));
                }
            }
            let _ = answers.send(None);
        });
    }
}

/// The connector's faults for whole processes: listens on a port of its
/// own, carries each connection to the broker through a [`FaultyConnector`]
/// and rewrites the broker addresses in the answers (metadata, coordinators,
/// share fetch endpoints; a ShareAcknowledge v2 answer, which names new
/// leaders only, is left alone) to its own, so that a worker
/// bootstrapped here, librdkafka in it included, stays behind it.
struct FaultyProxy {
    port: u16,
    _runtime: tokio::runtime::Runtime,
}

impl FaultyProxy {
    fn start(broker: &str, faults: &FaultyConnector) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("a port for the proxy");
        let port = listener.local_addr().unwrap().port();
        faults.with(|f| f.advertise = Some(("127.0.0.1".into(), i32::from(port))));
        let (faults, broker) = (faults.clone(), broker.to_string());
        runtime.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let _ = client.set_nodelay(true);
                if let Ok(to) = PlainTcp.connect(&broker).await {
                    faults.pipe(client, to);
                }
            }
        });
        Self {
            port,
            _runtime: runtime,
        }
    }

    fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Bytes>> {
    let mut len = [0u8; 4];
    if r.read_exact(&mut len).await.is_err() {
        return Ok(None);
    }
    let Ok(len @ 8..=0x4000000) = usize::try_from(i32::from_be_bytes(len)) else {
        return Ok(None);
    };
    let mut frame = vec![0u8; len];
    r.read_exact(&mut frame).await?;
    Ok(Some(Bytes::from(frame)))
}

async fn write_frame<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    frame: &[u8],
) -> std::io::Result<()> {
    w.write_all(&(frame.len() as i32).to_be_bytes()).await?;
    w.write_all(frame).await?;
    w.flush().await
}

/// The answer the client gets instead of `frame` (none: dropped).
fn alter(faults: &mut Faults, key: i16, version: i16, frame: Bytes) -> Option<Bytes> {
    if faults.dropping.contains(&key) {
        faults.dropped.push((key, Instant::now()));
        return None;
    }
    let frame = match &faults.advertise {
        Some(to) => advertise(key, version, frame, to).unwrap_or_else(|(e, frame)| {
            faults.errors.push(format!("API {key} v{version}: {e}"));
            frame
        }),
        None => frame,
    };
    let altered = match key {
        API_VERSIONS if !faults.cap_versions.is_empty() => {
            decode::<ApiVersionsResponse>(frame.clone(), version).and_then(|(id, mut answer)| {
                for api in &mut answer.api_keys {
                    if let Some(&max) = faults.cap_versions.get(&api.api_key) {
                        api.max_version = api.max_version.min(max);
                    }
                }
                encode(id, &answer, version)
            })
        }
        METADATA if !faults.leaderless.is_empty() => {
            decode::<MetadataResponse>(frame.clone(), version).and_then(|(id, mut answer)| {
                for topic in &mut answer.topics {
                    for part in &mut topic.partitions {
                        if faults.leaderless.contains(&part.partition_index) {
                            part.leader_id = BrokerId(-1);
                        }
                    }
                }
                encode(id, &answer, version)
            })
        }
        SHARE_FETCH if !faults.not_leader_once.is_empty() => {
            let v = version.min(1);
            let not_leader = std::mem::take(&mut faults.not_leader_once);
            decode::<ShareFetchResponse>(frame.clone(), v).and_then(|(id, mut answer)| {
                for topic in &mut answer.responses {
                    for part in &mut topic.partitions {
                        if not_leader.contains(&part.partition_index) {
                            part.error_code = ResponseError::NotLeaderOrFollower.code();
                            part.records = None;
                            part.acquired_records.clear();
                            part.current_leader.leader_id = -1;
                        }
                    }
                }
                encode(id, &answer, v)
            })
        }
        SHARE_FETCH
            if faults.garble_share_fetches > 0
                || !faults.garble_partitions.is_empty()
                || faults.garble_offset.is_some() =>
        {
            let v = version.min(1);
            decode::<ShareFetchResponse>(frame.clone(), v).and_then(|(id, mut answer)| {
                let mut garbled = Vec::new();
                for topic in &mut answer.responses {
                    for part in &mut topic.partitions {
                        let Some(records) = part.records.as_ref().filter(|r| r.len() > 16) else {
                            continue;
                        };
                        if !faults.garble_partitions.is_empty()
                            && !faults.garble_partitions.contains(&part.partition_index)
                        {
                            continue;
                        }
                        let mut bytes = BytesMut::from(&records[..]);
                        // Every batch's magic byte: offset 16 of the batch
                        // header, batches found by their length field.
                        let mut at = 0;
                        while at + 27 <= bytes.len() {
                            let base = i64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
                            let delta =
                                i32::from_be_bytes(bytes[at + 23..at + 27].try_into().unwrap());
                            if faults
                                .garble_offset
                                .is_none_or(|o| base <= o && o <= base + i64::from(delta))
                            {
                                bytes[at + 16] = 9;
                            }
                            let len =
                                i32::from_be_bytes(bytes[at + 8..at + 12].try_into().unwrap());
                            at += 12 + len.max(0) as usize;
                        }
                        part.records = Some(bytes.freeze());
                        garbled.push(part.partition_index);
                    }
                }
                if !garbled.is_empty() && faults.garble_share_fetches > 0 {
                    faults.garble_share_fetches -= 1;
                    faults.garbled.extend(garbled);
                }
                encode(id, &answer, v)
            })
        }
        _ => return Some(frame),
    };
    Some(altered.unwrap_or_else(|e| {
        faults.errors.push(format!("API {key} v{version}: {e}"));
        frame
    }))
}

/// `frame` with every broker address it carries set to `to`; on a frame
/// that cannot be read, the error and the frame as it was.
fn advertise(
    key: i16,
    version: i16,
    frame: Bytes,
    (host, port): &(String, i32),
) -> Result<Bytes, (anyhow::Error, Bytes)> {
    let host = || StrBytes::from_string(host.clone());
    let port = *port;
    let share_version = version.min(1);
    let altered = match key {
        METADATA => decode::<MetadataResponse>(frame.clone(), version).and_then(|(id, mut a)| {
            for b in &mut a.brokers {
                (b.host, b.port) = (host(), port);
            }
            encode(id, &a, version)
        }),
        FIND_COORDINATOR => {
            decode::<FindCoordinatorResponse>(frame.clone(), version).and_then(|(id, mut a)| {
                // One coordinator up to v3, a list of them from v4.
                if version < 4 {
                    (a.host, a.port) = (host(), port);
                }
                for c in &mut a.coordinators {
                    (c.host, c.port) = (host(), port);
                }
                encode(id, &a, version)
            })
        }
        SHARE_FETCH => {
            decode::<ShareFetchResponse>(frame.clone(), share_version).and_then(|(id, mut a)| {
                for n in &mut a.node_endpoints {
                    (n.host, n.port) = (host(), port);
                }
                encode(id, &a, share_version)
            })
        }
        _ => return Ok(frame),
    };
    altered.map_err(|e| (e, frame))
}

fn response_id(frame: &[u8]) -> i32 {
    i32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]])
}

fn decode<M: Decodable + HeaderVersion>(
    mut frame: Bytes,
    version: i16,
) -> anyhow::Result<(i32, M)> {
    let header = ResponseHeader::decode(&mut frame, M::header_version(version))?;
    Ok((header.correlation_id, M::decode(&mut frame, version)?))
}

fn encode<M: Encodable + HeaderVersion>(
    id: i32,
    answer: &M,
    version: i16,
) -> anyhow::Result<Bytes> {
    let mut out = BytesMut::new();
    ResponseHeader::default()
        .with_correlation_id(id)
        .encode(&mut out, M::header_version(version))?;
    answer.encode(&mut out, version)?;
    Ok(out.freeze())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A topic of `partitions` with `records` in small batches, and a share
/// group starting at its beginning with locks of `lock_ms`.
fn scenario(name: &str, partitions: i32, records: u64, lock_ms: u32) -> (String, String, String) {
    let bootstrap = real_broker().expect("a real broker");
    let topic = unique(name);
    let group = unique(&format!("{name}-g"));
    create_topic(&topic, partitions);
    produce(
        &topic,
        records,
        &["--kafka-property", "batch.num.messages=10"],
    );
    let cfg = ShareConsumerConfig::new(vec![bootstrap.clone()], &group, vec![topic.clone()]);
    runtime()
        .block_on(ShareConsumer::configure_group(
            &cfg,
            &[
                ("share.auto.offset.reset", "earliest"),
                ("share.record.lock.duration.ms", &lock_ms.to_string()),
                // Room for the deliveries a fault costs (Kafka's default is 5).
                ("share.delivery.count.limit", "10"),
            ],
        ))
        .expect("configuring the share group");
    (bootstrap, topic, group)
}

fn faulty_config(
    bootstrap: &str,
    group: &str,
    topic: &str,
    faults: &FaultyConnector,
) -> ShareConsumerConfig {
    let mut cfg = crate::share::config(bootstrap, group, topic);
    cfg.connector = Arc::new(faults.clone());
    cfg
}

/// What a member did: every record it was handed (partition, offset,
/// delivery count), the verdicts' outcomes, the partitions it could not
/// decode.
#[derive(Default)]
struct Run {
    handed: Vec<(i32, i64, i16)>,
    outcomes: Vec<AckOutcome>,
    undecodable: Vec<String>,
}

/// Every one of `n` records handed at least once.
fn all_handed(n: usize) -> impl Fn(&Run) -> bool {
    move |run| run.times_handed().len() >= n
}

impl Run {
    /// Offsets whose verdicts the broker refused.
    fn refused(&self) -> BTreeSet<(i32, i64)> {
        self.outcomes
            .iter()
            .filter(|o| o.error.is_some())
            .flat_map(|o| (o.batch.first_offset..=o.batch.last_offset).map(|x| (o.partition, x)))
            .collect()
    }

    fn times_handed(&self) -> BTreeMap<(i32, i64), usize> {
        let mut n = BTreeMap::new();
        for &(p, o, _) in &self.handed {
            *n.entry((p, o)).or_default() += 1;
        }
        n
    }
}

/// Polls, accepting every record, until `done` and nothing came for 2 s; `step` runs after every poll and may
/// change the faults. Every poll must succeed: a fault the member survives
/// returns no error from `poll`.
async fn consume(
    cfg: ShareConsumerConfig,
    done: impl Fn(&Run) -> bool,
    step: impl FnMut(&Run),
) -> Run {
    consume_with(cfg, done, step, |_| {}).await
}

/// [`consume`], with every record handed also given to `keep`.
async fn consume_keeping(
    cfg: ShareConsumerConfig,
    done: impl Fn(&Run) -> bool,
    keep: impl FnMut(&ShareRecord),
) -> Run {
    consume_with(cfg, done, |_| {}, keep).await
}

async fn consume_with(
    cfg: ShareConsumerConfig,
    done: impl Fn(&Run) -> bool,
    mut step: impl FnMut(&Run),
    mut keep: impl FnMut(&ShareRecord),
) -> Run {
    let mut c = ShareConsumer::join(cfg).await.expect("joining");
    let mut run = Run::default();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut idle_since = Instant::now();
    loop {
        assert!(
            Instant::now() < deadline,
            "gave up after 90 s: {} records handed",
            run.times_handed().len()
        );
        let fetched = c
            .poll()
            .await
            .unwrap_or_else(|e| panic!("poll failed: {e}"));
        run.undecodable.extend(fetched.undecodable);
        for r in &fetched.records {
            keep(r);
            run.handed.push((r.partition, r.offset, r.delivery_count));
            c.acknowledge(r, AckType::Accept)
                .expect("accepting a held record");
        }
        run.outcomes.extend(c.take_outcomes());
        step(&run);
        if !fetched.records.is_empty() {
            idle_since = Instant::now();
        } else if done(&run) && idle_since.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    c.flush().await.expect("flush");
    run.outcomes.extend(c.take_outcomes());
    run.outcomes.extend(c.close().await.expect("close"));
    run
}

fn assert_no_backlog(bootstrap: &str, group: &str) {
    let lag = share_group_lag(bootstrap, group);
    assert!(
        !lag.is_empty() && lag.values().all(|&l| l == 0),
        "the share group's backlog by Kafka's tool: {lag:?}"
    );
}

/// Kafka 4.3.2 fails a whole ShareFetch (UNKNOWN_SERVER_ERROR) when the
/// verdicts it carries name records a restarted broker no longer tracks.
/// Here a fetch carrying verdicts never reaches the broker and is answered
/// so: the member answers those verdicts as refused, `poll` returns no
/// error and fetching goes on; the refused records, still acquired under
/// the lost session, come back and are handed once more. Every other record
/// is handed exactly once, and Kafka's tool reads no backlog.
#[test]
fn a_share_fetch_the_broker_fails_refuses_its_verdicts_and_fetching_goes_on() {
    if real_broker().is_none() {
        return;
    }
    const N: usize = 100;
    let (bootstrap, topic, group) = scenario("share-fail", 2, N as u64, 5000);
    let faults = FaultyConnector::default();
    let cfg = faulty_config(&bootstrap, &group, &topic, &faults);
    let mut armed = false;
    // Done when every record was handed and each refused one twice.
    let done = |run: &Run| {
        let times = run.times_handed();
        times.len() >= N && run.refused().iter().all(|k| times.get(k) >= Some(&2))
    };
    let run = runtime().block_on(consume(cfg, done, |run| {
        // Once verdicts wait to ride the next fetch, that fetch fails.
        if !armed && !run.handed.is_empty() {
            faults.with(|f| f.fail_share_fetches = 1);
            armed = true;
        }
    }));

    assert_eq!(faults.with(|f| f.failed), 1, "the fault was injected once");
    let mut refused = BTreeMap::new();
    for o in &run.outcomes {
        if let Some(error) = o.error {
            assert_eq!(error, ResponseError::UnknownServerError, "{o:?}");
            for offset in o.batch.first_offset..=o.batch.last_offset {
                refused.insert((o.partition, offset), 2);
            }
        }
    }
    assert!(
        !refused.is_empty(),
        "the failed fetch's verdicts answered as refused"
    );
    let times = run.times_handed();
    assert_eq!(times.len(), N, "every record handed");
    let twice: BTreeMap<(i32, i64), usize> = times
        .iter()
        .filter(|(_, &n)| n > 1)
        .map(|(k, n)| (*k, *n))
        .collect();
    assert_eq!(
        twice, refused,
        "the refused records, and only they, handed twice"
    );
    assert_no_backlog(&bootstrap, &group);
    assert_eq!(faults.with(|f| f.errors.clone()), Vec::<String>::new());
}

/// Record bytes that cannot be decoded (every batch's magic byte garbled in
/// one answer): the member releases those records instead of dropping or
/// handing them out, says which partition, and gets them again (delivery
/// count 2) from the next fetches. Every record is handed exactly once and
/// Kafka's tool reads no backlog.
#[test]
fn share_records_that_cannot_be_decoded_are_released_and_delivered_again() {
    if real_broker().is_none() {
        return;
    }
    const N: usize = 100;
    // Locks far longer than the run: a record that comes back was released.
    let (bootstrap, topic, group) = scenario("share-garble", 2, N as u64, 50000);
    let started = Instant::now();
    let faults = FaultyConnector::default();
    let cfg = faulty_config(&bootstrap, &group, &topic, &faults);
    let mut armed = false;
    let run = runtime().block_on(consume(cfg, all_handed(N), |run| {
        if !armed && !run.handed.is_empty() {
            faults.with(|f| f.garble_share_fetches = 1);
            armed = true;
        }
    }));

    let garbled = faults.with(|f| f.garbled.clone());
    assert!(!garbled.is_empty(), "no answer was garbled");
    assert_eq!(
        run.undecodable.len(),
        garbled.len(),
        "each garbled partition said: {:?}",
        run.undecodable
    );
    for p in &garbled {
        let named = format!("partition {p}:");
        assert!(
            run.undecodable.iter().any(|e| e.contains(&named)),
            "partition {p} named: {:?}",
            run.undecodable
        );
    }
    let times = run.times_handed();
    assert_eq!(times.len(), N, "every record handed");
    assert!(
        times.values().all(|&n| n == 1),
        "handed more than once: {:?}",
        times.iter().filter(|(_, &n)| n > 1).collect::<Vec<_>>()
    );
    assert!(
        started.elapsed() < Duration::from_secs(50),
        "the records came back only when their lock ran out"
    );
    let again = run
        .handed
        .iter()
        .filter(|(_, _, count)| *count >= 2)
        .count();
    assert!(
        again > 0,
        "the released records came back with a higher delivery count: {:?}",
        run.handed
    );
    assert_no_backlog(&bootstrap, &group);
}

/// A batch that never decodes (the one holding offset 20, garbled in every
/// answer) among batches that do: the others' records are handed as usual,
/// at their first delivery; the bad batch's are released while their
/// delivery count is at most 2, then handed out without key or value, the
/// reason with them, for the caller to dead-letter (the worker does, past
/// `--max-attempts`) and accept, rather than left for the broker to archive
/// unseen at its delivery limit (10 here). Each record is handed once, and
/// Kafka's tool reads no backlog.
#[test]
fn a_batch_that_never_decodes_is_handed_out_bare_past_the_threshold() {
    if real_broker().is_none() {
        return;
    }
    const N: usize = 40;
    let (bootstrap, topic, group) = scenario("share-never", 1, N as u64, 15000);
    let faults = FaultyConnector::default();
    faults.with(|f| f.garble_offset = Some(20));
    let mut cfg = faulty_config(&bootstrap, &group, &topic, &faults);
    cfg.hand_undecodable_after = Some(2);
    let records: Arc<Mutex<Vec<ShareRecord>>> = Arc::default();
    let kept = records.clone();
    let run = runtime().block_on(consume_keeping(cfg, all_handed(N), move |r| {
        kept.lock().unwrap().push(r.clone())
    }));
    let times = run.times_handed();
    assert_eq!(times.len(), N, "every record handed");
    assert!(times.values().all(|&n| n == 1), "handed once each");
    let records = records.lock().unwrap();
    let (bare, whole): (Vec<&ShareRecord>, Vec<&ShareRecord>) =
        records.iter().partition(|r| r.undecodable.is_some());
    let bare_offsets: Vec<i64> = bare.iter().map(|r| r.offset).collect();
    assert!(bare_offsets.contains(&20), "{bare_offsets:?}");
    assert!(
        bare_offsets.len() < N / 2,
        "only the bad batch's records: {bare_offsets:?}"
    );
    for r in bare {
        assert_eq!(r.delivery_count, 3, "{r:?}");
        assert!(
            r.key.is_none() && r.value.is_none() && r.headers.is_empty(),
            "{r:?}"
        );
        let reason = r.undecodable.as_deref().unwrap_or_default();
        assert!(reason.contains("undecodable record batch"), "{reason}");
    }
    for r in whole {
        assert_eq!(r.delivery_count, 1, "{r:?}");
        assert!(r.value.is_some(), "{r:?}");
    }
    assert!(
        run.undecodable.len() >= 3,
        "said each time: {:?}",
        run.undecodable
    );
    assert_no_backlog(&bootstrap, &group);
}

/// A broker without the share group's own lag (DescribeShareGroupOffsets
/// v1, KIP-1226): the real broker's ApiVersions answer is made to say v0.
/// The backlog is then the high watermark less the start offset the broker
/// persists, and the reading says so; the start offsets are those Kafka's
/// tool reads. Without the cap, the same reading is the broker's lag.
#[test]
fn a_share_backlog_without_the_brokers_lag_falls_back_to_the_start_offset() {
    if real_broker().is_none() {
        return;
    }
    const N: u64 = 60;
    let (bootstrap, topic, group) = scenario("share-v0", 2, N, 15000);
    let rt = runtime();
    // One member takes and accepts some records, so that the group has
    // state on the broker, then leaves.
    let plain = ShareConsumerConfig::new(vec![bootstrap.clone()], &group, vec![topic.clone()]);
    let mut cfg = plain.clone();
    cfg.max_records = 20;
    let accepted = rt.block_on(async {
        let mut c = ShareConsumer::join(cfg).await.expect("joining");
        let mut accepted = 0;
        let by = Instant::now() + Duration::from_secs(30);
        while accepted == 0 && Instant::now() < by {
            for r in c.poll().await.expect("poll").records {
                c.acknowledge(&r, AckType::Accept).unwrap();
                accepted += 1;
            }
        }
        c.flush().await.expect("flush");
        c.close().await.expect("close");
        accepted
    });
    assert!(accepted > 0);

    let faults = FaultyConnector::default();
    faults.with(|f| f.cap_versions.insert(DESCRIBE_SHARE_GROUP_OFFSETS, 0));
    let timeout = Duration::from_secs(10);
    let read = |connector: Arc<dyn Connector>| {
        rt.block_on(backlog::read(
            connector,
            vec![bootstrap.clone()],
            &group,
            &topic,
            timeout,
        ))
        .expect("reading the backlog")
    };
    let old = read(Arc::new(faults.clone()));
    let asked: Vec<i16> = faults.with(|f| {
        f.requests
            .iter()
            .filter(|(k, _, _)| *k == DESCRIBE_SHARE_GROUP_OFFSETS)
            .map(|(_, v, _)| *v)
            .collect()
    });
    assert_eq!(asked, [0], "asked at v0 once");
    assert_eq!(old.backlog_source, SOURCE_START_OFFSET);
    let starts = share_group_offsets_column(&bootstrap, &group, "START-OFFSET");
    for p in &old.partitions {
        let Some(start) = p.start_offset else {
            assert_eq!(p.backlog, None, "no start, no backlog: {p:?}");
            continue;
        };
        assert_eq!(
            Some(&start),
            starts.get(&p.partition),
            "start offsets {starts:?}"
        );
        assert_eq!(p.backlog, Some(p.high - start), "{p:?}");
    }
    assert!(old.partitions.iter().any(|p| p.start_offset.is_some()));

    let new = read(Arc::new(PlainTcp));
    assert_eq!(new.backlog_source, SOURCE_BROKER_LAG);
    // Partitions no member fetched from have no state: unknown to both.
    let tool = share_group_lag(&bootstrap, &group);
    let ours: BTreeMap<i32, i64> = new
        .partitions
        .iter()
        .map(|p| (p.partition, p.backlog.unwrap_or(-1)))
        .collect();
    assert_eq!(ours, tool, "the broker's lag as Kafka's tool reads it");
    assert_eq!(
        old.partitions.iter().map(|p| p.high).sum::<i64>(),
        N as i64,
        "the high watermarks hold every record produced"
    );
    for (was, is) in old.partitions.iter().zip(&new.partitions) {
        // The persisted start can stay behind what is done: the fallback
        // may overstate, never understate.
        assert!(was.backlog >= is.backlog, "{was:?} against {is:?}");
    }
    assert_eq!(
        new.total_backlog,
        tool.values().filter(|&&l| l >= 0).sum::<i64>()
    );
}

/// A tracing subscriber for this thread whose lines the test reads.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Makes this thread's events (a current-thread runtime's tasks
    /// included) go here, until the guard is dropped.
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A broker that stops answering the member's fetches and acknowledgements
/// (its answers dropped) while it still answers heartbeats and metadata:
/// each poll waits its request timeout (2 s), and after each failure the
/// member asks for the leaders again; once the leader has not answered for
/// 5 s since the first failure it warns, only once while two more fetches
/// fail, and says once that it answers again. Nothing is lost: every record
/// is handed and Kafka's tool reads no backlog.
#[test]
fn a_leader_that_stops_answering_fetches_is_said_and_nothing_is_lost() {
    if real_broker().is_none() {
        return;
    }
    const N: usize = 100;
    let (bootstrap, topic, group) = scenario("share-drop", 2, N as u64, 2000);
    let faults = FaultyConnector::default();
    let mut cfg = faulty_config(&bootstrap, &group, &topic, &faults);
    cfg.request_timeout = Duration::from_secs(2);
    let log = Captured::default();
    let _guard = log.install();
    const WARNING: &str = "a partition leader cannot be reached";
    // When the answers began to be dropped, and when the warning was seen.
    let mut began: Option<Instant> = None;
    let mut warned: Option<Instant> = None;
    let mut ended: Option<Instant> = None;
    let run = runtime().block_on(consume(cfg, all_handed(N), |run| {
        if ended.is_some() {
            return;
        }
        let Some(from) = began else {
            if !run.handed.is_empty() {
                faults.with(|f| f.dropping.extend([SHARE_FETCH, SHARE_ACKNOWLEDGE]));
                began = Some(Instant::now());
            }
            return;
        };
        if warned.is_none() && log.text().contains(WARNING) {
            warned = Some(Instant::now());
        }
        let failed_after_warning = warned.map_or(0, |at| {
            faults.with(|f| f.count(SHARE_FETCH, at, Instant::now()))
        });
        if failed_after_warning >= 2 || from.elapsed() > Duration::from_secs(40) {
            faults.with(|f| f.dropping.clear());
            ended = Some(Instant::now());
        }
    }));
    let (began, ended) = (
        began.expect("the fault began"),
        ended.expect("the fault ended"),
    );
    let warned = warned.expect("the member warned");
    let text = log.text();
    assert_eq!(text.matches(WARNING).count(), 1, "warned once:\n{text}");
    let first_drop = faults.with(|f| {
        f.dropped
            .iter()
            .find(|(k, _)| *k == SHARE_FETCH)
            .map(|(_, at)| *at)
            .expect("a fetch answer dropped")
    });
    // The first failure comes a request timeout (2 s) after the first
    // dropped answer's request; the warning 5 s after that failure.
    assert!(
        warned - first_drop >= Duration::from_millis(6500),
        "warned {:?} after the first dropped answer:\n{text}",
        warned - first_drop
    );
    assert_eq!(
        text.matches("a partition leader answers again").count(),
        1,
        "said once that it answers again:\n{text}"
    );
    let (failures, lookups) = faults.with(|f| {
        let failures = f.dropped.iter().filter(|(k, _)| *k == SHARE_FETCH).count();
        (failures, f.count(METADATA, began, ended))
    });
    assert!(
        lookups + 1 >= failures,
        "leaders looked up again after each failed fetch: {lookups} lookups, {failures} failures"
    );
    let times = run.times_handed();
    assert_eq!(times.len(), N, "every record handed");
    assert_no_backlog(&bootstrap, &group);
}

/// A partition the metadata says has no leader (an election, or its broker
/// down with no replica) while the other keeps its leader; the fetch answer
/// says NotLeaderOrFollower for it once, later answers are the broker's own:
/// the member fetches the led partition meanwhile and only it (asking for
/// the other would get its records), asks for metadata at most every
/// 100 ms while fetches are quick, says once that the partition has no
/// leader and once that every partition has one again. Every record is
/// handed exactly once and Kafka's tool reads no backlog.
#[test]
fn a_partition_without_a_leader_waits_while_the_other_is_fetched() {
    if real_broker().is_none() {
        return;
    }
    // Enough that the led partition keeps polls quick through the window.
    const N: usize = 2000;
    let (bootstrap, topic, group) = scenario("share-leaderless", 2, N as u64, 5000);
    let faults = FaultyConnector::default();
    let mut cfg = faulty_config(&bootstrap, &group, &topic, &faults);
    cfg.max_records = 10;
    let log = Captured::default();
    let _guard = log.install();
    let mut window: Option<(Instant, usize, Option<Instant>)> = None;
    let mut handed_in_window = Vec::new();
    let run = runtime().block_on(consume(cfg, all_handed(N), |run| match window {
        None if !run.handed.is_empty() => {
            faults.with(|f| {
                f.leaderless.insert(1);
                f.not_leader_once.insert(1);
            });
            window = Some((Instant::now(), run.handed.len(), None));
        }
        Some((from, at, None))
            if from.elapsed() >= Duration::from_secs(1) && run.handed[at..].len() >= 400 =>
        {
            handed_in_window = run.handed[at..].to_vec();
            faults.with(|f| f.leaderless.clear());
            window = Some((from, at, Some(Instant::now())));
        }
        _ => {}
    }));
    let (from, _, to) = window.expect("the fault began");
    let to = to.expect("the fault ended");
    let text = log.text();
    let (lookups, fetches) =
        faults.with(|f| (f.count(METADATA, from, to), f.count(SHARE_FETCH, from, to)));
    let most = (to - from).as_millis() as usize / 100 + 2;
    assert!(
        (2..=most).contains(&lookups),
        "metadata asked at most every 100 ms while a partition has no leader: \
         {lookups} in {:?} ({fetches} fetches)",
        to - from
    );
    assert!(
        handed_in_window.iter().all(|&(p, _, _)| p == 0),
        "only the led partition fetched meanwhile: {handed_in_window:?}"
    );
    assert_eq!(
        text.matches("assigned partitions have no leader known")
            .count(),
        1,
        "said once:\n{text}"
    );
    assert_eq!(
        text.matches("every assigned partition has a leader again")
            .count(),
        1,
        "said once:\n{text}"
    );
    let times = run.times_handed();
    assert_eq!(times.len(), N, "every record handed");
    assert!(times.values().all(|&n| n == 1), "handed more than once");
    assert_no_backlog(&bootstrap, &group);
    assert_eq!(faults.with(|f| f.errors.clone()), Vec::<String>::new());
}

/// Authenticating again (KIP-368) while another request is in flight on the
/// connection: the MSK IAM listener ends a session with its 30 s token, so
/// the client authenticates again at 80% of it. A classic Fetch that waits
/// 3 s at the broker runs back to back on the connection throughout; when
/// the session is due, the re-authentication waits for the fetch in flight,
/// and no fetch is sent until it is done. Every fetch succeeds on the same
/// connection past the first session's end, so the session was renewed.
#[test]
fn authenticating_again_waits_for_the_request_in_flight() {
    if real_broker().is_none() {
        return;
    }
    let Some(env) = crate::msk_iam::iam_env() else {
        return;
    };
    let topic = unique("share-reauth");
    create_topic(&topic, 1);
    let kafka = crate::share::kafka_config(&env);
    let iam = crate::share::iam_config(
        &env,
        &kafka,
        "unused",
        &topic,
        &env["AWS_SECRET_ACCESS_KEY"],
        Arc::default(),
    );
    let faults = FaultyConnector::around(iam.connector.clone());
    let addr = env["KAFKA_BOOTSTRAP_SERVERS"].clone();
    let cluster = Arc::new(Cluster::new(
        Arc::new(faults.clone()),
        vec![addr.clone()],
        "microbatch-test".into(),
        Duration::from_secs(10),
    ));
    runtime().block_on(async {
        let meta = cluster
            .metadata(std::slice::from_ref(&topic))
            .await
            .expect("metadata");
        let topic_id = meta[0].id;
        let conn = cluster.conn(&addr, Lane::Fetch).await.expect("connecting");
        let opened = Instant::now();
        // Fetches that wait 3 s at the log end of an empty partition.
        let fetching = {
            let conn = conn.clone();
            tokio::spawn(async move {
                let mut fetches = 0;
                while opened.elapsed() < Duration::from_secs(36) {
                    let request = FetchRequest::default()
                        .with_max_wait_ms(3000)
                        .with_min_bytes(1)
                        .with_max_bytes(1 << 20)
                        .with_topics(vec![FetchTopic::default()
                            .with_topic_id(topic_id)
                            .with_partitions(vec![FetchPartition::default()
                                .with_partition(0)
                                .with_fetch_offset(0)
                                .with_partition_max_bytes(1 << 20)])]);
                    let answer = conn.call(request).await.expect("a fetch");
                    assert_eq!(answer.error_code, 0, "{answer:?}");
                    fetches += 1;
                }
                fetches
            })
        };
        // When the session is due, ask for the connection while a fetch
        // is in flight.
        // ... early in its 3 s wait, so that it is still in flight when
        // the re-authentication asks for its turn.
        let by = opened + Duration::from_secs(30);
        let fresh_fetch = || {
            faults.with(|f| {
                f.in_flight.get(&FETCH).copied() == Some(1)
                    && f.requests
                        .iter()
                        .rev()
                        .find(|(k, _, _)| *k == FETCH)
                        .is_some_and(|(_, _, at)| at.elapsed() < Duration::from_millis(500))
            })
        };
        while !conn.reauth_due() || !fresh_fetch() {
            assert!(Instant::now() < by, "the session never came due");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let asked = Instant::now();
        let again = cluster
            .conn(&addr, Lane::Fetch)
            .await
            .expect("authenticating again");
        let waited = asked.elapsed();
        assert!(Arc::ptr_eq(&conn, &again), "the same connection");
        assert!(!conn.reauth_due(), "the session was renewed");
        let fetches = fetching.await.expect("fetching");
        assert!(fetches >= 8, "{fetches} fetches in 36 s");
        let (violations, reauths) = faults.with(|f| (f.violations.clone(), f.reauthentications));
        assert_eq!(
            violations,
            Vec::<String>::new(),
            "SASL beside another request"
        );
        assert!(reauths >= 1, "authenticated again");
        assert!(
            waited >= Duration::from_secs(1),
            "the re-authentication waited for the fetch in flight ({waited:?})"
        );
    });
}

/// The worker itself, behind a proxy that garbles partition 1's records in
/// every answer (as a corrupt batch on the broker's disk would read):
/// partition 0's records are handled; partition 1's are released until
/// delivered more than `--max-attempts` (2) times, then dead-lettered
/// unhandled, each dead letter saying its batch cannot be decoded; nothing
/// else is dead-lettered and Kafka's tool reads no backlog. Before, they were
/// released until the broker archived them at its delivery limit, unseen.
#[test]
fn a_share_worker_dead_letters_records_that_never_decode() {
    let Some(bootstrap) = real_broker() else {
        return;
    };
    let s = Scenario::new("share-undecodable", 2);
    let group = unique("share-undecodable-group");
    let faults = FaultyConnector::default();
    faults.with(|f| f.garble_partitions.insert(1));
    let proxy = FaultyProxy::start(&bootstrap, &faults);
    let log = s.dir.path("handled.txt");
    let handler = logging_handler(&s.dir, &log, "");
    s.produce(60, &["--kafka-property", "batch.num.messages=10"]);
    let produced = all_records(&s.topic);
    let (first, second): (BTreeSet<_>, BTreeSet<_>) = produced.iter().partition(|(p, _)| *p == 0);
    assert!(!first.is_empty() && !second.is_empty(), "{produced:?}");
    let mut cmd = command();
    cmd.args(["run", "--bootstrap-servers", &proxy.bootstrap()]);
    let mut worker = spawn_member_with(
        cmd,
        &s.dir,
        "w",
        &s.topic,
        ("--share-group", &group),
        0,
        &[
            "--handler",
            "exec",
            "--command",
            &handler,
            "--max-attempts",
            "2",
        ],
    );
    let dlq = format!("{}.dlq", s.topic);
    let handled = || audited(std::slice::from_ref(&log));
    wait_until(
        Duration::from_secs(90),
        "partition 0 handled and partition 1 dead-lettered",
        || {
            handled().keys().copied().collect::<BTreeSet<_>>() == first
                && dead_lettered(&dlq) == second
        },
    );
    wait_for_share_backlog_zero(&bootstrap, &group, 2, Duration::from_secs(30));
    worker.terminate();
    assert!(handled().values().all(|&n| n == 1), "handled once each");
    let letters = read_topic(&dlq, &bootstrap);
    assert_eq!(letters.len(), second.len(), "one dead letter each");
    for letter in letters {
        let error = &letter.4["microbatch.error"];
        assert!(
            error.contains("delivered 3 times") && error.contains("cannot be decoded"),
            "{error}"
        );
        assert!(
            letter.2.is_none() && letter.3.is_empty(),
            "no key or value: {letter:?}"
        );
    }
    assert_eq!(faults.with(|f| f.errors.clone()), Vec::<String>::new());
}
