//! The `kafka_source`: the partitions of its topics are its splits, each read by the subtask
//! [`super::partition_owner`] names, from the offset its checkpoint recorded.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::sync::Mutex;
use weir_crds::kafka::{Isolation, KafkaSourceSpec, StartFrom, StopAt};
use weir_crds::plan::OnError;

use super::{CALL_TIMEOUT, Logged, client_config, kafka_error, partition_owner};
use crate::connectors::format::{Line, SourceDecoder};
use crate::connectors::stats::{ConnectorMetrics, MAX_PARTITIONS, PartitionStats};
use crate::error::RuntimeError;
use crate::event_time::{EventClock, SplitTime, Watermark};
use crate::operator::{Rescale, Source, bad_state};
use crate::record::{Record, Value};

/// One subtask of a `kafka_source`.
pub struct KafkaSource {
    spec: KafkaSourceSpec,
    /// `operator "orders" (kafka_source) subtask 1`, for messages.
    who: String,
    subtask: u32,
    parallelism: u32,
    consumer: BaseConsumer<Ends>,
    /// Values to records (`None` with `format: raw`).
    decoder: Option<SourceDecoder>,
    clock: Option<EventClock>,
    /// The partitions this subtask reads, by topic and number.
    parts: BTreeMap<(String, i32), Part>,
    /// Whether the partitions of its first start are known (and assigned).
    started: bool,
    /// Whether it was restored from a checkpoint: a partition its state does not name is a
    /// new one, read from its first offset.
    restored: bool,
    last_discovery: Instant,
    /// The offsets of each checkpoint taken and not yet completed, to commit to `groupId`.
    to_commit: Vec<(u64, Offsets)>,
    /// With `onError: deadLetter`: the producer of the dead letters, and its topic.
    dead_letters: Option<(BaseProducer<DeadLetters>, String)>,
    /// The partition of the last record polled.
    current: (String, i32),
    /// When a passing error of the client was last logged.
    last_warning: Option<Instant>,
    /// `topicPattern`, compiled.
    pattern: Option<regex::Regex>,
    /// Raw records that could not be read (a key or value that is not UTF-8).
    dropped: u64,
    /// Bytes read: keys and values.
    bytes_in: u64,
    /// Where its figures go, and when they last went.
    metrics: ConnectorMetrics,
    last_report: Option<Instant>,
}

/// How often a subtask's figures (offsets, lag) are brought up to date; the client's
/// statistics, which tell each partition's end, come as often.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// The consumer's context: its messages in the job's log, and each partition's end from the
/// client's statistics (the last stable offset with `read_committed`, the high watermark
/// otherwise), which the fetches keep up to date with no call of Weir's own.
struct Ends {
    logged: Logged,
    read_committed: bool,
    /// (topic, partition) → its first offset, and the offset after its last record a read
    /// can see.
    ends: Mutex<std::collections::HashMap<(String, i32), (i64, i64)>>,
}

impl rdkafka::ClientContext for Ends {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        self.logged.log(level, fac, message)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.logged.error(error, reason)
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut ends = self.ends.lock().unwrap_or_else(|e| e.into_inner());
        for (name, t) in statistics.topics {
            for (&id, p) in &t.partitions {
                let end = if self.read_committed { p.ls_offset } else { p.hi_offset };
                // -1: the partition's internal stand-in, or no fetch has told the end yet.
                if id >= 0 && end >= 0 && ends.len() < MAX_PARTITIONS {
                    ends.insert((name.clone(), id), (p.lo_offset.max(0), end));
                }
            }
        }
    }
}

impl rdkafka::consumer::ConsumerContext for Ends {}

/// Next offsets to read, `(topic, partition, offset)`.
type Offsets = Vec<(String, i32, i64)>;

/// A partition being read.
#[derive(Debug, Clone)]
struct Part {
    /// The next offset to read; `None`: its first (nothing read yet).
    next: Option<i64>,
    /// With `stopAt`/`stopTimestamp`: where it ends (the first offset not read).
    end: Option<i64>,
    time: SplitTime,
    /// Reached its end: no longer assigned.
    done: bool,
}

/// A partition's position in a checkpoint.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PartState {
    topic: String,
    partition: i32,
    /// The next offset to read; absent: its first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    end: Option<i64>,
    #[serde(default, skip_serializing_if = "SplitTime::is_empty")]
    time: SplitTime,
}

/// A subtask's position: every partition it reads.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SourceState {
    partitions: Vec<PartState>,
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource")
            .field("who", &self.who)
            .field("partitions", &self.parts.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// How long a poll waits for its first record.
const POLL_WAIT: Duration = Duration::from_millis(5);

impl KafkaSource {
    /// Subtask `subtask` of `parallelism` of operator `uid`: a client, not yet connected.
    pub fn new(
        spec: &KafkaSourceSpec,
        uid: &str,
        subtask: u32,
        parallelism: u32,
        decoder: Option<SourceDecoder>,
        clock: Option<EventClock>,
    ) -> Result<Self, RuntimeError> {
        let who = format!("operator {uid:?} (kafka_source) subtask {subtask}");
        let mut c = client_config(
            &spec.bootstrap_servers,
            &format!("weir-{uid}-{subtask}"),
            &spec.properties,
        );
        c.set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            // An offset the partition no longer has (retention deleted it): its first.
            .set("auto.offset.reset", "earliest")
            .set(
                "isolation.level",
                match spec.isolation {
                    Isolation::ReadCommitted => "read_committed",
                    Isolation::ReadUncommitted => "read_uncommitted",
                },
            );
        // A group id is needed to commit offsets and read committed ones; without one the
        // consumer only reads what it is assigned.
        c.set("group.id", spec.group_id.clone().unwrap_or_else(|| format!("weir-{uid}")));
        // The statistics tell each partition's end, for the lag.
        c.set("statistics.interval.ms", REPORT_EVERY.as_millis().to_string());
        let ends = Ends {
            logged: Logged { who: who.clone() },
            read_committed: spec.isolation == Isolation::ReadCommitted,
            ends: Mutex::default(),
        };
        let consumer: BaseConsumer<Ends> = c
            .create_with_context(ends)
            .map_err(|e| RuntimeError::user(format!("{who}: the consumer's settings: {e}")))?;
        let dead_letters = match (&spec.on_error, &spec.dead_letter_topic) {
            (OnError::DeadLetter, Some(topic)) => {
                let mut c = client_config(
                    &spec.bootstrap_servers,
                    &format!("weir-{uid}-{subtask}-dead-letters"),
                    &spec.properties,
                );
                c.set("enable.idempotence", "true").set("acks", "all");
                let ctx = DeadLetters { who: who.clone(), failed: Mutex::default() };
                let p: BaseProducer<DeadLetters> = c.create_with_context(ctx).map_err(|e| {
                    RuntimeError::user(format!("{who}: the dead letters' producer: {e}"))
                })?;
                Some((p, topic.clone()))
            }
            _ => None,
        };
        let pattern = match &spec.topic_pattern {
            Some(p) => Some(
                weir_crds::kafka::topic_regex(p)
                    .map_err(|e| RuntimeError::user(format!("{who}: {e}")))?,
            ),
            None => None,
        };
        Ok(Self {
            spec: spec.clone(),
            who,
            subtask,
            parallelism,
            consumer,
            decoder,
            clock,
            parts: BTreeMap::new(),
            started: false,
            restored: false,
            last_discovery: Instant::now(),
            to_commit: Vec::new(),
            pattern,
            last_warning: None,
            current: (String::new(), -1),
            dead_letters,
            dropped: 0,
            bytes_in: 0,
            metrics: ConnectorMetrics::default(),
            last_report: None,
        })
    }

    /// Reports its figures to `metrics`.
    pub fn with_metrics(mut self, metrics: ConnectorMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Brings its figures up to date: each partition's next offset and how far that is
    /// behind the partition's end (or the end of a bounded read, if that comes first).
    fn report(&mut self) {
        self.last_report = Some(Instant::now());
        // The positions past transactions' markers, so that a partition read to its end
        // shows no lag.
        let _ = self.catch_up_positions();
        let ends = self.consumer.context().ends.lock().unwrap_or_else(|e| e.into_inner());
        let partitions: Vec<PartitionStats> = self
            .parts
            .iter()
            .take(MAX_PARTITIONS)
            .map(|((t, p), part)| {
                let end = ends.get(&(t.clone(), *p)).copied();
                let lag = if part.done {
                    Some(0)
                } else {
                    end.map(|(first, end)| {
                        let end = part.end.map_or(end, |stop| stop.min(end));
                        // Nothing read yet: all of the partition is behind.
                        let from = part.next.unwrap_or(first);
                        (end - from).max(0) as u64
                    })
                };
                PartitionStats { topic: t.clone(), partition: *p, offset: part.next, lag }
            })
            .collect();
        drop(ends);
        let bytes_in = self.bytes_in;
        self.metrics.update(|s| {
            s.bytes_in = bytes_in;
            s.partitions = partitions;
        });
    }

    fn bounded(&self) -> bool {
        self.spec.stop_at.is_some() || self.spec.stop_timestamp.is_some()
    }

    /// The partitions of its topics in the cluster now. At the first start a topic that is
    /// not there fails the job; later a failed look is tried again at the next interval.
    fn list_partitions(&self, first: bool) -> Result<Vec<(String, i32)>, RuntimeError> {
        let mut out = Vec::new();
        if let Some(re) = &self.pattern {
            let md = self.consumer.fetch_metadata(None, CALL_TIMEOUT).map_err(|e| {
                kafka_error(&self.who, &format!("the topics of {}", self.spec.bootstrap_servers), e)
            })?;
            for t in md.topics() {
                if t.error().is_none() && !t.name().starts_with("__") && re.is_match(t.name()) {
                    out.extend(t.partitions().iter().map(|p| (t.name().to_string(), p.id())));
                }
            }
            return Ok(out);
        }
        for topic in self.spec.topics.iter().flatten() {
            let md = match self.consumer.fetch_metadata(Some(topic), CALL_TIMEOUT) {
                Ok(md) => md,
                Err(e) => {
                    return Err(kafka_error(
                        &self.who,
                        &format!(
                            "the partitions of topic {topic:?} from {}",
                            self.spec.bootstrap_servers
                        ),
                        e,
                    ));
                }
            };
            for t in md.topics() {
                if let Some(e) = t.error() {
                    if first {
                        return Err(RuntimeError::user(format!(
                            "{}: topic {topic:?} on {}: {e:?}: create the topic, or correct topics",
                            self.who, self.spec.bootstrap_servers
                        ))
                        .retryable());
                    }
                    continue;
                }
                for p in t.partitions() {
                    out.push((t.name().to_string(), p.id()));
                }
            }
        }
        Ok(out)
    }

    /// The first start (no state restored, nothing assigned yet): the partitions it owns, from
    /// where `startFrom` says and to where `stopAt` says, resolved to offsets now so that a
    /// restored job goes on from the same places.
    fn start(&mut self) -> Result<(), RuntimeError> {
        if self.started {
            return Ok(());
        }
        let mine: Vec<(String, i32)> = self
            .list_partitions(!self.restored)?
            .into_iter()
            .filter(|(t, p)| partition_owner(t, *p, self.parallelism) == self.subtask)
            .collect();
        let fresh: Vec<(String, i32)> =
            mine.into_iter().filter(|k| !self.parts.contains_key(k)).collect();
        if self.restored {
            // Partitions created since the checkpoint: from their first offset.
            self.add_new(fresh)?;
        } else {
            let mut starts = self.start_offsets(&fresh)?;
            let ends = self.end_offsets(&fresh)?;
            if self.bounded() {
                // A bounded partition starts at a known offset, or one whose records retention
                // deleted (its first offset at its end) would never be seen to end.
                for (i, (t, p)) in fresh.iter().enumerate() {
                    if starts[i].is_none() {
                        starts[i] = Some(self.watermarks(t, *p)?.0);
                    }
                }
            }
            for (i, k) in fresh.into_iter().enumerate() {
                let part =
                    Part { next: starts[i], end: ends[i], time: SplitTime::default(), done: false };
                self.parts.insert(k, part);
            }
        }
        self.started = true;
        self.last_discovery = Instant::now();
        self.assign()
    }

    /// Partitions found while running: read from their first offset (a bounded source reads
    /// only what its first start found).
    fn add_new(&mut self, fresh: Vec<(String, i32)>) -> Result<(), RuntimeError> {
        if self.bounded() {
            return Ok(());
        }
        for k in fresh {
            eprintln!(
                "weir: {}: reads partition {} of topic {:?}, new, from its first offset",
                self.who, k.1, k.0
            );
            self.parts
                .insert(k, Part { next: None, end: None, time: SplitTime::default(), done: false });
        }
        Ok(())
    }

    /// The first offset and the end (the offset after the last) of a partition now.
    fn watermarks(&self, t: &str, p: i32) -> Result<(i64, i64), RuntimeError> {
        self.consumer
            .fetch_watermarks(t, p, CALL_TIMEOUT)
            .map_err(|e| kafka_error(&self.who, &format!("the offsets of {t}/{p}"), e))
    }

    /// Where each of `parts` starts at the job's first start.
    fn start_offsets(&self, parts: &[(String, i32)]) -> Result<Vec<Option<i64>>, RuntimeError> {
        match self.spec.start_from {
            StartFrom::Earliest => Ok(vec![None; parts.len()]),
            StartFrom::Latest => {
                parts.iter().map(|(t, p)| Ok(Some(self.watermarks(t, *p)?.1))).collect()
            }
            StartFrom::Timestamp => {
                let ts = self.spec.start_timestamp.unwrap_or(0);
                self.offsets_at(parts, ts)
            }
            StartFrom::Group => {
                let mut tpl = TopicPartitionList::new();
                for (t, p) in parts {
                    tpl.add_partition(t, *p);
                }
                let got = self
                    .consumer
                    .committed_offsets(tpl, CALL_TIMEOUT)
                    .map_err(|e| kafka_error(&self.who, "the committed offsets of groupId", e))?;
                Ok(parts
                    .iter()
                    .map(|(t, p)| match got.find_partition(t, *p).map(|e| e.offset()) {
                        Some(Offset::Offset(o)) => Some(o),
                        _ => None,
                    })
                    .collect())
            }
        }
    }

    /// The first offset at or after `ts` in each partition (its end when none is).
    fn offsets_at(
        &self,
        parts: &[(String, i32)],
        ts: i64,
    ) -> Result<Vec<Option<i64>>, RuntimeError> {
        let mut tpl = TopicPartitionList::new();
        for (t, p) in parts {
            tpl.add_partition_offset(t, *p, Offset::Offset(ts))
                .map_err(|e| kafka_error(&self.who, "a timestamp lookup", e))?;
        }
        let got = self
            .consumer
            .offsets_for_times(tpl, CALL_TIMEOUT)
            .map_err(|e| kafka_error(&self.who, &format!("the offsets at timestamp {ts}"), e))?;
        parts
            .iter()
            .map(|(t, p)| match got.find_partition(t, *p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => Ok(Some(o)),
                // No record at or after it: the partition's end.
                _ => Ok(Some(self.watermarks(t, *p)?.1)),
            })
            .collect()
    }

    /// Where each of `parts` ends, for a bounded source.
    fn end_offsets(&self, parts: &[(String, i32)]) -> Result<Vec<Option<i64>>, RuntimeError> {
        match (self.spec.stop_at, self.spec.stop_timestamp) {
            (Some(StopAt::Latest), _) => {
                parts.iter().map(|(t, p)| Ok(Some(self.watermarks(t, *p)?.1))).collect()
            }
            (None, Some(ts)) => self.offsets_at(parts, ts),
            (None, None) => Ok(vec![None; parts.len()]),
        }
    }

    /// Assigns the partitions not yet done, each at its next offset.
    fn assign(&mut self) -> Result<(), RuntimeError> {
        let mut tpl = TopicPartitionList::new();
        for ((t, p), part) in &mut self.parts {
            if part.end.is_some_and(|end| part.next.is_some_and(|n| n >= end) || end <= 0) {
                part.done = true;
            }
            if part.done {
                continue;
            }
            let at = part.next.map_or(Offset::Beginning, Offset::Offset);
            tpl.add_partition_offset(t, *p, at)
                .map_err(|e| kafka_error(&self.who, "an assignment", e))?;
        }
        self.consumer
            .assign(&tpl)
            .map_err(|e| kafka_error(&self.who, "assigning its partitions", e))
    }

    /// Looks for new partitions every `partitionDiscoveryInterval`.
    fn discover(&mut self) -> Result<(), RuntimeError> {
        let every = self.spec.partition_discovery_interval.as_std();
        if every.is_zero() || self.bounded() || self.last_discovery.elapsed() < every {
            return Ok(());
        }
        self.last_discovery = Instant::now();
        let found = match self.list_partitions(false) {
            Ok(f) => f,
            Err(e) => {
                eprintln!(
                    "weir: {}: looking for new partitions: {e} (trying again later)",
                    self.who
                );
                return Ok(());
            }
        };
        let fresh: Vec<(String, i32)> = found
            .into_iter()
            .filter(|(t, p)| partition_owner(t, *p, self.parallelism) == self.subtask)
            .filter(|k| !self.parts.contains_key(k))
            .collect();
        if fresh.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for (t, p) in &fresh {
            tpl.add_partition_offset(t, *p, Offset::Beginning)
                .map_err(|e| kafka_error(&self.who, "an assignment", e))?;
        }
        self.add_new(fresh)?;
        self.consumer
            .incremental_assign(&tpl)
            .map_err(|e| kafka_error(&self.who, "assigning new partitions", e))
    }

    /// The consumer's positions (past the transactions' markers it skipped) for the
    /// partitions being read.
    fn catch_up_positions(&mut self) -> Result<(), RuntimeError> {
        let pos =
            self.consumer.position().map_err(|e| kafka_error(&self.who, "its positions", e))?;
        for e in pos.elements() {
            if let Offset::Offset(o) = e.offset()
                && let Some(part) = self.parts.get_mut(&(e.topic().to_string(), e.partition()))
                && part.next.is_none_or(|n| n < o)
            {
                part.next = Some(o);
            }
        }
        Ok(())
    }

    /// Partitions that reached their end stop being read.
    fn retire_ended(&mut self) -> Result<(), RuntimeError> {
        let mut ended = TopicPartitionList::new();
        for ((t, p), part) in &mut self.parts {
            if !part.done
                && let (Some(end), Some(next)) = (part.end, part.next)
                && next >= end
            {
                part.done = true;
                ended.add_partition(t, *p);
            }
        }
        if ended.count() > 0 {
            self.consumer
                .incremental_unassign(&ended)
                .map_err(|e| kafka_error(&self.who, "unassigning ended partitions", e))?;
        }
        Ok(())
    }

    /// A record of `format: raw`.
    /// `None` when its key or value is not UTF-8.
    fn raw(m: &rdkafka::message::BorrowedMessage<'_>) -> Option<Record> {
        let text =
            |b: Option<&[u8]>| std::str::from_utf8(b.unwrap_or_default()).ok().map(Value::str);
        let (Some(key), Some(value)) = (text(m.key()), text(m.payload())) else { return None };
        Some(vec![
            key,
            value,
            Value::str(m.topic()),
            Value::Int(i64::from(m.partition())),
            Value::Int(m.offset()),
            Value::Int(m.timestamp().to_millis().unwrap_or(0)),
        ])
    }

    /// Sends a record that does not parse, as it came, to the dead-letter topic.
    fn dead_letter(
        &self,
        m: &rdkafka::message::BorrowedMessage<'_>,
        why: &str,
    ) -> Result<(), RuntimeError> {
        let Some((producer, topic)) = &self.dead_letters else { return Ok(()) };
        let headers = OwnedHeaders::new()
            .insert(Header { key: "weir.error", value: Some(why) })
            .insert(Header { key: "weir.topic", value: Some(m.topic()) })
            .insert(Header { key: "weir.partition", value: Some(&m.partition().to_string()) })
            .insert(Header { key: "weir.offset", value: Some(&m.offset().to_string()) });
        let mut r: BaseRecord<'_, [u8], [u8]> =
            BaseRecord::to(topic).payload(m.payload().unwrap_or_default()).headers(headers);
        if let Some(k) = m.key() {
            r = r.key(k);
        }
        loop {
            match producer.send(r) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    producer.poll(Duration::from_millis(50));
                    r = back;
                }
                Err((e, _)) => {
                    return Err(kafka_error(
                        &self.who,
                        &format!("writing to deadLetterTopic {topic:?}"),
                        e,
                    ));
                }
            }
        }
        producer.poll(Duration::ZERO);
        Ok(())
    }

    /// Every dead letter sent is written (before a checkpoint covers the records after it).
    fn flush_dead_letters(&self) -> Result<(), RuntimeError> {
        let Some((producer, topic)) = &self.dead_letters else { return Ok(()) };
        producer.flush(CALL_TIMEOUT).map_err(|e| {
            kafka_error(&self.who, &format!("flushing deadLetterTopic {topic:?}"), e)
        })?;
        match producer.context().failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(e) => Err(RuntimeError::external(format!(
                "{}: writing to deadLetterTopic {topic:?}: {e}",
                self.who
            ))
            .retryable()),
            None => Ok(()),
        }
    }

    fn state(&self) -> SourceState {
        SourceState {
            partitions: self
                .parts
                .iter()
                .map(|((t, p), part)| PartState {
                    topic: t.clone(),
                    partition: *p,
                    next: part.next,
                    end: part.end,
                    time: part.time.clone(),
                })
                .collect(),
        }
    }

    fn take_state(&mut self, parts: Vec<PartState>) {
        for s in parts {
            let part = Part { next: s.next, end: s.end, time: s.time, done: false };
            self.parts.insert((s.topic, s.partition), part);
        }
        self.restored = true;
    }
}

/// The dead letters' delivery reports: the first failure.
struct DeadLetters {
    who: String,
    failed: Mutex<Option<String>>,
}

impl rdkafka::ClientContext for DeadLetters {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        Logged { who: self.who.clone() }.log(level, fac, message)
    }
}

impl rdkafka::producer::ProducerContext for DeadLetters {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &rdkafka::producer::DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert_with(|| e.to_string());
        }
    }
}

fn parse_state(who: &str, v: serde_json::Value) -> Result<SourceState, RuntimeError> {
    let st: SourceState = serde_json::from_value(v).map_err(|e| bad_state(who, e))?;
    for p in &st.partitions {
        // Read back from storage: names become requests to the cluster.
        if weir_crds::kafka::check_topic("topic", &p.topic).is_err()
            || p.partition < 0
            || p.next.is_some_and(|n| n < 0)
            || p.end.is_some_and(|n| n < 0)
        {
            return Err(RuntimeError::damaged(format!(
                "{who}: the restored state names partition {} of {:?} at {:?}: the checkpoint is damaged or forged",
                p.partition, p.topic, p.next
            )));
        }
    }
    Ok(st)
}

impl Source for KafkaSource {
    fn poll(&mut self, out: &mut Vec<Record>, max: usize) -> Result<bool, RuntimeError> {
        self.start()?;
        self.discover()?;
        let now = Instant::now();
        let mut wait = POLL_WAIT;
        while out.len() < max {
            let m = match self.consumer.poll(wait) {
                None => break,
                Some(Err(KafkaError::MessageConsumption(code))) => {
                    // Not fatal: the client goes on retrying (a broker lost, a leader that
                    // moved) and says so; the job rides it out, and a cluster away for longer
                    // fails the checkpoints.
                    if self.last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        self.last_warning = Some(Instant::now());
                        eprintln!("weir: {}: reading: {code} (the client retries)", self.who);
                    }
                    break;
                }
                Some(Err(e)) => return Err(kafka_error(&self.who, "reading", e)),
                Some(Ok(m)) => m,
            };
            wait = Duration::ZERO;
            self.bytes_in += (m.payload_len() + m.key().map_or(0, <[u8]>::len)) as u64;
            // The partition's key, made again only when the partition changes (records come
            // in runs of one partition): no allocation per record.
            if self.current.1 != m.partition() || self.current.0 != m.topic() {
                self.current = (m.topic().to_string(), m.partition());
            }
            let Some(part) = self.parts.get(&self.current) else { continue };
            if part.done || part.end.is_some_and(|end| m.offset() >= end) {
                continue;
            }
            let before = out.len();
            let dead_letters = self.dead_letters.is_some();
            // What is wrong with a record that goes to the dead letters.
            let mut bad: Option<String> = None;
            match &mut self.decoder {
                Some(d) if dead_letters => match d.decode(m.payload().unwrap_or_default()) {
                    Ok(r) => out.push(r),
                    Err(why) => bad = Some(why),
                },
                Some(d) => {
                    let bytes = m.payload().unwrap_or_default();
                    let line = Line { bytes, consumed: bytes.len() as u64, too_long: false };
                    let (t, p, o) = (m.topic(), m.partition(), m.offset());
                    d.push(line, || format!("topic {t:?} partition {p} offset {o}"), out)?;
                }
                None => {
                    if let Some(r) = Self::raw(&m) {
                        out.push(r);
                    } else if dead_letters {
                        bad = Some("the key or value is not UTF-8".into());
                    } else if self.spec.on_error == weir_crds::plan::OnError::Skip {
                        self.dropped += 1;
                    } else {
                        return Err(RuntimeError::user(format!(
                            "{}: topic {:?} partition {} offset {}: the key or value is not UTF-8: fix the record, or set onError: skip to drop such records",
                            self.who,
                            m.topic(),
                            m.partition(),
                            m.offset()
                        )));
                    }
                }
            }
            if let Some(why) = bad {
                self.dead_letter(&m, &why)?;
                self.dropped += 1;
            }
            let part = self.parts.get_mut(&self.current).expect("looked up above");
            part.next = Some(m.offset() + 1);
            if let Some(clock) = &self.clock {
                clock.observe(&mut part.time, &out[before..], now)?;
            }
        }
        let due = self.last_report.is_none_or(|t| t.elapsed() >= REPORT_EVERY);
        if self.bounded() {
            if out.is_empty() {
                self.catch_up_positions()?;
            }
            self.retire_ended()?;
            let more = self.parts.values().any(|p| !p.done);
            if due || !more {
                self.report();
            }
            return Ok(more);
        }
        if due {
            self.report();
        }
        Ok(true)
    }

    fn watermark(&mut self) -> Option<Watermark> {
        let clock = self.clock.as_ref()?;
        Some(
            clock.watermark(
                self.parts.values().filter(|p| !p.done).map(|p| &p.time),
                Instant::now(),
            ),
        )
    }

    fn take_dropped(&mut self) -> u64 {
        let from_decoder = self.decoder.as_mut().map_or(0, |d| d.take_dropped());
        std::mem::take(&mut self.dropped) + from_decoder
    }

    fn snapshot(&mut self, id: u64) -> Result<Option<serde_json::Value>, RuntimeError> {
        // A barrier before the first poll: the partitions (and where `startFrom` puts them)
        // belong in it, or a restored job would read them from their first offsets.
        self.start()?;
        self.flush_dead_letters()?;
        self.catch_up_positions()?;
        let st = self.state();
        if self.spec.group_id.is_some() {
            let offsets = st
                .partitions
                .iter()
                .filter_map(|p| Some((p.topic.clone(), p.partition, p.next?)))
                .collect();
            self.to_commit.push((id, offsets));
        }
        serde_json::to_value(st).map(Some).map_err(|e| RuntimeError::internal(e.to_string()))
    }

    fn checkpoint_complete(&mut self, id: u64) -> Result<(), RuntimeError> {
        let Some(i) = self.to_commit.iter().rposition(|(c, _)| *c <= id) else { return Ok(()) };
        let (_, offsets) = self.to_commit.drain(..=i).next_back().expect("found above");
        let mut tpl = TopicPartitionList::new();
        for (t, p, o) in &offsets {
            if tpl.add_partition_offset(t, *p, Offset::Offset(*o)).is_err() {
                return Ok(());
            }
        }
        // For lag tools only: a failed commit is logged and the job goes on. The final
        // checkpoint's is waited for: the process ends next.
        let ending = id == crate::exec::FINAL;
        let mode = if ending { CommitMode::Sync } else { CommitMode::Async };
        if tpl.count() > 0
            && let Err(e) = self.consumer.commit(&tpl, mode)
        {
            eprintln!("weir: {}: committing offsets to groupId: {e}", self.who);
        }
        Ok(())
    }

    fn restore(&mut self, state: serde_json::Value) -> Result<(), RuntimeError> {
        let st = parse_state(&self.who, state)?;
        self.take_state(st.partitions);
        Ok(())
    }

    fn rescale(
        &mut self,
        states: Vec<(u32, serde_json::Value)>,
        at: &Rescale,
    ) -> Result<(), RuntimeError> {
        let mut mine = Vec::new();
        for (_, v) in states {
            if v.is_null() {
                continue;
            }
            for p in parse_state(&self.who, v)?.partitions {
                if partition_owner(&p.topic, p.partition, at.parallelism) == at.subtask {
                    mine.push(p);
                }
            }
        }
        self.take_state(mine);
        Ok(())
    }
}
