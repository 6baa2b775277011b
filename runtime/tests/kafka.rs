//! The Kafka connectors against the test environment's real three-broker Kafka cluster
//! (`tests/env/kafka-up.sh`; `make e2e` runs these with its `env.sh` sourced): a job that
//! counts by key from a `kafka_source` into an exactly-once `kafka_sink` while its worker
//! processes are SIGKILLed and a broker is stopped gives every update of every key exactly
//! once to a `read_committed` consumer; `at-least-once` loses nothing; `startFrom` and
//! `onError` do what they say; partitions added while the job runs are read from their start.

mod common;
mod process;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use process::Proc;
use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use weir_runtime::connectors::SplitMix64;

/// The test that stops a broker holds this for writing; the others, which create topics with
/// three replicas, for reading.
static CLUSTER: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    CLUSTER.read().unwrap_or_else(|e| e.into_inner())
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: these tests run against the test environment's Kafka cluster; run tests/env/kafka-up.sh DIR and source DIR/kafka.env (make e2e does)"
        )
    })
}

fn bootstrap() -> String {
    env("WEIR_TEST_KAFKA")
}

/// A name no other test or run uses.
fn unique(test: &str) -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{test}-{nanos}-{}", std::process::id())
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new().set("bootstrap.servers", bootstrap()).create().unwrap()
}

fn create_topic(name: &str, partitions: i32) {
    let t = NewTopic::new(name, partitions, TopicReplication::Fixed(3));
    let r = block_on(admin().create_topics([&t], &AdminOptions::new())).unwrap();
    for x in r {
        x.unwrap_or_else(|e| panic!("creating topic {name}: {e:?}"));
    }
}

fn add_partitions(name: &str, total: usize) {
    let t = NewPartitions::new(name, total);
    let r = block_on(admin().create_partitions([&t], &AdminOptions::new())).unwrap();
    for x in r {
        x.unwrap_or_else(|e| panic!("adding partitions to {name}: {e:?}"));
    }
}

fn producer() -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .create()
        .unwrap()
}

/// Writes `(key, value)` records (value bytes as given) to `topic` (to `partition` if given)
/// and waits until all are acknowledged.
fn produce<'a>(
    topic: &str,
    partition: Option<i32>,
    records: impl IntoIterator<Item = (String, Vec<u8>)> + 'a,
) {
    let p = producer();
    for (k, v) in records {
        let mut r = BaseRecord::to(topic).key(&k).payload(&v);
        if let Some(part) = partition {
            r = r.partition(part);
        }
        loop {
            match p.send(r) {
                Ok(()) => break,
                Err((_, back)) => {
                    p.poll(Duration::from_millis(20));
                    r = back;
                }
            }
        }
    }
    p.flush(Duration::from_secs(60)).unwrap();
}

/// `n` JSON records `{"key": "k<i>", "value": 1}` of `keys` keys drawn from a seed, written to
/// `topic`: the count of each key.
fn produce_keys(topic: &str, n: u64, keys: u64, seed: u64) -> BTreeMap<String, u64> {
    let mut rng = SplitMix64::new(seed);
    let mut counts = BTreeMap::new();
    let records: Vec<(String, Vec<u8>)> = (0..n)
        .map(|_| {
            let k = format!("k{}", rng.next_u64() % keys);
            *counts.entry(k.clone()).or_insert(0) += 1;
            let v = format!("{{\"key\": \"{k}\", \"value\": 1}}").into_bytes();
            (k, v)
        })
        .collect();
    produce(topic, None, records);
    counts
}

/// Every value of `topic` a `read_committed` consumer finds, read to the partitions' ends as
/// they are now (or until nothing more came for `quiet`); at least `expected` are waited for.
fn read_topic(topic: &str, expected: usize, quiet: Duration) -> Vec<String> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", unique("reader"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(30)).unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for t in md.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning).unwrap();
            ends.insert(
                p.id(),
                c.fetch_watermarks(topic, p.id(), Duration::from_secs(30)).unwrap().1,
            );
        }
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let mut last = Instant::now();
    let at_ends = |c: &BaseConsumer| {
        let pos = c.position().unwrap();
        ends.iter().all(|(p, end)| {
            *end == 0
                || matches!(pos.find_partition(topic, *p).map(|e| e.offset()), Some(Offset::Offset(o)) if o >= *end)
        })
    };
    while last.elapsed() < quiet {
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                out.push(String::from_utf8(m.payload().unwrap_or_default().to_vec()).unwrap());
                last = Instant::now();
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {
                if out.len() >= expected && at_ends(&c) {
                    break;
                }
            }
        }
    }
    out
}

/// Checks a count's output: every update of every key exactly once (1..n for a key of n
/// records), and nothing else.
fn check_updates(values: &[String], counts: &BTreeMap<String, u64>) {
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for v in values {
        let j: serde_json::Value = serde_json::from_str(v).unwrap_or_else(|e| panic!("{v}: {e}"));
        let k = j["key"].as_str().unwrap_or_else(|| panic!("{v}")).to_string();
        seen.entry(k).or_default().push(j["count"].as_u64().unwrap_or_else(|| panic!("{v}")));
    }
    let mut wrong = Vec::new();
    for (k, n) in counts {
        let mut got = seen.remove(k).unwrap_or_default();
        got.sort_unstable();
        if got != (1..=*n).collect::<Vec<u64>>() {
            let dups = got.windows(2).filter(|w| w[0] == w[1]).count();
            wrong.push(format!(
                "{k}: {} updates for {n} records ({dups} twice), last {:?}",
                got.len(),
                got.last()
            ));
        }
    }
    assert!(
        seen.is_empty(),
        "keys that were never written: {:?}",
        seen.keys().take(5).collect::<Vec<_>>()
    );
    assert!(
        wrong.is_empty(),
        "{} of {} keys wrong: {:?}",
        wrong.len(),
        counts.len(),
        &wrong[..wrong.len().min(10)]
    );
}

fn write_manifest(
    dir: &Path,
    name: &str,
    source: &str,
    sink: &str,
    extra: &str,
) -> std::path::PathBuf {
    let file = dir.join("job.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: weir.dev/v1alpha1
kind: StreamJob
metadata: {{name: {name}}}
spec:
  parallelism: 2
  checkpointing: {{interval: 1s, timeout: 30s, storage: {chk}, retained: 2}}
  restartStrategy: {{type: fixed-delay, delay: 200ms, attempts: 100}}
{extra}  pipeline:
    operators:
      - {source}
      - {{uid: counts, type: count, inputs: [orders], key: key}}
      - {sink}
",
            chk = dir.join("checkpoints").display(),
        ),
    )
    .unwrap();
    file
}

fn start(file: &Path, dir: &Path, extra: &[&str]) -> Proc {
    let state = dir.join("state");
    let mut args = vec!["run", file.to_str().unwrap(), "--api-addr", "127.0.0.1:0"];
    args.extend(["--state-dir", state.to_str().unwrap()]);
    args.extend(extra);
    process::start(&args)
}

fn kafka_sh(args: &[&str]) {
    let sh = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/env/kafka.sh");
    let st = Command::new("bash").arg(sh).args(args).status().unwrap();
    assert!(st.success(), "kafka.sh {args:?}");
}

/// A count by key from 6 partitions into an exactly-once sink (or `delivery`), with workers
/// killed at random moments and, with `broker`, one broker stopped for 20 s in the middle.
fn count_with_kills(delivery: &str, records: u64, kills_wanted: u32, broker: bool, seed: u64) {
    let _alone = broker.then(|| CLUSTER.write().unwrap_or_else(|e| e.into_inner()));
    let _shared = (!broker).then(shared);
    let tmp = tempfile::tempdir().unwrap();
    let input = unique("orders");
    let output = unique("counts");
    create_topic(&input, 6);
    create_topic(&output, 3);
    let counts = produce_keys(&input, records, 5_000, seed);
    let source = format!(
        "{{uid: orders, type: kafka_source, topics: [{input}], bootstrapServers: \"{b}\", stopAt: latest, format: json, fields: {{key: string, value: int}}, groupId: {input}-job}}",
        b = bootstrap()
    );
    let sink = format!(
        "{{uid: out, type: kafka_sink, inputs: [counts], topic: {output}, key: key, bootstrapServers: \"{b}\", delivery: {delivery}, transactionTimeout: 60s}}",
        b = bootstrap()
    );
    let file = write_manifest(tmp.path(), "kafka-count", &source, &sink, "");
    let mut job = start(&file, tmp.path(), &["--processes"]);
    let mut rng = SplitMix64::new(seed);
    let mut kills = 0;
    let t0 = Instant::now();
    let mut broker_stopped: Option<Instant> = None;
    let mut broker_done = !broker;
    while kills < kills_wanted || !broker_done {
        if !process::wait_running(&mut job, u64::from(kills)) {
            break;
        }
        // A random moment: before, during or after a checkpoint (every second).
        std::thread::sleep(Duration::from_millis(200 + rng.next_u64() % 1500));
        if broker && broker_stopped.is_none() && kills >= kills_wanted / 2 {
            kafka_sh(&["stop-broker", "2", "--kill"]);
            broker_stopped = Some(Instant::now());
        }
        if let Some(at) = broker_stopped
            && !broker_done
            && at.elapsed() >= Duration::from_secs(20)
        {
            kafka_sh(&["start-broker", "2"]);
            broker_done = true;
        }
        let workers = common::children_of(job.child.id());
        if workers.is_empty() || job.child.try_wait().unwrap().is_some() {
            break;
        }
        if kills < kills_wanted {
            let victim = workers[(rng.next_u64() % workers.len() as u64) as usize];
            let _ = Command::new("kill").args(["-KILL", &victim.to_string()]).status();
            kills += 1;
        }
    }
    if broker_stopped.is_some() && !broker_done {
        kafka_sh(&["start-broker", "2"]);
    }
    let (code, err) = job.finish(Duration::from_secs(600));
    assert_eq!(code, Some(0), "{err}");
    assert!(
        kills >= kills_wanted,
        "the job ended after {kills} kills in {:?}; make the input longer: {err}",
        t0.elapsed()
    );
    let values = read_topic(&output, records as usize, Duration::from_secs(20));
    match delivery {
        "exactly-once" => check_updates(&values, &counts),
        _ => {
            // Nothing lost: every update is there at least once.
            let mut seen: BTreeMap<String, std::collections::BTreeSet<u64>> = BTreeMap::new();
            for v in &values {
                let j: serde_json::Value = serde_json::from_str(v).unwrap();
                seen.entry(j["key"].as_str().unwrap().into())
                    .or_default()
                    .insert(j["count"].as_u64().unwrap());
            }
            for (k, n) in &counts {
                let got = seen.get(k).map_or(0, |s| s.len() as u64);
                assert_eq!(got, *n, "key {k}: {got} distinct updates of {n}");
            }
        }
    }
}

#[test]
fn a_count_by_key_through_kafka_is_exact_with_killed_workers_and_a_stopped_broker() {
    count_with_kills("exactly-once", 1_000_000, 10, true, 0x6b61);
}

#[test]
fn a_count_by_key_through_kafka_at_least_once_loses_nothing_with_killed_workers() {
    count_with_kills("at-least-once", 1_000_000, 6, false, 0x616c);
}

#[test]
fn a_bounded_source_ends_where_the_topic_ended_and_every_update_is_committed_once() {
    count_with_kills("exactly-once", 50_000, 0, false, 0x6264);
}

fn sink_spec(topic: &str, prefix: &str) -> weir_crds::kafka::KafkaSinkSpec {
    serde_json::from_value(serde_json::json!({
        "topic": topic,
        "key": "key",
        "bootstrapServers": bootstrap(),
        "transactionalIdPrefix": prefix,
        "transactionTimeout": "60s",
    }))
    .unwrap()
}

/// Records `{key: k<i % 7>, count: i}` for `range`.
fn numbered(range: std::ops::Range<i64>) -> Vec<weir_runtime::record::Record> {
    use weir_runtime::record::Value;
    range.map(|i| vec![Value::str(&format!("k{}", i % 7)), Value::Int(i)]).collect()
}

/// The `count` of every value `topic` holds, committed, sorted.
fn committed_numbers(topic: &str, expected: usize) -> Vec<i64> {
    let mut n: Vec<i64> = read_topic(topic, expected, Duration::from_secs(20))
        .iter()
        .map(|v| serde_json::from_str::<serde_json::Value>(v).unwrap()["count"].as_i64().unwrap())
        .collect();
    n.sort_unstable();
    n
}

/// The sink's recovery, driven step by step as a crash would leave it: a sink that
/// pre-committed a transaction at a barrier and died before the checkpoint's completion
/// reached it (and with a later transaction open) is restored; the restored sink writes the
/// pre-committed records again, once, and fences the open transaction; restored again from a
/// checkpoint whose transactions committed, it writes nothing twice.
#[test]
fn a_restored_sink_commits_what_its_checkpoint_pre_committed_exactly_once() {
    let _cluster = shared();
    use weir_runtime::connectors::KafkaSink;
    use weir_runtime::operator::Operator;
    let topic = unique("sink-recovery");
    create_topic(&topic, 3);
    let prefix = unique("weir-test-txn");
    let spec = sink_spec(&topic, &prefix);
    let fields = vec!["key".to_string(), "count".to_string()];
    let mut out = Vec::new();

    // Attempt 1: records 0..1000 before barrier 1, 1000..1500 after it; then it dies (nothing
    // of it is closed or dropped: its transactions stay as they are).
    let mut a = KafkaSink::new(&spec, "out", "job", 0, &fields, true, 0).unwrap();
    a.restore(None).unwrap();
    a.process(0, numbered(0..1000), &mut out).unwrap();
    let checkpoint1 = a.snapshot(1).unwrap().unwrap();
    a.process(0, numbered(1000..1500), &mut out).unwrap();
    std::mem::forget(a);

    // Attempt 2, restored from checkpoint 1 (the coordinator triggered 1 before).
    let mut b = KafkaSink::new(&spec, "out", "job", 0, &fields, true, 1).unwrap();
    b.restore(Some(checkpoint1.clone())).unwrap();
    b.process(0, numbered(1500..2000), &mut out).unwrap();
    let checkpoint2 = b.snapshot(2).unwrap().unwrap();
    b.checkpoint_complete(2).unwrap();
    let want: Vec<i64> = (0..1000).chain(1500..2000).collect();
    assert_eq!(committed_numbers(&topic, want.len()), want);

    // Attempt 3 restores checkpoint 2, whose transaction committed: nothing is written again.
    drop(b);
    let mut c = KafkaSink::new(&spec, "out", "job", 0, &fields, true, 2).unwrap();
    c.restore(Some(checkpoint2)).unwrap();
    c.process(0, numbered(2000..2100), &mut out).unwrap();
    c.snapshot(3).unwrap();
    c.checkpoint_complete(3).unwrap();
    let want: Vec<i64> = (0..1000).chain(1500..2100).collect();
    assert_eq!(committed_numbers(&topic, want.len()), want);
}

/// A checkpoint's sink state is read back from storage: one that names another sink's
/// transactions or impossible offsets is refused as damaged, before anything is written.
#[test]
fn a_forged_sink_state_is_refused() {
    use weir_runtime::connectors::KafkaSink;
    use weir_runtime::operator::Operator;
    let topic = unique("sink-forged");
    let spec = sink_spec(&topic, "weir-forged");
    let fields = vec!["key".to_string(), "count".to_string()];
    let pending = |id: &str, group: &str, runs: serde_json::Value| {
        serde_json::json!({"prefix": "weir-forged-job", "subtask": 0, "checkpoint": 1, "pending": [
            {"transactionalId": id, "epoch": 1, "group": group, "marker": [topic, 0], "runs": runs}
        ]})
    };
    for (state, why) in [
        (
            pending("someone-else-0-1", "weir-forged-job-0", serde_json::json!([[topic, 0, 0, 5]])),
            "another sink",
        ),
        (
            pending("weir-forged-job-0-1", "victims-group", serde_json::json!([[topic, 0, 0, 5]])),
            "another sink",
        ),
        (
            pending(
                "weir-forged-job-0-1",
                "weir-forged-job-0",
                serde_json::json!([[topic, -1, 0, 5]]),
            ),
            "records at",
        ),
        (
            pending(
                "weir-forged-job-0-1",
                "weir-forged-job-0",
                serde_json::json!([["../x", 0, 0, 5]]),
            ),
            "records at",
        ),
        (
            pending(
                "weir-forged-job-0-1",
                "weir-forged-job-0",
                serde_json::json!([[topic, 0, 0, 0]]),
            ),
            "records at",
        ),
        (
            serde_json::json!({"prefix": "bad prefix!", "subtask": 0, "checkpoint": 1, "pending": []}),
            "prefix",
        ),
    ] {
        let mut s = KafkaSink::new(&spec, "out", "job", 0, &fields, true, 1).unwrap();
        let e = s.restore(Some(state.clone())).unwrap_err();
        assert!(e.message.contains(why) && e.message.contains("damaged or forged"), "{state}: {e}");
    }
}

/// A job of one `kafka_source` (its other keys `source`) into a JSON `file_sink` under `dir`.
fn source_job(dir: &Path, source: &str) -> std::path::PathBuf {
    let file = dir.join("job.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: weir.dev/v1alpha1
kind: StreamJob
metadata: {{name: kafka-read}}
spec:
  parallelism: 2
  checkpointing: {{interval: 500ms, timeout: 30s, storage: {chk}}}
  pipeline:
    operators:
      - {{uid: orders, type: kafka_source, bootstrapServers: \"{b}\", {source}}}
      - {{uid: out, type: file_sink, inputs: [orders], path: {out}, format: json}}
",
            b = bootstrap(),
            chk = dir.join("checkpoints").display(),
            out = dir.join("out").display(),
        ),
    )
    .unwrap();
    file
}

/// The committed lines under `dir/out`, sorted.
fn committed_lines(dir: &Path) -> Vec<String> {
    let mut lines: Vec<String> = std::fs::read_dir(dir.join("out"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .flat_map(|e| {
                    std::fs::read_to_string(e.path())
                        .unwrap()
                        .lines()
                        .map(String::from)
                        .collect::<Vec<_>>()
                })
                .collect()
        })
        .unwrap_or_default();
    lines.sort();
    lines
}

/// Waits (at most a minute) until `dir/out` holds `n` committed lines.
fn wait_for_lines(dir: &Path, n: usize) {
    let t = Instant::now();
    while committed_lines(dir).len() < n && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `file` to its end (it must succeed): its log.
fn run_bounded(file: &Path, dir: &Path) -> String {
    process::run_to_end(file, &dir.join("state"), 2, Duration::from_secs(180))
}

/// JSON values `{"id": i}` for `range`, as `(key, value)` records.
fn ids(range: std::ops::Range<u32>) -> Vec<(String, Vec<u8>)> {
    range.map(|i| (format!("k{i}"), format!("{{\"id\": {i}}}").into_bytes())).collect()
}

fn id_lines(range: std::ops::Range<u32>) -> Vec<String> {
    let mut v: Vec<String> = range.map(|i| format!("{{\"id\":{i}}}")).collect();
    v.sort();
    v
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// `startFrom: timestamp` with `stopTimestamp` reads the records between the two; `group`
/// starts at the group's committed offsets; `latest` at the end when the job first started.
#[test]
fn start_from_each_mode_reads_from_where_it_says() {
    let _cluster = shared();
    let topic = unique("start-from");
    create_topic(&topic, 3);
    produce(&topic, None, ids(0..300));
    std::thread::sleep(Duration::from_millis(50));
    let t1 = now_ms();
    std::thread::sleep(Duration::from_millis(50));
    produce(&topic, None, ids(300..600));
    std::thread::sleep(Duration::from_millis(50));
    let t2 = now_ms();
    std::thread::sleep(Duration::from_millis(50));
    produce(&topic, None, ids(600..700));
    let fields = "format: json, fields: {id: int}";

    // timestamp .. stopTimestamp: exactly the middle batch.
    let tmp = tempfile::tempdir().unwrap();
    let file = source_job(
        tmp.path(),
        &format!(
            "topics: [{topic}], {fields}, startFrom: timestamp, startTimestamp: {t1}, stopTimestamp: {t2}"
        ),
    );
    run_bounded(&file, tmp.path());
    assert_eq!(committed_lines(tmp.path()), id_lines(300..600));

    // group: a group that committed, for each partition, the offset after its first 10.
    let group = unique("group");
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", &group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition_offset(&topic, p, Offset::Offset(10)).unwrap();
    }
    c.commit(&tpl, rdkafka::consumer::CommitMode::Sync).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let file = source_job(
        tmp.path(),
        &format!("topics: [{topic}], {fields}, startFrom: group, groupId: {group}, stopAt: latest"),
    );
    run_bounded(&file, tmp.path());
    let got = committed_lines(tmp.path());
    assert_eq!(got.len(), 700 - 30, "all but the first 10 of each partition");
    // The first 10 of each partition are the ones not read.
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", unique("r"))
        .create()
        .unwrap();
    let mut skipped = Vec::new();
    let mut tpl = TopicPartitionList::new();
    for p in 0..3 {
        tpl.add_partition_offset(&topic, p, Offset::Beginning).unwrap();
    }
    reader.assign(&tpl).unwrap();
    let t = Instant::now();
    let mut seen = 0;
    while seen < 700 && t.elapsed() < Duration::from_secs(30) {
        if let Some(Ok(m)) = reader.poll(Duration::from_millis(100)) {
            seen += 1;
            if m.offset() < 10 {
                skipped.push(
                    String::from_utf8(m.payload().unwrap().to_vec()).unwrap().replace(' ', ""),
                );
            }
        }
    }
    assert_eq!(skipped.len(), 30);
    assert!(
        skipped.iter().all(|s| !got.contains(s)),
        "a record before the group's offsets was read"
    );
    // The job committed its own offsets to the group when its checkpoints completed: the
    // group's offsets are now the partitions' ends.
    let committed = c.committed_offsets(tpl.clone(), Duration::from_secs(30)).unwrap();
    let ends: i64 =
        (0..3).map(|p| c.fetch_watermarks(&topic, p, Duration::from_secs(30)).unwrap().1).sum();
    let at: i64 = committed.elements().iter().map(|e| e.offset().to_raw().unwrap_or(0)).sum();
    assert_eq!(at, ends, "the group's offsets after the job: {committed:?}");

    // latest: records written after the job started only.
    let tmp = tempfile::tempdir().unwrap();
    let file = source_job(tmp.path(), &format!("topics: [{topic}], {fields}, startFrom: latest"));
    let mut job = start(&file, tmp.path(), &[]);
    assert!(process::wait_running(&mut job, 0));
    std::thread::sleep(Duration::from_secs(2));
    produce(&topic, None, ids(700..750));
    wait_for_lines(tmp.path(), 50);
    std::thread::sleep(Duration::from_secs(1));
    let _ = job.child.kill();
    let (_, log) = job.finish(Duration::from_secs(30));
    assert_eq!(committed_lines(tmp.path()), id_lines(700..750), "{log}");
}

/// Partitions added to the topic while the job runs are found and read from their start.
#[test]
fn partitions_added_while_running_are_read_from_their_start() {
    let _cluster = shared();
    let topic = unique("discovery");
    create_topic(&topic, 2);
    produce(&topic, None, ids(0..100));
    let tmp = tempfile::tempdir().unwrap();
    let file = source_job(
        tmp.path(),
        &format!(
            "topics: [{topic}], format: json, fields: {{id: int}}, partitionDiscoveryInterval: 1s"
        ),
    );
    let mut job = start(&file, tmp.path(), &[]);
    assert!(process::wait_running(&mut job, 0));
    let wait_for = |n: usize| wait_for_lines(tmp.path(), n);
    wait_for(100);
    add_partitions(&topic, 5);
    // Written before the job can have found them: read from their first offset, not their end.
    produce(&topic, Some(2), ids(100..150));
    produce(&topic, Some(4), ids(150..200));
    wait_for(200);
    std::thread::sleep(Duration::from_secs(1));
    let _ = job.child.kill();
    let (_, log) = job.finish(Duration::from_secs(30));
    assert_eq!(committed_lines(tmp.path()), id_lines(0..200), "{log}");
    assert!(log.contains("new, from its first offset"), "{log}");
}

/// A value that does not parse fails the job naming where it is (`onError: fail`), or is
/// dropped and counted (`skip`); `format: raw` gives every record with its coordinates.
#[test]
fn bad_records_follow_on_error_and_raw_reads_everything() {
    let _cluster = shared();
    let topic = unique("bad-records");
    create_topic(&topic, 1);
    let mut records = ids(0..20);
    records.insert(7, ("bad".into(), b"{\"id\": \"seven\"}".to_vec()));
    records.insert(12, ("bad".into(), b"not json".to_vec()));
    records.insert(15, ("bad".into(), vec![0xff, 0xfe]));
    produce(&topic, None, records);
    let fields = "format: json, fields: {id: int}, stopAt: latest";

    let tmp = tempfile::tempdir().unwrap();
    let file = source_job(tmp.path(), &format!("topics: [{topic}], {fields}"));
    let (code, err) = start(&file, tmp.path(), &[]).finish(Duration::from_secs(120));
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains(&format!("topic {topic:?} partition 0 offset 7"))
            && err.contains("onError: skip"),
        "{err}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let file = source_job(tmp.path(), &format!("topics: [{topic}], {fields}, onError: skip"));
    let log = run_bounded(&file, tmp.path());
    assert_eq!(committed_lines(tmp.path()), id_lines(0..20), "{log}");
    assert!(log.contains("skipped topic"), "{log}");

    // deadLetter: the good ones read, the bad ones as they came in the dead-letter topic,
    // with what is wrong and where they were in their headers.
    let dead = unique("dead-letters");
    create_topic(&dead, 1);
    let tmp = tempfile::tempdir().unwrap();
    let file = source_job(
        tmp.path(),
        &format!("topics: [{topic}], {fields}, onError: deadLetter, deadLetterTopic: {dead}"),
    );
    let log = run_bounded(&file, tmp.path());
    assert_eq!(committed_lines(tmp.path()), id_lines(0..20), "{log}");
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", unique("dead-reader"))
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&dead, 0, Offset::Beginning).unwrap();
    c.assign(&tpl).unwrap();
    let mut letters = Vec::new();
    let t = Instant::now();
    while letters.len() < 3 && t.elapsed() < Duration::from_secs(30) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            use rdkafka::message::Headers;
            let h = m.headers().expect("headers");
            let header = |k: &str| {
                h.iter()
                    .find(|x| x.key == k)
                    .and_then(|x| x.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            };
            letters.push((
                m.payload().unwrap().to_vec(),
                m.key().map(<[u8]>::to_vec),
                header("weir.offset"),
                header("weir.topic"),
                header("weir.error").unwrap_or_default(),
            ));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(c.poll(Duration::from_millis(500)).is_none(), "more than 3 dead letters");
    let offsets: Vec<Option<String>> = letters.iter().map(|l| l.2.clone()).collect();
    assert_eq!(offsets, [Some("7".into()), Some("12".into()), Some("15".into())]);
    assert_eq!(letters[0].0, b"{\"id\": \"seven\"}".to_vec());
    assert_eq!(letters[1].0, b"not json".to_vec());
    assert_eq!(letters[2].0, vec![0xff, 0xfe], "the bytes as they came");
    assert!(
        letters
            .iter()
            .all(|l| l.1.as_deref() == Some(&b"bad"[..]) && l.3.as_deref() == Some(topic.as_str()))
    );
    assert!(letters[0].4.contains("id"), "{:?}", letters[0].4);
    assert!(letters.iter().all(|l| !l.4.is_empty()));

    let tmp = tempfile::tempdir().unwrap();
    let file = source_job(
        tmp.path(),
        &format!("topics: [{topic}], format: raw, stopAt: latest, onError: skip"),
    );
    run_bounded(&file, tmp.path());
    let lines = committed_lines(tmp.path());
    // The one value that is not UTF-8 is dropped; the others come whole.
    assert_eq!(lines.len(), 22, "{lines:?}");
    let j: serde_json::Value = lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|j| j["offset"] == 12)
        .unwrap();
    assert_eq!(
        (j["key"].as_str(), j["value"].as_str(), j["partition"].as_i64()),
        (Some("bad"), Some("not json"), Some(0))
    );
    assert_eq!(j["topic"].as_str(), Some(topic.as_str()));
    assert!(j["timestamp"].as_i64().unwrap() > 1_700_000_000_000, "{j}");
}

/// `topicPattern` reads every topic whose name matches, those created while the job runs too,
/// and no other.
#[test]
fn a_topic_pattern_reads_the_topics_it_matches_and_those_created_later() {
    let _cluster = shared();
    let stem = unique("pattern");
    create_topic(&format!("{stem}-a"), 2);
    create_topic(&format!("{stem}-b"), 1);
    create_topic(&format!("{stem}x-other"), 1);
    produce(&format!("{stem}-a"), None, ids(0..50));
    produce(&format!("{stem}-b"), None, ids(50..80));
    produce(&format!("{stem}x-other"), None, ids(1000..1010));
    let tmp = tempfile::tempdir().unwrap();
    let file = source_job(
        tmp.path(),
        &format!(
            "topicPattern: '{stem}-.*', format: json, fields: {{id: int}}, partitionDiscoveryInterval: 1s"
        ),
    );
    let mut job = start(&file, tmp.path(), &[]);
    assert!(process::wait_running(&mut job, 0));
    let wait_for = |n: usize| wait_for_lines(tmp.path(), n);
    wait_for(80);
    create_topic(&format!("{stem}-c"), 2);
    produce(&format!("{stem}-c"), None, ids(80..120));
    wait_for(120);
    std::thread::sleep(Duration::from_secs(1));
    let _ = job.child.kill();
    let (_, log) = job.finish(Duration::from_secs(30));
    assert_eq!(committed_lines(tmp.path()), id_lines(0..120), "{log}");
}

/// Bad Kafka parameters are refused before anything starts, naming the field and what to do.
#[test]
fn bad_kafka_parameters_are_refused_before_anything_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let src = "{uid: orders, type: kafka_source, topics: [orders], bootstrapServers: \"k:9092\", format: json, fields: {key: string, value: int}}";
    let sink = "{uid: out, type: kafka_sink, inputs: [counts], topic: out, key: key, bootstrapServers: \"k:9092\"}";
    let cases: Vec<(String, String, &str)> = vec![
        (src.replace("\"k:9092\"", "\"k\""), sink.into(), "bootstrapServers: \"k\" has no port"),
        (src.replace("\"k:9092\"", "\"k:9092,,\""), sink.into(), "bootstrapServers"),
        (
            src.replace("topics: [orders]", "topics: [orders], topicPattern: 'o.*'"),
            sink.into(),
            "give one of them",
        ),
        (
            src.replace("topics: [orders]", "topicPattern: 'o(.*'"),
            sink.into(),
            "topicPattern \"o(.*\" is not a regular expression",
        ),
        (
            src.replace("topics: [orders]", "topics: [\"a/b\"]"),
            sink.into(),
            "is not a Kafka topic name",
        ),
        (
            src.replace("format: json", "format: json, startFrom: timestamp"),
            sink.into(),
            "needs startTimestamp",
        ),
        (
            src.replace("format: json", "format: json, startFrom: group"),
            sink.into(),
            "startFrom: group needs groupId",
        ),
        (
            src.replace("format: json", "format: json, startFrom: newest"),
            sink.into(),
            "startFrom \"newest\" is not one of",
        ),
        (
            src.replace("format: json", "format: json, stopAt: latest, stopTimestamp: 5"),
            sink.into(),
            "give one of them",
        ),
        (
            src.replace("format: json", "format: json, properties: {group.id: x}"),
            sink.into(),
            "properties.group.id is set by Weir: set groupId",
        ),
        (
            src.replace("format: json", "format: json, properties: {sasl.password: hunter2}"),
            sink.into(),
            "is a credential",
        ),
        (
            src.replace("format: json", "format: json, onError: deadLetter"),
            sink.into(),
            "onError: deadLetter needs deadLetterTopic",
        ),
        (
            src.replace("format: json", "format: json, deadLetterTopic: dlq"),
            sink.into(),
            "deadLetterTopic is read only with onError: deadLetter",
        ),
        (src.into(), sink.replace("topic: out", "topic: out, topicField: key"), "give one of them"),
        (
            src.into(),
            sink.replace("key: key", "key: nope"),
            "key \"nope\" is not a field of its input",
        ),
        (
            src.into(),
            sink.replace("topic: out", "topicField: count"),
            "topicField \"count\" holds an integer, not text",
        ),
        (
            src.into(),
            sink.replace("key: key", "key: key, delivery: twice"),
            "delivery \"twice\" is not one of",
        ),
        (
            src.into(),
            sink.replace("key: key", "key: key, transactionTimeout: 5s"),
            "transactionTimeout 5s is not longer than the checkpoint interval",
        ),
        (
            src.into(),
            sink.replace("key: key", "key: key, properties: {transactional.id: x}"),
            "set transactionalIdPrefix",
        ),
    ];
    for (source, sink, want) in cases {
        let file = write_manifest(tmp.path(), "bad", &source, &sink, "");
        let err = process::refused(&file);
        assert!(err.contains(want), "{source} / {sink}: {err}");
        assert!(!err.contains("hunter2"), "the credential is in the message: {err}");
    }
}

/// A savepoint or checkpoint restored into another run of the job (an upgrade, a coordinator
/// that restarted): the old run's pre-committed transaction is written again once and its
/// open one fenced, although the new run numbers its checkpoints afresh.
#[test]
fn a_sink_restored_in_another_run_settles_the_old_runs_transactions() {
    use weir_runtime::connectors::KafkaSink;
    use weir_runtime::operator::{Operator, Rescale};
    let _cluster = shared();
    let topic = unique("sink-runs");
    create_topic(&topic, 2);
    let prefix = unique("weir-test-runs");
    let spec = sink_spec(&topic, &prefix);
    let fields = vec!["key".to_string(), "count".to_string()];
    let mut out = Vec::new();
    // Run 1 at parallelism 2: subtask 1 pre-commits at checkpoint 7 and dies with the next
    // transaction open; subtask 0 commits.
    let mut states = Vec::new();
    for s in 0..2u32 {
        let mut a = KafkaSink::new(&spec, "out", "run-1", s, &fields, true, 6).unwrap();
        a.restore(None).unwrap();
        a.process(0, numbered(i64::from(s) * 1000..i64::from(s) * 1000 + 300), &mut out).unwrap();
        states.push((s, a.snapshot(7).unwrap().unwrap()));
        if s == 0 {
            a.checkpoint_complete(7).unwrap();
        } else {
            a.process(0, numbered(5000..5100), &mut out).unwrap();
        }
        std::mem::forget(a);
    }
    // Run 2, at parallelism 1: its checkpoint ids start at 0 again.
    let mut b = KafkaSink::new(&spec, "out", "run-2", 0, &fields, true, 0).unwrap();
    let at = Rescale {
        uid: "out".into(),
        subtask: 0,
        parallelism: 1,
        old_parallelism: 2,
        key_groups: (0, 127),
    };
    b.rescale(states, &at).unwrap();
    b.process(0, numbered(3000..3050), &mut out).unwrap();
    b.snapshot(1).unwrap();
    b.checkpoint_complete(1).unwrap();
    let want: Vec<i64> = (0..300).chain(1000..1300).chain(3000..3050).collect();
    assert_eq!(committed_numbers(&topic, want.len()), want);
}

/// Waits (at most `limit`) until `/v1/job` shows what `ok` wants: that job info.
fn wait_info(
    api: &str,
    limit: Duration,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t = Instant::now();
    let mut last = serde_json::Value::Null;
    while t.elapsed() < limit {
        if let Some(i) = process::job_info(api) {
            if ok(&i) {
                return i;
            }
            last = i;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what} within {limit:?}; the job's last info: {last:#}");
}

/// The operator `uid` of a job info.
fn operator<'a>(info: &'a serde_json::Value, uid: &str) -> &'a serde_json::Value {
    info["operators"].as_array().unwrap().iter().find(|o| o["uid"] == uid).unwrap()
}

#[test]
fn the_source_tells_its_lag_and_bytes_and_the_sink_its_commits() {
    let _shared = shared();
    let tmp = tempfile::tempdir().unwrap();
    let input = unique("metrics-in");
    let output = unique("metrics-out");
    create_topic(&input, 3);
    create_topic(&output, 3);
    let counts = produce_keys(&input, 6_000, 50, 0x6d65);
    // The bytes produced: keys and values, as produce_keys wrote them.
    let bytes: u64 = {
        let mut rng = SplitMix64::new(0x6d65);
        (0..6_000)
            .map(|_| {
                let k = format!("k{}", rng.next_u64() % 50);
                (k.len() + format!("{{\"key\": \"{k}\", \"value\": 1}}").len()) as u64
            })
            .sum()
    };
    // A throttle in the source's chain holds it back: 2 × 1,000 records a second, so the
    // source is seconds behind the topic's end.
    let file = tmp.path().join("job.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: weir.dev/v1alpha1
kind: StreamJob
metadata: {{name: kafka-metrics}}
spec:
  parallelism: 2
  checkpointing: {{interval: 500ms, timeout: 30s, storage: {chk}}}
  pipeline:
    operators:
      - {{uid: orders, type: kafka_source, topics: [{input}], bootstrapServers: \"{b}\", format: json, fields: {{key: string, value: int}}}}
      - {{uid: slow, type: throttle, inputs: [orders], ratePerSecond: 1000}}
      - {{uid: counts, type: count, inputs: [slow], key: key}}
      - {{uid: out, type: kafka_sink, inputs: [counts], topic: {output}, key: key, bootstrapServers: \"{b}\"}}
",
            b = bootstrap(),
            chk = tmp.path().join("checkpoints").display(),
        ),
    )
    .unwrap();
    let job = start(&file, tmp.path(), &[]);
    let api = job.addr("api");
    // Behind: every partition's end known and records still to read, each partition of the
    // topic shown once with the subtask that reads it.
    let behind = wait_info(&api, Duration::from_secs(60), "a lag above 0", |i| {
        operator(i, "orders")["lag"].as_u64().is_some_and(|l| l > 0)
    });
    let src = operator(&behind, "orders");
    let parts = src["partitions"].as_array().unwrap();
    let mut got: Vec<(String, i64)> = parts
        .iter()
        .map(|p| (p["topic"].as_str().unwrap().to_string(), p["partition"].as_i64().unwrap()))
        .collect();
    got.sort();
    assert_eq!(got, (0..3).map(|p| (input.clone(), p)).collect::<Vec<_>>(), "{src:#}");
    let summed: u64 = parts.iter().map(|p| p["lag"].as_u64().unwrap()).sum();
    assert_eq!(src["lag"].as_u64(), Some(summed), "{src:#}");
    assert!(summed <= 6_000, "{src:#}");
    for p in parts {
        let subtask = p["subtask"].as_u64().unwrap() as u32;
        let owner = weir_runtime::connectors::partition_owner(
            &input,
            p["partition"].as_i64().unwrap() as i32,
            2,
        );
        assert_eq!(subtask, owner, "{p}");
    }
    // Caught up: no lag, every byte counted, transactions committed.
    let done = wait_info(&api, Duration::from_secs(60), "no lag with every byte read", |i| {
        let o = operator(i, "orders");
        o["lag"].as_u64() == Some(0) && o["bytesIn"].as_u64() == Some(bytes)
    });
    let commits = wait_info(&api, Duration::from_secs(30), "commits after the last records", |i| {
        operator(i, "out")["commits"]["committed"].as_u64().is_some_and(|c| c >= 2)
    });
    let sink = operator(&commits, "out");
    assert!(sink["commits"]["seconds"].as_f64().unwrap() > 0.0, "{sink:#}");
    assert!(sink["commits"]["openTransactions"].as_u64().unwrap() <= 2 * 2, "{sink:#}");
    assert!(operator(&done, "counts").get("lag").is_none(), "only a source has a lag");
    // More input: the lag goes up, then back to 0.
    produce_keys(&input, 12_000, 50, 0x6d66);
    wait_info(&api, Duration::from_secs(30), "a lag after more input", |i| {
        operator(i, "orders")["lag"].as_u64().is_some_and(|l| l > 0)
    });
    wait_info(&api, Duration::from_secs(60), "no lag again", |i| {
        operator(i, "orders")["lag"].as_u64() == Some(0)
    });
    // The same on /metrics.
    let (code, text) = process::request(&api, "GET", "/metrics", None).unwrap();
    assert_eq!(code, 200);
    for family in [
        "weir_source_lag_records{",
        "weir_source_bytes_in_total{",
        "weir_sink_commits_total{",
        "weir_sink_commit_seconds_total{",
        "weir_sink_open_transactions{",
    ] {
        assert!(text.contains(family), "{family} not on /metrics:\n{text}");
    }
    let line = format!("topic=\"{input}\"");
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("weir_source_partition_lag_records{") && l.contains(&line))
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines.iter().all(|l| l.ends_with(" 0")), "{lines:?}");
    // And the counts came through exactly once.
    let mut all = counts;
    let mut rng = SplitMix64::new(0x6d66);
    for _ in 0..12_000 {
        *all.entry(format!("k{}", rng.next_u64() % 50)).or_insert(0) += 1;
    }
    let values = read_topic(&output, 18_000, Duration::from_secs(10));
    check_updates(&values, &all);
    job.signal("-TERM");
    let (code, err) = job.finish(Duration::from_secs(60));
    assert!(code.is_some(), "{err}");
}

#[test]
fn a_cluster_away_past_the_checkpoint_timeout_fails_checkpoints_restarts_the_job_and_loses_nothing()
{
    let _alone = CLUSTER.write().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let input = unique("away-in");
    let output = unique("away-out");
    create_topic(&input, 3);
    create_topic(&output, 3);
    let counts = produce_keys(&input, 60_000, 500, 0x6177);
    let b = bootstrap();
    // 2 × 2,000 records a second: the job runs 15 s, and the cluster goes away in the middle.
    let file = tmp.path().join("job.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: weir.dev/v1alpha1
kind: StreamJob
metadata: {{name: kafka-away}}
spec:
  parallelism: 2
  checkpointing: {{interval: 1s, timeout: 3s, tolerableFailures: 2, storage: {chk}}}
  restartStrategy: {{type: fixed-delay, delay: 1s, attempts: 1000}}
  pipeline:
    operators:
      - {{uid: orders, type: kafka_source, topics: [{input}], bootstrapServers: \"{b}\", stopAt: latest, format: json, fields: {{key: string, value: int}}}}
      - {{uid: slow, type: throttle, inputs: [orders], ratePerSecond: 2000}}
      - {{uid: counts, type: count, inputs: [slow], key: key}}
      - {{uid: out, type: kafka_sink, inputs: [counts], topic: {output}, key: key, bootstrapServers: \"{b}\", transactionTimeout: 60s}}
",
            chk = tmp.path().join("checkpoints").display(),
        ),
    )
    .unwrap();
    let mut job = start(&file, tmp.path(), &["--processes"]);
    assert!(process::wait_running(&mut job, 0));
    let api = job.addr("api");
    wait_info(&api, Duration::from_secs(30), "two checkpoints completed", |i| {
        i["lastCheckpoint"]["id"].as_u64().is_some_and(|id| id >= 2)
    });
    // Every broker away for 20 s: far past the checkpoint timeout (3 s) times the failures
    // tolerated (2).
    for id in ["1", "2", "3"] {
        kafka_sh(&["stop-broker", id, "--kill"]);
    }
    std::thread::sleep(Duration::from_secs(20));
    for id in ["1", "2", "3"] {
        kafka_sh(&["spawn", id]);
    }
    let t = Instant::now();
    loop {
        let out = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/env/kafka.sh"))
            .arg("brokers")
            .output()
            .unwrap();
        if String::from_utf8_lossy(&out.stdout).lines().count() == 3 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "the brokers did not come back");
        std::thread::sleep(Duration::from_millis(500));
    }
    let (code, err) = job.finish(Duration::from_secs(300));
    assert_eq!(code, Some(0), "{err}");
    // The checkpoints failed while the cluster was away, past what is tolerated, and the job
    // restarted.
    assert!(
        err.contains("3 checkpoints failed in a row (checkpointing.tolerableFailures is 2)"),
        "{err}"
    );
    assert!(err.contains("restarting in"), "{err}");
    let values = read_topic(&output, 60_000, Duration::from_secs(20));
    check_updates(&values, &counts);
}
