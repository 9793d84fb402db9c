//! The replication connection: startup with `replication=database`, TLS, SCRAM-SHA-256 (and
//! md5/cleartext for old servers), simple queries, and the CopyBoth stream of
//! `START_REPLICATION … LOGICAL`.
//!
//! Why a small module here instead of a replication crate: the protocol part is short (startup,
//! auth, three message kinds in CopyBoth) and the crates that do it either hand back raw pgoutput
//! bytes anyway (`pgwire-replication`) or decode into their own types that we would convert
//! again (`pg_walstream`). Owning these ~400 lines keeps one copy of every byte from socket to
//! [`super::decode`] (frames are `Bytes` slices of the read buffer), lets the stream loop send
//! status updates while it waits on sink backpressure, and builds on `postgres-protocol`, the
//! message and SCRAM code tokio-postgres itself uses. The normal connection is tokio-postgres.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::config::{ConnInfo, Target};
use crate::tls::TlsMode;

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// What went wrong talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum ReplError {
    /// Network failure (retryable).
    #[error("{endpoint}: {source}")]
    Io {
        /// `host:port/db`.
        endpoint: String,
        /// The I/O error.
        source: io::Error,
    },
    /// TLS could not be set up or was refused.
    #[error("{endpoint}: TLS: {msg}")]
    Tls {
        /// `host:port/db`.
        endpoint: String,
        /// Why.
        msg: String,
    },
    /// The server reported an error.
    #[error("{endpoint}: {severity} {code}: {message}{}", detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Server {
        /// `host:port/db`.
        endpoint: String,
        /// ERROR / FATAL.
        severity: String,
        /// SQLSTATE.
        code: String,
        /// Primary message.
        message: String,
        /// DETAIL, if any.
        detail: Option<String>,
    },
    /// Authentication could not proceed (unsupported method, missing password).
    #[error("{endpoint}: authentication: {msg}")]
    Auth {
        /// `host:port/db`.
        endpoint: String,
        /// Why.
        msg: String,
    },
    /// The server sent something we do not understand.
    #[error("{endpoint}: protocol: {msg}")]
    Protocol {
        /// `host:port/db`.
        endpoint: String,
        /// What.
        msg: String,
    },
    /// Connect timed out.
    #[error("{endpoint}: connect timed out after {after:?}")]
    Timeout {
        /// `host:port/db`.
        endpoint: String,
        /// The timeout.
        after: Duration,
    },
    /// No candidate server is the writer: each is in recovery or unreachable (mid-failover,
    /// or an Aurora cluster endpoint still pointing at the old writer). Retried.
    #[error("no server is the writer: {tried}")]
    NoWriter {
        /// Each candidate with why it was passed over.
        tried: String,
    },
}

impl ReplError {
    /// True when retrying later can help (network, server restart); false for configuration or
    /// permission problems that need a person.
    pub fn is_transient(&self) -> bool {
        match self {
            ReplError::Io { .. }
            | ReplError::Timeout { .. }
            | ReplError::Protocol { .. }
            | ReplError::NoWriter { .. } => true,
            ReplError::Tls { .. } | ReplError::Auth { .. } => false,
            ReplError::Server { code, .. } => {
                // 57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now,
                // 55006 object in use (slot active elsewhere: e.g. our previous walsender),
                // 53300 too many connections, 08* connection exceptions, 40* rollbacks.
                code.starts_with("57P")
                    || code.starts_with("08")
                    || code.starts_with("40")
                    || code == "55006"
                    || code == "53300"
                    || code == "53400"
            }
        }
    }

    /// SQLSTATE if the server sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ReplError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A TCP stream, encrypted or not.
pub enum MaybeTls {
    /// Plaintext.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for MaybeTls {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for MaybeTls {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One backend message: tag and body (a zero-copy slice of the read buffer).
#[derive(Debug)]
struct Frame {
    tag: u8,
    body: Bytes,
}

/// Reads frames from a byte stream; cancel-safe because partial data stays in the buffer.
struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    endpoint: String,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    fn try_frame(&mut self) -> Result<Option<Frame>, ReplError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len < 4 {
            return Err(ReplError::Protocol {
                endpoint: self.endpoint.clone(),
                msg: format!("bad frame length {len}"),
            });
        }
        if self.buf.len() < len + 1 {
            self.buf.reserve(len + 1 - self.buf.len());
            return Ok(None);
        }
        let tag = self.buf[0];
        let mut frame = self.buf.split_to(len + 1);
        frame.advance(5);
        Ok(Some(Frame { tag, body: frame.freeze() }))
    }

    async fn next(&mut self) -> Result<Frame, ReplError> {
        loop {
            if let Some(f) = self.try_frame()? {
                return Ok(f);
            }
            if self.buf.capacity() - self.buf.len() < 8192 {
                self.buf.reserve(256 * 1024);
            }
            let n = self
                .io
                .read_buf(&mut self.buf)
                .await
                .map_err(|source| ReplError::Io { endpoint: self.endpoint.clone(), source })?;
            if n == 0 {
                return Err(ReplError::Io {
                    endpoint: self.endpoint.clone(),
                    source: io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection"),
                });
            }
        }
    }
}

fn parse_error(endpoint: &str, body: &[u8]) -> ReplError {
    let mut severity = String::from("ERROR");
    let mut code = String::new();
    let mut message = String::new();
    let mut detail = None;
    let mut hint = None;
    for field in body.split(|b| *b == 0) {
        if field.is_empty() {
            continue;
        }
        let v = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'V' => severity = v,
            b'C' => code = v,
            b'M' => message = v,
            b'D' => detail = Some(v),
            b'H' => hint = Some(v),
            _ => {}
        }
    }
    if let Some(h) = hint {
        detail = Some(match detail {
            Some(d) => format!("{d}; hint: {h}"),
            None => format!("hint: {h}"),
        });
    }
    ReplError::Server { endpoint: endpoint.to_string(), severity, code, message, detail }
}

/// An authenticated connection in replication mode, ready for commands.
pub struct ReplConnection {
    reader: FrameReader<ReadHalf<MaybeTls>>,
    writer: WriteHalf<MaybeTls>,
    out: BytesMut,
    endpoint: String,
}

impl ReplConnection {
    /// Connect to the first candidate server that answers and is acceptable (the writer,
    /// unless `info.target` is `Any`): negotiate TLS per the mode, authenticate, wait for
    /// ReadyForQuery. With one candidate its own error is returned, so messages stay exact.
    pub async fn connect(info: &ConnInfo) -> Result<ReplConnection, ReplError> {
        let candidates = info.candidates();
        let single = candidates.len() == 1;
        let (mut tried, mut permanent) = (Vec::new(), None);
        for cand in candidates {
            let endpoint = cand.endpoint();
            let attempt = match tokio::time::timeout(cand.connect_timeout, Self::connect_inner(&cand, &endpoint)).await
            {
                Ok(r) => r,
                Err(_) => Err(ReplError::Timeout { endpoint: endpoint.clone(), after: cand.connect_timeout }),
            };
            match attempt {
                Ok(mut conn) => {
                    if info.target == Target::Any {
                        return Ok(conn);
                    }
                    let rows = conn.simple_query("SELECT pg_is_in_recovery()").await?;
                    if rows.first().and_then(|r| r.first()).cloned().flatten().as_deref() == Some("f") {
                        return Ok(conn);
                    }
                    conn.close().await;
                    tried.push(format!("{endpoint} is in recovery (a standby)"));
                }
                Err(e) if single => return Err(e),
                Err(e) => {
                    if !e.is_transient() && permanent.is_none() {
                        permanent = Some(e.to_string());
                    }
                    tried.push(e.to_string());
                }
            }
        }
        // A wrong password or a missing grant is not fixed by waiting: said as such.
        if let Some(msg) = permanent {
            return Err(ReplError::Auth { endpoint: info.endpoint(), msg });
        }
        Err(ReplError::NoWriter { tried: tried.join("; ") })
    }

    /// `host:port/db` of the server this connection reached.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    async fn connect_inner(info: &ConnInfo, endpoint: &str) -> Result<ReplConnection, ReplError> {
        let io_err = |source| ReplError::Io { endpoint: endpoint.to_string(), source };
        let tcp = TcpStream::connect((info.host.as_str(), info.port)).await.map_err(io_err)?;
        tcp.set_nodelay(true).map_err(io_err)?;
        let stream = negotiate_tls(tcp, info, endpoint).await?;
        let (r, w) = tokio::io::split(stream);
        let mut conn = ReplConnection {
            reader: FrameReader { io: r, buf: BytesMut::with_capacity(256 * 1024), endpoint: endpoint.to_string() },
            writer: w,
            out: BytesMut::with_capacity(1024),
            endpoint: endpoint.to_string(),
        };
        let params = [
            ("user", info.user.as_str()),
            ("database", info.dbname.as_str()),
            ("replication", "database"),
            ("application_name", "polysync"),
            ("client_encoding", "UTF8"),
            // Fixed text forms for the values pgoutput sends (see types.rs).
            ("options", super::config::SESSION_OPTIONS),
        ];
        frontend::startup_message(params.iter().copied(), &mut conn.out).map_err(io_err)?;
        conn.flush().await?;
        conn.authenticate(info).await?;
        // Parameter status, backend key data, then ReadyForQuery.
        loop {
            let f = conn.reader.next().await?;
            match f.tag {
                b'Z' => break,
                b'E' => return Err(parse_error(endpoint, &f.body)),
                _ => {}
            }
        }
        Ok(conn)
    }

    async fn flush(&mut self) -> Result<(), ReplError> {
        let endpoint = &self.endpoint;
        self.writer
            .write_all(&self.out)
            .await
            .map_err(|source| ReplError::Io { endpoint: endpoint.clone(), source })?;
        self.writer.flush().await.map_err(|source| ReplError::Io { endpoint: endpoint.clone(), source })?;
        self.out.clear();
        Ok(())
    }

    async fn authenticate(&mut self, info: &ConnInfo) -> Result<(), ReplError> {
        let endpoint = self.endpoint.clone();
        let auth_err = |msg: &str| ReplError::Auth { endpoint: endpoint.clone(), msg: msg.to_string() };
        let io_err = |source| ReplError::Io { endpoint: endpoint.clone(), source };
        let password = || {
            info.password
                .as_ref()
                .map(|p| p.expose().as_bytes().to_vec())
                .ok_or_else(|| auth_err("the server asks for a password and none is configured"))
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let f = self.reader.next().await?;
            match f.tag {
                b'E' => return Err(parse_error(&endpoint, &f.body)),
                b'R' => {
                    let mut body = f.body.clone();
                    if body.len() < 4 {
                        return Err(auth_err("short authentication message"));
                    }
                    let kind = body.get_i32();
                    match kind {
                        0 => return Ok(()),
                        3 => {
                            frontend::password_message(&password()?, &mut self.out).map_err(io_err)?;
                            self.flush().await?;
                        }
                        5 => {
                            if body.len() < 4 {
                                return Err(auth_err("short md5 salt"));
                            }
                            let salt = [body[0], body[1], body[2], body[3]];
                            let hash =
                                postgres_protocol::authentication::md5_hash(info.user.as_bytes(), &password()?, salt);
                            frontend::password_message(hash.as_bytes(), &mut self.out).map_err(io_err)?;
                            self.flush().await?;
                        }
                        10 => {
                            let mechs: Vec<&[u8]> = body.split(|b| *b == 0).filter(|m| !m.is_empty()).collect();
                            if !mechs.contains(&sasl::SCRAM_SHA_256.as_bytes()) {
                                return Err(auth_err("server offers no SCRAM-SHA-256"));
                            }
                            let s = ScramSha256::new(&password()?, ChannelBinding::unsupported());
                            frontend::sasl_initial_response(sasl::SCRAM_SHA_256, s.message(), &mut self.out)
                                .map_err(io_err)?;
                            scram = Some(s);
                            self.flush().await?;
                        }
                        11 => {
                            let s = scram.as_mut().ok_or_else(|| auth_err("SASL continue without start"))?;
                            s.update(&body).map_err(|e| auth_err(&e.to_string()))?;
                            frontend::sasl_response(s.message(), &mut self.out).map_err(io_err)?;
                            self.flush().await?;
                        }
                        12 => {
                            let mut s = scram.take().ok_or_else(|| auth_err("SASL final without start"))?;
                            s.finish(&body).map_err(|e| auth_err(&format!("server signature: {e}")))?;
                        }
                        other => {
                            return Err(auth_err(&format!("unsupported authentication method {other}")));
                        }
                    }
                }
                other => {
                    return Err(ReplError::Protocol {
                        endpoint: endpoint.clone(),
                        msg: format!("unexpected message {:?} during authentication", other as char),
                    });
                }
            }
        }
    }

    /// Run a simple-protocol command and return its rows as text (replication commands such as
    /// `IDENTIFY_SYSTEM` and `CREATE_REPLICATION_SLOT` answer this way).
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, ReplError> {
        frontend::query(sql, &mut self.out)
            .map_err(|source| ReplError::Io { endpoint: self.endpoint.clone(), source })?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let f = self.reader.next().await?;
            match f.tag {
                b'D' => rows.push(parse_data_row(&f.body)),
                b'E' => error = Some(parse_error(&self.endpoint, &f.body)),
                b'Z' => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    /// Say goodbye (Terminate) so the server ends the backend at once.
    pub async fn close(mut self) {
        frontend::terminate(&mut self.out);
        let _ = self.flush().await;
        let _ = self.writer.shutdown().await;
    }

    /// `START_REPLICATION SLOT … LOGICAL start (options)` and switch to streaming.
    pub async fn start_logical(
        mut self,
        slot: &str,
        start_lsn: u64,
        options: &[(&str, &str)],
    ) -> Result<ReplicationStream, ReplError> {
        let opts = options
            .iter()
            .map(|(k, v)| format!("\"{}\" '{}'", k.replace('"', ""), v.replace('\'', "''")))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "START_REPLICATION SLOT \"{}\" LOGICAL {} ({opts})",
            slot.replace('"', ""),
            crate::change::Lsn(start_lsn)
        );
        frontend::query(&sql, &mut self.out)
            .map_err(|source| ReplError::Io { endpoint: self.endpoint.clone(), source })?;
        self.flush().await?;
        loop {
            let f = self.reader.next().await?;
            match f.tag {
                b'W' => break,
                b'E' => return Err(parse_error(&self.endpoint, &f.body)),
                b'N' | b'S' => {}
                other => {
                    return Err(ReplError::Protocol {
                        endpoint: self.endpoint.clone(),
                        msg: format!("unexpected message {:?} after START_REPLICATION", other as char),
                    });
                }
            }
        }
        Ok(ReplicationStream { conn: self })
    }
}

fn parse_data_row(body: &[u8]) -> Vec<Option<String>> {
    let mut b = body;
    if b.len() < 2 {
        return Vec::new();
    }
    let n = b.get_i16().max(0) as usize;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        if b.len() < 4 {
            break;
        }
        let len = b.get_i32();
        if len < 0 {
            out.push(None);
        } else {
            let len = (len as usize).min(b.len());
            out.push(Some(String::from_utf8_lossy(&b[..len]).into_owned()));
            b.advance(len);
        }
    }
    out
}

async fn negotiate_tls(tcp: TcpStream, info: &ConnInfo, endpoint: &str) -> Result<MaybeTls, ReplError> {
    let tls_err = |msg: String| ReplError::Tls { endpoint: endpoint.to_string(), msg };
    let io_err = |source| ReplError::Io { endpoint: endpoint.to_string(), source };
    if info.tls == TlsMode::Disable {
        return Ok(MaybeTls::Plain(tcp));
    }
    let mut tcp = tcp;
    let mut req = BytesMut::new();
    frontend::ssl_request(&mut req);
    tcp.write_all(&req).await.map_err(io_err)?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(io_err)?;
    if answer[0] != b'S' {
        if info.tls.requires_tls() {
            return Err(tls_err(format!(
                "sslmode={} but the server does not accept TLS connections",
                info.tls.as_str()
            )));
        }
        return Ok(MaybeTls::Plain(tcp));
    }
    let config = crate::tls::client_config(info.tls, info.ca_file.as_deref())
        .map_err(|e| tls_err(e.to_string()))?
        .expect("TLS mode is not disable");
    let name = rustls::pki_types::ServerName::try_from(info.host.clone())
        .map_err(|e| tls_err(format!("host {:?} is not a valid TLS server name: {e}", info.host)))?;
    let stream = TlsConnector::from(Arc::new(config)).connect(name, tcp).await.map_err(|e| tls_err(e.to_string()))?;
    Ok(MaybeTls::Tls(Box::new(stream)))
}

/// A message of the logical replication stream.
#[derive(Debug)]
pub enum ReplMessage {
    /// WAL data: one pgoutput message.
    XLogData {
        /// LSN of the start of the data.
        wal_start: u64,
        /// Current end of WAL on the server (for logical walsenders: the record's LSN).
        wal_end: u64,
        /// The pgoutput message.
        data: Bytes,
    },
    /// Primary keepalive: the server's sent position and whether it wants a reply now.
    Keepalive {
        /// Everything before this has been decoded and sent.
        wal_end: u64,
        /// Reply immediately or be disconnected after wal_sender_timeout.
        reply_requested: bool,
    },
}

/// The CopyBoth stream after START_REPLICATION.
pub struct ReplicationStream {
    conn: ReplConnection,
}

impl ReplicationStream {
    /// Next message. Cancel-safe: partially received frames stay buffered.
    pub async fn recv(&mut self) -> Result<ReplMessage, ReplError> {
        loop {
            if let Some(m) = self.try_recv_buffered()? {
                return Ok(m);
            }
            let f = self.conn.reader.next().await?;
            if let Some(m) = self.message(f)? {
                return Ok(m);
            }
        }
    }

    /// The next message if it has already been read from the socket: no waiting, no future.
    /// The server sends changes in bursts, so the consumer takes most messages this way.
    pub fn try_recv_buffered(&mut self) -> Result<Option<ReplMessage>, ReplError> {
        while let Some(f) = self.conn.reader.try_frame()? {
            if let Some(m) = self.message(f)? {
                return Ok(Some(m));
            }
        }
        Ok(None)
    }

    /// A frame as a replication message; `None` for frames that carry none.
    fn message(&self, f: Frame) -> Result<Option<ReplMessage>, ReplError> {
        match f.tag {
            b'd' => {
                let mut b = f.body;
                if b.is_empty() {
                    return Ok(None);
                }
                match b.get_u8() {
                    b'w' if b.len() >= 24 => {
                        let wal_start = b.get_u64();
                        let wal_end = b.get_u64();
                        let _send_time = b.get_i64();
                        Ok(Some(ReplMessage::XLogData { wal_start, wal_end, data: b }))
                    }
                    b'k' if b.len() >= 17 => {
                        let wal_end = b.get_u64();
                        let _t = b.get_i64();
                        let reply_requested = b.get_u8() == 1;
                        Ok(Some(ReplMessage::Keepalive { wal_end, reply_requested }))
                    }
                    other => Err(ReplError::Protocol {
                        endpoint: self.conn.endpoint.clone(),
                        msg: format!("unknown CopyData message {:?}", other as char),
                    }),
                }
            }
            b'E' => Err(parse_error(&self.conn.endpoint, &f.body)),
            b'c' => Err(ReplError::Io {
                endpoint: self.conn.endpoint.clone(),
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "server ended the replication stream"),
            }),
            _ => Ok(None),
        }
    }

    /// Standby status update: received (`write`), durably applied (`flush`, the checkpoint) and
    /// applied positions.
    pub async fn send_status(&mut self, write: u64, flush: u64, reply: bool) -> Result<(), ReplError> {
        let mut msg = BytesMut::with_capacity(34);
        msg.put_u8(b'r');
        msg.put_u64(write);
        msg.put_u64(flush);
        msg.put_u64(flush);
        msg.put_i64(pg_now_micros());
        msg.put_u8(u8::from(reply));
        frontend::CopyData::new(msg.freeze())
            .map_err(|source| ReplError::Io { endpoint: self.conn.endpoint.clone(), source })?
            .write(&mut self.conn.out);
        self.conn.flush().await
    }

    /// End the stream politely (CopyDone + Terminate), so the walsender exits at once and the
    /// slot is free for the next consumer.
    pub async fn close(mut self) {
        frontend::copy_done(&mut self.conn.out);
        frontend::terminate(&mut self.conn.out);
        let _ = self.conn.flush().await;
        let _ = self.conn.writer.shutdown().await;
    }
}

fn pg_now_micros() -> i64 {
    let unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_micros() as i64;
    unix - PG_EPOCH_OFFSET_MICROS
}
