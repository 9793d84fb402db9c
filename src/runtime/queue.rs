//! One sink's queue: where its records wait between the pipeline lanes and its writers, so
//! that each sink consumes at its own pace.
//!
//! Two tiers, one order. While the sink keeps up, records wait in memory, one bounded deque per
//! lane, each holding its change's ticket until the sink applied it. When the sink holds the
//! others back or is stuck, the queue *spills*: every record not yet applied is written to the
//! sink's [`Spool`] and its ticket released, and from then on new records go to the spool too.
//! It spills when a lane is full or a record waited longer than `spill_after` *while another
//! sink has nothing to do* (it waits for this one through the window; a sink counts only while
//! it is being fed records, so one whose pipelines match nothing of the workload does not), when no write of this
//! sink succeeded for `spill_after` (stalled), when writes fail, or when a truncate needs a
//! barrier. A sink that is merely slower than the source, with no other sink waiting for it (a
//! backlog drain into one sink), is not spilled: a full lane is backpressure, which costs less
//! than writing every record to disk and reading it back.
//! The spool task reads them back in order and hands them to the lanes as room allows; once it
//! has caught up with the end, new records go to memory again. Either way a change's position
//! is confirmed only when each sink has applied or durably spooled its records.
//!
//! Every record has a sequence number; per key, order holds because a key's records go to one
//! lane in sequence order, from memory or from the spool, and a lane's writer is sequential.
//! A record spilled while its write was in flight may be applied twice (its spooled copy comes
//! later in the same lane): harmless, since every sink write is idempotent or version-guarded.
//!
//! A barrier (a truncate) is applied only after every earlier record of the sink is applied,
//! and before any later one is handed to a writer.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::record::Item;
use super::spool::{ReadPos, Spool, SpoolError};
use super::window::Ticket;
use crate::change::Name;
use crate::sink::Record;
use crate::telemetry::metrics;

/// Most records waiting to be appended to the spool; intake waits beyond this.
const PENDING_CAP: usize = 8192;
/// Records read from the spool per read.
const READ_BATCH: usize = 512;

/// Which sink queues of a topology have nothing to do right now, shared by every queue of it:
/// a queue that is full or slow spills only when some other queue is hungry, i.e. when it is
/// holding the others back through the window.
///
/// A queue counts only while it is fed: it took a record within [`FED_RECENTLY`]. A sink whose
/// pipelines match nothing of the current workload is idle, not waiting, and a backlog drain
/// into the one sink that does get records stays backpressure instead of a spill to disk.
#[derive(Debug, Default)]
pub struct Hunger {
    cells: Mutex<Vec<std::sync::Weak<HungerCell>>>,
}

/// How recently a queue must have taken a record to count as waiting for the others.
pub const FED_RECENTLY: Duration = Duration::from_secs(30);

/// One queue's entry in [`Hunger`].
#[derive(Debug)]
struct HungerCell {
    hungry: std::sync::atomic::AtomicBool,
    /// When it last took a record, or `None` (never since it started).
    fed: Mutex<Option<Instant>>,
}

impl Hunger {
    fn register(&self) -> Arc<HungerCell> {
        let cell = Arc::new(HungerCell { hungry: false.into(), fed: Mutex::new(None) });
        let mut cells = self.cells.lock().unwrap_or_else(|p| p.into_inner());
        cells.retain(|c| c.strong_count() > 0);
        cells.push(Arc::downgrade(&cell));
        cell
    }

    /// Queues with nothing to do that took a record within [`FED_RECENTLY`].
    pub fn hungry(&self) -> usize {
        self.hungry_besides(None)
    }

    fn hungry_besides(&self, me: Option<&Arc<HungerCell>>) -> usize {
        let cells = self.cells.lock().unwrap_or_else(|p| p.into_inner());
        cells
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .filter(|c| me.is_none_or(|m| !Arc::ptr_eq(m, c)))
            .filter(|c| c.hungry.load(Ordering::SeqCst))
            .filter(|c| c.fed.lock().unwrap_or_else(|p| p.into_inner()).is_some_and(|t| t.elapsed() <= FED_RECENTLY))
            .count()
    }
}

/// The queue no longer takes records (shutdown, or the sink was removed).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the sink's queue is closed")]
pub struct Closed;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Memory,
    Spool,
}

struct Held {
    rec: Arc<Record>,
    ticket: Ticket,
    since: Instant,
}

struct Pending {
    seq: u64,
    rec: Arc<Record>,
    ticket: Option<Ticket>,
    barrier: bool,
}

impl Pending {
    fn leased(&self) -> bool {
        self.ticket.as_ref().is_some_and(Ticket::is_leased)
    }
}

struct State {
    mode: Mode,
    closed: bool,
    next_seq: u64,
    lanes: Vec<VecDeque<Item>>,
    /// Memory records not yet applied, by sequence number.
    held: BTreeMap<u64, Held>,
    /// Records to append to the spool, in sequence order.
    pending: Vec<Pending>,
    /// Records being appended right now.
    writing: usize,
    /// Spooled records handed to the lanes and not yet applied, with their commit times.
    dispatched: BTreeMap<u64, Option<chrono::DateTime<chrono::Utc>>>,
    /// Tickets of spooled records read under a lease: released only once applied, since a new
    /// owner of the shard resumes from its last checkpoint (bounded by those windows' sizes).
    kept: std::collections::HashMap<u64, Ticket>,
    /// Where the spool task reads next.
    read: Option<ReadPos>,
    /// Records read from the spool that did not fit their lane yet.
    carry: VecDeque<Item>,
    /// A spooled barrier read and waiting for every earlier record, or in flight.
    barrier: Option<(u64, bool)>,
    /// Last append failure, for the log (once per failure streak).
    spool_error: Option<String>,
    /// Counted in the topology's [`Hunger`].
    hungry: bool,
    /// When a write of this sink last completed (or the queue started).
    last_progress: Instant,
}

/// A sink's queue, shared by the pipeline lanes (intake), its writers and its spool task.
pub struct SinkQueue {
    name: Name,
    lane_cap: usize,
    spill_after: Duration,
    spool: Option<Arc<Spool>>,
    state: Mutex<State>,
    lane_ready: Vec<Notify>,
    room: Notify,
    spool_wake: Notify,
    hunger: Arc<Hunger>,
    hunger_cell: Arc<HungerCell>,
}

/// What a writer took: records of one lane, or a barrier alone.
pub enum Take {
    /// Records to write together.
    Batch(Vec<Item>),
    /// A barrier: write it alone.
    Barrier(Item),
    /// Closed and drained.
    Closed,
}

impl SinkQueue {
    /// A queue for `lanes` lanes of up to `lane_cap` records each, spilling to `spool` (none:
    /// memory only, and a full lane is backpressure). Starts in spool mode when the spool holds
    /// records from an earlier run.
    pub fn new(
        name: Name,
        lanes: usize,
        lane_cap: usize,
        spill_after: Duration,
        spool: Option<Arc<Spool>>,
        hunger: Arc<Hunger>,
    ) -> SinkQueue {
        let (mode, next_seq, read) = match &spool {
            Some(s) if !s.is_empty() => (Mode::Spool, s.end(), Some(s.start())),
            Some(s) => (Mode::Memory, s.end(), None),
            None => (Mode::Memory, 0, None),
        };
        let q = SinkQueue {
            name,
            lane_cap: lane_cap.max(1),
            spill_after,
            spool,
            state: Mutex::new(State {
                mode,
                closed: false,
                next_seq,
                lanes: (0..lanes.max(1)).map(|_| VecDeque::new()).collect(),
                held: BTreeMap::new(),
                pending: Vec::new(),
                writing: 0,
                dispatched: BTreeMap::new(),
                kept: std::collections::HashMap::new(),
                read,
                carry: VecDeque::new(),
                barrier: None,
                spool_error: None,
                hungry: false,
                last_progress: Instant::now(),
            }),
            lane_ready: (0..lanes.max(1)).map(|_| Notify::new()).collect(),
            room: Notify::new(),
            spool_wake: Notify::new(),
            hunger_cell: hunger.register(),
            hunger,
        };
        q.update_hunger(&mut q.lock());
        q
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Recount this queue in the shared [`Hunger`] after its state changed.
    fn update_hunger(&self, st: &mut State) {
        let now = st.mode == Mode::Memory && st.held.is_empty() && st.pending.is_empty() && !st.closed;
        if now != st.hungry {
            st.hungry = now;
            self.hunger_cell.hungry.store(now, Ordering::SeqCst);
        }
    }

    /// Another queue that is being fed has nothing to do (this one is holding it back).
    fn others_hungry(&self, _st: &State) -> bool {
        self.hunger.hungry_besides(Some(&self.hunger_cell)) > 0
    }

    /// Sink name.
    pub fn name(&self) -> &Name {
        &self.name
    }

    /// Number of lanes.
    pub fn lanes(&self) -> usize {
        self.lane_ready.len()
    }

    /// The spool, if this sink has one.
    pub fn spool(&self) -> Option<&Arc<Spool>> {
        self.spool.as_ref()
    }

    /// Records not yet applied: in memory, waiting for the spool, and in the spool.
    pub fn backlog(&self) -> u64 {
        let st = self.lock();
        let spooled = self.spool.as_ref().map_or(0, |s| s.backlog());
        st.held.len() as u64 + st.pending.len() as u64 + spooled
    }

    /// True when the queue is in spool mode (the sink is behind).
    pub fn spooling(&self) -> bool {
        self.lock().mode == Mode::Spool
    }

    /// Seconds the sink is behind: from the source commit of the oldest record it has not
    /// applied (in memory or read back from the spool) to now; 0 when nothing waits.
    pub fn lag_seconds(&self) -> f64 {
        let st = self.lock();
        let oldest = [
            st.held.values().next().and_then(|h| h.rec.change.commit_time),
            st.dispatched.values().next().copied().flatten(),
            st.carry.front().and_then(|i| i.rec.change.commit_time),
            st.pending.first().and_then(|p| p.rec.change.commit_time),
        ]
        .into_iter()
        .flatten()
        .min();
        match oldest {
            Some(t) => ((chrono::Utc::now() - t).num_milliseconds().max(0) as f64) / 1e3,
            None => 0.0,
        }
    }

    /// Take a record for `lane`. `barrier`: the record must be applied after every earlier
    /// record of this sink and before every later one (a truncate); the caller guarantees no
    /// later record arrives until this returns. Cancel-safe: nothing is taken until it returns.
    pub async fn push(&self, lane: usize, rec: Arc<Record>, ticket: Ticket, barrier: bool) -> Result<(), Closed> {
        enum Next {
            Queued(usize),
            Spooled,
            MemoryBarrier,
            Wait,
        }
        let mut ticket = Some(ticket);
        loop {
            let room = self.room.notified();
            let next = {
                let mut st = self.lock();
                if st.closed {
                    return Err(Closed);
                }
                let lane = lane % st.lanes.len();
                *self.hunger_cell.fed.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
                match st.mode {
                    Mode::Memory if !barrier && st.lanes[lane].len() < self.lane_cap => {
                        let seq = st.next_seq;
                        st.next_seq += 1;
                        let t = ticket.take().expect("taken once");
                        let fence = t.fence();
                        st.held.insert(seq, Held { rec: Arc::clone(&rec), ticket: t, since: Instant::now() });
                        st.lanes[lane].push_back(Item { seq, rec: Arc::clone(&rec), held: true, fence });
                        self.update_hunger(&mut st);
                        Next::Queued(lane)
                    }
                    // A full lane while no other sink waits for this one: backpressure.
                    Mode::Memory if !barrier && !self.others_hungry(&st) => Next::Wait,
                    Mode::Memory if self.spool.is_some() => {
                        self.spill_locked(
                            &mut st,
                            if barrier { "a truncate needs a barrier" } else { "a lane is full" },
                        );
                        continue;
                    }
                    Mode::Memory if barrier => Next::MemoryBarrier,
                    Mode::Memory => Next::Wait,
                    Mode::Spool if st.pending.len() < PENDING_CAP => {
                        let seq = st.next_seq;
                        st.next_seq += 1;
                        st.pending.push(Pending { seq, rec: Arc::clone(&rec), ticket: ticket.take(), barrier });
                        self.update_hunger(&mut st);
                        Next::Spooled
                    }
                    Mode::Spool => Next::Wait,
                }
            };
            match next {
                Next::Queued(lane) => {
                    self.lane_ready[lane].notify_one();
                    return Ok(());
                }
                Next::Spooled => {
                    self.spool_wake.notify_one();
                    return Ok(());
                }
                Next::MemoryBarrier => {
                    return self.memory_barrier(lane, rec, ticket.take().expect("taken once")).await;
                }
                Next::Wait => room.await,
            }
        }
    }

    /// A barrier without a spool: wait until every earlier record is applied, then hand the
    /// barrier to its lane alone and wait until it is applied too.
    async fn memory_barrier(&self, lane: usize, rec: Arc<Record>, ticket: Ticket) -> Result<(), Closed> {
        loop {
            let room = self.room.notified();
            {
                let mut st = self.lock();
                if st.closed {
                    return Err(Closed);
                }
                if st.held.is_empty() {
                    let seq = st.next_seq;
                    st.next_seq += 1;
                    let lane = lane % st.lanes.len();
                    let fence = ticket.fence();
                    st.held.insert(seq, Held { rec: Arc::clone(&rec), ticket, since: Instant::now() });
                    st.lanes[lane].push_back(Item { seq, rec, held: true, fence });
                    st.barrier = Some((seq, true));
                    drop(st);
                    self.lane_ready[lane].notify_one();
                    break;
                }
            }
            room.await;
        }
        loop {
            let room = self.room.notified();
            {
                let st = self.lock();
                if st.barrier.is_none() || st.closed {
                    return Ok(());
                }
            }
            room.await;
        }
    }

    /// Move every memory record not yet applied to the spool (in sequence order) and switch
    /// to spool mode. Their tickets are released once the spool task made them durable.
    fn spill_locked(&self, st: &mut State, why: &str) {
        if st.mode == Mode::Spool || self.spool.is_none() {
            return;
        }
        let held = std::mem::take(&mut st.held);
        let n = held.len();
        let mut spilled: Vec<Pending> = held
            .into_iter()
            .map(|(seq, h)| Pending { seq, rec: h.rec, ticket: Some(h.ticket), barrier: false })
            .collect();
        spilled.append(&mut st.pending);
        st.pending = spilled;
        for lane in st.lanes.iter_mut() {
            lane.retain(|i| !i.held);
        }
        st.mode = Mode::Spool;
        self.update_hunger(st);
        st.read = self.spool.as_ref().map(|s| s.start());
        metrics().sink_spills.with_label_values(&[&self.name]).inc();
        tracing::info!(sink = %self.name, records = n, reason = why, "sink is behind: its records go to the spool until it catches up");
        self.spool_wake.notify_one();
        self.room.notify_waiters();
    }

    /// Spill now if the sink is behind: a memory record has waited longer than `spill_after`
    /// and another sink waits for this one, or no write completed for `spill_after` (stalled).
    pub fn spill_if_behind(&self) {
        let mut st = self.lock();
        let old = st.held.values().next().is_some_and(|h| h.since.elapsed() >= self.spill_after);
        if !old {
            return;
        }
        if st.last_progress.elapsed() >= self.spill_after {
            self.spill_locked(&mut st, "no write completed for spill_after (the sink is stuck)");
        } else if self.others_hungry(&st) {
            self.spill_locked(&mut st, "a record waited longer than spill_after while other sinks wait");
        }
    }

    /// A write of `seqs` failed: spill if the oldest has waited long enough. Returns true when
    /// the memory records of the batch now live in the spool (the writer drops them).
    pub fn spill_after_failure(&self, oldest: Instant) -> bool {
        let mut st = self.lock();
        if st.mode == Mode::Memory && self.spool.is_some() && oldest.elapsed() >= self.spill_after {
            self.spill_locked(&mut st, "a write to the sink failed");
        }
        st.mode == Mode::Spool
    }

    /// Is this memory record still waiting in memory (not spilled)?
    pub fn is_held(&self, seq: u64) -> bool {
        self.lock().held.contains_key(&seq)
    }

    /// When a memory record was queued.
    pub fn held_since(&self, seq: u64) -> Option<Instant> {
        self.lock().held.get(&seq).map(|h| h.since)
    }

    /// Take up to `max` records of `lane` (waiting `linger` for more once one is there), or a
    /// barrier alone. Cancel-safe.
    pub async fn take(&self, lane: usize, max: usize, linger: Duration) -> Take {
        let mut out: Vec<Item> = Vec::new();
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let ready = self.lane_ready[lane].notified();
            {
                let mut st = self.lock();
                let barrier = st.barrier.map(|b| b.0);
                let q = &mut st.lanes[lane];
                while out.len() < max.max(1) {
                    match q.front() {
                        Some(i) if Some(i.seq) == barrier => {
                            if out.is_empty() {
                                let item = q.pop_front().expect("front exists");
                                drop(st);
                                self.room.notify_waiters();
                                return Take::Barrier(item);
                            }
                            break;
                        }
                        Some(_) => out.push(q.pop_front().expect("front exists")),
                        None => break,
                    }
                }
                let closed = st.closed && st.lanes[lane].is_empty();
                let full = out.len() >= max.max(1) || st.lanes[lane].front().is_some_and(|i| Some(i.seq) == barrier);
                drop(st);
                if !out.is_empty() {
                    self.room.notify_waiters();
                    self.spool_wake.notify_one();
                }
                if full || (!out.is_empty() && linger.is_zero()) {
                    return Take::Batch(out);
                }
                if out.is_empty() && closed {
                    return Take::Closed;
                }
            }
            if !out.is_empty() {
                let d = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + linger);
                tokio::select! {
                    _ = ready => {}
                    _ = tokio::time::sleep_until(d) => return Take::Batch(out),
                }
            } else {
                ready.await;
            }
        }
    }

    /// These records are applied (or dead-lettered): release their tickets, let the cursor move.
    /// A memory record that was spilled meanwhile has no ticket left here (the spool released
    /// it) and its spooled copy is applied again later, harmlessly.
    pub fn complete(&self, items: &[Item]) {
        if items.is_empty() {
            return;
        }
        let mut tickets = Vec::new();
        {
            let mut st = self.lock();
            st.last_progress = Instant::now();
            for i in items {
                if i.held {
                    if let Some(h) = st.held.remove(&i.seq) {
                        tickets.push(h.ticket);
                    }
                } else {
                    st.dispatched.remove(&i.seq);
                    if let Some(t) = st.kept.remove(&i.seq) {
                        tickets.push(t);
                    }
                }
                if st.barrier.is_some_and(|b| b.0 == i.seq) {
                    st.barrier = None;
                }
            }
            self.update_hunger(&mut st);
        }
        for t in tickets {
            t.ack();
        }
        self.room.notify_waiters();
        self.spool_wake.notify_one();
    }

    /// Stop: no more records are taken or read back from the spool; writers finish what their
    /// lanes hold and end. The spool keeps the rest for the next start.
    pub fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        self.update_hunger(&mut st);
        drop(st);
        self.room.notify_waiters();
        self.spool_wake.notify_one();
        for n in &self.lane_ready {
            n.notify_one();
        }
    }

    /// Wake every writer (a sink swap or a stop).
    pub fn wake_writers(&self) {
        for n in &self.lane_ready {
            n.notify_one();
        }
    }

    /// True when nothing is left anywhere (memory, pending, spool).
    pub fn is_drained(&self) -> bool {
        let st = self.lock();
        st.held.is_empty()
            && st.pending.is_empty()
            && st.writing == 0
            && st.lanes.iter().all(VecDeque::is_empty)
            && self.spool.as_ref().is_none_or(|s| s.is_empty())
    }

    /// These records were read under a lease that is no longer valid: they leave the queue
    /// unapplied and their tickets are dropped, never acknowledged, so nothing past them is
    /// confirmed (the shard's next owner reads them again).
    pub fn abandon(&self, items: &[Item]) {
        if items.is_empty() {
            return;
        }
        {
            let mut st = self.lock();
            st.last_progress = Instant::now();
            for i in items {
                if i.held {
                    st.held.remove(&i.seq);
                } else {
                    st.dispatched.remove(&i.seq);
                    st.kept.remove(&i.seq);
                }
            }
            self.update_hunger(&mut st);
        }
        metrics().sink_fenced.with_label_values(&[&self.name]).inc_by(items.len() as u64);
        self.room.notify_waiters();
        self.spool_wake.notify_one();
    }

    /// Tickets of spooled leased records (see `kept`): released by a retiring sink once its
    /// spool went to the dead-letter queue.
    pub fn take_kept(&self) -> Vec<Ticket> {
        self.lock().kept.drain().map(|(_, t)| t).collect()
    }

    /// Memory records not yet applied, with their tickets: handed over for dead-lettering when
    /// a removed sink cannot finish them.
    pub fn take_held(&self) -> Vec<(Arc<Record>, Ticket)> {
        let mut st = self.lock();
        let held = std::mem::take(&mut st.held);
        for lane in st.lanes.iter_mut() {
            lane.retain(|i| !i.held);
        }
        held.into_values().map(|h| (h.rec, h.ticket)).collect()
    }

    /// The spool task: appends pending records (group commit), releases their tickets, reads
    /// spooled records back into the lanes, moves the cursor, and returns to memory mode once
    /// caught up. Runs until `stop`.
    pub async fn run_spool(self: Arc<Self>, stop: CancellationToken) {
        let Some(spool) = self.spool.clone() else { return };
        let mut delays = super::policy::backoff(super::policy::Profile::Local);
        let mut last_commit = Instant::now();
        let mut committed = spool.cursor();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = self.spool_wake.notified();
            let mut progressed = false;
            // 1. Append what is pending.
            let batch: Vec<Pending> = {
                let mut st = self.lock();
                let b = std::mem::take(&mut st.pending);
                st.writing = b.len();
                b
            };
            if !batch.is_empty() {
                let encoded: Vec<(u64, Vec<u8>)> =
                    batch.iter().map(|p| (p.seq, super::record::encode(&p.rec, p.barrier, p.leased()))).collect();
                let sp = Arc::clone(&spool);
                let r = tokio::task::spawn_blocking(move || sp.append(&encoded)).await;
                let r = r.unwrap_or_else(|e| {
                    Err(SpoolError::Io { path: spool.dir().to_owned(), source: std::io::Error::other(e.to_string()) })
                });
                match r {
                    Ok(()) => {
                        let mut st = self.lock();
                        st.writing = 0;
                        if st.spool_error.take().is_some() {
                            tracing::info!(sink = %self.name, "spool writes succeed again");
                        }
                        // Durable now: release the tickets, except those read under a lease.
                        let mut release = Vec::with_capacity(batch.len());
                        let n = batch.len() as u64;
                        for p in batch {
                            match p.ticket {
                                Some(t) if t.is_leased() => {
                                    st.kept.insert(p.seq, t);
                                }
                                Some(t) => release.push(t),
                                None => {}
                            }
                        }
                        drop(st);
                        metrics().sink_spooled.with_label_values(&[&self.name]).inc_by(n);
                        for t in release {
                            t.ack();
                        }
                        delays = super::policy::backoff(super::policy::Profile::Local);
                        progressed = true;
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        let first = {
                            let mut st = self.lock();
                            st.writing = 0;
                            // Back in front, in order; their tickets stay held (nothing is
                            // confirmed).
                            let mut rest = std::mem::take(&mut st.pending);
                            st.pending = batch;
                            st.pending.append(&mut rest);
                            st.spool_error.replace(msg.clone()).is_none()
                        };
                        super::policy::report(
                            &format!("sink {}", self.name),
                            super::policy::Failure::Local,
                            &msg,
                            first,
                        );
                        let d = delays.next().unwrap_or(Duration::from_secs(5));
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(d) => {}
                        }
                        continue;
                    }
                }
            }
            // 2. Hand spooled records to the lanes, in order, as room allows.
            if self.dispatch(&spool).await {
                progressed = true;
            }
            // 3. Move the cursor (at most a few times a second; always when drained).
            let cursor = {
                let st = self.lock();
                let next = st.read.map_or(spool.end(), |r| r.next);
                let carried = st.carry.front().map(|i| i.seq);
                st.dispatched.keys().next().copied().into_iter().chain(carried).min().unwrap_or(next).min(next)
            };
            if cursor > committed && (last_commit.elapsed() > Duration::from_millis(200) || cursor >= spool.end()) {
                let sp = Arc::clone(&spool);
                match tokio::task::spawn_blocking(move || sp.commit(cursor)).await {
                    Ok(Ok(())) => {
                        committed = cursor;
                        last_commit = Instant::now();
                        self.room.notify_waiters();
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(sink = %self.name, error = %e, "cannot save the spool cursor; retrying")
                    }
                    Err(_) => {}
                }
            }
            // 4. Back to memory once everything spooled is handed over.
            {
                let mut st = self.lock();
                // Caught up means applied, not merely handed to the lanes: a sink that is still
                // failing keeps its new records in the spool rather than in memory.
                let caught_up = st.mode == Mode::Spool
                    && st.pending.is_empty()
                    && st.writing == 0
                    && st.carry.is_empty()
                    && st.dispatched.is_empty()
                    && st.barrier.is_none()
                    && st.read.is_none_or(|r| r.next >= spool.end());
                if caught_up {
                    st.mode = Mode::Memory;
                    self.update_hunger(&mut st);
                    st.read = None;
                    drop(st);
                    tracing::info!(sink = %self.name, "sink caught up with its spool");
                    self.room.notify_waiters();
                }
            }
            m_gauges(&self);
            if progressed {
                continue;
            }
            if stop.is_cancelled() {
                return;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = wake => {}
                _ = tick.tick() => self.spill_if_behind(),
            }
        }
    }

    /// Read spooled records into the lanes. True when something moved.
    async fn dispatch(&self, spool: &Arc<Spool>) -> bool {
        let mut moved = false;
        loop {
            {
                let mut st = self.lock();
                if st.closed {
                    return moved;
                }
                // Carried records first, up to a waiting barrier.
                while let Some(front) = st.carry.front() {
                    if st.barrier == Some((front.seq, false)) {
                        break;
                    }
                    let lane = super::router::lane_for(&front.rec.change, st.lanes.len());
                    if st.lanes[lane].len() >= self.lane_cap {
                        return moved;
                    }
                    let item = st.carry.pop_front().expect("front exists");
                    st.dispatched.insert(item.seq, item.rec.change.commit_time);
                    st.lanes[lane].push_back(item);
                    self.lane_ready[lane].notify_one();
                    moved = true;
                }
                // A barrier goes to its lane alone, once every earlier record is applied; nothing
                // after it is read until it is applied too.
                if let Some((seq, handed)) = st.barrier {
                    if !handed
                        && !st.dispatched.keys().any(|s| *s < seq)
                        && st.carry.front().is_some_and(|i| i.seq == seq)
                    {
                        let item = st.carry.pop_front().expect("front exists");
                        let lane = super::router::lane_for(&item.rec.change, st.lanes.len());
                        st.dispatched.insert(seq, item.rec.change.commit_time);
                        st.lanes[lane].push_back(item);
                        st.barrier = Some((seq, true));
                        self.lane_ready[lane].notify_one();
                        moved = true;
                    }
                    return moved;
                }
                if !st.carry.is_empty() {
                    return moved;
                }
            }
            let Some(mut pos) = self.lock().read else { return moved };
            if pos.next >= spool.end() {
                return moved;
            }
            let sp = Arc::clone(spool);
            let read = tokio::task::spawn_blocking(move || {
                let r = sp.read(&mut pos, READ_BATCH);
                (r, pos)
            })
            .await;
            let Ok((read, pos)) = read else { return moved };
            let frames = match read {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(sink = %self.name, error = %e, "cannot read the spool; the sink stops consuming until it can");
                    return moved;
                }
            };
            let mut st = self.lock();
            st.read = Some(pos);
            if frames.is_empty() {
                return moved;
            }
            for (seq, bytes) in frames {
                match super::record::decode(&bytes) {
                    Ok(d) if d.leased && !st.kept.contains_key(&seq) => {
                        // Left by an earlier run: its change was never confirmed, so the shard's
                        // owner reads it again; applying this copy could land after newer writes.
                        metrics().sink_fenced.with_label_values(&[&self.name]).inc();
                    }
                    Ok(super::record::Decoded { rec, barrier, .. }) => {
                        let fence = st.kept.get(&seq).and_then(Ticket::fence);
                        st.carry.push_back(Item { seq, rec: Arc::new(rec), held: false, fence });
                        if barrier {
                            st.barrier = Some((seq, false));
                            // Read on from just after the barrier once it is applied.
                            st.read = Some(spool_pos_after(spool, seq));
                            break;
                        }
                    }
                    Err(e) => {
                        // Written by this program and checksummed: a bug or a version change.
                        tracing::error!(sink = %self.name, seq, error = %e, "a spooled record cannot be decoded; it is skipped and counted");
                        metrics().sink_errors.with_label_values(&[&self.name, "spool_decode"]).inc();
                    }
                }
            }
            moved = true;
        }
    }
}

/// A read position just after `seq` (reading skips what is below `next`).
fn spool_pos_after(spool: &Spool, seq: u64) -> ReadPos {
    let mut p = spool.start();
    p.next = seq + 1;
    p
}

fn m_gauges(q: &SinkQueue) {
    let m = metrics();
    m.sink_backlog.with_label_values(&[&q.name]).set(q.backlog() as i64);
    m.sink_lag.with_label_values(&[&q.name]).set(q.lag_seconds());
    if let Some(s) = &q.spool {
        m.sink_spool_bytes.with_label_values(&[&q.name]).set(s.bytes() as i64);
    }
}
