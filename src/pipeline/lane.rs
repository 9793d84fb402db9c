//! A pipeline lane: takes changes in order, runs every matching pipeline, and hands the
//! resulting records to the sinks' lanes of the same index (so a key's order holds end to end).
//!
//! The pipeline set is read through an `ArcSwap`; a reload swaps it between changes, which is
//! the "batch boundary" at which new definitions take effect. A change whose rendering fails is
//! dead-lettered for that pipeline and sink; its other pipelines and sinks still get it.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::PipelineSet;
use super::process::{self, Step};
use super::router::Envelope;
use crate::change::{Name, Op, SNAPSHOT_ORIGIN};
use crate::dlq::DeadLetterQueue;
use crate::sink::Record;
use crate::sink::runner::record_dead_letter;

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

/// Run until the input closes (drained) or the hard stop fires.
pub async fn run(mut inp: LaneInputs) {
    let mut current = inp.pipelines.load_full();
    let mut matches: HashMap<(Name, Name), Vec<usize>> = HashMap::new();
    let mut batch: Vec<Envelope> = Vec::with_capacity(256);
    let mut steps = Vec::with_capacity(4);
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
            if !Arc::ptr_eq(&latest, &current) {
                current = Arc::clone(&latest);
                matches.clear();
            }
        }
        for env in batch.drain(..) {
            let change = &env.change;
            let key = (Arc::clone(&change.source), Arc::clone(&change.relation));
            let idx = matches.entry(key).or_insert_with(|| current.matching(&change.source, &change.relation));
            for &i in idx.iter() {
                let rp = current.get(i);
                let def = &rp.def;
                if !def.ops.contains(change.op) {
                    continue;
                }
                // Snapshot rows go to the pipeline that asked for them only.
                if change.op == Op::Read
                    && let Some(target) = change.origin.as_deref().and_then(|o| o.strip_prefix(SNAPSHOT_ORIGIN))
                    && target != &*def.name
                {
                    continue;
                }
                process::apply(def, change, None, &mut steps);
                for step in steps.drain(..) {
                    match step {
                        Step::Payload { action, payload } => {
                            let sink = &rp.sinks[action];
                            let rec = Record {
                                ticket: env.ticket.retain(),
                                change: Arc::clone(change),
                                pipeline: Arc::clone(&def.name),
                                payload,
                            };
                            // Without waiting when there is room (no cancellation future per
                            // record); otherwise wait, unless the hard stop fires.
                            let tx = &sink.lanes[inp.index % sink.lanes.len()];
                            let sent = match tx.try_send(rec) {
                                Ok(()) => true,
                                Err(mpsc::error::TrySendError::Full(rec)) => tokio::select! {
                                    r = tx.send(rec) => r.is_ok(),
                                    _ = inp.hard_stop.cancelled() => false,
                                },
                                Err(mpsc::error::TrySendError::Closed(_)) => false,
                            };
                            if !sent {
                                return; // shutting down: nothing more is acknowledged
                            }
                        }
                        Step::DeadLetter { sink, reason } => {
                            if !record_dead_letter(&inp.dlq, &def.name, &sink, &reason, change, &inp.hard_stop).await {
                                return;
                            }
                        }
                    }
                }
            }
            env.ticket.ack();
        }
    }
}
