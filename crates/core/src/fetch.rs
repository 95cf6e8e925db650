//! Fetched records, taken from librdkafka many at a time.
//!
//! The consumer's own queue carries rebalances, errors and statistics as well
//! as records, and the client library hands it out one event per call: a
//! queue lock, three clock reads and an event wrapper for every record. The
//! worker instead routes each assigned partition's fetch queue to a
//! [`FetchQueue`] of its own and drains it with `rd_kafka_consume_batch_queue`
//! (up to a burst of records per call), while rebalances and the rest stay on
//! the consumer queue, polled separately.
//!
//! librdkafka's version barriers still apply: records fetched before a
//! partition was paused, revoked or seeked are dropped inside the batch call,
//! exactly as on the consumer queue.

use std::ffi::{CStr, CString};
use std::ptr::NonNull;
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{BorrowedMessage, Headers, Message};

use crate::batch::Header;

/// A librdkafka queue that receives the records of the partitions routed to it.
pub struct FetchQueue {
    queue: NonNull<rd::rd_kafka_queue_t>,
    /// The consumer's own queue, only to ask whether it has events waiting.
    consumer_queue: NonNull<rd::rd_kafka_queue_t>,
    slots: Vec<*mut rd::rd_kafka_message_t>,
}

// SAFETY: librdkafka queues are thread-safe; the handles are only pointers,
// and `slots` holds no message between calls.
unsafe impl Send for FetchQueue {}

impl FetchQueue {
    /// A queue on `consumer` taking up to `burst` records per call; drop it
    /// before the consumer.
    pub fn new<C: ConsumerContext>(consumer: &BaseConsumer<C>, burst: usize) -> Self {
        let rk = consumer.client().native_ptr();
        // SAFETY: the client pointer is valid while the consumer lives.
        let (queue, consumer_queue) = unsafe {
            (
                rd::rd_kafka_queue_new(rk),
                rd::rd_kafka_queue_get_consumer(rk),
            )
        };
        Self {
            queue: NonNull::new(queue).expect("librdkafka could not allocate a queue"),
            consumer_queue: NonNull::new(consumer_queue)
                .expect("a subscribing consumer has a consumer queue"),
            slots: vec![std::ptr::null_mut(); burst.max(1)],
        }
    }

    /// Sends a partition's fetched records here. Call it before each
    /// assignment of the partition: librdkafka clears the route when it
    /// stops fetching, and without one it would keep the records in the
    /// partition's own queue, where nobody reads them.
    pub fn route<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        topic: &str,
        partition: i32,
    ) {
        self.reroute(consumer, topic, partition);
    }

    /// Routes a partition here again, and says whether records of it were
    /// waiting in its own queue, unrouted. librdkafka clears a route when
    /// it stops fetching a partition and never restores one an application
    /// set, so a stop served after an assignment's [`route`](Self::route)
    /// would strand the partition's records where nobody reads them (the
    /// likeliest cause of a partition that came back and stayed unread,
    /// once, under load).
    /// Routing again is harmless: records already queued move here in
    /// order, and a routed queue holds none of its own.
    pub fn reroute<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        topic: &str,
        partition: i32,
    ) -> bool {
        let Ok(topic) = CString::new(topic) else {
            return false;
        };
        // SAFETY: as in `route`; the lengths are read under the queues' locks.
        unsafe {
            let partition_queue = rd::rd_kafka_queue_get_partition(
                consumer.client().native_ptr(),
                topic.as_ptr(),
                partition,
            );
            if partition_queue.is_null() {
                return false;
            }
            // A routed queue reports the length of the queue it feeds. Only
            // this thread takes records from that one, so between two reads
            // of it the length only grows, unless librdkafka purged outdated
            // records meanwhile (a pause, a seek). A partition length
            // outside that range is the partition's own: stranded records.
            // Best effort: one that happens to fall inside goes unnoticed,
            // and is routed all the same.
            let before = rd::rd_kafka_queue_length(self.queue.as_ptr());
            let own = rd::rd_kafka_queue_length(partition_queue);
            let after = rd::rd_kafka_queue_length(self.queue.as_ptr());
            let stranded = own > 0 && before <= after && !(before..=after).contains(&own);
            rd::rd_kafka_queue_forward(partition_queue, self.queue.as_ptr());
            rd::rd_kafka_queue_destroy(partition_queue);
            stranded
        }
    }

    /// Whether the consumer queue (rebalances, errors, statistics) has events.
    pub fn consumer_events_waiting(&self) -> bool {
        // SAFETY: valid queue handle.
        unsafe { rd::rd_kafka_queue_length(self.consumer_queue.as_ptr()) > 0 }
    }

    /// Appends up to one burst of fetched records (and fetch errors) to
    /// `out`, waiting up to `timeout` (whole milliseconds) for the first.
    pub fn consume(&mut self, timeout: Duration, out: &mut Vec<FetchedMessage>) -> usize {
        // librdkafka's batch call waits until the burst is full or the time
        // is up, however many records it holds by then: a fixed delay for a
        // slow stream, and a wake-up per enqueued record for a fast one. So
        // take what is there, and only when nothing is, wait for one record.
        let all = self.slots.len();
        let mut n = self.take(0, all, 0);
        if n == 0 {
            let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
            if timeout_ms > 0 && self.take(0, 1, timeout_ms) == 1 {
                n = 1 + self.take(1, all, 0);
            }
        }
        out.reserve(n);
        out.extend(
            self.slots[..n]
                .iter()
                .filter_map(|&m| NonNull::new(m).map(FetchedMessage)),
        );
        n
    }

    /// Fills `slots[from..to]`, waiting until it is full or `timeout_ms`
    /// has passed.
    fn take(&mut self, from: usize, to: usize, timeout_ms: i32) -> usize {
        let room = &mut self.slots[from..to];
        // SAFETY: `room` has space for `room.len()` pointers; librdkafka
        // fills the first `n` with messages we now own.
        let n = unsafe {
            rd::rd_kafka_consume_batch_queue(
                self.queue.as_ptr(),
                timeout_ms,
                room.as_mut_ptr(),
                room.len(),
            )
        };
        usize::try_from(n).unwrap_or(0)
    }
}

impl Drop for FetchQueue {
    fn drop(&mut self) {
        // SAFETY: both handles were obtained in `new` and are released once;
        // records still queued are freed with the queue.
        unsafe {
            rd::rd_kafka_queue_destroy(self.queue.as_ptr());
            rd::rd_kafka_queue_destroy(self.consumer_queue.as_ptr());
        }
    }
}

/// One fetched record (or a fetch error), owned until dropped.
pub struct FetchedMessage(NonNull<rd::rd_kafka_message_t>);

// SAFETY: a message may be read and destroyed from any thread.
unsafe impl Send for FetchedMessage {}

impl FetchedMessage {
    fn raw(&self) -> &rd::rd_kafka_message_t {
        // SAFETY: owned and valid until drop.
        unsafe { self.0.as_ref() }
    }

    /// The fetch error this message reports instead of a record, if any.
    pub fn error(&self) -> Option<RDKafkaErrorCode> {
        let err = self.raw().err;
        (err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR).then(|| err.into())
    }

    /// The error's text (librdkafka puts it in the payload), for logs.
    pub fn error_text(&self) -> String {
        String::from_utf8_lossy(self.payload().unwrap_or_default()).into_owned()
    }
}

/// A consumed record as the worker takes it in: from the fetch queue, or
/// (for a partition that was somehow not routed there) the consumer queue.
pub trait ConsumedRecord {
    fn partition(&self) -> i32;
    fn offset(&self) -> i64;
    /// Create or log-append time in milliseconds, if the record has one.
    fn timestamp_ms(&self) -> Option<i64>;
    fn key(&self) -> Option<&[u8]>;
    fn payload(&self) -> Option<&[u8]>;
    /// The record's headers, copied.
    fn headers(&self) -> Vec<Header>;
}

impl ConsumedRecord for FetchedMessage {
    fn partition(&self) -> i32 {
        self.raw().partition
    }

    fn offset(&self) -> i64 {
        self.raw().offset
    }

    fn timestamp_ms(&self) -> Option<i64> {
        let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: valid message; `kind` is written by the call.
        let ts = unsafe { rd::rd_kafka_message_timestamp(self.0.as_ptr(), &mut kind) };
        (kind != rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE && ts >= 0)
            .then_some(ts)
    }

    fn key(&self) -> Option<&[u8]> {
        let m = self.raw();
        // SAFETY: librdkafka keeps `key_len` bytes at `key` while the message lives.
        (!m.key.is_null())
            .then(|| unsafe { std::slice::from_raw_parts(m.key.cast::<u8>(), m.key_len) })
    }

    fn payload(&self) -> Option<&[u8]> {
        let m = self.raw();
        // SAFETY: as for the key.
        (!m.payload.is_null())
            .then(|| unsafe { std::slice::from_raw_parts(m.payload.cast::<u8>(), m.len) })
    }

    /// Parsing the headers costs an allocation even when there are none,
    /// so the worker asks only when something reads them.
    fn headers(&self) -> Vec<Header> {
        let mut headers = Vec::new();
        // SAFETY: valid message; the header list belongs to the message, and
        // names and values are copied before it goes.
        unsafe {
            let mut list: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
            if rd::rd_kafka_message_headers(self.0.as_ptr(), &mut list)
                != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
                || list.is_null()
            {
                return headers;
            }
            let mut idx = 0;
            loop {
                let mut name: *const std::os::raw::c_char = std::ptr::null();
                let mut value: *const std::os::raw::c_void = std::ptr::null();
                let mut size = 0usize;
                if rd::rd_kafka_header_get_all(list, idx, &mut name, &mut value, &mut size)
                    != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
                {
                    break;
                }
                headers.push(Header {
                    name: CStr::from_ptr(name).to_string_lossy().into_owned(),
                    value: (!value.is_null())
                        .then(|| std::slice::from_raw_parts(value.cast::<u8>(), size).to_vec()),
                });
                idx += 1;
            }
        }
        headers
    }
}

impl ConsumedRecord for BorrowedMessage<'_> {
    fn partition(&self) -> i32 {
        Message::partition(self)
    }
    fn offset(&self) -> i64 {
        Message::offset(self)
    }
    fn timestamp_ms(&self) -> Option<i64> {
        Message::timestamp(self).to_millis()
    }
    fn key(&self) -> Option<&[u8]> {
        Message::key(self)
    }
    fn payload(&self) -> Option<&[u8]> {
        Message::payload(self)
    }
    fn headers(&self) -> Vec<Header> {
        Message::headers(self)
            .map(|hs| {
                hs.iter()
                    .map(|h| Header {
                        name: h.key.to_string(),
                        value: h.value.map(<[u8]>::to_vec),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for FetchedMessage {
    fn drop(&mut self) {
        // SAFETY: owned since `consume`; destroyed once.
        unsafe { rd::rd_kafka_message_destroy(self.0.as_ptr()) };
    }
}
