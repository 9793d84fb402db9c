//! The runtime's unit tests, on a fault-injecting sink: failures, rejections, stalls and wrong
//! answers, and what each does to order, tickets and the spool. Timer-only tests run under
//! tokio's paused clock; tests that touch the spool (blocking file I/O on other threads, which a
//! paused clock does not wait for) run on the real clock with short timeouts.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::queue::{SinkQueue, Take};
use super::record::Item;
use super::sink_handle::{SinkHandle, SinkRuntime};
use super::spool::Spool;
use super::window::AckWindow;
use crate::change::{Change, Name, Op, Row, Value};
use crate::dlq::DeadLetterQueue;
use crate::sink::{BatchLimits, ItemOutcome, Payload, Record, Sink, SinkConfig, SinkError, SinkErrorKind};
use crate::telemetry::Health;

/// What the test sink does with the next writes.
#[derive(Default)]
struct Faults {
    /// Fail this many whole writes (transient).
    fail: u32,
    /// Answer with one outcome too few this many times.
    short: u32,
    /// Reject records with these ids.
    reject: Vec<i64>,
    /// Hang every write until cleared.
    stall: bool,
    /// Take this long per write (a slow sink that makes progress).
    delay: Duration,
}

/// A sink that records what it applied, in order, and misbehaves on request.
#[derive(Default)]
struct TestSink {
    faults: Mutex<Faults>,
    applied: Mutex<Vec<(i64, Op)>>,
    writes: Mutex<u32>,
    unstall: tokio::sync::Notify,
}

fn id_of(c: &Change) -> i64 {
    match c.key.get("id") {
        Some(Value::Int(i)) => *i,
        _ => -1,
    }
}

impl Sink for TestSink {
    fn name(&self) -> &str {
        "test"
    }
    fn endpoint(&self) -> String {
        "test".into()
    }
    fn limits(&self) -> BatchLimits {
        BatchLimits { max_records: 8, linger: Duration::ZERO }
    }
    fn write<'a>(&'a self, batch: &'a [Arc<Record>]) -> BoxFuture<'a, Result<Vec<ItemOutcome>, SinkError>> {
        Box::pin(async move {
            *self.writes.lock().unwrap() += 1;
            let delay = self.faults.lock().unwrap().delay;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            loop {
                let n = self.unstall.notified();
                if !self.faults.lock().unwrap().stall {
                    break;
                }
                n.await;
            }
            let err = |msg: &str| SinkError {
                sink: "test".into(),
                endpoint: "test".into(),
                kind: SinkErrorKind::Transient,
                msg: msg.into(),
            };
            {
                let mut f = self.faults.lock().unwrap();
                if f.fail > 0 {
                    f.fail -= 1;
                    return Err(err("injected failure"));
                }
                if f.short > 0 {
                    f.short -= 1;
                    return Ok(vec![ItemOutcome::Applied; batch.len().saturating_sub(1)]);
                }
            }
            let reject = self.faults.lock().unwrap().reject.clone();
            let mut out = Vec::new();
            for r in batch {
                let id = id_of(&r.change);
                if reject.contains(&id) {
                    out.push(ItemOutcome::Rejected(format!("id {id} refused")));
                } else {
                    self.applied.lock().unwrap().push((id, r.change.op));
                    out.push(ItemOutcome::Applied);
                }
            }
            Ok(out)
        })
    }
    fn check(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }
}

fn change(id: i64, op: Op, version: u64) -> Arc<Change> {
    let key: Row = [(Name::from("id"), Value::Int(id))].into_iter().collect();
    let mut c = Change::test_insert("public.t", key.clone(), Some(key));
    c.op = op;
    c.version = crate::change::Version::from_u64(version);
    Arc::new(c)
}

fn record(c: Arc<Change>) -> Arc<Record> {
    Arc::new(Record { change: c, pipeline: "p".into(), payload: Payload::Discard })
}

struct Rig {
    sink: Arc<TestSink>,
    handle: SinkHandle,
    window: Arc<AckWindow>,
    tasks: TaskTracker,
    dlq_dir: tempfile::TempDir,
    _spool_dir: tempfile::TempDir,
    /// Another sink's queue with nothing to do, so a full or slow test sink holds it back.
    _bystander: Option<Arc<SinkQueue>>,
}

async fn rig(spool: bool, spill_after: Duration) -> Rig {
    rig_with(spool, spill_after, Bystander::Fed).await
}

/// Another sink of the topology besides the test sink.
#[derive(Clone, Copy, PartialEq)]
enum Bystander {
    /// None.
    None,
    /// One that never gets a record (its pipelines match nothing of the workload).
    Idle,
    /// One that gets records and has applied them all: it waits for the test sink.
    Fed,
}

async fn rig_with(spool: bool, spill_after: Duration, others: Bystander) -> Rig {
    let hunger = Arc::new(crate::runtime::queue::Hunger::default());
    let bystander = (others != Bystander::None)
        .then(|| Arc::new(SinkQueue::new("other".into(), 1, 4, spill_after, None, Arc::clone(&hunger))));
    if let Some(b) = bystander.as_ref().filter(|_| others == Bystander::Fed) {
        // It took (and applied) a record just now: it is part of the flow, so it waits for the
        // test sink through the window (a sink that never gets a record does not).
        let w = AckWindow::new("bystander", 4, 0);
        let t = w.try_issue().unwrap();
        b.push(0, record(change(0, Op::Insert, 1)), t, false).await.unwrap();
        let Take::Batch(items) = b.take(0, 8, Duration::ZERO).await else { panic!("bystander's record") };
        b.complete(&items);
    }
    let dlq_dir = tempfile::tempdir().unwrap();
    let spool_dir = tempfile::tempdir().unwrap();
    let dlq = Arc::new(DeadLetterQueue::open(dlq_dir.path(), 1 << 20, 1 << 24).unwrap());
    let spool = spool.then(|| Arc::new(Spool::open(&spool_dir.path().join("test"), 1 << 26).unwrap()));
    let queue = Arc::new(SinkQueue::new("test".into(), 2, 4, spill_after, spool, Arc::clone(&hunger)));
    let tasks = TaskTracker::new();
    let rt =
        SinkRuntime { dlq, health: Arc::new(Health::new()), hard_stop: CancellationToken::new(), tasks: tasks.clone() };
    let sink = Arc::new(TestSink::default());
    let handle =
        SinkHandle::start("test", SinkConfig::Noop(Default::default()), Arc::clone(&sink) as Arc<dyn Sink>, queue, &rt);
    Rig {
        sink,
        handle,
        window: AckWindow::new("t", 1024, 0),
        tasks,
        dlq_dir,
        _spool_dir: spool_dir,
        _bystander: bystander,
    }
}

impl Rig {
    /// Push one record for change `c` under a new ticket, and mark its position `pos`.
    async fn push(&self, c: Arc<Change>, pos: u64, barrier: bool) {
        let t = self.window.try_issue().unwrap();
        let lane = super::router::lane_for(&c, 2);
        self.handle.queue.push(lane, record(c), t.retain(), barrier).await.unwrap();
        t.ack();
        self.window.mark(pos);
    }

    async fn settle(&self) {
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Poll `cond` (real or paused clock) until it holds, for up to ten seconds of real time.
    async fn until(&self, what: &str, cond: impl Fn(&Rig) -> bool) {
        let start = std::time::Instant::now();
        while !cond(self) {
            assert!(start.elapsed() < Duration::from_secs(10), "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn applied(&self) -> Vec<(i64, Op)> {
        self.sink.applied.lock().unwrap().clone()
    }

    /// Each id's ops in the order the sink applied them.
    fn per_key(&self) -> BTreeMap<i64, Vec<Op>> {
        let mut m: BTreeMap<i64, Vec<Op>> = BTreeMap::new();
        for (id, op) in self.applied() {
            m.entry(id).or_default().push(op);
        }
        m
    }

    async fn stop(self) {
        self.handle.close();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

#[tokio::test(start_paused = true)]
async fn failed_writes_are_retried_in_order_and_confirm_only_once_applied() {
    let r = rig(false, Duration::from_secs(3600)).await;
    r.sink.faults.lock().unwrap().fail = 3;
    for i in 0..6 {
        r.push(change(i % 2, if i < 2 { Op::Insert } else { Op::Update }, i as u64 + 1), i as u64 + 1, false).await;
    }
    r.settle().await;
    assert_eq!(r.window.confirmed(), 6, "everything applied after three failures");
    let per_key = r.per_key();
    assert_eq!(per_key[&0], vec![Op::Insert, Op::Update, Op::Update], "one key's order kept through the retries");
    assert_eq!(per_key[&1].len(), 3);
    assert!(*r.sink.writes.lock().unwrap() >= 4);
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_rejected_item_is_dead_lettered_and_the_rest_applied() {
    let r = rig(false, Duration::from_secs(3600)).await;
    r.sink.faults.lock().unwrap().reject = vec![2];
    for i in 0..4 {
        r.push(change(i, Op::Insert, 1), i as u64 + 1, false).await;
    }
    r.settle().await;
    assert_eq!(r.window.confirmed(), 4, "a dead letter counts as done");
    assert_eq!(r.applied().len(), 3);
    let dead = crate::dlq::read_all(r.dlq_dir.path(), |_, _, e| panic!("{e}")).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "id 2 refused");
    r.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_wrong_number_of_outcomes_retries_the_batch() {
    let r = rig(false, Duration::from_secs(3600)).await;
    r.sink.faults.lock().unwrap().short = 2;
    for i in 0..3 {
        r.push(change(i, Op::Insert, 1), i as u64 + 1, false).await;
    }
    r.settle().await;
    assert_eq!(r.window.confirmed(), 3);
    let mut ids: Vec<i64> = r.applied().iter().map(|a| a.0).collect();
    ids.sort();
    assert_eq!(ids, vec![0, 1, 2], "each applied once the answer is whole");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sink_spills_to_its_spool_releases_the_window_and_catches_up_in_order() {
    let r = rig(true, Duration::from_millis(200)).await;
    r.sink.faults.lock().unwrap().stall = true;
    for i in 0..40u64 {
        let id = (i % 5) as i64;
        r.push(change(id, if i < 5 { Op::Insert } else { Op::Update }, i + 1), i + 1, false).await;
    }
    // Nothing applied, but after spill_after every record is durable in the spool.
    r.until("the window to be released by the spool", |r| r.window.confirmed() == 40).await;
    assert!(r.applied().is_empty());
    assert!(r.handle.queue.spooling());
    assert!(r.handle.queue.backlog() > 0);
    r.sink.faults.lock().unwrap().stall = false;
    r.sink.unstall.notify_waiters();
    r.until("the sink to catch up", |r| !r.handle.queue.spooling() && r.handle.queue.backlog() == 0).await;
    let per_key = r.per_key();
    for id in 0..5 {
        let ops = &per_key[&id];
        assert_eq!(ops[0], Op::Insert, "key {id} starts with its insert: {ops:?}");
        assert!(ops.len() >= 8, "key {id} got all its records (some twice: in flight when spilled): {ops:?}");
    }
    r.stop().await;
}

/// A sink that is only slower than the source, with no other sink waiting for it (a backlog
/// drain into one sink), is not spilled: a full lane is backpressure, cheaper than writing each
/// record to the spool and reading it back. Once it stops making progress at all, it spills.
/// A sink beside it whose pipelines get no records is idle, not waiting: the same holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_sink_alone_gets_backpressure_and_a_stuck_one_spills() {
    for others in [Bystander::None, Bystander::Idle] {
        slow_then_stuck(rig_with(true, Duration::from_millis(300), others).await).await;
    }
}

async fn slow_then_stuck(r: Rig) {
    r.sink.faults.lock().unwrap().delay = Duration::from_millis(40);
    for i in 0..60u64 {
        r.push(change((i % 7) as i64, Op::Update, i + 1), i + 1, false).await;
        assert!(!r.handle.queue.spooling(), "a slow but progressing sink alone is not spilled");
    }
    r.until("everything applied", |r| r.window.confirmed() == 60).await;
    assert_eq!(r.applied().len(), 60, "each record applied once (none went through the spool)");
    r.sink.faults.lock().unwrap().delay = Duration::ZERO;
    r.sink.faults.lock().unwrap().stall = true;
    for i in 60..70u64 {
        r.push(change((i % 7) as i64, Op::Update, i + 1), i + 1, false).await;
    }
    r.until("a stuck sink to spill", |r| r.handle.queue.spooling() && r.window.confirmed() == 70).await;
    r.sink.faults.lock().unwrap().stall = false;
    r.sink.unstall.notify_waiters();
    r.until("the sink to catch up", |r| !r.handle.queue.spooling() && r.handle.queue.backlog() == 0).await;
    r.stop().await;
}

/// A slow sink that another, fed sink waits for through the window spills, so the other goes
/// on at its own pace; order per key still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_sink_that_others_wait_for_spills() {
    let r = rig(true, Duration::from_millis(300)).await;
    r.sink.faults.lock().unwrap().delay = Duration::from_millis(40);
    for i in 0..60u64 {
        r.push(change((i % 7) as i64, Op::Update, i + 1), i + 1, false).await;
    }
    assert!(r.handle.queue.spooling(), "a full lane while another sink waits spills");
    r.until("everything confirmed (spooled or applied)", |r| r.window.confirmed() == 60).await;
    r.sink.faults.lock().unwrap().delay = Duration::ZERO;
    r.until("the sink to catch up", |r| !r.handle.queue.spooling() && r.handle.queue.backlog() == 0).await;
    for (id, ops) in r.per_key() {
        assert!(ops.len() >= (60 - id as usize).div_ceil(7), "key {id} got every record: {ops:?}");
    }
    r.stop().await;
}

/// Records read under a DynamoDB lease: a spooled copy does not confirm them (a new owner
/// would resume from the checkpoint, so the spool is not where they are safe), they confirm
/// once applied; and once the lease is no longer valid, what is left is abandoned, neither
/// applied nor confirmed, from memory and from the spool alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_read_under_a_lease_confirm_only_once_applied_and_are_abandoned_once_it_lapses() {
    use crate::checkpoint::fence::Fence;
    let hour = std::time::Instant::now() + Duration::from_secs(3600);

    let mut r = rig(true, Duration::from_millis(200)).await;
    r.window = AckWindow::fenced("leased", 1024, 0, Some(Fence::new(hour)));
    r.sink.faults.lock().unwrap().stall = true;
    for i in 0..40u64 {
        r.push(change((i % 5) as i64, Op::Update, i + 1), i + 1, false).await;
    }
    r.until("the stalled sink to spill", |r| r.handle.queue.spooling()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(r.window.confirmed(), 0, "spooled but not applied: not confirmed under a lease");
    r.sink.faults.lock().unwrap().stall = false;
    r.sink.unstall.notify_waiters();
    r.until("everything applied and confirmed", |r| r.window.confirmed() == 40).await;
    assert!(r.applied().len() >= 40);
    r.stop().await;

    let mut r = rig(true, Duration::from_millis(200)).await;
    let fence = Fence::new(hour);
    r.window = AckWindow::fenced("leased", 1024, 0, Some(Arc::clone(&fence)));
    r.sink.faults.lock().unwrap().fail = u32::MAX;
    for i in 0..20u64 {
        r.push(change(i as i64, Op::Insert, i + 1), i + 1, false).await;
    }
    r.until("the failing sink to spill", |r| r.handle.queue.spooling()).await;
    fence.revoke();
    r.sink.faults.lock().unwrap().fail = 0;
    r.until("the queue to be empty", |r| r.handle.queue.backlog() == 0 && !r.handle.queue.spooling()).await;
    assert!(r.applied().is_empty(), "nothing read under a lapsed lease is applied: {:?}", r.applied());
    assert_eq!(r.window.confirmed(), 0, "nor confirmed");
    assert_eq!(r.window.in_flight(), 20, "their tickets are dropped, never acknowledged");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_barrier_is_applied_after_everything_before_and_before_everything_after() {
    for spool in [true, false] {
        let r = rig(spool, Duration::from_secs(3600)).await;
        for i in 0..10 {
            r.push(change(i, Op::Insert, 1), i as u64 + 1, false).await;
        }
        let mut t = (*change(-1, Op::Truncate, 2)).clone();
        t.key = Row::default();
        r.push(Arc::new(t), 11, true).await;
        for i in 10..20 {
            r.push(change(i, Op::Insert, 3), i as u64 + 2, false).await;
        }
        // Distinct records: a write in flight when the queue spills is applied again from the
        // spool (harmless by design), so the raw count can pass 21 without ever equalling it.
        let distinct = |r: &Rig| r.applied().into_iter().map(|a| a.0).collect::<std::collections::BTreeSet<_>>().len();
        r.until(&format!("all 21 applied (spool {spool})"), |r| distinct(r) == 21).await;
        let applied = r.applied();
        let at = applied.iter().position(|a| a.1 == Op::Truncate).expect("truncate applied");
        assert!(applied[..at].iter().all(|a| a.0 < 10), "spool {spool}: {applied:?}");
        assert!(applied[at + 1..].iter().all(|a| a.0 >= 10), "spool {spool}: {applied:?}");
        r.until("everything confirmed", |r| r.window.confirmed() == 21).await;
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spooled_records_survive_a_restart_and_are_delivered_first() {
    let spool_dir = tempfile::tempdir().unwrap();
    let path = spool_dir.path().join("test");
    {
        // A queue whose sink never answers: records spill, then the process "dies".
        let spool = Arc::new(Spool::open(&path, 1 << 24).unwrap());
        let q = Arc::new(SinkQueue::new(
            "test".into(),
            2,
            4,
            Duration::from_millis(100),
            Some(Arc::clone(&spool)),
            Default::default(),
        ));
        let stop = CancellationToken::new();
        let task = tokio::spawn(Arc::clone(&q).run_spool(stop.clone()));
        let w = AckWindow::new("t", 64, 0);
        for i in 0..10 {
            let t = w.try_issue().unwrap();
            q.push(i as usize % 2, record(change(i, Op::Insert, 1)), t.retain(), false).await.unwrap();
            t.ack();
        }
        let start = std::time::Instant::now();
        while w.in_flight() > 0 {
            assert!(start.elapsed() < Duration::from_secs(10), "the ten records never reached the spool");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
        let _ = task.await;
    }
    // Restart: a new queue on the same spool starts in spool mode and delivers them.
    let spool = Arc::new(Spool::open(&path, 1 << 24).unwrap());
    assert_eq!(spool.backlog(), 10);
    let q = Arc::new(SinkQueue::new("test".into(), 2, 4, Duration::from_secs(1), Some(spool), Default::default()));
    assert!(q.spooling());
    let stop = CancellationToken::new();
    let task = tokio::spawn(Arc::clone(&q).run_spool(stop.clone()));
    let mut got = Vec::new();
    let start = std::time::Instant::now();
    while got.len() < 10 {
        assert!(start.elapsed() < Duration::from_secs(10), "delivered only {got:?}");
        for lane in 0..2 {
            let take = tokio::time::timeout(Duration::from_millis(20), q.take(lane, 8, Duration::ZERO)).await;
            if let Ok(super::queue::Take::Batch(items)) = take {
                got.extend(items.iter().map(|i: &Item| id_of(&i.rec.change)));
                q.complete(&items);
            }
        }
    }
    got.sort();
    assert_eq!(got, (0..10).collect::<Vec<_>>());
    stop.cancel();
    let _ = task.await;
}
