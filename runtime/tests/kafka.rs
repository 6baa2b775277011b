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
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
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
fn produce<'a>(topic: &str, partition: Option<i32>, records: impl IntoIterator<Item = (String, Vec<u8>)> + 'a) {
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

/// Every value of `topic` a `read_committed` consumer finds, read until `expected` values came
/// or nothing more came for `quiet`.
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
    for t in md.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning).unwrap();
        }
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let mut last = Instant::now();
    while out.len() < expected || last.elapsed() < Duration::from_millis(500) {
        if last.elapsed() > quiet {
            break;
        }
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                out.push(String::from_utf8(m.payload().unwrap_or_default().to_vec()).unwrap());
                last = Instant::now();
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            None => {}
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
            wrong.push(format!("{k}: {} updates for {n} records ({dups} twice), last {:?}", got.len(), got.last()));
        }
    }
    assert!(seen.is_empty(), "keys that were never written: {:?}", seen.keys().take(5).collect::<Vec<_>>());
    assert!(wrong.is_empty(), "{} of {} keys wrong: {:?}", wrong.len(), counts.len(), &wrong[..wrong.len().min(10)]);
}

fn write_manifest(dir: &Path, name: &str, source: &str, sink: &str, extra: &str) -> std::path::PathBuf {
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
        std::thread::sleep(Duration::from_millis(300 + rng.next_u64() % 2200));
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
    assert!(kills >= kills_wanted, "the job ended after {kills} kills in {:?}; make the input longer: {err}", t0.elapsed());
    let values = read_topic(&output, records as usize, Duration::from_secs(20));
    match delivery {
        "exactly-once" => check_updates(&values, &counts),
        _ => {
            // Nothing lost: every update is there at least once.
            let mut seen: BTreeMap<String, std::collections::BTreeSet<u64>> = BTreeMap::new();
            for v in &values {
                let j: serde_json::Value = serde_json::from_str(v).unwrap();
                seen.entry(j["key"].as_str().unwrap().into()).or_default().insert(j["count"].as_u64().unwrap());
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
    count_with_kills("at-least-once", 200_000, 4, false, 0x616c);
}

#[test]
fn a_bounded_source_ends_where_the_topic_ended_and_every_update_is_committed_once() {
    count_with_kills("exactly-once", 50_000, 0, false, 0x6264);
}
