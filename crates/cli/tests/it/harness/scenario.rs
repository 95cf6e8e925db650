//! One test's world on the test broker: its own directory, topic and group,
//! the workers it starts on them and the evidence about them, so a test
//! begins with one line and never repeats its names.

use std::time::Duration;

use super::{
    assert_all_handled, create_topic_with_configs, produce, produce_steadily, spawn_exec_worker,
    spawn_worker, total_lag, unique, wait_for_lag_zero, Proc, TestDir,
};

/// A directory, a topic and a consumer group, all named after the test.
pub struct Scenario {
    pub dir: TestDir,
    pub topic: String,
    pub group: String,
}

impl Scenario {
    /// `name`'s directory, a new topic of `partitions` partitions and a new
    /// group.
    pub fn new(name: &str, partitions: i32) -> Self {
        Self::with_topic_configs(name, partitions, &[])
    }

    /// A directory and names, the topic not created (a test that creates
    /// it later, or never).
    pub fn without_topic(name: &str) -> Self {
        Self {
            dir: TestDir::new(name),
            topic: unique(name),
            group: unique("g"),
        }
    }

    /// [`Scenario::new`] with topic configs (`max.message.bytes`).
    pub fn with_topic_configs(name: &str, partitions: i32, configs: &[(&str, &str)]) -> Self {
        let scenario = Self::without_topic(name);
        create_topic_with_configs(&scenario.topic, partitions, configs);
        scenario
    }

    /// Creates the default dead-letter topic, `<topic>.dlq`, and names it.
    pub fn dead_letter_topic(&self, partitions: i32) -> String {
        let dlq = format!("{}.dlq", self.topic);
        create_topic_with_configs(&dlq, partitions, &[]);
        dlq
    }

    /// `count` records from `microbatch produce` (its flags in `extra`).
    pub fn produce(&self, count: u64, extra: &[&str]) {
        produce(&self.topic, count, extra);
    }

    /// `count` records at `rate` a second, in the background.
    pub fn produce_steadily(&self, count: u64, rate: u64, extra: &[&str]) -> Proc {
        produce_steadily(&self.dir, &self.topic, count, rate, extra)
    }

    /// `microbatch run` on the topic and group, serving HTTP on `port`.
    pub fn worker(&self, name: &str, port: u16, extra: &[&str]) -> Proc {
        spawn_worker(&self.dir, name, &self.topic, &self.group, port, extra)
    }

    /// [`Scenario::worker`] with the `exec` handler running `command`.
    pub fn exec_worker(&self, name: &str, port: u16, command: &str, extra: &[&str]) -> Proc {
        spawn_exec_worker(
            &self.dir,
            name,
            &self.topic,
            &self.group,
            port,
            command,
            extra,
        )
    }

    pub fn wait_for_lag_zero(&self, limit: Duration) {
        wait_for_lag_zero(&self.topic, &self.group, limit);
    }

    pub fn total_lag(&self) -> i64 {
        total_lag(&self.topic, &self.group)
    }

    /// Every record reached a recording handler (see [`assert_all_handled`]):
    /// (records, duplicates).
    pub fn assert_all_handled(&self) -> (usize, usize) {
        assert_all_handled(&self.dir, &self.topic, &self.group)
    }
}
