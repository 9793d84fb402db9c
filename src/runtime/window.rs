//! The acknowledgement window: which changes of a source partition are still owed to a sink,
//! and therefore which source position may be confirmed.
//!
//! Every change read from a source gets a ticket (a sequence number). A ticket starts with one
//! hold (the pipeline lane's); each sink record made from the change adds one; every sink ack
//! (applied or dead-lettered) and the lane's release remove one. When a ticket reaches zero it
//! is done. The *watermark* is the first ticket that is not done: everything before it has been
//! applied by every sink of every pipeline.
//!
//! Sources attach *marks* to ticket boundaries ("once every ticket before N is done, position P
//! is safe to confirm"; for PostgreSQL P is a transaction's end LSN), so the confirmed position
//! never passes an unapplied change, whatever order the lanes finish in.
//!
//! The window has a fixed capacity (the in-flight limit): the source waits for space, which is
//! how backpressure reaches the source and how memory stays bounded for any backlog or
//! transaction size. Counters are atomics in a ring, so acks from many lanes never contend on a
//! lock; only the thread that moves the watermark takes a (try-)lock.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use tokio::sync::Notify;

use crate::checkpoint::fence::Fence;

/// Ring of per-ticket hold counts plus the marks waiting for the watermark.
pub struct AckWindow {
    slots: Box<[AtomicU32]>,
    mask: u64,
    /// Next ticket to issue; tickets below it have initialised slots.
    issued: AtomicU64,
    /// Watermark: every ticket below it is done.
    done: AtomicU64,
    /// Highest position whose mark the watermark has passed.
    confirmed: AtomicU64,
    /// Latest mark position pushed (whether or not passed yet).
    marked: AtomicU64,
    marks: Mutex<VecDeque<Mark>>,
    advancing: Mutex<()>,
    space: Notify,
    name: String,
    /// The lease the partition is read under (a DynamoDB shard with a lease table): its records
    /// are applied only while it is valid, and a spooled record does not count as done.
    fence: Option<Arc<Fence>>,
}

#[derive(Debug, Clone, Copy)]
struct Mark {
    ticket_end: u64,
    position: u64,
}

impl fmt::Debug for AckWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AckWindow")
            .field("name", &self.name)
            .field("issued", &self.issued.load(Ordering::Relaxed))
            .field("done", &self.done.load(Ordering::Relaxed))
            .field("confirmed", &self.confirmed.load(Ordering::Relaxed))
            .finish()
    }
}

impl AckWindow {
    /// A window admitting up to `capacity` (rounded up to a power of two) unfinished changes.
    /// `start` is the position already confirmed (what a restart would resume from).
    pub fn new(name: impl Into<String>, capacity: usize, start: u64) -> Arc<AckWindow> {
        AckWindow::fenced(name, capacity, start, None)
    }

    /// A window whose records may be applied only while `fence` is valid (see
    /// [`crate::checkpoint::fence`]).
    pub fn fenced(name: impl Into<String>, capacity: usize, start: u64, fence: Option<Arc<Fence>>) -> Arc<AckWindow> {
        let cap = capacity.max(2).next_power_of_two();
        Arc::new(AckWindow {
            slots: (0..cap).map(|_| AtomicU32::new(0)).collect(),
            mask: (cap - 1) as u64,
            issued: AtomicU64::new(0),
            done: AtomicU64::new(0),
            confirmed: AtomicU64::new(start),
            marked: AtomicU64::new(start),
            marks: Mutex::new(VecDeque::new()),
            advancing: Mutex::new(()),
            space: Notify::new(),
            name: name.into(),
            fence,
        })
    }

    /// Read under a lease: its records count as done only once applied (a spooled copy is not
    /// enough, since after a lease loss the new owner resumes from the last checkpoint).
    pub fn is_leased(&self) -> bool {
        self.fence.is_some()
    }

    /// The lease it was read under is no longer valid: its records must not be applied, and
    /// nothing more is confirmed (the new owner reads them again).
    pub fn is_fenced_off(&self) -> bool {
        self.fence.as_ref().is_some_and(|f| !f.is_valid())
    }

    /// Number of tickets the window can hold.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Changes read but not yet applied everywhere.
    pub fn in_flight(&self) -> u64 {
        self.issued.load(Ordering::Acquire) - self.done.load(Ordering::Acquire)
    }

    /// True when every issued change is done and every mark is passed.
    pub fn is_drained(&self) -> bool {
        self.in_flight() == 0 && self.confirmed.load(Ordering::Acquire) >= self.marked.load(Ordering::Acquire)
    }

    /// The highest position that is safe to confirm to the source.
    pub fn confirmed(&self) -> u64 {
        self.confirmed.load(Ordering::Acquire)
    }

    /// Wait until a ticket can be issued. Cancel-safe.
    pub async fn wait_for_space(&self) {
        loop {
            let notified = self.space.notified();
            if self.in_flight() < self.slots.len() as u64 {
                return;
            }
            notified.await;
        }
    }

    /// Issue the next ticket, or `None` if the window is full (call [`wait_for_space`] first).
    /// Only the source that owns the window issues tickets.
    ///
    /// [`wait_for_space`]: AckWindow::wait_for_space
    pub fn try_issue(self: &Arc<Self>) -> Option<Ticket> {
        let seq = self.issued.load(Ordering::Relaxed);
        if seq - self.done.load(Ordering::Acquire) >= self.slots.len() as u64 {
            return None;
        }
        self.slots[(seq & self.mask) as usize].store(1, Ordering::Release);
        self.issued.store(seq + 1, Ordering::Release);
        Some(Ticket { window: Arc::clone(self), seq })
    }

    /// Position `position` may be confirmed once every ticket issued so far is done.
    /// Positions must not decrease; a smaller one is ignored.
    pub fn mark(&self, position: u64) {
        let ticket_end = self.issued.load(Ordering::Acquire);
        {
            let mut marks = self.marks.lock().expect("marks lock");
            if position <= self.marked.load(Ordering::Acquire) {
                return;
            }
            self.marked.store(position, Ordering::Release);
            match marks.back_mut() {
                Some(last) if last.ticket_end == ticket_end => last.position = position,
                _ => marks.push_back(Mark { ticket_end, position }),
            }
        }
        self.advance();
    }

    // SeqCst on the slot counters and the watermark: a completion racing with the advancer must
    // be seen either by the advancer's scan or by the completer's own watermark check.
    fn release(&self, seq: u64) {
        let prev = self.slots[(seq & self.mask) as usize].fetch_sub(1, Ordering::SeqCst);
        debug_assert!(prev > 0, "ticket {seq} of {} released more often than held", self.name);
        if prev == 1 && seq == self.done.load(Ordering::SeqCst) {
            self.advance();
        }
    }

    fn retain(&self, seq: u64) {
        self.slots[(seq & self.mask) as usize].fetch_add(1, Ordering::SeqCst);
    }

    /// Move the watermark over finished tickets and confirm the marks it passes.
    fn advance(&self) {
        let mut moved = false;
        loop {
            let Ok(guard) = self.advancing.try_lock() else {
                // Whoever holds the lock re-checks after releasing it, so our completion is seen.
                break;
            };
            let issued = self.issued.load(Ordering::SeqCst);
            let start = self.done.load(Ordering::SeqCst);
            let mut d = start;
            while d < issued && self.slots[(d & self.mask) as usize].load(Ordering::SeqCst) == 0 {
                d += 1;
            }
            if d != start {
                self.done.store(d, Ordering::SeqCst);
                moved = true;
            }
            {
                let mut marks = self.marks.lock().expect("marks lock");
                let mut pos = None;
                while let Some(m) = marks.front() {
                    if m.ticket_end > d {
                        break;
                    }
                    pos = Some(m.position);
                    marks.pop_front();
                }
                if let Some(p) = pos
                    && !self.is_fenced_off()
                {
                    self.confirmed.fetch_max(p, Ordering::SeqCst);
                }
            }
            drop(guard);
            let issued = self.issued.load(Ordering::SeqCst);
            let recheck = d < issued && self.slots[(d & self.mask) as usize].load(Ordering::SeqCst) == 0;
            let marks_ready = self
                .marks
                .lock()
                .expect("marks lock")
                .front()
                .is_some_and(|m| m.ticket_end <= self.done.load(Ordering::SeqCst));
            if !recheck && !marks_ready {
                break;
            }
        }
        if moved {
            self.space.notify_waiters();
        }
    }
}

/// One hold on one change. Dropping a ticket does **not** acknowledge it: only [`Ticket::ack`]
/// does, so a change lost to a bug or an aborted shutdown is never confirmed, it replays.
pub struct Ticket {
    window: Arc<AckWindow>,
    seq: u64,
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ticket({}#{})", self.window.name, self.seq)
    }
}

impl Ticket {
    /// Another hold on the same change (one per sink record made from it).
    pub fn retain(&self) -> Ticket {
        self.window.retain(self.seq);
        Ticket { window: Arc::clone(&self.window), seq: self.seq }
    }

    /// This hold is finished: the record was applied or dead-lettered.
    pub fn ack(self) {
        self.window.release(self.seq);
    }

    /// Sequence number within the window.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// See [`AckWindow::is_leased`].
    pub fn is_leased(&self) -> bool {
        self.window.is_leased()
    }

    /// The lease its change was read under, if any.
    pub fn fence(&self) -> Option<Arc<Fence>> {
        self.window.fence.clone()
    }

    /// See [`AckWindow::is_fenced_off`]. The caller drops (never acknowledges) such a ticket.
    pub fn is_fenced_off(&self) -> bool {
        self.window.is_fenced_off()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirms_only_after_every_earlier_ticket_is_done() {
        let w = AckWindow::new("t", 8, 100);
        let a = w.try_issue().unwrap();
        let b = w.try_issue().unwrap();
        w.mark(200); // tx 1 = a, b
        let c = w.try_issue().unwrap();
        w.mark(300); // tx 2 = c
        let c2 = c.retain();
        c.ack();
        c2.ack();
        assert_eq!(w.confirmed(), 100, "tx 2 done but tx 1 is not");
        b.ack();
        assert_eq!(w.confirmed(), 100);
        a.ack();
        assert_eq!(w.confirmed(), 300);
        assert!(w.is_drained());
    }

    #[test]
    fn window_is_bounded_and_frees_space() {
        let w = AckWindow::new("t", 4, 0);
        let t: Vec<_> = (0..4).map(|_| w.try_issue().unwrap()).collect();
        assert!(w.try_issue().is_none());
        let mut it = t.into_iter();
        it.next().unwrap().ack();
        assert!(w.try_issue().is_some());
    }

    #[test]
    fn dropped_ticket_is_never_confirmed() {
        let w = AckWindow::new("t", 4, 0);
        let a = w.try_issue().unwrap();
        w.mark(10);
        drop(a);
        assert_eq!(w.confirmed(), 0);
    }

    #[test]
    fn empty_transactions_confirm_immediately_when_idle() {
        let w = AckWindow::new("t", 4, 0);
        w.mark(5);
        assert_eq!(w.confirmed(), 5);
        w.mark(4);
        assert_eq!(w.confirmed(), 5, "positions never go back");
    }

    #[test]
    fn concurrent_acks_reach_the_end() {
        let w = AckWindow::new("t", 1 << 12, 0);
        let mut handles = Vec::new();
        let (tx, rx) = std::sync::mpsc::sync_channel::<Ticket>(1024);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..4 {
            let rx = Arc::clone(&rx);
            handles.push(std::thread::spawn(move || {
                loop {
                    let t = rx.lock().unwrap().recv();
                    match t {
                        Ok(t) => t.ack(),
                        Err(_) => break,
                    }
                }
            }));
        }
        for i in 0..100_000u64 {
            while w.try_issue().map(|t| tx.send(t).unwrap()).is_none() {
                std::thread::yield_now();
            }
            if i % 7 == 0 {
                w.mark(i + 1);
            }
        }
        w.mark(1_000_000);
        drop(tx);
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(w.in_flight(), 0);
        assert_eq!(w.confirmed(), 1_000_000);
    }
}
