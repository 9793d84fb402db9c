//! The router: hashes (relation, key) onto ordered lanes so changes to one row are never
//! reordered while different rows proceed in parallel, and admits a change only when the
//! source's acknowledgement window and the lane queue both have room.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use rustc_hash::FxHasher;
use tokio::sync::mpsc;

use crate::change::{Change, Value};
use crate::checkpoint::{AckWindow, Ticket};

/// A change on its way through a lane, with the hold that keeps its position unconfirmed.
pub struct Envelope {
    /// The change (shared by every pipeline that matches it).
    pub change: Arc<Change>,
    /// The lane's hold.
    pub ticket: Ticket,
}

/// The pipeline lanes are gone (shutdown).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("pipeline lanes are closed")]
pub struct Closed;

/// Lane inputs.
#[derive(Clone)]
pub struct Router {
    lanes: Arc<[mpsc::Sender<Envelope>]>,
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

impl Router {
    /// Router over lane senders.
    pub fn new(lanes: Vec<mpsc::Sender<Envelope>>) -> Router {
        Router { lanes: lanes.into() }
    }

    /// Number of lanes.
    pub fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// The lane of a change: same relation and key, same lane. Truncates go to lane 0.
    pub fn lane_of(&self, change: &Change) -> usize {
        if self.lanes.len() == 1 {
            return 0;
        }
        let mut h = FxHasher::default();
        change.relation.hash(&mut h);
        for (_, v) in change.key.iter() {
            hash_value(v, &mut h);
        }
        (h.finish() % self.lanes.len() as u64) as usize
    }

    /// An emitter feeding these lanes under a source's acknowledgement window.
    pub fn emitter(&self, window: Arc<AckWindow>) -> Emitter {
        Emitter { router: self.clone(), window }
    }
}

/// A source's way into the lanes.
pub struct Emitter {
    router: Router,
    window: Arc<AckWindow>,
}

/// Room for one change, reserved in the window and in its lane.
pub struct Reservation<'a> {
    permit: mpsc::Permit<'a, Envelope>,
    window: &'a Arc<AckWindow>,
}

impl Emitter {
    /// The window this emitter issues tickets from.
    pub fn window(&self) -> &Arc<AckWindow> {
        &self.window
    }

    /// Lane of a change.
    pub fn lane_of(&self, change: &Change) -> usize {
        self.router.lane_of(change)
    }

    /// Wait until a change for `lane` can be accepted. Cancel-safe: nothing is taken until
    /// [`Reservation::send`].
    pub async fn reserve(&self, lane: usize) -> Result<Reservation<'_>, Closed> {
        self.window.wait_for_space().await;
        let permit = self.router.lanes[lane].reserve().await.map_err(|_| Closed)?;
        Ok(Reservation { permit, window: &self.window })
    }
}

impl Reservation<'_> {
    /// Hand the change over. Only the emitter's source issues tickets from its window, and the
    /// window had room when reserved, so this cannot fail.
    pub fn send(self, change: Change) {
        let ticket = self.window.try_issue().expect("window had room at reservation");
        self.permit.send(Envelope { change: Arc::new(change), ticket });
    }
}
