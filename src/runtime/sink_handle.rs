//! A running sink target: its queue, its lane writers, its spool task and its health check,
//! behind one handle that a reload can re-point at a new config without losing a record.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::queue::SinkQueue;
use super::writer::{self, SinkSlot, WriterContext};
use crate::change::Name;
use crate::dlq::DeadLetterQueue;
use crate::sink::{Sink, SinkConfig};
use crate::telemetry::{Health, metrics};

/// How often a sink is probed for readiness.
const CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// What starting a sink needs from the daemon.
#[derive(Clone)]
pub struct SinkRuntime {
    /// Where refused records go.
    pub dlq: Arc<DeadLetterQueue>,
    /// Readiness registry.
    pub health: Arc<Health>,
    /// Abandon work (the shutdown deadline passed).
    pub hard_stop: CancellationToken,
    /// The daemon's task tracker: every task a sink starts is on it.
    pub tasks: TaskTracker,
}

/// A running sink target.
pub struct SinkHandle {
    /// Target name.
    pub name: Name,
    /// Its queue (pipeline lanes push here).
    pub queue: Arc<SinkQueue>,
    slot: Arc<SinkSlot>,
    config: Mutex<SinkConfig>,
    /// Stops this sink's writers' background companions (spool task, health check).
    stop: CancellationToken,
    health: Arc<Health>,
}

impl SinkHandle {
    /// Start writers (one per lane of `queue`), the spool task and the health check.
    pub fn start(
        name: &str,
        config: SinkConfig,
        sink: Arc<dyn Sink>,
        queue: Arc<SinkQueue>,
        rt: &SinkRuntime,
    ) -> SinkHandle {
        let slot = Arc::new(SinkSlot::new(sink));
        let stop = CancellationToken::new();
        let ctx = WriterContext {
            queue: Arc::clone(&queue),
            slot: Arc::clone(&slot),
            dlq: Arc::clone(&rt.dlq),
            health: Arc::clone(&rt.health),
            hard_stop: rt.hard_stop.clone(),
        };
        for lane in 0..queue.lanes() {
            rt.tasks.spawn(writer::run(lane, ctx.clone()));
        }
        rt.tasks.spawn(Arc::clone(&queue).run_spool(stop.clone()));
        rt.tasks.spawn(check(
            name.to_string(),
            Arc::clone(&slot),
            Arc::clone(&queue),
            Arc::clone(&rt.health),
            stop.clone(),
        ));
        SinkHandle {
            name: Name::from(name),
            queue,
            slot,
            config: Mutex::new(config),
            stop,
            health: Arc::clone(&rt.health),
        }
    }

    /// The config it runs with now.
    pub fn config(&self) -> SinkConfig {
        self.config.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Re-point the sink at a new config: its queued and spooled records go to the new target,
    /// an attempt in flight against the old one is abandoned and repeated on the new one.
    pub fn swap(&self, config: SinkConfig, sink: Arc<dyn Sink>) {
        *self.config.lock().unwrap_or_else(|p| p.into_inner()) = config;
        self.slot.swap(sink);
        self.queue.wake_writers();
    }

    /// Stop everything (shutdown, after the lanes are gone): writers finish what their lanes
    /// hold, the spool keeps the rest.
    pub fn close(&self) {
        self.queue.close();
        self.stop.cancel();
    }

    /// A sink no longer used by any pipeline: let it finish what it holds for up to
    /// `deadline`, then dead-letter what is left (so its changes can be confirmed), and stop.
    pub async fn retire(self: Arc<Self>, dlq: Arc<DeadLetterQueue>, deadline: Duration, hard_stop: CancellationToken) {
        let until = tokio::time::Instant::now() + deadline;
        while !self.queue.is_drained() && tokio::time::Instant::now() < until {
            tokio::select! {
                _ = hard_stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        if !self.queue.is_drained() {
            let reason = format!("sink {} was removed by a reload before it applied this", self.name);
            let held = self.queue.take_held();
            tracing::warn!(sink = %self.name, records = held.len(), "a removed sink did not finish in time; its records go to the dead-letter queue");
            for (rec, ticket) in held {
                if !writer::dead_letter(&dlq, &rec.pipeline, &self.name, &reason, &rec.change, &hard_stop).await {
                    return;
                }
                ticket.ack();
            }
            if let Some(spool) = self.queue.spool().cloned()
                && super::spool_drain::to_dead_letters(&spool, &dlq, &self.name, &reason, &hard_stop).await.is_ok()
            {
                for t in self.queue.take_kept() {
                    t.ack();
                }
            }
        }
        self.close();
        self.health.remove(&format!("sink {}", self.name));
    }
}

/// Probe the sink's current target every few seconds (and say how far behind it is).
async fn check(name: String, slot: Arc<SinkSlot>, queue: Arc<SinkQueue>, health: Arc<Health>, stop: CancellationToken) {
    let component = format!("sink {name}");
    loop {
        let sink = slot.load().sink.clone();
        let r = tokio::select! {
            _ = stop.cancelled() => break,
            r = tokio::time::timeout(CHECK_INTERVAL, sink.check()) => r,
        };
        let state = match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.msg),
            Err(_) => Err(format!("no answer within {CHECK_INTERVAL:?}")),
        };
        metrics().sink_up.with_label_values(&[&name]).set(i64::from(state.is_ok()));
        let backlog = queue.backlog();
        health.set(
            &component,
            state.map_err(|e| {
                if backlog > 0 {
                    format!("down: {e}; {backlog} records behind ({:.0} s), held in its spool", queue.lag_seconds())
                } else {
                    format!("down: {e}")
                }
            }),
        );
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(CHECK_INTERVAL) => {}
        }
    }
}
