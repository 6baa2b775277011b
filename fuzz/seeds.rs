//! Writes the seed corpora, `seeds/<target>/<name>`, with the real encoders: batches and frames
//! of the exchange, control messages (alone and as the lines of a connection), checkpoint and
//! savepoint metadata (unsigned, signed with the fuzz targets' secret, and of format 1),
//! in-flight records and keyed state entries.
//!
//! Not a fuzz target: built by `cargo fuzz build` with the targets, run from their target
//! directory (README.md). It has a `main` of its own; the empty `fuzz_target!` below is only
//! there so that it links like the others (libFuzzer's `main` is then not used).

use std::path::PathBuf;
use std::time::Duration;

use weir_runtime::exchange::align;
use weir_runtime::auth::JobSecret;
use weir_runtime::checkpoint::{
    self, InFlightHandle, MAGIC_V1, Metadata, OperatorState, Settings, TaskAck,
};
use weir_runtime::control::{
    self, AssignedCheckpoints, Assignment, SavepointTarget, ToCoordinator, ToWorker,
};
use weir_runtime::record::{Record, Value};
use weir_runtime::savepoint::{self, KeyedFile, KeyedFormat};
use weir_runtime::snapshot::{SnapshotFile, StateHandle};
use weir_runtime::exchange::wire::{self, Barrier, Header, Kind};

libfuzzer_sys::fuzz_target!(|_data: &[u8]| {});

/// The secret the checkpoint_metadata target checks MACs with.
const SECRET: &str = "0123456789abcdef0123456789abcdef";

struct Out(PathBuf);

impl Out {
    fn target(&self, name: &str) -> PathBuf {
        let d = self.0.join(name);
        std::fs::create_dir_all(&d).expect("a seed directory");
        d
    }

    fn write(&self, target: &str, name: &str, bytes: &[u8]) {
        std::fs::write(self.target(target).join(name), bytes).expect("a seed file");
    }
}

fn records() -> Vec<Record> {
    vec![
        vec![Value::Str("hello".into()), Value::Int(1)],
        vec![Value::Str("wörld".into()), Value::Int(-3), Value::Float(2.5)],
        vec![],
        vec![Value::Int(i64::MIN), Value::Int(i64::MAX), Value::Float(f64::NEG_INFINITY)],
        vec![Value::Str("".into())],
        vec![Value::Bool(true), Value::Bool(false)],
    ]
}

fn batch(records: &[Record]) -> Vec<u8> {
    let mut b = Vec::new();
    wire::encode_batch(records, &mut b);
    b
}

fn frame(kind: Kind, n: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = Header { kind, edge: 1, from: 0, to: 1, n }.to_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

fn wire_seeds(out: &Out) {
    let rs = records();
    out.write("wire_batch", "empty", &batch(&[]));
    out.write("wire_batch", "records", &batch(&rs));
    out.write("wire_batch", "one", &batch(&rs[..1]));
    let many: Vec<Record> = (0..200).map(|i| vec![Value::Int(i), Value::Str(format!("k{i}").into())]).collect();
    out.write("wire_batch", "many", &batch(&many));

    let b = batch(&rs);
    let barrier = wire::encode_barrier(Barrier::checkpoint(7, 1_790_000_000_000, false));
    let unaligned = wire::encode_barrier(Barrier::checkpoint(8, 1_790_000_000_500, true));
    let stop = wire::encode_barrier(Barrier {
        id: 9,
        ts: 1_790_000_001_000,
        unaligned: false,
        savepoint: true,
        stop: true,
    });
    let mut stream = frame(Kind::Batch, b.len() as u32, &b);
    stream.extend(frame(Kind::Barrier, wire::BARRIER_LEN, &barrier));
    stream.extend(frame(Kind::Batch, 1, &batch(&[])));
    stream.extend(frame(Kind::Barrier, wire::BARRIER_LEN, &unaligned));
    stream.extend(frame(Kind::Barrier, wire::BARRIER_LEN, &stop));
    stream.extend(frame(Kind::End, 0, &[]));
    out.write("wire_frames", "stream", &stream);
    out.write("wire_frames", "credit", &frame(Kind::Credit, 16, &[]));
    out.write("wire_frames", "barrier-payload", &stop);
    // A header that claims the largest payload, and a few bytes of it.
    out.write("wire_frames", "big-claim", &frame(Kind::Batch, wire::MAX_PAYLOAD, &b));
}

fn small_metadata(savepoint: bool) -> Metadata {
    let keyed = (!savepoint).then(|| StateHandle {
        instance: "counts-0-run-a0".into(),
        key_groups: (0, 63),
        files: vec![
            SnapshotFile {
                name: "000012.sst".into(),
                key: "shared/counts-0-run-a0/000012.sst".into(),
                size: 1024,
            },
            SnapshotFile {
                name: "MANIFEST-000005".into(),
                key: "shared/own-3/counts-0-run-a0/MANIFEST-000005".into(),
                size: 64,
            },
            SnapshotFile {
                name: "CURRENT".into(),
                key: "shared/own-3/counts-0-run-a0/CURRENT".into(),
                size: 16,
            },
        ],
    });
    let keyed_file = savepoint.then(|| KeyedFile {
        file: "keyed/counts-1".into(),
        format: KeyedFormat::Sst,
        key_groups: (64, 67),
        offsets: vec![13, 13, 100, 250, 250, 400],
        checksums: vec![0, 11, 22, 0, 33],
        entries: 9,
    });
    Metadata {
        version: checkpoint::VERSION,
        job_name: "wordcount".into(),
        job_id: "8c1f".into(),
        id: 3,
        triggered_at: 1_790_000_000_000,
        completed_at: 1_790_000_000_900,
        parallelism: 2,
        max_parallelism: 128,
        operator_uids: vec!["lines".into(), "counts".into()],
        final_: false,
        savepoint,
        state_backend: Default::default(),
        operators: vec![
            OperatorState {
                uid: "lines".into(),
                subtask: 0,
                keyed: None,
                keyed_file: None,
                state: Some(serde_json::json!({"position": 417, "done": false})),
                in_flight: None,
            },
            OperatorState {
                uid: "counts".into(),
                subtask: u32::from(savepoint),
                keyed,
                keyed_file,
                state: None,
                in_flight: (!savepoint).then(|| InFlightHandle {
                    key: "chk-3/inflight/counts-0".into(),
                    bytes: 90,
                    records: 4,
                }),
            },
        ],
    }
}

fn checkpoint_seeds(out: &Out) {
    let secret = JobSecret::new(SECRET).expect("the seeds' secret");
    let c = small_metadata(false);
    let s = small_metadata(true);
    out.write("checkpoint_metadata", "checkpoint", &c.to_bytes(None));
    out.write("checkpoint_metadata", "checkpoint-signed", &c.to_bytes(Some(&secret)));
    out.write("checkpoint_metadata", "savepoint", &s.to_bytes(None));
    out.write("checkpoint_metadata", "savepoint-signed", &s.to_bytes(Some(&secret)));
    let mut old = s.clone();
    old.version = 1;
    if let Some(f) = &mut old.operators[1].keyed_file {
        f.format = KeyedFormat::Entries;
        f.checksums.clear();
    }
    let mut v1 = MAGIC_V1.to_vec();
    v1.extend(serde_json::to_vec(&old).expect("metadata serializes"));
    out.write("checkpoint_metadata", "format-1", &v1);
}

fn control_seeds(out: &Out) {
    let spec = weir_runtime::load_manifest(
        &PathBuf::from(manifest_dir()).join("../manifests/examples/wordcount.yaml"),
    )
    .expect("the example manifest")
    .spec;
    let plan = weir_runtime::plan::build(&spec, Some(2), Some(128)).expect("the example's plan");
    let hex = weir_runtime::auth::hex(&[0xab; 32]);
    let ack = TaskAck {
        task: "counts".into(),
        subtask: 0,
        operators: small_metadata(false).operators,
        state_bytes: 1104,
        uploaded_bytes: 1024,
        alignment_ms: 3,
        sync_ms: 5,
        async_ms: 40,
        unaligned: true,
        in_flight_bytes: 90,
    };
    let to_coordinator = vec![
        ToCoordinator::Hello {
            protocol: control::PROTOCOL,
            index: Some(1),
            data_addr: "10.0.0.7:6123".into(),
            nonce: hex.clone(),
        },
        ToCoordinator::Proof { proof: hex.clone() },
        ToCoordinator::Progress {
            records: vec![(10, 10), (10, 80), (80, 3)],
            state_bytes: 4096,
            dropped: vec![0, 2, 0],
        },
        ToCoordinator::Ack { id: 3, ack: Box::new(ack), attempt: 1 },
        ToCoordinator::Decline { id: 4, message: "no room".into(), attempt: 1 },
        ToCoordinator::Finished { records: vec![(1, 2)], dropped: vec![1], attempt: 1 },
        ToCoordinator::Failed {
            message: "boom".into(),
            user: false,
            retryable: true,
            damaged: true,
            attempt: 1,
        },
    ];
    let storage: weir_crds::StorageUri = "s3://weir-bucket/checkpoints".parse().expect("a URI");
    let assignment = Assignment {
        plan,
        run_id: "run-a0".into(),
        worker_of: vec![0, 1],
        data_addrs: vec!["10.0.0.6:6123".into(), "10.0.0.7:6123".into()],
        keep_state: false,
        job_id: "8c1f".into(),
        attempt: 1,
        checkpoints: Some(AssignedCheckpoints {
            settings: Settings {
                interval: Duration::from_secs(1),
                exactly_once: true,
                timeout: Duration::from_secs(600),
                min_pause: Duration::ZERO,
                max_concurrent: 1,
                tolerable_failures: 0,
                unaligned: true,
                alignment_timeout: Duration::from_millis(250),
                incremental: true,
                retained: 3,
            },
            storage: storage.clone(),
            job_dir: "default/wordcount/8c1f".into(),
            after_id: 3,
            restore: small_metadata(true).operators,
            restored_parallelism: Some(4),
            restore_storage: Some("/var/tmp/weir/savepoints".parse().expect("a URI")),
            stop_at_start: true,
        }),
    };
    let to_worker = vec![
        ToWorker::Challenge { nonce: hex.clone(), proof: hex },
        ToWorker::Start(Box::new(assignment)),
        ToWorker::Refused { reason: "wrong secret".into() },
        ToWorker::Stop,
        ToWorker::Cancel,
        ToWorker::Trigger { id: 4, savepoint: None },
        ToWorker::Trigger {
            id: 5,
            savepoint: Some(SavepointTarget {
                dir: "s3://weir-bucket/savepoints/sp-5".parse().expect("a URI"),
                stop: true,
            }),
        },
        ToWorker::Complete { id: 4, final_: false },
        ToWorker::Exit,
    ];
    let mut worker_stream = Vec::new();
    for (i, m) in to_coordinator.iter().enumerate() {
        out.write("control_json", &format!("to-coordinator-{i}"), &line(m));
        worker_stream.extend(line(m));
    }
    let mut coordinator_stream = Vec::new();
    for (i, m) in to_worker.iter().enumerate() {
        out.write("control_json", &format!("to-worker-{i}"), &line(m));
        coordinator_stream.extend(line(m));
    }
    // control_reader: the first byte picks the limit, a deadline and the side that reads.
    for (ctl, name) in [(0x80u8, "hello-limit"), (0xc0, "hello-limit-deadline"), (0x1f, "small-limit")] {
        let mut b = vec![ctl];
        b.extend_from_slice(&worker_stream);
        out.write("control_reader", &format!("coordinator-reads-{name}"), &b);
        let mut b = vec![ctl | 0x20];
        b.extend_from_slice(&coordinator_stream);
        out.write("control_reader", &format!("worker-reads-{name}"), &b);
    }
}

/// A message as `control::Writer::send` writes it: its JSON and a newline.
fn line<T: serde::Serialize>(m: &T) -> Vec<u8> {
    let mut l = serde_json::to_vec(m).expect("a message serializes");
    l.push(b'\n');
    l
}

fn in_flight_seeds(out: &Out) {
    let rs = records();
    out.write("in_flight", "empty", &align::encode_in_flight(&[]));
    out.write("in_flight", "batches", &align::encode_in_flight(&[(0, rs.clone()), (1, vec![]), (0, rs[..2].to_vec())]));
}

fn keyed_seeds(out: &Out) {
    // Entries of key groups 3..=5 (the stored key: the key group, big-endian, then the key).
    let entries: Vec<(Vec<u8>, Vec<u8>)> = [(3u16, "a", "1"), (3, "b", "22"), (5, "word", ""), (5, "zz", "333")]
        .iter()
        .map(|&(g, k, v)| {
            let mut key = g.to_be_bytes().to_vec();
            key.extend_from_slice(k.as_bytes());
            (key, v.as_bytes().to_vec())
        })
        .collect();
    let mut file = Vec::new();
    let (offsets, n) = savepoint::write_entries(&mut file, (3, 5), &mut |visit| {
        for (k, v) in &entries {
            visit(k, v)?;
        }
        Ok(())
    })
    .expect("entries encode");
    assert_eq!(n, 4);
    // The target reads a byte range without the magic; its first byte is a control byte.
    for (ctl, name) in [(0u8, "all"), (1, "all-refused")] {
        let mut b = vec![ctl];
        b.extend_from_slice(&file[offsets[0] as usize..]);
        out.write("keyed_entries", name, &b);
    }
    let mut b = vec![0u8];
    b.extend_from_slice(&file[offsets[2] as usize..offsets[3] as usize]);
    out.write("keyed_entries", "one-group", &b);
}

fn main() {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(manifest_dir()).join("seeds"));
    let out = Out(dir.clone());
    wire_seeds(&out);
    checkpoint_seeds(&out);
    control_seeds(&out);
    in_flight_seeds(&out);
    keyed_seeds(&out);
    println!("seeds written to {}", dir.display());
}

/// The package's directory, from cargo at run time when cargo runs this (a binary built in
/// another checkout sharing the target directory must not read that checkout's files).
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into())
}
