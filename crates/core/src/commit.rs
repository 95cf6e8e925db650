//! Asynchronous offset commits whose results come back.
//!
//! librdkafka reports the result of a manual asynchronous commit only to a
//! queue named with the commit (its event API reports auto-commits alone), so
//! the worker commits through a queue of its own and reads the results on the
//! poll thread: no blocking round trip per commit, and failures are seen,
//! counted and retried.

use std::ffi::CStr;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::TopicPartitionList;

/// One partition's part of a commit result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedPartition {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The partition's own error, if the broker refused it.
    pub error: Option<RDKafkaErrorCode>,
}

/// The outcome of one asynchronous commit.
#[derive(Debug, Clone)]
pub struct CommitResult {
    /// The request's error, if the whole commit failed.
    pub error: Option<RDKafkaErrorCode>,
    pub partitions: Vec<CommittedPartition>,
}

/// A librdkafka queue that receives commit results.
pub struct CommitQueue {
    queue: *mut rd::rd_kafka_queue_t,
}

// SAFETY: librdkafka queues are thread-safe; the handle is only a pointer.
unsafe impl Send for CommitQueue {}
unsafe impl Sync for CommitQueue {}

impl CommitQueue {
    /// A queue on `consumer`; drop it before the consumer.
    pub fn new<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> Self {
        // SAFETY: the client pointer is valid while the consumer lives.
        let queue = unsafe { rd::rd_kafka_queue_new(consumer.client().native_ptr()) };
        assert!(!queue.is_null(), "librdkafka could not allocate a queue");
        Self { queue }
    }

    /// Starts an asynchronous commit; its result arrives through [`Self::poll`].
    pub fn commit<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        offsets: &TopicPartitionList,
    ) -> Result<(), KafkaError> {
        // SAFETY: all pointers are valid for the call; librdkafka copies `offsets`.
        let err = unsafe {
            rd::rd_kafka_commit_queue(
                consumer.client().native_ptr(),
                offsets.ptr(),
                self.queue,
                None,
                std::ptr::null_mut(),
            )
        };
        if err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            Ok(())
        } else {
            Err(KafkaError::ConsumerCommit(err.into()))
        }
    }

    /// The next commit result, if one has arrived.
    pub fn poll(&self) -> Option<CommitResult> {
        // SAFETY: a zero timeout never blocks; the event is destroyed below.
        let event = unsafe { rd::rd_kafka_queue_poll(self.queue, 0) };
        if event.is_null() {
            return None;
        }
        let result = unsafe {
            let err = rd::rd_kafka_event_error(event);
            let list = rd::rd_kafka_event_topic_partition_list(event);
            let mut partitions = Vec::new();
            if !list.is_null() {
                let list = &*list;
                for i in 0..list.cnt as usize {
                    let e = &*list.elems.add(i);
                    let topic = if e.topic.is_null() {
                        String::new()
                    } else {
                        CStr::from_ptr(e.topic).to_string_lossy().into_owned()
                    };
                    partitions.push(CommittedPartition {
                        topic,
                        partition: e.partition,
                        offset: e.offset,
                        error: (e.err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR)
                            .then(|| e.err.into()),
                    });
                }
            }
            CommitResult {
                error: (err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR)
                    .then(|| err.into()),
                partitions,
            }
        };
        // SAFETY: the event came from this queue and is destroyed once.
        unsafe { rd::rd_kafka_event_destroy(event) };
        Some(result)
    }
}

impl Drop for CommitQueue {
    fn drop(&mut self) {
        while self.poll().is_some() {}
        // SAFETY: created in `new`, destroyed once.
        unsafe { rd::rd_kafka_queue_destroy(self.queue) };
    }
}
