//! The `kafka_sink`. With `delivery: exactly-once` each subtask writes the records between two
//! barriers in a Kafka transaction of its own, with the transactional id
//! `<prefix>-<run>-<subtask>-<epoch>` (the epoch: one above the barrier it began after). At the
//! barrier the transaction is flushed (pre-committed) and recorded in the checkpoint, with the
//! offsets its records got; when the checkpoint completes it is committed, together with a
//! marker: the epoch, as the offset of the group `<prefix>-<run>-<subtask>`, so that whether it
//! committed can be asked of the cluster afterwards.
//!
//! A restored sink settles what its checkpoint recorded as pre-committed: librdkafka cannot
//! take over another producer's transaction, so the sink fences it (a producer with the same
//! transactional id aborts it if it is still open), asks the marker whether it committed, and
//! if it did not, reads its records back from the log (they are there, aborted, at the offsets
//! the checkpoint recorded) and writes them again in a transaction that commits their markers
//! with them. It then fences every id the attempts after the checkpoint may have left open.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Message, Timestamp};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use weir_crds::kafka::{Delivery, KafkaSinkSpec};

use super::{CALL_TIMEOUT, Logged, client_config, kafka_error};
use crate::connectors::format::Encoder;
use crate::connectors::stats::ConnectorMetrics;
use crate::error::RuntimeError;
use crate::exec::FINAL;
use crate::operator::{Operator, Rescale, bad_state};
use crate::record::Record;

/// The most transactional ids a restored subtask fences beyond those its checkpoint names.
const MAX_FENCED: u64 = 64;

/// One subtask of a `kafka_sink`.
pub struct KafkaSink {
    spec: KafkaSinkSpec,
    who: String,
    subtask: u32,
    /// Its transactional ids' prefix.
    prefix: String,
    /// Producer settings, without a transactional id.
    base: ClientConfig,
    encoder: Encoder,
    key: Option<usize>,
    topic_field: Option<usize>,
    checkpointed: bool,
    /// Checkpoint ids of this run start above this one.
    after_id: u64,
    /// The last barrier seen: the open transaction's epoch is one above.
    last_barrier: u64,
    /// The transaction being written (exactly-once), or the producer (otherwise).
    open: Option<Txn>,
    /// Transactions flushed at a barrier, waiting for their checkpoint to complete.
    pending: Vec<(u64, Txn)>,
    /// A consumer per marker group, for its group metadata.
    groups: HashMap<String, BaseConsumer<Logged>>,
    value: Vec<u8>,
    /// Where its figures go: transactions committed, the time that took, those open.
    metrics: ConnectorMetrics,
    commits: u64,
    commit_time: Duration,
}

/// A producer, with its transaction when there is one.
struct Txn {
    /// The transactional id (empty without transactions).
    id: String,
    epoch: u64,
    producer: BaseProducer<Deliveries>,
}

/// A subtask's state in a checkpoint: its prefix and the transactions it pre-committed.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SinkState {
    prefix: String,
    subtask: u32,
    /// The checkpoint the state belongs to: the transactions of this prefix and subtask from
    /// epoch `checkpoint + 1` on began after it.
    checkpoint: u64,
    pending: Vec<PendingTxn>,
}

/// A pre-committed transaction: where its records are, and its marker.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PendingTxn {
    transactional_id: String,
    epoch: u64,
    /// The group whose offset at `marker` says which epoch committed last.
    group: String,
    marker: (String, i32),
    /// Its records: runs of consecutive offsets, `(topic, partition, first, count)`.
    runs: Vec<(String, i32, i64, i64)>,
}

/// A record read back from the log, to write again.
struct Resent {
    topic: String,
    partition: i32,
    value: Vec<u8>,
    key: Option<Vec<u8>>,
    timestamp: Option<i64>,
}

/// What a producer's delivery reports said: the offsets of its records and the first error.
#[derive(Debug, Default)]
struct DeliveryLog {
    runs: BTreeMap<(String, i32), Vec<(i64, i64)>>,
    error: Option<String>,
}

struct Deliveries {
    who: String,
    log: Mutex<DeliveryLog>,
}

impl ClientContext for Deliveries {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        Logged { who: self.who.clone() }.log(level, fac, message)
    }
    fn error(&self, error: KafkaError, reason: &str) {
        eprintln!("weir: {}: kafka: {error}: {reason}", self.who);
    }
}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(m) => {
                let runs = log.runs.entry((m.topic().to_string(), m.partition())).or_default();
                match runs.last_mut() {
                    Some((first, count)) if *first + *count == m.offset() => *count += 1,
                    _ => runs.push((m.offset(), 1)),
                }
            }
            Err((e, m)) => {
                if log.error.is_none() {
                    log.error = Some(format!(
                        "writing to topic {:?} partition {}: {e}",
                        m.topic(),
                        m.partition()
                    ));
                }
            }
        }
    }
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("who", &self.who)
            .field("open", &self.open.as_ref().map(|t| &t.id))
            .field("pending", &self.pending.iter().map(|(c, t)| (c, &t.id)).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Txn {
    fn error(&self) -> Option<String> {
        self.producer.context().log.lock().unwrap_or_else(|e| e.into_inner()).error.clone()
    }
}

/// The stem of a sink's transactional ids and marker groups: its `transactionalIdPrefix`
/// (`weir-<uid>` when the manifest gives none), then the job's run. Each run numbers its
/// epochs afresh from its checkpoint ids, so ids of two runs must not meet: a new run's first
/// epochs would otherwise be below the markers an earlier run left in the same group.
pub fn transactional_stem(prefix: Option<&str>, job_id: &str, uid: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(
                |c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '-' },
            )
            .collect()
    };
    let prefix = prefix.map_or_else(|| format!("weir-{}", clean(uid)), str::to_string);
    let mut p = format!("{prefix}-{}", clean(job_id));
    p.truncate(MAX_STEM);
    p
}

/// The longest stem: Kafka takes transactional ids of up to 32767 bytes, but they are shown in
/// tools and logs.
const MAX_STEM: usize = 240;

/// How many epochs after its checkpoint a restored state's transactions of another run (or of
/// an attempt whose coordinator restarted) are fenced: the attempts after a checkpoint that
/// completed can have begun a transaction at each barrier they took before they failed.
const FENCED_AFTER: u64 = 8;

impl KafkaSink {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        spec: &KafkaSinkSpec,
        uid: &str,
        job_id: &str,
        subtask: u32,
        input_fields: &[String],
        checkpointed: bool,
        after_id: u64,
    ) -> Result<Self, RuntimeError> {
        let who = format!("operator {uid:?} (kafka_sink) subtask {subtask}");
        let mut base = client_config(
            &spec.bootstrap_servers,
            &format!("weir-{uid}-{subtask}"),
            &spec.properties,
        );
        match spec.delivery {
            Delivery::ExactlyOnce => {
                base.set(
                    "transaction.timeout.ms",
                    spec.transaction_timeout.as_std().as_millis().to_string(),
                );
            }
            Delivery::AtLeastOnce => {
                base.set("enable.idempotence", "true").set("acks", "all");
            }
            Delivery::None => {
                base.set("acks", "1");
            }
        }
        let pos = |name: &Option<String>| {
            name.as_ref().and_then(|n| input_fields.iter().position(|f| f == n))
        };
        let prefix = transactional_stem(spec.transactional_id_prefix.as_deref(), job_id, uid);
        Ok(Self {
            spec: spec.clone(),
            who,
            subtask,
            prefix,
            base,
            encoder: Encoder::new(spec.format, input_fields),
            key: pos(&spec.key),
            topic_field: pos(&spec.topic_field),
            checkpointed,
            after_id,
            last_barrier: after_id,
            open: None,
            pending: Vec::new(),
            groups: HashMap::new(),
            value: Vec::new(),
            metrics: ConnectorMetrics::default(),
            commits: 0,
            commit_time: Duration::ZERO,
        })
    }

    /// Reports its figures to `metrics`.
    pub fn with_metrics(mut self, metrics: ConnectorMetrics) -> Self {
        self.metrics = metrics;
        self.report();
        self
    }

    fn report(&self) {
        let transactional = self.spec.delivery == Delivery::ExactlyOnce;
        let open =
            if transactional { self.pending.len() + usize::from(self.open.is_some()) } else { 0 };
        let (commits, micros) = (self.commits, self.commit_time.as_micros() as u64);
        self.metrics.update(|s| {
            s.transactional = transactional;
            s.commits = commits;
            s.commit_micros = micros;
            s.open_transactions = u32::try_from(open).unwrap_or(u32::MAX);
        });
    }

    fn producer(
        &self,
        transactional_id: Option<&str>,
    ) -> Result<BaseProducer<Deliveries>, RuntimeError> {
        let mut c = self.base.clone();
        if let Some(id) = transactional_id {
            c.set("transactional.id", id);
        }
        let ctx = Deliveries { who: self.who.clone(), log: Mutex::default() };
        c.create_with_context(ctx)
            .map_err(|e| RuntimeError::user(format!("{}: the producer's settings: {e}", self.who)))
    }

    /// A producer with transactional id `id`, its transactions initialised: any transaction an
    /// earlier producer of the id left open is aborted (fenced).
    fn transactional(&self, id: &str) -> Result<BaseProducer<Deliveries>, RuntimeError> {
        let p = self.producer(Some(id))?;
        p.init_transactions(CALL_TIMEOUT)
            .map_err(|e| kafka_error(&self.who, &format!("starting transactions of {id}"), e))?;
        Ok(p)
    }

    /// The producer to write with now: the open transaction's, begun on the first record
    /// after a barrier.
    fn writer(&mut self) -> Result<&BaseProducer<Deliveries>, RuntimeError> {
        if self.open.is_none() {
            let epoch = self.last_barrier + 1;
            let txn = match self.spec.delivery {
                Delivery::ExactlyOnce => {
                    let id = format!("{}-{}-{epoch}", self.prefix, self.subtask);
                    let producer = self.transactional(&id)?;
                    producer.begin_transaction().map_err(|e| {
                        kafka_error(&self.who, &format!("beginning transaction {id}"), e)
                    })?;
                    Txn { id, epoch, producer }
                }
                _ => Txn { id: String::new(), epoch, producer: self.producer(None)? },
            };
            self.open = Some(txn);
            self.report();
        }
        Ok(&self.open.as_ref().expect("opened above").producer)
    }

    /// The group of the marker of subtask `subtask`'s transactions of prefix `prefix`.
    fn marker_group(prefix: &str, subtask: u32) -> String {
        format!("{prefix}-{subtask}")
    }

    fn group_consumer(&mut self, group: &str) -> Result<&BaseConsumer<Logged>, RuntimeError> {
        if !self.groups.contains_key(group) {
            let mut c = client_config(
                &self.spec.bootstrap_servers,
                &format!("{}-marker", self.prefix),
                &self.spec.properties,
            );
            c.set("group.id", group).set("enable.auto.commit", "false");
            let consumer =
                c.create_with_context(Logged { who: self.who.clone() }).map_err(|e| {
                    RuntimeError::user(format!("{}: the consumer's settings: {e}", self.who))
                })?;
            self.groups.insert(group.to_string(), consumer);
        }
        Ok(&self.groups[group])
    }

    fn group_metadata(&mut self, group: &str) -> Result<ConsumerGroupMetadata, RuntimeError> {
        let who = self.who.clone();
        self.group_consumer(group)?
            .group_metadata()
            .ok_or_else(|| RuntimeError::internal(format!("{who}: no metadata of group {group:?}")))
    }

    /// Adds markers (`group` at `tp` is `epoch`) to `producer`'s transaction.
    fn add_markers(
        &mut self,
        producer: &BaseProducer<Deliveries>,
        markers: &BTreeMap<String, BTreeMap<(String, i32), u64>>,
    ) -> Result<(), RuntimeError> {
        for (group, at) in markers {
            let mut tpl = TopicPartitionList::new();
            for ((t, p), epoch) in at {
                tpl.add_partition_offset(t, *p, Offset::Offset(*epoch as i64))
                    .map_err(|e| kafka_error(&self.who, "a marker", e))?;
            }
            let meta = self.group_metadata(group)?;
            producer.send_offsets_to_transaction(&tpl, &meta, CALL_TIMEOUT).map_err(|e| {
                kafka_error(&self.who, &format!("the marker of group {group:?}"), e)
            })?;
        }
        Ok(())
    }

    /// Commits a pre-committed transaction, with its marker.
    fn commit(&mut self, txn: Txn) -> Result<(), RuntimeError> {
        if self.spec.delivery != Delivery::ExactlyOnce {
            return Ok(());
        }
        let t0 = Instant::now();
        if let Some(marker) = first_partition(&txn) {
            let group = Self::marker_group(&self.prefix, self.subtask);
            let markers = BTreeMap::from([(group, BTreeMap::from([(marker, txn.epoch)]))]);
            self.add_markers(&txn.producer, &markers)?;
        }
        txn.producer.commit_transaction(CALL_TIMEOUT).map_err(|e| {
            kafka_error(&self.who, &format!("committing transaction {}", txn.id), e)
        })?;
        self.commits += 1;
        self.commit_time += t0.elapsed();
        Ok(())
    }

    /// Flushes the open producer: every record written is acknowledged (or the error is).
    fn flush(&self, txn: &Txn) -> Result<(), RuntimeError> {
        txn.producer
            .flush(self.spec.transaction_timeout.as_std().min(Duration::from_secs(120)))
            .map_err(|e| kafka_error(&self.who, "flushing", e))?;
        match txn.error() {
            Some(e) => Err(RuntimeError::external(format!("{}: {e}", self.who)).retryable()),
            None => Ok(()),
        }
    }

    /// Settles the restored states: each pre-committed transaction committed (again, from the
    /// log, if it did not), and every id the attempts after the checkpoint used fenced.
    fn settle(&mut self, states: Vec<SinkState>, restored: u64) -> Result<(), RuntimeError> {
        let t0 = Instant::now();
        let mut again: Vec<Resent> = Vec::new();
        let mut markers: BTreeMap<String, BTreeMap<(String, i32), u64>> = BTreeMap::new();
        let mut committed = 0;
        for st in &states {
            for p in &st.pending {
                // Nothing can commit it from here on; then the marker says whether it did.
                drop(self.transactional(&p.transactional_id)?);
                let done = self.marker_epoch(&p.group, &p.marker)?.is_some_and(|e| e >= p.epoch);
                if done {
                    committed += 1;
                    continue;
                }
                again.extend(self.read_back(p)?);
                markers.entry(p.group.clone()).or_default().insert(p.marker.clone(), p.epoch);
            }
        }
        if !markers.is_empty() {
            let id = format!("{}-{}-recovery", self.prefix, self.subtask);
            let producer = self.transactional(&id)?;
            producer
                .begin_transaction()
                .map_err(|e| kafka_error(&self.who, "beginning recovery", e))?;
            let n = again.len();
            for x in &again {
                let mut r = BaseRecord::to(&x.topic).partition(x.partition).payload(&x.value[..]);
                if let Some(k) = &x.key {
                    r = r.key(&k[..]);
                }
                if let Some(ts) = x.timestamp {
                    r = r.timestamp(ts);
                }
                send(&producer, r).map_err(|e| kafka_error(&self.who, "writing again", e))?;
            }
            producer
                .flush(CALL_TIMEOUT)
                .map_err(|e| kafka_error(&self.who, "flushing recovery", e))?;
            if let Some(e) =
                producer.context().log.lock().unwrap_or_else(|e| e.into_inner()).error.clone()
            {
                return Err(
                    RuntimeError::external(format!("{}: recovery: {e}", self.who)).retryable()
                );
            }
            self.add_markers(&producer, &markers)?;
            producer
                .commit_transaction(CALL_TIMEOUT)
                .map_err(|e| kafka_error(&self.who, "committing recovery", e))?;
            eprintln!(
                "weir: {}: wrote again the {n} records of {} transactions its checkpoint recorded as pre-committed that had not committed",
                self.who,
                markers.values().map(BTreeMap::len).sum::<usize>()
            );
        }
        // Every id the attempts after the checkpoint may have used: of each restored subtask's
        // stem, and this subtask's own. In this run they go up to one above the highest
        // checkpoint the coordinator triggered; in another run's (or when the coordinator
        // restarted) to a fixed number of epochs after the checkpoint.
        let mut names: BTreeMap<(String, u32), u64> = BTreeMap::new();
        for st in &states {
            let c = names.entry((st.prefix.clone(), st.subtask)).or_insert(st.checkpoint);
            *c = (*c).min(st.checkpoint);
        }
        names.entry((self.prefix.clone(), self.subtask)).or_insert(restored);
        let mut fenced = 0;
        for ((stem, s), c) in &names {
            // (A final checkpoint's id is the highest there is: nothing came after it.)
            let mut last = c.saturating_add(FENCED_AFTER);
            if *stem == self.prefix {
                last = last.max(self.after_id.saturating_add(1));
            }
            let first = c.saturating_add(1).max(last.saturating_sub(MAX_FENCED - 1));
            for e in first..=last {
                drop(self.transactional(&format!("{stem}-{s}-{e}"))?);
                fenced += 1;
            }
        }
        if committed + fenced > 0 || !markers.is_empty() {
            eprintln!(
                "weir: {}: restored: {committed} pre-committed transactions had committed, {fenced} transactional ids fenced, in {:?}",
                self.who,
                t0.elapsed()
            );
        }
        Ok(())
    }

    /// The epoch group `group` last committed at `marker`.
    fn marker_epoch(
        &mut self,
        group: &str,
        marker: &(String, i32),
    ) -> Result<Option<u64>, RuntimeError> {
        let who = self.who.clone();
        let consumer = self.group_consumer(group)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&marker.0, marker.1);
        let got = consumer
            .committed_offsets(tpl, CALL_TIMEOUT)
            .map_err(|e| kafka_error(&who, &format!("the marker of group {group:?}"), e))?;
        Ok(match got.find_partition(&marker.0, marker.1).map(|e| e.offset()) {
            Some(Offset::Offset(o)) if o >= 0 => Some(o as u64),
            _ => None,
        })
    }

    /// The records of a transaction that did not commit, read back from the log at the
    /// offsets its delivery reports gave.
    fn read_back(&self, p: &PendingTxn) -> Result<Vec<Resent>, RuntimeError> {
        let mut c = client_config(
            &self.spec.bootstrap_servers,
            &format!("{}-recovery", self.prefix),
            &self.spec.properties,
        );
        c.set("group.id", format!("{}-recovery", self.prefix))
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_uncommitted")
            .set("auto.offset.reset", "error");
        let consumer: BaseConsumer<Logged> =
            c.create_with_context(Logged { who: self.who.clone() }).map_err(|e| {
                RuntimeError::user(format!("{}: the consumer's settings: {e}", self.who))
            })?;
        // Offsets wanted, per partition.
        let mut wanted: BTreeMap<(String, i32), Vec<(i64, i64)>> = BTreeMap::new();
        for (t, part, first, count) in &p.runs {
            wanted.entry((t.clone(), *part)).or_default().push((*first, *count));
        }
        let mut tpl = TopicPartitionList::new();
        for ((t, part), runs) in &wanted {
            let first = runs.iter().map(|r| r.0).min().unwrap_or(0);
            tpl.add_partition_offset(t, *part, Offset::Offset(first))
                .map_err(|e| kafka_error(&self.who, "reading back", e))?;
        }
        consumer.assign(&tpl).map_err(|e| kafka_error(&self.who, "reading back", e))?;
        let total: i64 = p.runs.iter().map(|r| r.3).sum();
        let last: BTreeMap<(String, i32), i64> = wanted
            .iter()
            .map(|(k, runs)| (k.clone(), runs.iter().map(|r| r.0 + r.1).max().unwrap_or(0)))
            .collect();
        let mut out = Vec::with_capacity(total as usize);
        let deadline = Instant::now() + CALL_TIMEOUT * 2;
        let mut finished = 0;
        while finished < wanted.len() {
            if Instant::now() > deadline {
                return Err(RuntimeError::external(format!(
                    "{}: reading back the records of transaction {} (epoch {}): only {} of {total} came within {:?}; they may have been deleted (retention or compaction)",
                    self.who, p.transactional_id, p.epoch, out.len(), CALL_TIMEOUT * 2
                ))
                .retryable());
            }
            let Some(m) = consumer.poll(Duration::from_millis(100)) else { continue };
            let m = m.map_err(|e| kafka_error(&self.who, "reading back", e))?;
            let k = (m.topic().to_string(), m.partition());
            let Some(runs) = wanted.get(&k) else { continue };
            let o = m.offset();
            if runs.iter().any(|(f, n)| o >= *f && o < f + n) {
                let ts = match m.timestamp() {
                    Timestamp::CreateTime(t) => Some(t),
                    _ => None,
                };
                out.push(Resent {
                    topic: k.0.clone(),
                    partition: k.1,
                    value: m.payload().unwrap_or_default().to_vec(),
                    key: m.key().map(<[u8]>::to_vec),
                    timestamp: ts,
                });
            }
            if o + 1 >= last[&k] {
                finished += 1;
                let mut done = TopicPartitionList::new();
                done.add_partition(&k.0, k.1);
                let _ = consumer.incremental_unassign(&done);
            }
        }
        if out.len() as i64 != total {
            return Err(RuntimeError::damaged(format!(
                "{}: transaction {} recorded {total} records, the log holds {} of them",
                self.who,
                p.transactional_id,
                out.len()
            )));
        }
        Ok(out)
    }

    fn state(&self, checkpoint: u64) -> SinkState {
        let group = Self::marker_group(&self.prefix, self.subtask);
        SinkState {
            prefix: self.prefix.clone(),
            subtask: self.subtask,
            checkpoint,
            pending: self
                .pending
                .iter()
                .filter_map(|(_, t)| {
                    let log = t.producer.context().log.lock().unwrap_or_else(|e| e.into_inner());
                    let runs: Vec<(String, i32, i64, i64)> = log
                        .runs
                        .iter()
                        .flat_map(|((topic, p), rs)| {
                            rs.iter().map(move |(f, n)| (topic.clone(), *p, *f, *n))
                        })
                        .collect();
                    let marker = runs.first().map(|r| (r.0.clone(), r.1))?;
                    Some(PendingTxn {
                        transactional_id: t.id.clone(),
                        epoch: t.epoch,
                        group: group.clone(),
                        marker,
                        runs,
                    })
                })
                .collect(),
        }
    }
}

/// The first partition a transaction wrote to: its marker's.
fn first_partition(txn: &Txn) -> Option<(String, i32)> {
    let log = txn.producer.context().log.lock().unwrap_or_else(|e| e.into_inner());
    log.runs.iter().find(|(_, r)| !r.is_empty()).map(|(k, _)| k.clone())
}

/// Sends `r`, waiting while the producer's queue is full.
fn send<'a>(
    producer: &BaseProducer<Deliveries>,
    mut r: BaseRecord<'a, [u8], [u8]>,
) -> Result<(), KafkaError> {
    loop {
        match producer.send(r) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                producer.poll(Duration::from_millis(50));
                r = back;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

fn parse_state(who: &str, v: serde_json::Value) -> Result<SinkState, RuntimeError> {
    let st: SinkState = serde_json::from_value(v).map_err(|e| bad_state(who, e))?;
    let bad = |what: String| {
        RuntimeError::damaged(format!(
            "{who}: the restored state {what}: the checkpoint is damaged or forged"
        ))
    };
    if st.prefix.is_empty()
        || st.prefix.len() > MAX_STEM
        || !st.prefix.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(bad(format!("has a transactional id stem that is not one, {:?}", st.prefix)));
    }
    for p in &st.pending {
        if !p.transactional_id.starts_with(&format!("{}-", st.prefix))
            || p.group != KafkaSink::marker_group(&st.prefix, st.subtask)
        {
            return Err(bad(format!("names transaction {:?} of another sink", p.transactional_id)));
        }
        if p.runs.is_empty() || p.runs.len() > 1_000_000 {
            return Err(bad(format!(
                "gives transaction {:?} {} runs of records",
                p.transactional_id,
                p.runs.len()
            )));
        }
        for (t, part, first, count) in &p.runs {
            if weir_crds::kafka::check_topic("topic", t).is_err()
                || *part < 0
                || *first < 0
                || *count <= 0
            {
                return Err(bad(format!(
                    "gives transaction {:?} records at {t:?}/{part} {first}+{count}",
                    p.transactional_id
                )));
            }
        }
    }
    Ok(st)
}

impl Operator for KafkaSink {
    fn process(
        &mut self,
        _input: usize,
        batch: Vec<Record>,
        _out: &mut Vec<Record>,
    ) -> Result<(), RuntimeError> {
        self.writer()?;
        let mut value = std::mem::take(&mut self.value);
        let txn = self.open.as_ref().expect("writer opened it");
        let mut key = String::new();
        for r in &batch {
            value.clear();
            self.encoder.write(std::slice::from_ref(r), &mut value);
            value.pop(); // the line's end
            let topic: &str = match (self.topic_field, &self.spec.topic) {
                (Some(i), _) => match r.get(i) {
                    Some(crate::record::Value::Str(s)) => s,
                    other => {
                        return Err(RuntimeError::user(format!(
                            "{}: topicField holds {other:?}, not a topic name",
                            self.who
                        )));
                    }
                },
                (None, Some(t)) => t,
                (None, None) => {
                    return Err(RuntimeError::internal(format!(
                        "{}: its plan names no topic and no topicField",
                        self.who
                    )));
                }
            };
            let mut rec = BaseRecord::to(topic).payload(&value[..]);
            if let Some(i) = self.key {
                use std::fmt::Write;
                key.clear();
                if let Some(v) = r.get(i) {
                    let _ = write!(key, "{v}");
                }
                rec = rec.key(key.as_bytes());
            }
            send(&txn.producer, rec)
                .map_err(|e| kafka_error(&self.who, &format!("writing to topic {topic:?}"), e))?;
        }
        self.value = value;
        txn.producer.poll(Duration::ZERO);
        if let Some(e) = txn.error() {
            return Err(RuntimeError::external(format!("{}: {e}", self.who)).retryable());
        }
        Ok(())
    }

    fn finish(&mut self, _out: &mut Vec<Record>) -> Result<(), RuntimeError> {
        if self.checkpointed {
            // The final checkpoint flushes and commits.
            return Ok(());
        }
        if let Some(txn) = self.open.take() {
            self.flush(&txn)?;
            self.commit(txn)?;
            self.report();
        }
        Ok(())
    }

    fn restore(&mut self, state: Option<serde_json::Value>) -> Result<(), RuntimeError> {
        if self.spec.delivery != Delivery::ExactlyOnce {
            return Ok(());
        }
        match state {
            Some(v) => {
                let st = parse_state(&self.who, v)?;
                let restored = st.checkpoint;
                self.settle(vec![st], restored)
            }
            None => self.settle(Vec::new(), 0),
        }
    }

    fn rescale(
        &mut self,
        states: Vec<(u32, serde_json::Value)>,
        at: &Rescale,
    ) -> Result<(), RuntimeError> {
        if self.spec.delivery != Delivery::ExactlyOnce {
            return Ok(());
        }
        // Each old subtask's transactions are settled by exactly one new subtask.
        let mut mine = Vec::new();
        let mut restored = 0;
        for (old, v) in states {
            if v.is_null() {
                continue;
            }
            let st = parse_state(&self.who, v)?;
            restored = restored.max(st.checkpoint);
            if old % at.parallelism == at.subtask {
                mine.push(st);
            }
        }
        self.settle(mine, restored)
    }

    fn snapshot(&mut self, id: u64) -> Result<Option<serde_json::Value>, RuntimeError> {
        if let Some(txn) = self.open.take() {
            if self.spec.delivery != Delivery::None {
                self.flush(&txn)?;
            }
            match self.spec.delivery {
                Delivery::ExactlyOnce => self.pending.push((id, txn)),
                // The same producer goes on.
                _ => self.open = Some(txn),
            }
        }
        if id != FINAL {
            self.last_barrier = id;
        }
        self.report();
        if self.spec.delivery != Delivery::ExactlyOnce {
            return Ok(None);
        }
        serde_json::to_value(self.state(id))
            .map(Some)
            .map_err(|e| RuntimeError::internal(e.to_string()))
    }

    fn checkpoint_complete(&mut self, id: u64) -> Result<(), RuntimeError> {
        let (done, later): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.pending).into_iter().partition(|(c, _)| *c <= id);
        self.pending = later;
        for (_, txn) in done {
            self.commit(txn)?;
        }
        self.report();
        Ok(())
    }

    fn tick(&mut self, _out: &mut Vec<Record>) -> Result<(), RuntimeError> {
        // Delivery reports between batches.
        if let Some(txn) = &self.open {
            txn.producer.poll(Duration::ZERO);
        }
        Ok(())
    }
}
