//! The router: hashes (relation, key) onto ordered pipeline lanes, so changes to one row are
//! never reordered while different rows proceed in parallel, and admits a change only when its
//! partition's acknowledgement window and its lane both have room.
//!
//! A truncate has no key and must not overtake, or be overtaken by, any change of any lane: it
//! goes to every lane as a [`LaneBarrier`]; the lanes meet there, one of them processes it, and
//! only then do they go on (see `lane.rs`).

use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use rustc_hash::FxHasher;
use tokio::sync::mpsc;

use super::window::{AckWindow, Ticket};
use crate::change::{Change, Op, Value};
use crate::source::{Closed, Output, Partition, SendError};

/// What travels down a pipeline lane.
pub enum Envelope {
    /// A change, with the hold that keeps its position unconfirmed.
    Change {
        /// The change (shared by every pipeline that matches it).
        change: Arc<Change>,
        /// The lane's hold.
        ticket: Ticket,
    },
    /// A change every lane must meet at (a truncate).
    Barrier(Arc<LaneBarrier>),
}

/// A truncate on its way through every lane at once.
pub struct LaneBarrier {
    /// Where the lanes meet (twice: before the change is processed, and after).
    pub meet: tokio::sync::Barrier,
    /// The change.
    pub change: Arc<Change>,
    /// Its hold, taken by the lane that processes it.
    pub ticket: Mutex<Option<Ticket>>,
}

fn hash_value(v: &Value, h: &mut FxHasher) {
    std::mem::discriminant(v).hash(h);
    match v {
        Value::Null => {}
        Value::Bool(b) => b.hash(h),
        Value::Int(i) => i.hash(h),
        Value::Float(f) => f.to_bits().hash(h),
        Value::Decimal(s) | Value::Text(s) | Value::Json(s) | Value::Uuid(s) => s.hash(h),
        Value::Bytes(b) => b.hash(h),
        Value::Timestamp(t) => t.timestamp_micros().hash(h),
        Value::Date(d) => d.hash(h),
        Value::List(l) | Value::Set(l) => l.iter().for_each(|x| hash_value(x, h)),
        Value::Map(m) => m.iter().for_each(|(k, x)| {
            k.hash(h);
            hash_value(x, h)
        }),
        Value::Other { text, .. } => text.hash(h),
    }
}

/// The lane of a change among `lanes`: same relation and key, same lane. Sink queues use the
/// same function, so a key keeps one lane from source to sink.
pub fn lane_for(change: &Change, lanes: usize) -> usize {
    if lanes <= 1 {
        return 0;
    }
    let mut h = FxHasher::default();
    change.relation.hash(&mut h);
    for (_, v) in change.key.iter() {
        hash_value(v, &mut h);
    }
    (h.finish() % lanes as u64) as usize
}

/// Pipeline lane inputs.
#[derive(Clone)]
pub struct Router {
    lanes: Arc<[mpsc::Sender<Envelope>]>,
}

impl Router {
    /// Router over lane senders.
    pub fn new(lanes: Vec<mpsc::Sender<Envelope>>) -> Router {
        Router { lanes: lanes.into() }
    }

    /// Number of lanes.
    pub fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// An emitter feeding these lanes under `window`.
    pub fn emitter(&self, window: Arc<AckWindow>) -> Emitter {
        Emitter { router: self.clone(), window }
    }
}

impl Output for Router {
    fn partition(
        &self,
        name: &str,
        capacity: usize,
        start: u64,
        fence: Option<Arc<crate::checkpoint::fence::Fence>>,
    ) -> Arc<dyn Partition> {
        Arc::new(self.emitter(AckWindow::fenced(name, capacity, start, fence)))
    }
}

/// One partition's way into the lanes.
pub struct Emitter {
    router: Router,
    window: Arc<AckWindow>,
}

impl Emitter {
    /// The window this emitter issues tickets from.
    pub fn window(&self) -> &Arc<AckWindow> {
        &self.window
    }

    fn try_barrier(&self, change: Change) -> Result<(), SendError> {
        let mut permits = Vec::with_capacity(self.router.lanes.len());
        for lane in self.router.lanes.iter() {
            match lane.try_reserve() {
                Ok(p) => permits.push(p),
                Err(mpsc::error::TrySendError::Full(())) => return Err(SendError::Full(Box::new(change))),
                Err(mpsc::error::TrySendError::Closed(())) => return Err(SendError::Closed),
            }
        }
        let Some(ticket) = self.window.try_issue() else { return Err(SendError::Full(Box::new(change))) };
        let barrier = Arc::new(LaneBarrier {
            meet: tokio::sync::Barrier::new(permits.len()),
            change: Arc::new(change),
            ticket: Mutex::new(Some(ticket)),
        });
        for p in permits {
            p.send(Envelope::Barrier(Arc::clone(&barrier)));
        }
        Ok(())
    }
}

impl Partition for Emitter {
    fn try_send(&self, change: Change) -> Result<(), SendError> {
        if change.op == Op::Truncate {
            return self.try_barrier(change);
        }
        let lane = lane_for(&change, self.router.lanes.len());
        let permit = match self.router.lanes[lane].try_reserve() {
            Ok(p) => p,
            Err(mpsc::error::TrySendError::Full(())) => return Err(SendError::Full(Box::new(change))),
            Err(mpsc::error::TrySendError::Closed(())) => return Err(SendError::Closed),
        };
        let Some(ticket) = self.window.try_issue() else { return Err(SendError::Full(Box::new(change))) };
        permit.send(Envelope::Change { change: Arc::new(change), ticket });
        Ok(())
    }

    fn room<'a>(&'a self, change: &Change) -> BoxFuture<'a, Result<(), Closed>> {
        let lanes: Vec<usize> = if change.op == Op::Truncate {
            (0..self.router.lanes.len()).collect()
        } else {
            vec![lane_for(change, self.router.lanes.len())]
        };
        Box::pin(async move {
            self.window.wait_for_space().await;
            for lane in lanes {
                // Wait for capacity, then give it back: try_send takes it for real.
                drop(self.router.lanes[lane].reserve().await.map_err(|_| Closed)?);
            }
            Ok(())
        })
    }

    fn mark(&self, position: u64) {
        self.window.mark(position);
    }

    fn confirmed(&self) -> u64 {
        self.window.confirmed()
    }

    fn in_flight(&self) -> u64 {
        self.window.in_flight()
    }

    fn is_drained(&self) -> bool {
        self.window.is_drained()
    }

    fn is_fenced_off(&self) -> bool {
        self.window.is_fenced_off()
    }
}
