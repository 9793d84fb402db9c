//! The graph sink's writer: a batch of changes becomes as few traversals as order allows.
//!
//! Upserts and drops whose out vertex is known run as `sideEffect` steps of one traversal
//! (`g.inject(1).sideEffect(…)…none()`), in change order; drops of edges whose endpoints are
//! unknown run as one `g.E(ids…).drop()` placed before them (moved earlier only past operations
//! on other elements). Every write is idempotent (ids are deterministic, upserts match by id),
//! so retrying a batch is harmless. A permanent error is narrowed down by splitting the batch
//! until the change that causes it is found and dead-lettered alone.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::Mutex;

use super::action::{GraphOp, PropValue};
use super::config::{Compat, GraphAuth, GraphSinkConfig};
use super::gremlin::{Bytecode, Connection, Endpoint, GValue, GremlinError};
use crate::aws::AwsSettings;
use crate::sink::{BatchLimits, ItemOutcome, Payload, Record, Sink, SinkError, SinkErrorKind};

/// A connected graph target.
pub struct GraphSink {
    name: String,
    endpoint: Endpoint,
    compat: Compat,
    pool: Vec<Mutex<Option<Connection>>>,
    next: AtomicUsize,
    limits: BatchLimits,
}

/// One request of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// A traversal of side effects.
    Traversal(Bytecode),
    /// `g.E(ids…).drop()`.
    DropEdges(Vec<String>),
}

fn s(v: &str) -> GValue {
    GValue::Str(v.to_string())
}

fn anon() -> Bytecode {
    Bytecode::new()
}

fn with_props(mut b: Bytecode, props: &[(String, Option<PropValue>)], vertex: bool) -> Bytecode {
    for (k, v) in props {
        match v {
            Some(v) if vertex => b.push("property", vec![GValue::Cardinality("single"), s(k), GValue::from(v)]),
            Some(v) => b.push("property", vec![s(k), GValue::from(v)]),
            None => b.push(
                "sideEffect",
                vec![GValue::Traversal(anon().step("properties", vec![s(k)]).step("drop", vec![]))],
            ),
        }
    }
    b
}

fn upsert_vertex(compat: Compat, id: &str, label: &str, props: &[(String, Option<PropValue>)]) -> Bytecode {
    let base = match compat {
        Compat::Merge => anon()
            .step("mergeV", vec![GValue::Map(vec![(GValue::T("id"), s(id))])])
            .step("option", vec![GValue::Merge("onCreate"), GValue::Map(vec![(GValue::T("label"), s(label))])]),
        Compat::Coalesce => anon().step("V", vec![s(id)]).step("fold", vec![]).step(
            "coalesce",
            vec![
                GValue::Traversal(anon().step("unfold", vec![])),
                GValue::Traversal(anon().step("addV", vec![s(label)]).step("property", vec![GValue::T("id"), s(id)])),
            ],
        ),
    };
    with_props(base, props, true)
}

fn upsert_edge(
    compat: Compat,
    id: &str,
    label: &str,
    from: &(String, String),
    to: &(String, String),
    props: &[(String, Option<PropValue>)],
) -> Bytecode {
    let base = match compat {
        Compat::Merge => anon().step("mergeE", vec![GValue::Map(vec![(GValue::T("id"), s(id))])]).step(
            "option",
            vec![
                GValue::Merge("onCreate"),
                GValue::Map(vec![
                    (GValue::T("label"), s(label)),
                    (GValue::Direction("OUT"), s(&from.1)),
                    (GValue::Direction("IN"), s(&to.1)),
                ]),
            ],
        ),
        Compat::Coalesce => anon()
            .step("V", vec![s(&from.1)])
            .step("outE", vec![s(label)])
            .step("hasId", vec![s(id)])
            .step("fold", vec![])
            .step(
                "coalesce",
                vec![
                    GValue::Traversal(anon().step("unfold", vec![])),
                    GValue::Traversal(
                        anon()
                            .step("addE", vec![s(label)])
                            .step("from", vec![GValue::Traversal(anon().step("V", vec![s(&from.1)]))])
                            .step("to", vec![GValue::Traversal(anon().step("V", vec![s(&to.1)]))])
                            .step("property", vec![GValue::T("id"), s(id)]),
                    ),
                ],
            ),
    };
    with_props(base, props, false)
}

/// Turn the operations of a batch (in change order) into requests.
pub fn plan(compat: Compat, ops: &[&GraphOp]) -> Vec<Request> {
    let mut requests = Vec::new();
    let mut drops: Vec<String> = Vec::new();
    let mut seg = Bytecode::new().step("inject", vec![GValue::Int(1)]);
    let mut seg_edges: HashSet<&str> = HashSet::new();
    let flush =
        |requests: &mut Vec<Request>, drops: &mut Vec<String>, seg: &mut Bytecode, seg_edges: &mut HashSet<&str>| {
            if !drops.is_empty() {
                requests.push(Request::DropEdges(std::mem::take(drops)));
            }
            if seg.len() > 1 {
                let done = std::mem::replace(seg, Bytecode::new().step("inject", vec![GValue::Int(1)]));
                requests.push(Request::Traversal(done.step("none", vec![])));
            }
            seg_edges.clear();
        };
    let effect = |seg: &mut Bytecode, b: Bytecode| seg.push("sideEffect", vec![GValue::Traversal(b)]);
    for op in ops {
        match op {
            GraphOp::DropEdge { id, from: None } => {
                if seg_edges.contains(id.as_str()) {
                    flush(&mut requests, &mut drops, &mut seg, &mut seg_edges);
                }
                drops.push(id.clone());
            }
            GraphOp::DropEdge { id, from: Some(from) } => {
                seg_edges.insert(id);
                effect(
                    &mut seg,
                    anon()
                        .step("V", vec![s(from)])
                        .step("outE", vec![])
                        .step("hasId", vec![s(id)])
                        .step("drop", vec![]),
                );
            }
            GraphOp::Edge { id, label, from, to, props } => {
                seg_edges.insert(id);
                effect(&mut seg, upsert_vertex(compat, &from.1, &from.0, &[]));
                effect(&mut seg, upsert_vertex(compat, &to.1, &to.0, &[]));
                effect(&mut seg, upsert_edge(compat, id, label, from, to, props));
            }
            GraphOp::Vertex { id, label, props } => effect(&mut seg, upsert_vertex(compat, id, label, props)),
            GraphOp::DropVertex { id } => effect(&mut seg, anon().step("V", vec![s(id)]).step("drop", vec![])),
            // Mid-traversal V() exists in Gremlin, mid-traversal E() does not: edges are reached
            // through their out vertices.
            GraphOp::DropLabel { vertices: true, label } => {
                effect(&mut seg, anon().step("V", vec![]).step("hasLabel", vec![s(label)]).step("drop", vec![]))
            }
            GraphOp::DropLabel { vertices: false, label } => {
                effect(&mut seg, anon().step("V", vec![]).step("outE", vec![s(label)]).step("drop", vec![]))
            }
        }
    }
    flush(&mut requests, &mut drops, &mut seg, &mut seg_edges);
    requests
}

fn drop_edges(ids: &[String]) -> Bytecode {
    Bytecode::new().step("E", ids.iter().map(|i| s(i)).collect()).step("drop", vec![]).step("none", vec![])
}

impl GraphSink {
    /// Connect (one connection up front, so an unreachable server shows at start-up).
    pub async fn connect(
        name: &str,
        cfg: &GraphSinkConfig,
        aws: &AwsSettings,
        base: &std::path::Path,
    ) -> Result<GraphSink, SinkError> {
        let endpoint_text = cfg.url.clone();
        let fatal = |e: &dyn std::fmt::Display| SinkError {
            sink: name.to_string(),
            endpoint: endpoint_text.clone(),
            kind: SinkErrorKind::Fatal,
            msg: e.to_string(),
        };
        let tls = if cfg.url.starts_with("wss://") {
            let ca = cfg.tls_ca_file.as_ref().map(|f| if f.is_absolute() { f.clone() } else { base.join(f) });
            crate::tls::client_config(cfg.tls.unwrap_or(crate::tls::TlsMode::VerifyFull), ca.as_deref())
                .map_err(|e| fatal(&e))?
                .map(Arc::new)
        } else {
            None
        };
        let sign = if cfg.auth() == GraphAuth::Iam {
            let sdk = crate::aws::sdk_config(aws).await;
            let region = cfg
                .region
                .clone()
                .or_else(|| sdk.region().map(|r| r.to_string()))
                .ok_or_else(|| fatal(&"IAM auth needs a region (region = or AWS_REGION)"))?;
            let provider = sdk.credentials_provider().ok_or_else(|| fatal(&"IAM auth: no AWS credentials found"))?;
            Some(super::iam::signer(provider, region))
        } else {
            None
        };
        let endpoint = Endpoint {
            url: cfg.url.clone(),
            tls,
            plain: (cfg.auth() == GraphAuth::Basic).then(|| {
                (
                    cfg.username.clone().unwrap_or_default(),
                    cfg.password.as_ref().map(|p| p.expose().to_string()).unwrap_or_default(),
                )
            }),
            sign,
            timeout: cfg.timeout.unwrap_or(Duration::from_secs(30)),
        };
        let sink = GraphSink {
            name: name.to_string(),
            endpoint,
            compat: cfg.compat,
            pool: (0..4).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            limits: BatchLimits {
                max_records: cfg.batch_size.unwrap_or(100),
                linger: cfg.linger.unwrap_or(Duration::from_millis(5)),
            },
        };
        sink.submit(&Bytecode::new().step("inject", vec![GValue::Int(1)]).step("none", vec![])).await.map_err(|e| {
            let kind = if e.code == 401 || e.code == 403 || e.code == 407 {
                SinkErrorKind::Fatal
            } else {
                SinkErrorKind::Transient
            };
            SinkError { sink: name.to_string(), endpoint: cfg.url.clone(), kind, msg: e.to_string() }
        })?;
        Ok(sink)
    }

    async fn submit(&self, traversal: &Bytecode) -> Result<(), GremlinError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.pool.len();
        let mut slot = self.pool[i].lock().await;
        if slot.is_none() {
            *slot = Some(Connection::open(&self.endpoint).await?);
        }
        let conn = slot.as_mut().expect("opened above");
        let result = conn.submit(traversal).await;
        if matches!(&result, Err(e) if e.code == 0 || e.code == 598) {
            // The connection may be half-broken or still busy with the timed-out request.
            *slot = None;
        }
        result
    }

    fn error(&self, e: GremlinError) -> SinkError {
        SinkError {
            sink: self.name.clone(),
            endpoint: self.endpoint.url.clone(),
            kind: if e.is_transient() { SinkErrorKind::Transient } else { SinkErrorKind::Fatal },
            msg: e.to_string(),
        }
    }

    /// Write the records at `idx`; a permanent failure is narrowed down by halving.
    fn write_some<'a>(
        &'a self,
        ops: &'a [Vec<&'a GraphOp>],
        idx: Vec<usize>,
        outcomes: &'a mut [ItemOutcome],
    ) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let flat: Vec<&GraphOp> = idx.iter().flat_map(|&i| ops[i].iter().copied()).collect();
            let mut failed = None;
            for req in plan(self.compat, &flat) {
                let r = match &req {
                    Request::Traversal(t) => self.submit(t).await,
                    Request::DropEdges(ids) => self.submit(&drop_edges(ids)).await,
                };
                if let Err(e) = r {
                    if e.is_transient() {
                        return Err(self.error(e));
                    }
                    failed = Some(e);
                    break;
                }
            }
            let Some(e) = failed else { return Ok(()) };
            if idx.len() == 1 {
                outcomes[idx[0]] = ItemOutcome::Rejected(e.to_string());
                return Ok(());
            }
            let (a, b) = idx.split_at(idx.len() / 2);
            let (a, b) = (a.to_vec(), b.to_vec());
            self.write_some(ops, a, outcomes).await?;
            self.write_some(ops, b, outcomes).await
        })
    }

    async fn write_batch(&self, batch: &[Arc<Record>]) -> Result<Vec<ItemOutcome>, SinkError> {
        let mut outcomes = vec![ItemOutcome::Applied; batch.len()];
        let mut ops: Vec<Vec<&GraphOp>> = Vec::with_capacity(batch.len());
        let mut idx = Vec::with_capacity(batch.len());
        for (i, rec) in batch.iter().enumerate() {
            match &rec.payload {
                Payload::Graph(g) => {
                    ops.push(g.iter().collect());
                    idx.push(i);
                }
                _ => {
                    ops.push(Vec::new());
                    outcomes[i] = ItemOutcome::Rejected("payload is not for a graph sink".into());
                }
            }
        }
        self.write_some(&ops, idx, &mut outcomes).await?;
        Ok(outcomes)
    }
}

impl Sink for GraphSink {
    fn name(&self) -> &str {
        &self.name
    }
    fn endpoint(&self) -> String {
        self.endpoint.url.clone()
    }
    fn limits(&self) -> BatchLimits {
        self.limits
    }
    fn write<'a>(&'a self, batch: &'a [Arc<Record>]) -> BoxFuture<'a, Result<Vec<ItemOutcome>, SinkError>> {
        Box::pin(self.write_batch(batch))
    }
    fn check(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        Box::pin(async move {
            self.submit(&Bytecode::new().step("inject", vec![GValue::Int(1)]).step("none", vec![]))
                .await
                .map_err(|e| self.error(e))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edge(id: &str) -> GraphOp {
        GraphOp::Edge {
            id: id.into(),
            label: "l".into(),
            from: ("a".into(), "a1".into()),
            to: ("b".into(), "b1".into()),
            props: vec![],
        }
    }

    #[test]
    fn drops_without_endpoints_go_first_unless_order_forbids() {
        let ops = [
            GraphOp::DropEdge { id: "e1".into(), from: None },
            edge("e1"),
            GraphOp::DropEdge { id: "e2".into(), from: None },
            edge("e2"),
        ];
        let refs: Vec<&GraphOp> = ops.iter().collect();
        let plan = plan(Compat::Merge, &refs);
        assert_eq!(plan.len(), 2, "one drop request, one traversal: {plan:?}");
        assert_eq!(plan[0], Request::DropEdges(vec!["e1".into(), "e2".into()]));

        // An upsert then a drop of the same edge must stay in that order.
        let ops = [edge("e1"), GraphOp::DropEdge { id: "e1".into(), from: None }, edge("e1")];
        let refs: Vec<&GraphOp> = ops.iter().collect();
        let plan = super::plan(Compat::Merge, &refs);
        assert!(matches!(&plan[0], Request::Traversal(_)));
        assert_eq!(plan[1], Request::DropEdges(vec!["e1".into()]));
        assert!(matches!(&plan[2], Request::Traversal(_)));
    }
}
