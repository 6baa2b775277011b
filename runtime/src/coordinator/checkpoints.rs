//! Checkpoints: what a worker acknowledges is checked, a complete checkpoint's metadata is
//! written and the old ones are deleted, and a restore is checked against the plan.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use weir_crds::api::{CheckpointInfo, CheckpointStatus};

use crate::checkpoint::{self, Metadata, Settings, TaskAck};
use crate::control::ToWorker;
use crate::error::RuntimeError;
use crate::plan::Plan;

use super::*;

impl Driver<'_> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn info(
        &self,
        id: u64,
        status: CheckpointStatus,
        triggered_at: u64,
        completed_at: u64,
        acks: &BTreeMap<(String, u32), TaskAck>,
        final_: bool,
        failure: Option<String>,
    ) -> CheckpointInfo {
        let end = if completed_at > 0 { completed_at } else { checkpoint::now_ms() };
        CheckpointInfo {
            id,
            status,
            trigger_time: triggered_at,
            duration_ms: end.saturating_sub(triggered_at),
            size_bytes: acks.values().map(|a| a.state_bytes).sum(),
            uploaded_bytes: acks.values().map(|a| a.uploaded_bytes).sum(),
            alignment_ms: acks.values().map(|a| a.alignment_ms).max().unwrap_or(0),
            unaligned: acks.values().any(|a| a.unaligned),
            in_flight_bytes: acks.values().map(|a| a.in_flight_bytes).sum(),
            acknowledged: acks.len() as u32,
            subtasks: self.acks_needed as u32,
            final_,
            path: None,
            failure,
        }
    }

    /// A checkpoint failed: counts it, and ends the attempt once failures in a row pass the
    /// tolerance.
    pub(super) fn checkpoint_failed(
        &self,
        pd: &Pending,
        why: String,
        in_a_row: &mut u32,
        settings: &Settings,
    ) -> Option<AttemptEnd> {
        eprintln!("weir: coordinator: {why}");
        *in_a_row += 1;
        self.c.status.record(self.info(
            pd.id,
            CheckpointStatus::Failed,
            pd.triggered_at,
            0,
            &pd.acks,
            false,
            Some(why.clone()),
        ));
        if *in_a_row > settings.tolerable_failures {
            return Some(AttemptEnd::Failed(
                RuntimeError::external(format!(
                    "{in_a_row} checkpoints failed in a row (checkpointing.tolerableFailures is {}); the last: {why}",
                    settings.tolerable_failures
                ))
                .retryable(),
            ));
        }
        None
    }

    pub(super) fn metadata(
        &self,
        id: u64,
        triggered_at: u64,
        completed_at: u64,
        acks: &BTreeMap<(String, u32), TaskAck>,
        final_: bool,
        savepoint: bool,
    ) -> Metadata {
        let plan = &self.c.plan;
        Metadata {
            version: checkpoint::VERSION,
            job_name: self.c.opts.name.clone(),
            job_id: self.job_id.clone(),
            id,
            triggered_at,
            completed_at,
            parallelism: plan.parallelism,
            max_parallelism: plan.max_parallelism,
            operator_uids: plan.ops.iter().map(|o| o.uid.clone()).collect(),
            final_,
            savepoint,
            state_backend: plan.state_backend,
            operators: acks.values().flat_map(|a| a.operators.iter().cloned()).collect(),
        }
    }

    /// Writes checkpoint `id`'s metadata (the moment it exists), then applies retention.
    pub(super) fn complete(
        &mut self,
        id: u64,
        triggered_at: u64,
        completed_at: u64,
        acks: &BTreeMap<(String, u32), TaskAck>,
        final_: bool,
    ) -> Result<(), RuntimeError> {
        let ck = self.ck.as_ref().expect("checkpointing");
        let (job, retained) = (ck.job.clone(), ck.settings.retained as usize);
        let meta = self.metadata(id, triggered_at, completed_at, acks, final_, false);
        let key = format!("{}/{}", Metadata::dir(id), checkpoint::METADATA);
        job.put(&key, &meta.to_bytes(self.c.opts.secret.for_metadata()))?;
        let mut info = self.info(
            id,
            CheckpointStatus::Completed,
            triggered_at,
            checkpoint::now_ms(),
            acks,
            final_,
            None,
        );
        info.path = Some(job.describe(&key));
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        eprintln!(
            "weir: {}checkpoint {id} completed in {} ms: {:.1} MiB of state, {:.1} MiB uploaded{} ({})",
            if final_ { "final " } else { "" },
            info.duration_ms,
            mib(info.size_bytes),
            mib(info.uploaded_bytes),
            if info.unaligned {
                format!(", unaligned with {:.1} MiB in flight", mib(info.in_flight_bytes))
            } else {
                String::new()
            },
            job.describe(&key)
        );
        self.c.status.record(info);
        self.completed.push_back(meta);
        if self.completed.len() > retained {
            let n = self.completed.len() - retained;
            let dropped: Vec<Metadata> = self.completed.drain(..n).collect();
            let kept: Vec<Metadata> = self.completed.iter().cloned().collect();
            if let Err(e) = checkpoint::discard(job.as_ref(), &dropped, &kept) {
                eprintln!("weir: coordinator: deleting old checkpoints: {e}");
            }
        }
        Ok(())
    }

    /// Deletes every checkpoint of this job id (`spec.checkpointing.onCancel: delete`).
    pub(super) fn delete_checkpoints(&self) {
        let Some(ck) = &self.ck else { return };
        let r = ck.job.list("").and_then(|all| {
            let n = all.len();
            for e in all {
                ck.job.delete(&e.key)?;
            }
            Ok(n)
        });
        match r {
            Ok(n) => {
                ck.root.remove_empty_dirs(&ck.dir);
                eprintln!(
                    "weir: spec.checkpointing.onCancel is delete: deleted the job's checkpoints ({n} files, {})",
                    ck.job.describe("")
                );
            }
            Err(e) => eprintln!(
                "weir: spec.checkpointing.onCancel is delete, but deleting the job's checkpoints in {} failed: {e}",
                ck.job.describe("")
            ),
        }
    }

    /// Completes the pending checkpoints and savepoints that every subtask has acknowledged
    /// or, having ended, takes part in with its final state.
    pub(super) fn conclude_covered(
        &mut self,
        pending: &mut VecDeque<Pending>,
        final_acks: &BTreeMap<(String, u32), TaskAck>,
        failures_in_a_row: &mut u32,
        last_done: &mut Instant,
    ) -> Option<AttemptEnd> {
        let needed = self.acks_needed;
        let covered = |p: &Pending| {
            p.acks.len() + final_acks.keys().filter(|k| !p.acks.contains_key(*k)).count() >= needed
        };
        while let Some(pos) = pending.iter().position(covered) {
            let mut pd = pending.remove(pos).expect("found");
            for (k, a) in final_acks {
                pd.acks.entry(k.clone()).or_insert_with(|| a.clone());
            }
            if let Some(end) = self.conclude(pd, pending, failures_in_a_row, last_done) {
                return Some(end);
            }
        }
        None
    }

    /// Completes a checkpoint or savepoint that has every subtask's part.
    pub(super) fn conclude(
        &mut self,
        pd: Pending,
        pending: &mut VecDeque<Pending>,
        failures_in_a_row: &mut u32,
        last_done: &mut Instant,
    ) -> Option<AttemptEnd> {
        let id = pd.id;
        if let Some(sp) = &pd.savepoint {
            match self.complete_savepoint(&pd, sp) {
                Ok(meta) if sp.target.stop => {
                    // The sinks commit, then the workers end.
                    self.send_all(&ToWorker::Complete { id, final_: false });
                    self.stopped_into = Some((meta, sp.target.dir.clone()));
                }
                Ok(_) => {}
                Err(e) => {
                    let why = format!("writing its metadata: {e}");
                    return self.savepoint_failed(&pd, &why);
                }
            }
            return None;
        }
        // Older checkpoints still in flight are subsumed by this one (savepoints are not).
        pending.retain(|p| p.savepoint.is_some() || p.id > pd.id);
        match self.complete(pd.id, pd.triggered_at, checkpoint::now_ms(), &pd.acks, false) {
            Ok(()) => {
                *failures_in_a_row = 0;
                self.send_all(&ToWorker::Complete { id, final_: false });
            }
            Err(e) => {
                let settings = self.settings();
                let why = format!("checkpoint {id}: writing its metadata: {e}");
                if let Some(end) = self.checkpoint_failed(&pd, why, failures_in_a_row, &settings) {
                    return Some(end);
                }
            }
        }
        *last_done = Instant::now();
        None
    }

    /// Whether worker `w` may acknowledge `ack`: a task of the job, a subtask this
    /// coordinator placed on that worker, and state of that task's operators only, each once.
    pub(super) fn check_ack(&self, w: usize, ack: &TaskAck) -> Result<(), String> {
        let plan = &self.c.plan;
        let (task_of, heads) = crate::exec::tasks(plan);
        let Some(&head) = heads.iter().find(|&&h| plan.ops[h].uid == ack.task) else {
            return Err(format!("it names task {:?}, which the job does not have", ack.task));
        };
        if ack.subtask >= plan.parallelism {
            return Err(format!(
                "it names subtask {} of {:?}, but the job runs {} subtasks",
                ack.subtask, ack.task, plan.parallelism
            ));
        }
        let placed = if self.expected == 1 { 0 } else { ack.subtask as usize };
        if placed != w {
            return Err(format!(
                "it names subtask {} of {:?}, which runs on worker {placed}",
                ack.subtask, ack.task
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for o in &ack.operators {
            let ours = plan.ops.iter().position(|p| p.uid == o.uid);
            if ours.is_none_or(|i| task_of[i] != task_of[head]) {
                return Err(format!(
                    "it holds state of operator {:?}, which is not in task {:?}",
                    o.uid, ack.task
                ));
            }
            if o.subtask != ack.subtask {
                return Err(format!(
                    "it holds state of subtask {} of {:?} as subtask {}'s",
                    o.subtask, o.uid, ack.subtask
                ));
            }
            if !seen.insert(o.uid.as_str()) {
                return Err(format!("it holds the state of operator {:?} twice", o.uid));
            }
        }
        Ok(())
    }
}

/// Checks that a checkpoint fits the job before anything starts.
pub(super) fn check_restore(
    m: &Metadata,
    plan: &Plan,
    allow_non_restored: bool,
) -> Result<(), RuntimeError> {
    // A savepoint is in the one format both backends read; a checkpoint is in its backend's
    // own (RocksDB's files, or the heap's full copy).
    if !m.savepoint && m.state_backend != plan.state_backend {
        return Err(RuntimeError::user(format!(
            "{} was taken with spec.stateBackend {}, but the job has {}: a checkpoint restores only into the backend that took it; to change spec.stateBackend, start from a savepoint (take one with the old backend, then restore it with the new one)",
            m.describe(),
            m.state_backend,
            plan.state_backend
        )));
    }
    if m.max_parallelism != plan.max_parallelism {
        return Err(RuntimeError::user(format!(
            "{} was taken with maxParallelism {}, but the job has {}: maxParallelism cannot change once a job has state",
            m.describe(),
            m.max_parallelism,
            plan.max_parallelism
        )));
    }
    if !allow_non_restored {
        // Operators without state (a map, a split) may come and go.
        let has_state = |o: &&checkpoint::OperatorState| {
            o.keyed.is_some()
                || o.keyed_file.is_some()
                || o.state.is_some()
                || o.in_flight.is_some()
        };
        for o in m.operators.iter().filter(has_state) {
            if !plan.ops.iter().any(|p| p.uid == o.uid) {
                return Err(RuntimeError::user(format!(
                    "{} holds state of operator uid {:?}, which the pipeline no longer has: put it back, or set spec.restore.allowNonRestoredState to drop its state",
                    m.describe(),
                    o.uid
                )));
            }
        }
    }
    Ok(())
}
