//! Kafka: the `kafka_source` (partitions as splits, offsets in the checkpoint) and the
//! `kafka_sink` (a transaction per subtask and checkpoint, committed when the checkpoint
//! completes), both on librdkafka through `rdkafka`, with no Kafka protocol of Weir's own.
//! What they share is here: the client settings and how librdkafka's log reaches the job's.

mod sink;
mod source;

pub use sink::KafkaSink;
pub use source::KafkaSource;

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;

use crate::error::RuntimeError;

/// How long a call to the cluster that Weir waits on (metadata, offsets, a transaction's
/// start and end) may take before it counts as failed.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The settings every client of an operator starts from: its brokers, a client id naming the
/// job's operator and subtask, the credentials of the job's environment, and the manifest's
/// `properties` (which the planner checked hold none that Weir sets).
pub(crate) fn client_config(
    bootstrap: &str,
    client_id: &str,
    properties: &BTreeMap<String, String>,
) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap).set("client.id", client_id);
    for (k, v) in properties {
        c.set(k, v);
    }
    // Credentials come from the environment (a Secret the controller maps into it), never
    // from the manifest.
    for (var, key) in [
        ("WEIR_KAFKA_SASL_USERNAME", "sasl.username"),
        ("WEIR_KAFKA_SASL_PASSWORD", "sasl.password"),
        ("WEIR_KAFKA_SSL_KEY_PASSWORD", "ssl.key.password"),
    ] {
        if let Ok(v) = std::env::var(var)
            && !v.is_empty()
        {
            c.set(key, v);
        }
    }
    c.set_log_level(RDKafkaLogLevel::Warning);
    c
}

/// librdkafka's warnings and errors, in the job's log with the operator they belong to.
#[derive(Debug, Clone)]
pub(crate) struct Logged {
    pub who: String,
}

impl ClientContext for Logged {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Warning as i32) {
            eprintln!("weir: {}: kafka {fac}: {message}", self.who);
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        eprintln!("weir: {}: kafka: {error}: {reason}", self.who);
    }
}

impl rdkafka::consumer::ConsumerContext for Logged {}

/// A failed call to the cluster: the job restarts and tries again.
pub(crate) fn kafka_error(who: &str, what: &str, e: KafkaError) -> RuntimeError {
    RuntimeError::external(format!("{who}: {what}: {e}")).retryable()
}

/// The subtask that reads partition `partition` of `topic` at parallelism `p`: a topic's
/// partitions go round the subtasks from a place its name picks, so that the first
/// partitions of many topics do not all land on subtask 0.
pub fn partition_owner(topic: &str, partition: i32, p: u32) -> u32 {
    let start = xxhash_rust::xxh3::xxh3_64(topic.as_bytes()) % u64::from(p);
    ((start + partition.max(0) as u64) % u64::from(p)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_dealt_evenly_whatever_the_parallelism() {
        for p in 1..=7u32 {
            for topic in ["orders", "a", "payments.v2"] {
                let mut n = vec![0u32; p as usize];
                for part in 0..(3 * p as i32) {
                    n[partition_owner(topic, part, p) as usize] += 1;
                }
                assert!(n.iter().all(|&c| c == 3), "{topic} at {p}: {n:?}");
            }
        }
    }
}
