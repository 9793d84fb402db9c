//! A wire-level fake of the DynamoDB Streams endpoint, for what the moto emulator cannot show:
//! several shards with lineage, and the error paths (expired iterators, trimmed data,
//! throttling). It speaks the real JSON protocol; tests script its shards and faults.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{Value, json};

/// A scripted shard.
#[derive(Debug, Clone)]
pub struct FakeShard {
    pub id: String,
    pub parent: Option<String>,
    /// (sequence number, user id) of each INSERT record.
    pub records: Vec<(String, String)>,
    /// Closed shards end (no NextShardIterator) after their records.
    pub closed: bool,
}

/// Faults to inject, consumed as they fire.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// GetRecords on this shard answers ExpiredIteratorException this many times.
    pub expire: HashMap<String, u32>,
    /// GetRecords on this shard answers LimitExceededException this many times.
    pub throttle: HashMap<String, u32>,
    /// GetShardIterator AFTER_SEQUENCE_NUMBER on this shard answers TrimmedDataAccessException
    /// this many times.
    pub trimmed: HashMap<String, u32>,
}

/// What the fake saw.
#[derive(Debug, Clone)]
pub struct Call {
    pub at: Instant,
    pub op: String,
    pub shard: String,
    pub detail: String,
}

pub struct FakeStreams {
    pub arn: String,
    shards: Vec<FakeShard>,
    faults: Mutex<Faults>,
    pub calls: Mutex<Vec<Call>>,
}

fn error(kind: &str, msg: &str) -> (u16, Value) {
    (400, json!({"__type": format!("com.amazonaws.dynamodb.v20120810#{kind}"), "message": msg}))
}

impl FakeStreams {
    fn handle(&self, target: &str, req: &Value) -> (u16, Value) {
        let op = target.rsplit('.').next().unwrap_or_default().to_string();
        match op.as_str() {
            "DescribeStream" => {
                let shards: Vec<Value> = self
                    .shards
                    .iter()
                    .map(|s| {
                        let mut v = json!({
                            "ShardId": s.id,
                            "SequenceNumberRange": {"StartingSequenceNumber": s.records.first().map(|r| r.0.clone()).unwrap_or_else(|| "1".into())}
                        });
                        if let Some(p) = &s.parent {
                            v["ParentShardId"] = json!(p);
                        }
                        if s.closed {
                            v["SequenceNumberRange"]["EndingSequenceNumber"] = json!(s.records.last().map(|r| r.0.clone()).unwrap_or_else(|| "1".into()));
                        }
                        v
                    })
                    .collect();
                self.log(&op, "", "");
                (
                    200,
                    json!({"StreamDescription": {
                        "StreamArn": self.arn, "StreamLabel": "fake", "StreamStatus": "ENABLED",
                        "StreamViewType": "NEW_AND_OLD_IMAGES", "TableName": "fake", "Shards": shards,
                        "KeySchema": [{"AttributeName": "user_id", "KeyType": "HASH"}]
                    }}),
                )
            }
            "GetShardIterator" => {
                let shard = req["ShardId"].as_str().unwrap_or_default().to_string();
                let kind = req["ShardIteratorType"].as_str().unwrap_or_default().to_string();
                let Some(s) = self.shards.iter().find(|s| s.id == shard) else {
                    return error("ResourceNotFoundException", "no such shard");
                };
                self.log(&op, &shard, &kind);
                if kind == "AFTER_SEQUENCE_NUMBER" && self.consume(|f| &mut f.trimmed, &shard) {
                    return error("TrimmedDataAccessException", "records have been trimmed");
                }
                let pos = match kind.as_str() {
                    "TRIM_HORIZON" => 0,
                    "LATEST" => s.records.len(),
                    "AFTER_SEQUENCE_NUMBER" => {
                        let after = req["SequenceNumber"].as_str().unwrap_or_default();
                        s.records.iter().position(|r| r.0 == after).map(|p| p + 1).unwrap_or(0)
                    }
                    _ => 0,
                };
                (200, json!({"ShardIterator": format!("{shard}|{pos}")}))
            }
            "GetRecords" => {
                let it = req["ShardIterator"].as_str().unwrap_or_default();
                let (shard, pos) = it.rsplit_once('|').unwrap_or((it, "0"));
                let pos: usize = pos.parse().unwrap_or(0);
                self.log(&op, shard, &pos.to_string());
                if self.consume(|f| &mut f.expire, shard) {
                    return error("ExpiredIteratorException", "iterator expired");
                }
                if self.consume(|f| &mut f.throttle, shard) {
                    return error("LimitExceededException", "rate exceeded");
                }
                let s = self.shards.iter().find(|s| s.id == shard).expect("known shard");
                let batch: Vec<Value> = s.records[pos.min(s.records.len())..]
                    .iter()
                    .take(2)
                    .map(|(seq, user)| {
                        let mut r = json!({
                            "eventID": format!("ev-{seq}"), "eventName": "INSERT", "eventVersion": "1.1",
                            "eventSource": "aws:dynamodb", "awsRegion": "us-east-1",
                            "dynamodb": {
                                "ApproximateCreationDateTime": 1_767_323_045.0,
                                "Keys": {"user_id": {"S": user}},
                                "NewImage": {"user_id": {"S": user}, "shard": {"S": shard}},
                                "SequenceNumber": seq, "SizeBytes": 20, "StreamViewType": "NEW_AND_OLD_IMAGES"
                            }
                        });
                        // "user@region" scripts a replicated write of a legacy global table: the
                        // image carries aws:rep:updateregion (the 2017.11.29 version's marker).
                        if let Some((_, region)) = user.split_once('@') {
                            r["dynamodb"]["NewImage"]["aws:rep:updateregion"] = json!({"S": region});
                        }
                        // A user id starting with "!nokey" scripts a record without keys.
                        if user.starts_with("!nokey") {
                            r["dynamodb"].as_object_mut().unwrap().remove("Keys");
                        }
                        r
                    })
                    .collect();
                let next = pos + batch.len();
                let mut out = json!({"Records": batch});
                if !(s.closed && next >= s.records.len()) {
                    out["NextShardIterator"] = json!(format!("{shard}|{next}"));
                }
                (200, out)
            }
            other => error("UnknownOperationException", &format!("fake does not serve {other}")),
        }
    }

    fn consume(&self, pick: impl Fn(&mut Faults) -> &mut HashMap<String, u32>, shard: &str) -> bool {
        let mut f = self.faults.lock().unwrap();
        match pick(&mut f).get_mut(shard) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }

    fn log(&self, op: &str, shard: &str, detail: &str) {
        self.calls.lock().unwrap().push(Call {
            at: Instant::now(),
            op: op.into(),
            shard: shard.into(),
            detail: detail.into(),
        });
    }
}

/// Serve a fake stream; returns its endpoint URL and the fake (for its call log).
pub async fn serve(shards: Vec<FakeShard>, faults: Faults) -> (String, Arc<FakeStreams>) {
    let fake = Arc::new(FakeStreams {
        arn: "arn:aws:dynamodb:us-east-1:123456789012:table/fake/stream/2026-11-24T00:00:00.000".into(),
        shards,
        faults: Mutex::new(faults),
        calls: Mutex::new(Vec::new()),
    });
    let app = {
        let fake = Arc::clone(&fake);
        axum::Router::new().fallback(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let fake = Arc::clone(&fake);
            async move {
                let target = headers.get("x-amz-target").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
                let req: Value = serde_json::from_slice(&body).unwrap_or_default();
                let (status, out) = fake.handle(&target, &req);
                let kind =
                    out["__type"].as_str().map(|t| t.rsplit('#').next().unwrap_or(t).to_string()).unwrap_or_default();
                (
                    axum::http::StatusCode::from_u16(status).unwrap(),
                    [("content-type", "application/x-amz-json-1.0".to_string()), ("x-amzn-errortype", kind)],
                    out.to_string(),
                )
            }
        })
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}"), fake)
}
