//! A job's attempts: launching the workers, waiting for them, handing each its assignment,
//! and running one attempt until it ends (the job finished, a failure, a stop).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::RecvTimeoutError;
use weir_crds::api::{CheckpointStatus, JobState};

use crate::auth::{self};
use crate::checkpoint::{self, Settings, TaskAck};
use crate::control::{
    AssignedCheckpoints, Assignment, SavepointTarget, ToCoordinator, ToWorker, Writer,
};
use crate::error::{RuntimeError, Whose};
use crate::exec::{FINAL, RunSummary};

use super::*;

impl Driver<'_> {
    /// Starts the workers that are this coordinator's to start and are not running.
    pub(super) fn launch(&mut self) -> Result<(), RuntimeError> {
        match &self.c.opts.launch {
            Launch::InProcess { state_dir } => {
                if self.in_process.as_ref().is_some_and(|t| !t.is_finished()) {
                    return Ok(());
                }
                let wopts = crate::worker::WorkerOptions {
                    coordinator: self.connect_to.clone(),
                    index: None,
                    state_dir: state_dir.clone(),
                    data_bind: "127.0.0.1:0".into(),
                    advertise_host: None,
                    stop: Arc::default(),
                    connect_timeout: crate::worker::CONNECT_TIMEOUT,
                    secret: self.c.opts.secret.clone(),
                };
                self.in_process = Some(
                    std::thread::Builder::new()
                        .name("worker".into())
                        .spawn(move || crate::worker::run(&wopts))
                        .map_err(|e| RuntimeError::internal(format!("starting a thread: {e}")))?,
                );
            }
            Launch::Processes { exe, state_dir } => {
                for i in 0..self.expected {
                    if self.slots[i].is_some() {
                        continue;
                    }
                    if let Some(c) = &mut self.children[i]
                        && matches!(c.try_wait(), Ok(None))
                    {
                        continue; // still starting
                    }
                    let child = std::process::Command::new(exe)
                        .args(["worker", "--coordinator", &self.connect_to])
                        .args(["--index", &i.to_string()])
                        .arg("--state-dir")
                        .arg(state_dir)
                        .args(["--data-addr", "127.0.0.1:0"])
                        .env("WEIR_DIE_WITH_PARENT", "1")
                        .env(auth::ENV, self.c.opts.secret.text())
                        .stdin(std::process::Stdio::null())
                        .spawn()
                        .map_err(|e| {
                            RuntimeError::internal(format!("starting {}: {e}", exe.display()))
                        })?;
                    self.children[i] = Some(child);
                }
            }
            Launch::External => {}
        }
        Ok(())
    }

    pub(super) fn connected(&self) -> u32 {
        self.slots.iter().filter(|s| s.is_some()).count() as u32
    }

    pub(super) fn stop_requested(&self) -> bool {
        self.c.opts.stop.load(Ordering::Relaxed)
    }

    pub(super) fn drive(&mut self) -> Result<RunSummary, RuntimeError> {
        loop {
            match self.wait_for_workers()? {
                AttemptEnd::StoppedIdle => {
                    self.c.status.update(|i| i.state = JobState::Finished);
                    return Ok(self.summary());
                }
                AttemptEnd::Failed(e)
                | AttemptEnd::FailedStarting(e)
                | AttemptEnd::Abandoned(e) => return Err(e),
                AttemptEnd::Finished => {}
            }
            let end = self.run_attempt();
            let while_starting = matches!(end, AttemptEnd::FailedStarting(_));
            match end {
                AttemptEnd::Abandoned(e) => {
                    eprintln!("weir: coordinator: {}", e.message);
                    self.cancel_attempt();
                    self.c.status.fail_savepoints(&e.message, false);
                    return Err(e);
                }
                AttemptEnd::Finished | AttemptEnd::StoppedIdle => {
                    self.c.status.update(|i| {
                        i.state = JobState::Finished;
                        i.state_bytes = 0;
                        i.subtask_state_bytes.clear();
                    });
                    return Ok(self.summary());
                }
                AttemptEnd::Failed(e) | AttemptEnd::FailedStarting(e) => {
                    self.cancel_attempt();
                    self.c.status.fail_savepoints(
                        &format!("the job failed before the savepoint completed: {}", e.message),
                        false,
                    );
                    let restart = if e.whose == Whose::User {
                        Err("the error is in the job's spec or input, so a restart would fail the same way".to_string())
                    } else if e.whose == Whose::Damaged {
                        Err("the stored state it restores is damaged, and a restart would read the same bytes: restore the job from a savepoint or an older checkpoint (--from-savepoint, spec.restore.path)".to_string())
                    } else if while_starting
                        && self.uncounted < MAX_UNCOUNTED
                        && self.restarts.restarts_at_all()
                    {
                        // A worker lost while the job was restarting: the same restart, again.
                        self.uncounted += 1;
                        Ok(self.restarts.again())
                    } else {
                        self.uncounted = 0;
                        self.restarts.on_failure(Instant::now())
                    };
                    let delay = match restart {
                        Ok(d) => d,
                        Err(why) => {
                            return Err(RuntimeError {
                                message: format!("{} (not restarted: {why})", e.message),
                                ..e
                            });
                        }
                    };
                    self.attempt += 1;
                    // (Kept: should that attempt fail too, the next one restores it again.)
                    if let Some((from, uri)) = self.stopped_into.clone() {
                        self.start = Start::CommitAndEnd { from, uri };
                    } else if let Some(own) = self.completed.back() {
                        self.start = Start::Restore { from: own.clone(), uri: None };
                    }
                    let from = match &self.start {
                        Start::CommitAndEnd { from: m, .. } => format!(
                            "from {}, which it stopped into, to commit what it holds and end",
                            m.describe()
                        ),
                        Start::Restore { from: m, .. } => format!("from {}", m.describe()),
                        Start::Fresh => "from the beginning (no checkpoint completed yet)".into(),
                    };
                    eprintln!(
                        "weir: coordinator: {}; restarting in {:.1} s {from} (attempt {}{})",
                        e.message,
                        delay.as_secs_f64(),
                        self.attempt,
                        if self.uncounted > 0 {
                            "; it failed while restarting, which is not counted as a new failure"
                        } else {
                            ""
                        }
                    );
                    self.c.status.update(|i| {
                        i.state = JobState::Restarting;
                        i.restarts += 1;
                        i.error = Some(e.message.clone());
                    });
                    let until = Instant::now() + delay;
                    while Instant::now() < until {
                        if self.stop_requested() {
                            self.c.status.update(|i| i.state = JobState::Finished);
                            eprintln!("weir: coordinator: stopped while restarting");
                            return Ok(self.summary());
                        }
                        self.pump(Duration::from_millis(20));
                    }
                }
            }
        }
    }

    pub(super) fn summary(&self) -> RunSummary {
        let records: BTreeMap<String, (u64, u64)> = self
            .c
            .status
            .snapshot()
            .operators
            .iter()
            .map(|o| (o.uid.clone(), (o.records_in, o.records_out)))
            .collect();
        RunSummary { elapsed: self.c.status.started.elapsed(), records }
    }

    /// Handles connection events between attempts: new workers take their slots, lost ones
    /// leave them.
    pub(super) fn pump(&mut self, wait: Duration) {
        self.c.status.expire_savepoint_requests(self.c.spec.savepoints.timeout.as_std());
        match self.events.recv_timeout(wait) {
            Ok(Event::Joined { slot, conn, writer, data_addr }) => {
                self.join(slot, conn, writer, data_addr)
            }
            Ok(Event::Msg { conn, msg }) => {
                if !matches!(msg, Ok(Some(_))) {
                    self.lose(conn);
                }
            }
            Err(_) => {}
        }
    }

    pub(super) fn join(&mut self, slot: usize, conn: u64, writer: Arc<Writer>, data_addr: String) {
        if self.slots[slot].is_some() {
            let why = format!("a second worker with --index {slot}");
            let _ = writer.send(&ToWorker::Refused { reason: why.clone() });
            eprintln!("weir: coordinator: refused a worker: {why}");
            return;
        }
        self.conns.insert(conn, slot);
        self.slots[slot] = Some(Slot { conn, writer, data_addr });
        let n = self.connected();
        self.c.status.update(|i| i.workers_connected = n);
    }

    /// Connection `conn` closed: its slot is free.
    pub(super) fn lose(&mut self, conn: u64) -> Option<usize> {
        let slot = self.conns.remove(&conn)?;
        if self.slots[slot].as_ref().is_some_and(|s| s.conn == conn) {
            self.slots[slot] = None;
        }
        let n = self.connected();
        self.c.status.update(|i| i.workers_connected = n);
        Some(slot)
    }

    /// Waits until a worker is connected for every slot (starting the ones it launches).
    pub(super) fn wait_for_workers(&mut self) -> Result<AttemptEnd, RuntimeError> {
        let mut last_log = Instant::now();
        let mut last_launch = Instant::now();
        while (self.connected() as usize) < self.expected {
            if self.stop_requested() {
                for (w, s) in self.slots.iter().enumerate() {
                    if let Some(s) = s {
                        let _ = s.writer.send(&ToWorker::Refused {
                            reason: format!("the job was stopped before it started (worker {w})"),
                        });
                    }
                }
                eprintln!(
                    "weir: coordinator: stopped with {} of {} workers connected",
                    self.connected(),
                    self.expected
                );
                return Ok(AttemptEnd::StoppedIdle);
            }
            for (i, c) in self.children.iter_mut().enumerate() {
                if self.slots[i].is_some() {
                    continue;
                }
                if let Some(child) = c
                    && let Ok(Some(st)) = child.try_wait()
                {
                    if !self.started_once {
                        return Err(RuntimeError::internal(format!(
                            "worker {i} exited ({st}) before the job started"
                        )));
                    }
                    *c = None;
                }
            }
            if self.started_once && last_launch.elapsed() > Duration::from_millis(200) {
                self.launch()?;
                last_launch = Instant::now();
            }
            if last_log.elapsed() > Duration::from_secs(30) {
                eprintln!(
                    "weir: coordinator: {} of {} workers connected, waiting",
                    self.connected(),
                    self.expected
                );
                last_log = Instant::now();
            }
            self.pump(Duration::from_millis(10));
        }
        Ok(AttemptEnd::Finished)
    }

    /// Tells every worker to give up the attempt and waits (a while) until each has said so
    /// or is gone.
    pub(super) fn cancel_attempt(&mut self) {
        let mut waiting: HashMap<u64, usize> = HashMap::new();
        for (i, s) in self.slots.iter().enumerate() {
            if let Some(s) = s
                && !self.ended.contains(&s.conn)
            {
                let _ = s.writer.send(&ToWorker::Cancel);
                waiting.insert(s.conn, i);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while !waiting.is_empty() && Instant::now() < deadline {
            match self.events.recv_timeout(Duration::from_millis(50)) {
                Ok(Event::Msg { conn, msg }) => match msg {
                    Ok(Some(ToCoordinator::Failed { .. } | ToCoordinator::Finished { .. })) => {
                        waiting.remove(&conn);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => {
                        waiting.remove(&conn);
                        self.lose(conn);
                    }
                },
                Ok(Event::Joined { slot, conn, writer, data_addr }) => {
                    self.join(slot, conn, writer, data_addr)
                }
                Err(_) => {}
            }
        }
        // Workers that did not answer are dropped (and killed, if this coordinator started
        // them): the next attempt starts with fresh ones.
        for (conn, slot) in waiting {
            eprintln!("weir: coordinator: worker {slot} did not end its attempt; dropping it");
            if let Some(s) = &self.slots[slot] {
                s.writer.shutdown();
            }
            self.lose(conn);
            if let Some(c) = &mut self.children[slot] {
                let _ = c.kill();
                let _ = c.wait();
                self.children[slot] = None;
            }
        }
    }

    pub(super) fn assignment(&self, worker: usize, worker_of: &[u32]) -> Assignment {
        let p = self.c.plan.parallelism;
        let data_addrs: Vec<String> = self
            .slots
            .iter()
            .map(|s| s.as_ref().map(|s| s.data_addr.clone()).unwrap_or_default())
            .collect();
        let checkpoints = self.ck.as_ref().map(|ck| {
            let hosted: Vec<u32> =
                (0..p).filter(|&s| worker_of[s as usize] == worker as u32).collect();
            // At another parallelism every subtask may take state of any old one.
            let restore = self
                .start
                .metadata()
                .map(|m| {
                    m.operators
                        .iter()
                        .filter(|o| m.parallelism != p || hosted.contains(&o.subtask))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            AssignedCheckpoints {
                settings: ck.settings.clone(),
                storage: ck.uri.clone(),
                job_dir: ck.dir.clone(),
                after_id: self.last_id,
                restore,
                restored_parallelism: self.start.metadata().map(|m| m.parallelism),
                restore_storage: self.start.uri().cloned(),
                stop_at_start: self.start.ends_at_once(),
            }
        });
        Assignment {
            plan: self.c.plan.clone(),
            run_id: self.c.opts.run_id.clone(),
            worker_of: worker_of.to_vec(),
            data_addrs,
            keep_state: self.c.opts.keep_state,
            job_id: self.job_id.clone(),
            attempt: self.attempt,
            checkpoints,
        }
    }

    /// The checkpoint settings of a job that takes checkpoints.
    pub(super) fn settings(&self) -> Settings {
        self.ck.as_ref().expect("checkpointing").settings.clone()
    }

    pub(super) fn send_all(&self, msg: &ToWorker) {
        for s in self.slots.iter().flatten() {
            let _ = s.writer.send(msg);
        }
    }

    /// Runs one attempt of the job until it finishes or fails.
    pub(super) fn run_attempt(&mut self) -> AttemptEnd {
        let p = self.c.plan.parallelism;
        let worker_of: Vec<u32> = (0..p).map(|s| if self.expected == 1 { 0 } else { s }).collect();
        for w in 0..self.expected {
            let start = ToWorker::Start(Box::new(self.assignment(w, &worker_of)));
            let slot = self.slots[w].as_ref().expect("all connected");
            if let Err(e) = slot.writer.send(&start) {
                return AttemptEnd::Failed(
                    RuntimeError::external(format!("sending the job to worker {w}: {e}"))
                        .retryable(),
                );
            }
        }
        self.started_once = true;
        self.ended.clear();
        self.restarts.started(Instant::now());
        self.c.status.update(|i| {
            i.state = JobState::Running;
            i.error = None;
        });
        let conns: HashMap<u64, usize> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (s.conn, i)))
            .collect();
        let mut progress: Vec<Progress> = vec![Progress::default(); self.expected];
        let mut finished = vec![false; self.expected];
        // Workers that reported progress: their subtasks run (the exchange connected, the
        // state restored). A lost connection before all have is a failure of the restart.
        let mut running = vec![false; self.expected];
        let mut stopping = false;
        let mut stopping_since = Instant::now();
        // Told to stop, the workers flush and take their final checkpoint: as long as a
        // checkpoint may take, and no less than half a minute.
        let stop_limit = self.c.spec.checkpointing.timeout.as_std().max(Duration::from_secs(30));
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let mut final_acks: BTreeMap<(String, u32), TaskAck> = BTreeMap::new();
        let mut final_sent = false;
        // A savepoint that stops the job was triggered: no checkpoint after it.
        let mut stop_savepoint = self.start.ends_at_once();
        let mut failures_in_a_row: u32 = 0;
        let attempt_start = Instant::now();
        let mut last_trigger: Option<Instant> = None;
        let mut last_done = attempt_start;
        loop {
            if !stopping && self.stop_requested() {
                stopping = true;
                stopping_since = Instant::now();
                self.c.status.update(|i| i.state = JobState::Stopping);
                self.send_all(&ToWorker::Stop);
            }
            self.c.status.expire_savepoint_requests(self.c.spec.savepoints.timeout.as_std());
            if stopping && stopping_since.elapsed() > stop_limit {
                return AttemptEnd::Abandoned(RuntimeError::external(format!(
                    "the job did not stop within {} s of being told to (spec.checkpointing.timeout, at least 30 s): its workers were cancelled; it resumes from its last completed checkpoint",
                    stop_limit.as_secs()
                )));
            }
            // Checkpoints and savepoints: trigger, time out.
            if let Some(settings) = self.ck.as_ref().map(|ck| ck.settings.clone()) {
                // Subtasks that ended take part with their final state: checkpoints go on
                // until every subtask has ended (FLIP-147).
                let open = !stopping && !stop_savepoint && !final_sent;
                // One savepoint at a time, and no checkpoint while it is in flight: nothing
                // can turn its barrier into an unaligned one.
                if open
                    && !pending.iter().any(|p| p.savepoint.is_some())
                    && let Some(req) = self.c.status.next_savepoint_request()
                {
                    let root = req.directory.clone().or_else(|| self.savepoint_root.clone());
                    let dir = root.expect("checkpointing has a savepoint directory").join(
                        &format!("{}/{}/sp-{}", self.c.opts.namespace, self.c.opts.name, req.id),
                    );
                    self.last_id += 1;
                    let id = self.last_id;
                    let target = SavepointTarget { dir: dir.clone(), stop: req.stop };
                    eprintln!(
                        "weir: coordinator: savepoint {} (checkpoint {id}) to {dir}{}",
                        req.id,
                        if req.stop { ", then the job stops" } else { "" }
                    );
                    self.send_all(&ToWorker::Trigger { id, savepoint: Some(target.clone()) });
                    pending.push_back(Pending {
                        id,
                        triggered: Instant::now(),
                        triggered_at: checkpoint::now_ms(),
                        acks: BTreeMap::new(),
                        savepoint: Some(PendingSavepoint { request: req.id.clone(), target }),
                    });
                    self.c.status.update_savepoint(&req.id, |s| s.checkpoint_id = Some(id));
                    if req.stop {
                        stop_savepoint = true;
                        self.c.status.update(|i| i.state = JobState::Stopping);
                    }
                }
                let open = open && !stop_savepoint;
                let requested = self.c.status.trigger.load(Ordering::Relaxed);
                let due = !settings.interval.is_zero()
                    && last_trigger.unwrap_or(attempt_start).elapsed() >= settings.interval
                    && last_done.elapsed() >= settings.min_pause;
                if (due || requested)
                    && open
                    && !pending.iter().any(|p| p.savepoint.is_some())
                    && pending.len() < settings.max_concurrent as usize
                {
                    self.c.status.trigger.store(false, Ordering::Relaxed);
                    self.last_id += 1;
                    let id = self.last_id;
                    let now_ms = checkpoint::now_ms();
                    pending.push_back(Pending {
                        id,
                        triggered: Instant::now(),
                        triggered_at: now_ms,
                        acks: BTreeMap::new(),
                        savepoint: None,
                    });
                    last_trigger = Some(Instant::now());
                    self.send_all(&ToWorker::Trigger { id, savepoint: None });
                    self.c.status.record(self.info(
                        id,
                        CheckpointStatus::InProgress,
                        now_ms,
                        0,
                        &BTreeMap::new(),
                        false,
                        None,
                    ));
                }
                let sp_timeout = self.c.spec.savepoints.timeout.as_std();
                while let Some(pos) = pending.iter().position(|p| {
                    let t = if p.savepoint.is_some() { sp_timeout } else { settings.timeout };
                    p.triggered.elapsed() >= t
                }) {
                    let pd = pending.remove(pos).expect("found");
                    if pd.savepoint.is_some() {
                        let why = format!(
                            "expired after {} (spec.savepoints.timeout) with {} of {} subtasks acknowledged",
                            self.c.spec.savepoints.timeout,
                            pd.acks.len(),
                            self.acks_needed
                        );
                        if let Some(end) = self.savepoint_failed(&pd, &why) {
                            return end;
                        }
                        continue;
                    }
                    let why = format!(
                        "checkpoint {} expired after {} with {} of {} subtasks acknowledged",
                        pd.id,
                        self.c.spec.checkpointing.timeout,
                        pd.acks.len(),
                        self.acks_needed
                    );
                    if let Some(end) =
                        self.checkpoint_failed(&pd, why, &mut failures_in_a_row, &settings)
                    {
                        return end;
                    }
                    last_done = Instant::now();
                }
            }
            let (conn, msg) = match self.events.recv_timeout(Duration::from_millis(20)) {
                Ok(Event::Msg { conn, msg }) => (conn, msg),
                Ok(Event::Joined { slot, conn, writer, data_addr }) => {
                    // A worker for a slot that is taken (the job runs with all slots filled).
                    self.join(slot, conn, writer, data_addr);
                    continue;
                }
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    return AttemptEnd::Failed(RuntimeError::internal(
                        "the control listener stopped",
                    ));
                }
            };
            let Some(&w) = conns.get(&conn) else {
                // A connection from before this attempt.
                if !matches!(msg, Ok(Some(_))) {
                    self.lose(conn);
                }
                continue;
            };
            // Only what the coordinator assigned: a forged acknowledgement would complete a
            // checkpoint that holds no state of the subtask it names.
            // What belongs to an attempt that is over (a worker slow to report its end) is
            // not this attempt's.
            if let Ok(Some(
                ToCoordinator::Ack { attempt, .. }
                | ToCoordinator::Decline { attempt, .. }
                | ToCoordinator::Finished { attempt, .. }
                | ToCoordinator::Failed { attempt, .. },
            )) = &msg
                && *attempt != self.attempt
            {
                continue;
            }
            if let Ok(Some(ToCoordinator::Ack { ack, .. })) = &msg
                && let Err(why) = self.check_ack(w, ack)
            {
                return AttemptEnd::Failed(RuntimeError::internal(format!(
                    "worker {w} sent an acknowledgement that does not fit the job, so the attempt is given up: {why}"
                )));
            }
            match msg {
                Ok(Some(ToCoordinator::Progress {
                    records,
                    state_bytes,
                    dropped,
                    late,
                    subtask_state_bytes,
                    watermarks,
                    user_metrics,
                    connectors,
                })) => {
                    progress[w] = Progress {
                        records,
                        state_bytes,
                        dropped,
                        late,
                        subtask_state_bytes,
                        watermarks,
                        user_metrics,
                        connectors,
                    };
                    running[w] = true;
                    self.publish(&progress);
                }
                Ok(Some(ToCoordinator::Ack { id, ack, .. })) if id == FINAL => {
                    // A subtask that ended takes part in later checkpoints with its final
                    // state (FLIP-147). A savepoint is self-contained: keyed state in the
                    // checkpoint's files cannot be part of it.
                    if ack.operators.iter().any(|o| o.keyed.is_some() || o.keyed_file.is_some()) {
                        while let Some(pos) = pending.iter().position(|p| p.savepoint.is_some()) {
                            let pd = pending.remove(pos).expect("found");
                            let why = format!(
                                "subtask {} of {:?} ended (its input was exhausted) before the savepoint's barrier reached it, and its keyed state cannot be written into the savepoint after its end",
                                ack.subtask, ack.task
                            );
                            if let Some(end) = self.savepoint_failed(&pd, &why) {
                                return end;
                            }
                        }
                    }
                    final_acks.insert((ack.task.clone(), ack.subtask), *ack);
                    if final_acks.len() == self.acks_needed && !final_sent {
                        // Pending checkpoints can no longer complete: the final one subsumes them.
                        pending.clear();
                        self.last_id += 1;
                        let id = self.last_id;
                        let now = checkpoint::now_ms();
                        if let Err(e) = self.complete(id, now, now, &final_acks, true) {
                            return AttemptEnd::Failed(e);
                        }
                        final_sent = true;
                        self.send_all(&ToWorker::Complete { id, final_: true });
                        continue;
                    }
                    if let Some(end) = self.conclude_covered(
                        &mut pending,
                        &final_acks,
                        &mut failures_in_a_row,
                        &mut last_done,
                    ) {
                        return end;
                    }
                }
                Ok(Some(ToCoordinator::Ack { id, ack, .. })) => {
                    let Some(pd) = pending.iter_mut().find(|p| p.id == id) else { continue };
                    pd.acks.insert((ack.task.clone(), ack.subtask), *ack);
                    if let Some(end) = self.conclude_covered(
                        &mut pending,
                        &final_acks,
                        &mut failures_in_a_row,
                        &mut last_done,
                    ) {
                        return end;
                    }
                }
                Ok(Some(ToCoordinator::Decline { id, message, .. })) => {
                    if id == FINAL {
                        return AttemptEnd::Failed(
                            RuntimeError::external(format!(
                                "worker {w}: the final checkpoint failed: {message}"
                            ))
                            .retryable(),
                        );
                    }
                    let Some(pos) = pending.iter().position(|p| p.id == id) else { continue };
                    let pd = pending.remove(pos).expect("found");
                    if pd.savepoint.is_some() {
                        let why = format!("declined by worker {w}: {message}");
                        if let Some(end) = self.savepoint_failed(&pd, &why) {
                            return end;
                        }
                        continue;
                    }
                    let settings = self.settings();
                    let why = format!("checkpoint {id} declined by worker {w}: {message}");
                    if let Some(end) =
                        self.checkpoint_failed(&pd, why, &mut failures_in_a_row, &settings)
                    {
                        return end;
                    }
                    last_done = Instant::now();
                }
                Ok(Some(ToCoordinator::Finished {
                    records,
                    dropped,
                    late,
                    user_metrics,
                    connectors,
                    ..
                })) => {
                    self.ended.insert(conn);
                    progress[w] = Progress {
                        records,
                        state_bytes: 0,
                        dropped,
                        late,
                        subtask_state_bytes: Vec::new(),
                        watermarks: std::mem::take(&mut progress[w].watermarks),
                        user_metrics,
                        connectors,
                    };
                    finished[w] = true;
                    self.publish(&progress);
                    if finished.iter().all(|&f| f) {
                        return AttemptEnd::Finished;
                    }
                }
                Ok(Some(ToCoordinator::Failed { message, user, retryable, damaged, .. })) => {
                    self.ended.insert(conn);
                    let whose = match (user, damaged) {
                        (true, _) => Whose::User,
                        (_, true) => Whose::Damaged,
                        _ => Whose::External,
                    };
                    let e = RuntimeError {
                        whose,
                        retryable,
                        message: format!("worker {w}: {message}"),
                    };
                    return if retryable && !running.iter().all(|&r| r) {
                        AttemptEnd::FailedStarting(e)
                    } else {
                        AttemptEnd::Failed(e)
                    };
                }
                Ok(Some(ToCoordinator::Hello { .. } | ToCoordinator::Proof { .. })) => {
                    return AttemptEnd::Failed(RuntimeError::internal(format!(
                        "worker {w} said hello twice"
                    )));
                }
                Ok(None) | Err(_) => {
                    let why = match msg {
                        Err(e) => e,
                        _ => "closed the connection".into(),
                    };
                    self.lose(conn);
                    if finished[w] {
                        continue;
                    }
                    let e =
                        RuntimeError::external(format!("worker {w} was lost: {why}")).retryable();
                    return if running.iter().all(|&r| r) {
                        AttemptEnd::Failed(e)
                    } else {
                        AttemptEnd::FailedStarting(e)
                    };
                }
            }
        }
    }
}
