//! A wire-level SigV4 verifier standing in for AWS endpoints no local peer can imitate
//! (OpenSearch Service, Neptune): it recomputes each request's signature from scratch, with
//! its own HMAC code, and records what it saw.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

pub const KEY_ID: &str = "AKIDEXAMPLE";
pub const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
    m.update(data.as_bytes());
    m.finalize().into_bytes().to_vec()
}

/// What the verifier saw for one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub service: String,
    pub region: String,
    pub signed_headers: String,
    pub valid: bool,
    pub content_sha256_header: bool,
}

pub fn verify(method: &str, target: &str, headers: &[(String, String)], body: &[u8]) -> Option<Seen> {
    let h = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
    let auth = h("authorization")?;
    let rest = auth.strip_prefix("AWS4-HMAC-SHA256 ")?;
    let mut cred = "";
    let mut signed = "";
    let mut sig = "";
    for part in rest.split(',').map(str::trim) {
        if let Some(v) = part.strip_prefix("Credential=") {
            cred = v;
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            signed = v;
        } else if let Some(v) = part.strip_prefix("Signature=") {
            sig = v;
        }
    }
    let scope: Vec<&str> = cred.split('/').collect();
    let (key_id, date, region, service) = (scope[0], scope[1], scope[2], scope[3]);
    let amz_date = h("x-amz-date")?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut q: Vec<&str> = query.split('&').filter(|s| !s.is_empty()).collect();
    q.sort();
    let canonical_headers: String =
        signed.split(';').map(|name| format!("{name}:{}\n", h(name).unwrap_or("").trim())).collect();
    let payload = match h("x-amz-content-sha256") {
        Some(v) => v.to_string(),
        None => hex::encode(Sha256::digest(body)),
    };
    let canonical = format!("{method}\n{path}\n{}\n{canonical_headers}\n{signed}\n{payload}", q.join("&"));
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{date}/{region}/{service}/aws4_request\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    );
    let k = hmac(format!("AWS4{SECRET}").as_bytes(), date);
    let k = hmac(&k, region);
    let k = hmac(&k, service);
    let k = hmac(&k, "aws4_request");
    let expected = hex::encode(hmac(&k, &to_sign));
    let body_ok =
        h("x-amz-content-sha256").is_none_or(|v| v == hex::encode(Sha256::digest(body)) || v == "UNSIGNED-PAYLOAD");
    Some(Seen {
        path: path.to_string(),
        service: service.to_string(),
        region: region.to_string(),
        signed_headers: signed.to_string(),
        valid: key_id == KEY_ID && expected == sig && body_ok,
        content_sha256_header: h("x-amz-content-sha256").is_some(),
    })
}

/// Serve until the listener is dropped; every request's verification goes to `seen`.
pub async fn serve(listener: tokio::net::TcpListener, seen: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else { return };
        let seen = std::sync::Arc::clone(&seen);
        tokio::spawn(async move {
            let mut r = BufReader::new(sock);
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                let mut parts = line.split_whitespace();
                let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
                let mut headers = Vec::new();
                loop {
                    let mut l = String::new();
                    r.read_line(&mut l).await.unwrap();
                    let l = l.trim_end();
                    if l.is_empty() {
                        break;
                    }
                    let (k, v) = l.split_once(':').unwrap();
                    headers.push((k.trim().to_lowercase(), v.trim().to_string()));
                }
                let len: usize =
                    headers.iter().find(|(k, _)| k == "content-length").map(|(_, v)| v.parse().unwrap()).unwrap_or(0);
                let mut body = vec![0; len];
                r.read_exact(&mut body).await.unwrap();
                let v = verify(&method, &target, &headers, &body);
                let ok = v.as_ref().is_some_and(|s| s.valid);
                if let Some(s) = v {
                    seen.lock().unwrap().push(s);
                }
                let reply = if !ok {
                    r#"{"error":"signature does not match"}"#.to_string()
                } else if target.starts_with("/_bulk") {
                    let n = String::from_utf8_lossy(&body).lines().filter(|l| l.contains("\"_index\"")).count();
                    let items: Vec<String> = (0..n).map(|_| r#"{"index":{"status":201}}"#.to_string()).collect();
                    format!(r#"{{"took":1,"errors":false,"items":[{}]}}"#, items.join(","))
                } else {
                    "{}".to_string()
                };
                let status = if ok { "200 OK" } else { "403 Forbidden" };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{reply}",
                    reply.len()
                );
                if r.get_mut().write_all(resp.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}
