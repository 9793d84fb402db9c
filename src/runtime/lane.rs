//! A pipeline lane: takes changes in order, runs every matching pipeline, and hands the
//! resulting records to the sinks' queues under the lane's index (so a key's order holds end
//! to end).
//!
//! The pipeline set is read through an `ArcSwap`; a reload swaps it between batches, which is
//! the "batch boundary" at which new definitions take effect. A change whose rendering fails is
//! dead-lettered for that pipeline and sink; its other pipelines and sinks still get it.
//!
//! A truncate arrives at every lane as a barrier. Each lane stops there; when all have arrived
//! (so every earlier change is in the sinks' queues), one of them processes the truncate (its
//! records go to the sinks as barriers too), and then all go on. Nothing later can overtake it.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::PipelineSet;
use super::router::{Envelope, LaneBarrier};
use super::window::Ticket;
use super::writer::dead_letter;
use crate::change::{Change, Name, SNAPSHOT_ORIGIN};
use crate::dlq::DeadLetterQueue;
use crate::pipeline::process::{self, Step};
use crate::sink::Record;

/// What a lane needs.
pub struct LaneInputs {
    /// Lane index.
    pub index: usize,
    /// Ordered input.
    pub rx: mpsc::Receiver<Envelope>,
    /// Current pipelines.
    pub pipelines: Arc<ArcSwap<PipelineSet>>,
    /// Dead letters.
    pub dlq: Arc<DeadLetterQueue>,
    /// Abandon work (shutdown deadline passed).
    pub hard_stop: CancellationToken,
}

struct Lane {
    index: usize,
    dlq: Arc<DeadLetterQueue>,
    hard_stop: CancellationToken,
    current: Arc<PipelineSet>,
    matches: HashMap<(Name, Name), Vec<usize>>,
    steps: Vec<Step>,
}

impl Lane {
    /// Run every matching pipeline on `change` and hand its records over; then release the
    /// lane's hold. False when shutting down (nothing more is acknowledged).
    async fn process(&mut self, change: &Arc<Change>, ticket: Ticket, barrier: bool) -> bool {
        let Lane { index, dlq, hard_stop, current, matches, steps } = self;
        let key = (Arc::clone(&change.source), Arc::clone(&change.relation));
        let idx = matches.entry(key).or_insert_with(|| {
            let found = current.matching(&change.source, &change.relation);
            if found.is_empty() {
                // A table published (or added to the publication) that no pipeline reads: its
                // changes are confirmed without being applied, which must never be silent.
                tracing::warn!(source = %change.source, relation = %change.relation, lane = *index, "changes of this relation match no pipeline: they are counted in polysync_unmatched_changes_total and not applied anywhere (add a pipeline, or remove the table from the publication)");
            }
            found
        });
        if idx.is_empty() {
            crate::telemetry::metrics()
                .unmatched_changes
                .with_label_values(&[&*change.source, &*change.relation])
                .inc();
        }
        for &i in idx.iter() {
            let rp = current.get(i);
            let def = &rp.def;
            if !def.takes_op(change) {
                continue;
            }
            // Snapshot rows (and the clear before a re-read) go to the pipeline that asked for
            // them only.
            if let Some(target) = change.origin.as_deref().and_then(|o| o.strip_prefix(SNAPSHOT_ORIGIN))
                && target != &*def.name
            {
                continue;
            }
            process::apply(def, change, None, steps);
            for step in steps.drain(..) {
                match step {
                    Step::Payload { action, payload } => {
                        let sink = &rp.sinks[action];
                        let rec =
                            Arc::new(Record { change: Arc::clone(change), pipeline: Arc::clone(&def.name), payload });
                        let pushed = tokio::select! {
                            r = sink.queue.push(*index, rec, ticket.retain(), barrier) => r.is_ok(),
                            _ = hard_stop.cancelled() => false,
                        };
                        if !pushed {
                            return false;
                        }
                    }
                    Step::DeadLetter { sink, reason } => {
                        if !dead_letter(dlq, &def.name, &sink, &reason, change, hard_stop).await {
                            return false;
                        }
                    }
                }
            }
        }
        ticket.ack();
        true
    }

    /// Meet the other lanes at a truncate; the last to arrive processes it.
    async fn barrier(&mut self, b: &LaneBarrier) -> bool {
        let leader = tokio::select! {
            r = b.meet.wait() => r.is_leader(),
            _ = self.hard_stop.cancelled() => return false,
        };
        if leader {
            let ticket = b.ticket.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(ticket) = ticket
                && !self.process(&b.change, ticket, true).await
            {
                return false;
            }
        }
        tokio::select! {
            _ = b.meet.wait() => true,
            _ = self.hard_stop.cancelled() => false,
        }
    }
}

/// Run until the input closes (drained) or the hard stop fires.
pub async fn run(mut inp: LaneInputs) {
    let mut lane = Lane {
        index: inp.index,
        dlq: Arc::clone(&inp.dlq),
        hard_stop: inp.hard_stop.clone(),
        current: inp.pipelines.load_full(),
        matches: HashMap::new(),
        steps: Vec::with_capacity(4),
    };
    let mut batch: Vec<Envelope> = Vec::with_capacity(256);
    loop {
        let n = tokio::select! {
            n = inp.rx.recv_many(&mut batch, 256) => n,
            _ = inp.hard_stop.cancelled() => return,
        };
        if n == 0 {
            return;
        }
        {
            let latest = inp.pipelines.load();
            if !Arc::ptr_eq(&latest, &lane.current) {
                lane.current = Arc::clone(&latest);
                lane.matches.clear();
            }
        }
        for env in batch.drain(..) {
            let ok = match env {
                Envelope::Change { change, ticket } => lane.process(&change, ticket, false).await,
                Envelope::Barrier(b) => lane.barrier(&b).await,
            };
            if !ok {
                return;
            }
        }
    }
}
