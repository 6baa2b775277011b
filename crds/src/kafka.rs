//! The Kafka connectors' parameters (`kafka_source`, `kafka_sink`) and the checks the planner
//! makes of them before anything starts: the bootstrap servers' syntax, topic names, the
//! librdkafka settings a manifest may pass through and those Weir owns, and the sink's
//! transaction timeout against the job's checkpoints.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::Deserialize;

use crate::Duration;
use crate::plan::{EventTimeSpec, FieldType, JsonType, OnError, SinkFormat, SourceFormat};

/// The fields of a `kafka_source` with `format: raw`, in order.
pub const RAW_FIELDS: &[(&str, FieldType)] = &[
    ("key", FieldType::Text),
    ("value", FieldType::Text),
    ("topic", FieldType::Text),
    ("partition", FieldType::Integer),
    ("offset", FieldType::Integer),
    ("timestamp", FieldType::Integer),
];

/// Where a `kafka_source` starts reading a partition the first time the job reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    /// The first offset the partition still has.
    #[default]
    Earliest,
    /// The partition's end when the job first starts: only records written afterwards.
    Latest,
    /// The first record whose timestamp is at or after `startTimestamp`.
    Timestamp,
    /// The offsets committed for `groupId` (a partition without one from its first offset).
    Group,
}

/// Which records of transactions a `kafka_source` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// Committed records only, and nothing past an open transaction.
    #[default]
    ReadCommitted,
    /// Every record, of aborted and open transactions too.
    ReadUncommitted,
}

/// Where a bounded `kafka_source` ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StopAt {
    /// Each partition's end when the job first started (kept in its checkpoints, so that a
    /// restored job ends at the same place).
    Latest,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KafkaSourceSpec {
    /// The topics to read, each of its partitions a split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topics: Option<Vec<String>>,
    /// Instead of `topics`: every topic whose whole name matches this regular expression
    /// (`orders-.*`), those created while the job runs too (found every
    /// `partitionDiscoveryInterval`); Kafka's internal topics (`__...`) never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_pattern: Option<String>,
    /// The brokers to bootstrap from: `host:port`, comma-separated.
    pub bootstrap_servers: String,
    /// The consumer group whose offsets `startFrom: group` starts from, and to which the
    /// offsets of each completed checkpoint are committed, for lag tools (never read back:
    /// a restored job resumes from its checkpoint). Absent: nothing is committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// Where a partition is first read from: `earliest` (default), `latest`, `timestamp`
    /// (with `startTimestamp`) or `group` (the committed offsets of `groupId`). A partition
    /// found while the job runs, or after it restores, is read from its first offset.
    #[serde(default)]
    pub start_from: StartFrom,
    /// With `startFrom: timestamp`: epoch milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_timestamp: Option<i64>,
    /// Makes the source bounded: `latest` ends each partition at its end when the job first
    /// started; the job then finishes as bounded jobs do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_at: Option<StopAt>,
    /// Makes the source bounded: each partition ends before its first record whose timestamp
    /// is at or after this (epoch milliseconds), as found when the job first started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_timestamp: Option<i64>,
    /// `read_committed` (default) or `read_uncommitted`.
    #[serde(default)]
    pub isolation: Isolation,
    /// How a record's value becomes a record: `text` (the value as the one field `line`),
    /// `json` (an object read into `fields`), or `raw` (fields `key`, `value`, `topic`,
    /// `partition`, `offset`, `timestamp`).
    #[serde(default)]
    pub format: SourceFormat,
    /// With `format: json`: the fields to read, `{name: type}`, as a `file_source` reads them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<BTreeMap<String, JsonType>>,
    /// A value that does not parse: `fail` the job, naming the topic, partition and offset,
    /// `skip` it (counted in `weir_operator_records_dropped_total`), or `deadLetter`: write it
    /// as it came to `deadLetterTopic`, with the error in its header `weir.error`.
    #[serde(default)]
    pub on_error: OnError,
    /// With `onError: deadLetter`: the topic for the records that do not parse (on the same
    /// cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
    /// The records' event time and their watermark, each partition keeping its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_time: Option<EventTimeSpec>,
    /// How often the subtasks look for new partitions of the topics; `0s` never.
    #[serde(default = "default_discovery")]
    pub partition_discovery_interval: Duration,
    /// librdkafka settings passed through (`fetch.max.bytes: "1048576"`), except those Weir
    /// sets itself, which are refused by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
}

fn default_discovery() -> Duration {
    Duration::from_secs(30)
}

/// What a `kafka_sink` promises of the records it writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, JsonSchema, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Delivery {
    /// In Kafka transactions committed when the checkpoint that covers them completes: a
    /// `read_committed` consumer sees each record once.
    #[default]
    ExactlyOnce,
    /// Idempotent writes flushed at each checkpoint: none lost, some written again after a
    /// failure.
    AtLeastOnce,
    /// Written as they come, not waited for at checkpoints.
    None,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KafkaSinkSpec {
    /// The topic to write to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Instead of `topic`: the text field that names each record's topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_field: Option<String>,
    /// The field whose value is the Kafka record's key (its partition follows the key);
    /// absent: no key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The brokers to bootstrap from: `host:port`, comma-separated.
    pub bootstrap_servers: String,
    /// How a record becomes the Kafka record's value: `json` (an object keyed by the input's
    /// field names) or `csv`.
    #[serde(default = "default_sink_format")]
    pub format: SinkFormat,
    /// `exactly-once` (default), `at-least-once` or `none`.
    #[serde(default)]
    pub delivery: Delivery,
    /// The start of the sink's transactional ids, `<prefix>-<run>-<subtask>-<epoch>` (the run
    /// of the job: ids of two runs never meet), and of its marker groups,
    /// `<prefix>-<run>-<subtask>`. Absent: `weir-<uid>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transactional_id_prefix: Option<String>,
    /// How long a transaction may stay open before the brokers abort it: longer than the
    /// checkpoint interval and timeout together, and at most the brokers'
    /// `transaction.max.timeout.ms` (15 minutes by default).
    #[serde(default = "default_txn_timeout")]
    pub transaction_timeout: Duration,
    /// librdkafka settings passed through, except those Weir sets itself, which are refused
    /// by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
}

fn default_sink_format() -> SinkFormat {
    SinkFormat::Json
}

fn default_txn_timeout() -> Duration {
    Duration::from_secs(15 * 60)
}

/// librdkafka settings Weir sets itself: a manifest that passes one is refused, naming it and
/// the parameter to use instead.
pub const OWNED_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "set bootstrapServers"),
    ("metadata.broker.list", "set bootstrapServers"),
    ("group.id", "set groupId"),
    ("enable.auto.commit", "offsets are committed when checkpoints complete"),
    ("enable.auto.offset.store", "offsets are kept in the checkpoints"),
    ("auto.offset.reset", "set startFrom"),
    ("isolation.level", "set isolation"),
    ("enable.partition.eof", "the source finds the ends itself"),
    ("transactional.id", "set transactionalIdPrefix"),
    ("transaction.timeout.ms", "set transactionTimeout"),
    ("enable.idempotence", "set delivery"),
    ("acks", "set delivery"),
    ("request.required.acks", "set delivery"),
    ("client.id", "Weir names each client after the job, operator and subtask"),
    ("statistics.interval.ms", "the source reads its partitions' ends from them every second"),
];

/// Settings with credentials: they come from the job's environment (a Secret), never from the
/// manifest.
const SECRET_PROPERTIES: &[&str] = &[
    "sasl.password",
    "sasl.username",
    "sasl.oauthbearer.client.secret",
    "ssl.key.password",
    "ssl.key.pem",
    "ssl_key",
    "ssl.keystore.password",
    "ssl.certificate.pem",
];

/// `bootstrapServers`: `host:port` pairs, comma-separated, each host a name or an address
/// (IPv6 in brackets) and each port 1 to 65535.
pub fn check_bootstrap_servers(servers: &str) -> Result<(), String> {
    if servers.trim().is_empty() {
        return Err(
            "bootstrapServers is empty: name the brokers as host:port, comma-separated, e.g. kafka-0.kafka:9092".into(),
        );
    }
    for server in servers.split(',') {
        let s = server.trim();
        let bad = |why: &str| {
            Err(format!(
                "bootstrapServers: {s:?} {why}: name each broker as host:port, e.g. kafka-0.kafka:9092"
            ))
        };
        let Some((host, port)) = s.rsplit_once(':') else { return bad("has no port") };
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if host.is_empty() {
            return bad("has no host");
        }
        if host.starts_with('-')
            || !host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'))
        {
            return bad("is not a host name or address");
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => return bad("has no port from 1 to 65535"),
        }
    }
    Ok(())
}

/// A topic name as Kafka takes one: 1 to 249 of ASCII letters, digits, `.`, `_` and `-`, not
/// `.` or `..`.
pub fn check_topic(what: &str, topic: &str) -> Result<(), String> {
    let legal = !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if legal {
        Ok(())
    } else {
        Err(format!(
            "{what} {topic:?} is not a Kafka topic name: 1 to 249 ASCII letters, digits, '.', '_' and '-'"
        ))
    }
}

/// `properties`: none Weir owns, none with credentials, every name a librdkafka setting's
/// shape (lower case, dotted).
pub fn check_properties(props: &BTreeMap<String, String>) -> Result<(), String> {
    for name in props.keys() {
        if let Some((_, instead)) = OWNED_PROPERTIES.iter().find(|(n, _)| n == name) {
            return Err(format!("properties.{name} is set by Weir: {instead}"));
        }
        if SECRET_PROPERTIES.contains(&name.as_str()) {
            return Err(format!(
                "properties.{name} is a credential, which a manifest must not hold: put it in a Secret and name the Secret in credentialsSecret"
            ));
        }
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_'))
        {
            return Err(format!(
                "properties: {name:?} is not a librdkafka setting (lower-case dotted names, e.g. fetch.max.bytes)"
            ));
        }
    }
    Ok(())
}

/// The regular expression of `topicPattern`, matching whole names.
pub fn topic_regex(pattern: &str) -> Result<regex::Regex, String> {
    if pattern.len() > 1000 {
        return Err("topicPattern is longer than 1000 characters".into());
    }
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("topicPattern {pattern:?} is not a regular expression: {e}"))
}

/// A transactional id prefix: what Kafka's ids take, short enough for the subtask and epoch
/// after it.
pub fn check_transactional_id_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty()
        || prefix.len() > 200
        || !prefix.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!(
            "transactionalIdPrefix {prefix:?} must be 1 to 200 ASCII letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

impl KafkaSourceSpec {
    pub fn line_format(&self) -> crate::plan::LineFormat<'_> {
        crate::plan::LineFormat {
            format: self.format,
            fields: self.fields.as_ref(),
            on_error: self.on_error,
        }
    }

    /// Everything about it that does not depend on the other operators.
    pub fn check(&self) -> Result<(), String> {
        check_bootstrap_servers(&self.bootstrap_servers)?;
        check_properties(&self.properties)?;
        match (&self.topics, &self.topic_pattern) {
            (None, None) => {
                return Err("topics is missing: name the topics to read, e.g. topics: [orders], or give a topicPattern".into());
            }
            (Some(_), Some(_)) => {
                return Err(
                    "topics and topicPattern are two ways to name the topics: give one of them"
                        .into(),
                );
            }
            (Some(t), None) if t.is_empty() => {
                return Err("topics is empty: name the topics to read".into());
            }
            (Some(topics), None) => {
                for t in topics {
                    check_topic("topics:", t)?;
                }
            }
            (None, Some(p)) => {
                topic_regex(p)?;
            }
        }
        if let Some(g) = &self.group_id
            && g.trim().is_empty()
        {
            return Err("groupId is empty: name the consumer group, or leave groupId out".into());
        }
        match (self.start_from, self.start_timestamp) {
            (StartFrom::Timestamp, None) => {
                return Err("startFrom: timestamp needs startTimestamp (epoch milliseconds)".into());
            }
            (StartFrom::Timestamp, Some(t)) if t < 0 => {
                return Err(format!("startTimestamp {t} is before 1970: give epoch milliseconds"));
            }
            (StartFrom::Timestamp, Some(_)) => {}
            (_, Some(_)) => {
                return Err("startTimestamp is read only with startFrom: timestamp".into());
            }
            (StartFrom::Group, _) if self.group_id.is_none() => {
                return Err(
                    "startFrom: group needs groupId: the group whose offsets to start from".into(),
                );
            }
            _ => {}
        }
        match (self.on_error, &self.dead_letter_topic) {
            (OnError::DeadLetter, None) => {
                return Err("onError: deadLetter needs deadLetterTopic: the topic for the records that do not parse".into());
            }
            (OnError::DeadLetter, Some(t)) => check_topic("deadLetterTopic", t)?,
            (_, Some(_)) => {
                return Err("deadLetterTopic is read only with onError: deadLetter".into());
            }
            (_, None) => {}
        }
        if self.stop_at.is_some() && self.stop_timestamp.is_some() {
            return Err("stopAt and stopTimestamp are two ends: give one of them".into());
        }
        if let Some(t) = self.stop_timestamp
            && t < 0
        {
            return Err(format!("stopTimestamp {t} is before 1970: give epoch milliseconds"));
        }
        match (self.format, &self.fields) {
            (SourceFormat::Raw, Some(_)) => {
                Err("fields is read only with format: json (format: raw gives key, value, topic, partition, offset and timestamp)".into())
            }
            _ => Ok(()),
        }
    }
}

impl KafkaSinkSpec {
    /// Everything about it that does not depend on its input's fields.
    pub fn check(&self) -> Result<(), String> {
        check_bootstrap_servers(&self.bootstrap_servers)?;
        check_properties(&self.properties)?;
        match (&self.topic, &self.topic_field) {
            (Some(t), None) => check_topic("topic", t)?,
            (None, Some(_)) => {}
            (Some(_), Some(_)) => {
                return Err(
                    "topic and topicField are two ways to name the topic: give one of them".into(),
                );
            }
            (None, None) => {
                return Err("topic is missing: name the topic to write to (or a field that names it, topicField)".into());
            }
        }
        if let Some(p) = &self.transactional_id_prefix {
            check_transactional_id_prefix(p)?;
        }
        let t = self.transaction_timeout.as_std();
        if self.delivery == Delivery::ExactlyOnce
            && (t < std::time::Duration::from_secs(1)
                || t > std::time::Duration::from_secs(i32::MAX as u64 / 1000))
        {
            return Err(format!(
                "transactionTimeout {} is not from 1s to 24 days",
                self.transaction_timeout
            ));
        }
        Ok(())
    }

    /// With `delivery: exactly-once`, a transaction stays open from one checkpoint's barrier
    /// until the next checkpoint completes: the timeout must be longer than the checkpoint
    /// interval and timeout together.
    pub fn check_checkpoints(&self, interval: Duration, timeout: Duration) -> Result<(), String> {
        if self.delivery != Delivery::ExactlyOnce {
            return Ok(());
        }
        let needed = interval.as_std() + timeout.as_std();
        if self.transaction_timeout.as_std() <= needed {
            return Err(format!(
                "transactionTimeout {} is not longer than the checkpoint interval {interval} and timeout {timeout} together: the brokers would abort a transaction before its checkpoint completes; raise transactionTimeout (to at most the brokers' transaction.max.timeout.ms) or checkpoint more often",
                self.transaction_timeout
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootstrap_servers_are_host_port_lists() {
        for good in ["kafka:9092", "a:1,b.c:65535", " 10.0.0.1:9092 , [::1]:9093", "k-0.k.svc:9092"]
        {
            assert_eq!(check_bootstrap_servers(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("kafka", "no port"),
            ("kafka:0", "no port from 1"),
            ("kafka:99999", "no port from 1"),
            (":9092", "no host"),
            ("kafka:9092,", "no port"),
            ("ka fka:9092", "not a host"),
            ("-x:9092", "not a host"),
            ("kafka:9092/x", "no port"),
        ] {
            let e = check_bootstrap_servers(bad).unwrap_err();
            assert!(e.contains(why) && e.contains("bootstrapServers"), "{bad}: {e}");
        }
    }

    #[test]
    fn owned_and_secret_properties_are_refused_by_name() {
        let p = |k: &str| BTreeMap::from([(k.to_string(), "x".to_string())]);
        assert_eq!(check_properties(&p("fetch.max.bytes")), Ok(()));
        let e = check_properties(&p("group.id")).unwrap_err();
        assert!(e.contains("properties.group.id") && e.contains("groupId"), "{e}");
        let e = check_properties(&p("transactional.id")).unwrap_err();
        assert!(e.contains("transactionalIdPrefix"), "{e}");
        let e = check_properties(&p("sasl.password")).unwrap_err();
        assert!(e.contains("Secret") && !e.contains("\"x\""), "{e}");
        let e = check_properties(&p("Fetch Max")).unwrap_err();
        assert!(e.contains("not a librdkafka setting"), "{e}");
    }

    #[test]
    fn topic_names_are_kafkas() {
        assert_eq!(check_topic("topic", "orders.v1_x-2"), Ok(()));
        for bad in ["", ".", "..", "a b", "a/b", &"x".repeat(250)] {
            assert!(check_topic("topic", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_transaction_timeout_must_outlast_a_checkpoint() {
        let sink: KafkaSinkSpec = serde_json::from_value(serde_json::json!({
            "topic": "out", "bootstrapServers": "k:9092", "transactionTimeout": "60s"
        }))
        .unwrap();
        assert_eq!(sink.check(), Ok(()));
        assert_eq!(
            sink.check_checkpoints(Duration::from_secs(10), Duration::from_secs(30)),
            Ok(())
        );
        let e =
            sink.check_checkpoints(Duration::from_secs(30), Duration::from_secs(30)).unwrap_err();
        assert!(e.contains("transactionTimeout 1m") && e.contains("interval 30s"), "{e}");
        let at_least_once = KafkaSinkSpec { delivery: Delivery::AtLeastOnce, ..sink };
        assert_eq!(
            at_least_once.check_checkpoints(Duration::from_secs(30), Duration::from_secs(30)),
            Ok(())
        );
    }
}
