//! A small Gremlin client: bytecode traversals as GraphSON v3 over a WebSocket
//! (`tokio-tungstenite`), SASL PLAIN for Gremlin Server credentials, SigV4-signed handshakes for
//! Neptune IAM.
//!
//! Why not the `gremlin-client` crate: its 0.8 line has no `mergeV`/`mergeE` and its value type
//! cannot express the tokens they need (`Direction`, `Merge`), and it offers no way to add
//! headers to the WebSocket handshake, which Neptune IAM authentication requires. The protocol
//! part needed here is small: one JSON request per traversal, responses matched by request id.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

/// A value in a traversal.
#[derive(Debug, Clone, PartialEq)]
pub enum GValue {
    /// null
    Null,
    /// boolean
    Bool(bool),
    /// g:Int64
    Int(i64),
    /// g:Double
    Double(f64),
    /// string
    Str(String),
    /// g:Date (milliseconds since the epoch)
    Date(i64),
    /// g:List
    List(Vec<GValue>),
    /// g:Map (ordered pairs)
    Map(Vec<(GValue, GValue)>),
    /// g:T (`id`, `label`)
    T(&'static str),
    /// g:Direction (`OUT`, `IN`)
    Direction(&'static str),
    /// g:Merge (`onCreate`, `onMatch`)
    Merge(&'static str),
    /// g:Cardinality (`single`, `list`, `set`)
    Cardinality(&'static str),
    /// An anonymous traversal.
    Traversal(Bytecode),
}

/// Traversal bytecode: a list of steps with arguments.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Bytecode {
    steps: Vec<(&'static str, Vec<GValue>)>,
}

impl Bytecode {
    /// An empty traversal (`g` or `__`).
    pub fn new() -> Bytecode {
        Bytecode::default()
    }

    /// Append a step.
    pub fn step(mut self, name: &'static str, args: Vec<GValue>) -> Bytecode {
        self.steps.push((name, args));
        self
    }

    /// Append a step in place.
    pub fn push(&mut self, name: &'static str, args: Vec<GValue>) {
        self.steps.push((name, args));
    }

    /// Number of steps.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// True when there are no steps.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

fn typed(out: &mut String, t: &str, value: impl FnOnce(&mut String)) {
    let _ = write!(out, r#"{{"@type":"{t}","@value":"#);
    value(out);
    out.push('}');
}

fn json_str(out: &mut String, s: &str) {
    out.push_str(&serde_json::Value::String(s.to_string()).to_string());
}

/// GraphSON v3 of a value.
pub fn write_value(out: &mut String, v: &GValue) {
    match v {
        GValue::Null => out.push_str("null"),
        GValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        GValue::Int(i) => typed(out, "g:Int64", |o| {
            let _ = write!(o, "{i}");
        }),
        GValue::Double(d) => typed(out, "g:Double", |o| {
            if d.is_finite() {
                let _ = write!(o, "{d:?}");
            } else {
                json_str(
                    o,
                    if d.is_nan() {
                        "NaN"
                    } else if *d > 0.0 {
                        "Infinity"
                    } else {
                        "-Infinity"
                    },
                );
            }
        }),
        GValue::Str(s) => json_str(out, s),
        GValue::Date(ms) => typed(out, "g:Date", |o| {
            let _ = write!(o, "{ms}");
        }),
        GValue::List(items) => typed(out, "g:List", |o| {
            o.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    o.push(',');
                }
                write_value(o, item);
            }
            o.push(']');
        }),
        GValue::Map(pairs) => typed(out, "g:Map", |o| {
            o.push('[');
            for (i, (k, v)) in pairs.iter().enumerate() {
                if i > 0 {
                    o.push(',');
                }
                write_value(o, k);
                o.push(',');
                write_value(o, v);
            }
            o.push(']');
        }),
        GValue::T(t) => typed(out, "g:T", |o| json_str(o, t)),
        GValue::Direction(d) => typed(out, "g:Direction", |o| json_str(o, d)),
        GValue::Merge(m) => typed(out, "g:Merge", |o| json_str(o, m)),
        GValue::Cardinality(c) => typed(out, "g:Cardinality", |o| json_str(o, c)),
        GValue::Traversal(b) => write_bytecode(out, b),
    }
}

/// GraphSON v3 of bytecode.
pub fn write_bytecode(out: &mut String, b: &Bytecode) {
    typed(out, "g:Bytecode", |o| {
        o.push_str(r#"{"step":["#);
        for (i, (name, args)) in b.steps.iter().enumerate() {
            if i > 0 {
                o.push(',');
            }
            o.push('[');
            json_str(o, name);
            for a in args {
                o.push(',');
                write_value(o, a);
            }
            o.push(']');
        }
        o.push_str("]}");
    });
}

/// A failed request: the server's status code and message, or a connection problem (code 0).
#[derive(Debug, Clone, thiserror::Error)]
#[error("gremlin {code}: {message}")]
pub struct GremlinError {
    /// Gremlin status code (0: connection).
    pub code: u16,
    /// Server message.
    pub message: String,
}

impl GremlinError {
    fn io(e: impl std::fmt::Display) -> GremlinError {
        GremlinError { code: 0, message: e.to_string() }
    }

    /// Worth retrying as is: connection trouble, timeouts, Neptune's concurrency, throttling
    /// and failover errors.
    pub fn is_transient(&self) -> bool {
        const TRANSIENT: [&str; 8] = [
            "ConcurrentModificationException",
            "ReadOnlyViolationException",
            "ThrottlingException",
            "TimeLimitExceededException",
            "MemoryLimitExceededException",
            "InternalFailureException",
            "TooManyRequestsException",
            "CancelledByUserException",
        ];
        matches!(self.code, 0 | 598 | 429 | 503) || TRANSIENT.iter().any(|t| self.message.contains(t))
    }
}

fn request_id() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode(b);
    format!("{}-{}-4{}-a{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
}

/// Produces the extra handshake headers for a URL (SigV4 for Neptune IAM).
pub type HandshakeSigner =
    Arc<dyn Fn(&str) -> futures::future::BoxFuture<'static, Result<Vec<(String, String)>, String>> + Send + Sync>;

/// Where and how to connect.
#[derive(Clone)]
pub struct Endpoint {
    /// `ws://` or `wss://` URL of the Gremlin endpoint.
    pub url: String,
    /// rustls config for `wss://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// SASL PLAIN credentials (Gremlin Server).
    pub plain: Option<(String, String)>,
    /// Extra handshake headers (SigV4), produced fresh per connection.
    pub sign: Option<HandshakeSigner>,
    /// Per-request timeout.
    pub timeout: Duration,
}

/// One WebSocket connection to a Gremlin endpoint.
pub struct Connection {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    endpoint: Endpoint,
}

const MIME: &str = "application/vnd.gremlin-v3.0+json";

impl Connection {
    /// Open the WebSocket (signing the handshake when configured).
    pub async fn open(endpoint: &Endpoint) -> Result<Connection, GremlinError> {
        let mut request = endpoint.url.as_str().into_client_request().map_err(GremlinError::io)?;
        if let Some(sign) = &endpoint.sign {
            for (k, v) in
                sign(&endpoint.url).await.map_err(|e| GremlinError { code: 0, message: format!("SigV4: {e}") })?
            {
                request.headers_mut().insert(
                    http::HeaderName::from_bytes(k.as_bytes()).map_err(GremlinError::io)?,
                    http::HeaderValue::from_str(&v).map_err(GremlinError::io)?,
                );
            }
        }
        let connector = endpoint.tls.clone().map(Connector::Rustls);
        let connect = tokio_tungstenite::connect_async_tls_with_config(request, None, true, connector);
        let (ws, _) = tokio::time::timeout(endpoint.timeout, connect)
            .await
            .map_err(|_| GremlinError::io(format!("connect timed out after {:?}", endpoint.timeout)))?
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(resp) => GremlinError {
                    code: resp.status().as_u16(),
                    message: format!(
                        "handshake refused: {} {}",
                        resp.status(),
                        resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default()
                    ),
                },
                other => GremlinError::io(other),
            })?;
        Ok(Connection { ws, endpoint: endpoint.clone() })
    }

    async fn send_json(&mut self, json: &str) -> Result<(), GremlinError> {
        let mut frame = Vec::with_capacity(1 + MIME.len() + json.len());
        frame.push(MIME.len() as u8);
        frame.extend_from_slice(MIME.as_bytes());
        frame.extend_from_slice(json.as_bytes());
        self.ws.send(Message::Binary(frame.into())).await.map_err(GremlinError::io)
    }

    /// Submit a traversal and wait for its final status; results are not needed (the
    /// traversals polysync sends end in `none()`).
    pub async fn submit(&mut self, traversal: &Bytecode) -> Result<(), GremlinError> {
        let id = request_id();
        let mut json = String::with_capacity(256);
        let _ = write!(
            json,
            r#"{{"requestId":{{"@type":"g:UUID","@value":"{id}"}},"op":"bytecode","processor":"traversal","args":{{"gremlin":"#
        );
        write_bytecode(&mut json, traversal);
        json.push_str(r#","aliases":{"g":"g"}}}"#);
        let timeout = self.endpoint.timeout;
        match tokio::time::timeout(timeout, self.exchange(&id, &json)).await {
            Ok(r) => r,
            Err(_) => Err(GremlinError { code: 598, message: format!("no answer within {timeout:?}") }),
        }
    }

    async fn exchange(&mut self, id: &str, json: &str) -> Result<(), GremlinError> {
        self.send_json(json).await?;
        loop {
            let msg =
                self.ws.next().await.ok_or_else(|| GremlinError::io("connection closed"))?.map_err(GremlinError::io)?;
            let text = match msg {
                Message::Text(t) => t.to_string(),
                Message::Binary(b) => String::from_utf8_lossy(&b).into_owned(),
                Message::Ping(p) => {
                    self.ws.send(Message::Pong(p)).await.map_err(GremlinError::io)?;
                    continue;
                }
                Message::Close(_) => return Err(GremlinError::io("server closed the connection")),
                _ => continue,
            };
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| GremlinError::io(format!("response is not JSON: {e}")))?;
            let rid = match &v["requestId"] {
                serde_json::Value::String(s) => s.clone(),
                other => other["@value"].as_str().unwrap_or_default().to_string(),
            };
            if rid != id {
                continue; // an answer to an abandoned earlier request
            }
            let code = v["status"]["code"].as_u64().unwrap_or(0) as u16;
            let message = v["status"]["message"].as_str().unwrap_or_default().to_string();
            match code {
                200 | 204 => return Ok(()),
                206 => continue,
                407 => {
                    let Some((user, pass)) = self.endpoint.plain.clone() else {
                        return Err(GremlinError {
                            code,
                            message: "server requires credentials; set username/password".into(),
                        });
                    };
                    let sasl = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pass}"));
                    let auth = format!(
                        r#"{{"requestId":{{"@type":"g:UUID","@value":"{id}"}},"op":"authentication","processor":"traversal","args":{{"sasl":"{sasl}","saslMechanism":"PLAIN"}}}}"#
                    );
                    self.send_json(&auth).await?;
                }
                _ => return Err(GremlinError { code, message }),
            }
        }
    }

    /// Close politely.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graphson_of_a_merge_traversal() {
        let b = Bytecode::new()
            .step("inject", vec![GValue::Int(1)])
            .step(
                "sideEffect",
                vec![GValue::Traversal(
                    Bytecode::new()
                        .step("mergeV", vec![GValue::Map(vec![(GValue::T("id"), GValue::Str("u\"1".into()))])])
                        .step(
                            "option",
                            vec![
                                GValue::Merge("onCreate"),
                                GValue::Map(vec![(GValue::T("label"), GValue::Str("user".into()))]),
                            ],
                        )
                        .step(
                            "property",
                            vec![GValue::Cardinality("single"), GValue::Str("n".into()), GValue::Double(1.5)],
                        ),
                )],
            )
            .step("none", vec![]);
        let mut s = String::new();
        write_bytecode(&mut s, &b);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        let steps = &v["@value"]["step"];
        assert_eq!(steps[0], serde_json::json!(["inject", {"@type": "g:Int64", "@value": 1}]));
        let inner = &steps[1][1]["@value"]["step"];
        assert_eq!(inner[0][1]["@value"][0], serde_json::json!({"@type": "g:T", "@value": "id"}));
        assert_eq!(inner[0][1]["@value"][1], "u\"1", "data is a JSON value, never code");
        assert_eq!(inner[1][1], serde_json::json!({"@type": "g:Merge", "@value": "onCreate"}));
        assert_eq!(inner[2][3], serde_json::json!({"@type": "g:Double", "@value": 1.5}));
        assert_eq!(steps[2], serde_json::json!(["none"]));
        assert_eq!(request_id().len(), 36);
    }

    #[test]
    fn neptune_concurrency_errors_are_transient() {
        let e = GremlinError {
            code: 500,
            message: r#"{"code":"ConcurrentModificationException","detailedMessage":"Failed to complete"}"#.into(),
        };
        assert!(e.is_transient());
        assert!(!GremlinError { code: 597, message: "Vertex with id already exists: 1".into() }.is_transient());
    }
}
