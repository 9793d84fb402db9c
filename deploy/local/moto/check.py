"""Check of the local moto server: the AWS APIs polysync uses answer for real.

    check.py [-v] [ENDPOINT]      (default $POLYSYNC_TEST_AWS_ENDPOINT or http://127.0.0.1:55000)

DynamoDB: a table with a NEW_AND_OLD_IMAGES stream; put, put, update, delete.
DynamoDB Streams: list_streams, describe_stream, get_shard_iterator (TRIM_HORIZON and
AFTER_SEQUENCE_NUMBER), get_records gives INSERT, INSERT, MODIFY, REMOVE with the right images,
numeric increasing SequenceNumbers and an ApproximateCreationDateTime.
Timestream Write: describe_endpoints, create_database/table, write_records (multi-measure, Version).
Everything created is deleted again. Exits non-zero when a check fails.

With -v it also prints what moto does where it differs from AWS (summarised at the top of moto.sh):
one raw GetRecords response body, the sequence number shape, the shard layout, how Timestream
record versions are handled and whether timestream-query can read the data back.
"""
import json
import os
import sys
import time
import uuid

import boto3

args = [a for a in sys.argv[1:] if a != "-v"]
verbose = "-v" in sys.argv[1:]
endpoint = args[0] if args else os.environ.get("POLYSYNC_TEST_AWS_ENDPOINT", "http://127.0.0.1:55000")
kw = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")
name = "polysync-check-" + uuid.uuid4().hex[:8]


def say(*a):
    if verbose:
        print(*a, flush=True)


def check(cond, msg):
    if not cond:
        raise SystemExit(f"moto check FAILED: {msg}")


ddb = boto3.client("dynamodb", **kw)
streams = boto3.client("dynamodbstreams", **kw)
tsw = boto3.client("timestream-write", **kw)
tsq = boto3.client("timestream-query", **kw)

# The wire bodies (what the Rust SDK parses), not boto3's parsed dicts.
raw = {}
streams.meta.events.register(
    "after-call.dynamodbstreams.GetRecords", lambda http_response, **_: raw.__setitem__("body", http_response.content)
)

# ---- DynamoDB + DynamoDB Streams
desc = ddb.create_table(
    TableName=name,
    KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
    AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}, {"AttributeName": "sk", "AttributeType": "N"}],
    BillingMode="PAY_PER_REQUEST",
    StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
)["TableDescription"]
try:
    arn = desc["LatestStreamArn"]
    key1 = {"pk": {"S": "a"}, "sk": {"N": "1"}}
    ddb.put_item(TableName=name, Item={**key1, "v": {"N": "1"}, "b": {"B": b"\x00\x01"}, "s": {"S": "ü x"}})
    ddb.put_item(TableName=name, Item={"pk": {"S": "b"}, "sk": {"N": "2"}, "v": {"N": "2"}})
    ddb.update_item(TableName=name, Key=key1, UpdateExpression="SET v = :v", ExpressionAttributeValues={":v": {"N": "10"}})
    ddb.delete_item(TableName=name, Key={"pk": {"S": "b"}, "sk": {"N": "2"}})

    listed = [s["StreamArn"] for s in streams.list_streams(TableName=name)["Streams"]]
    check(arn in listed, f"stream {arn} not listed: {listed}")
    sd = streams.describe_stream(StreamArn=arn)["StreamDescription"]
    check(sd["StreamStatus"] == "ENABLED" and sd["StreamViewType"] == "NEW_AND_OLD_IMAGES", f"stream: {sd}")
    shards = sd["Shards"]
    check(len(shards) >= 1, "stream has no shard")
    say(f"describe_stream: StreamLabel={sd['StreamLabel']} shards={len(shards)}: {json.dumps(shards)}")

    shard = shards[0]["ShardId"]
    it = streams.get_shard_iterator(StreamArn=arn, ShardId=shard, ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
    got = streams.get_records(ShardIterator=it)
    recs = got["Records"]
    say("GetRecords raw response body (TRIM_HORIZON):")
    say(json.dumps(json.loads(raw["body"]), indent=2, ensure_ascii=False))
    events = [r["eventName"] for r in recs]
    check(events == ["INSERT", "INSERT", "MODIFY", "REMOVE"], f"events {events}")
    ins, _, mod, rem = (r["dynamodb"] for r in recs)
    check("NewImage" in ins and "OldImage" not in ins, "INSERT images")
    check(mod["OldImage"]["v"] == {"N": "1"} and mod["NewImage"]["v"] == {"N": "10"}, f"MODIFY images {mod}")
    check("OldImage" in rem and "NewImage" not in rem, "REMOVE images")
    check(ins["NewImage"]["b"] == {"B": b"\x00\x01"} and ins["NewImage"]["s"] == {"S": "ü x"}, "attribute values")
    seqs = [r["dynamodb"]["SequenceNumber"] for r in recs]
    check(all(s.isdigit() for s in seqs), f"sequence numbers {seqs}")
    check([int(s) for s in seqs] == sorted({int(s) for s in seqs}), f"sequence numbers not increasing: {seqs}")
    check(all("ApproximateCreationDateTime" in r["dynamodb"] for r in recs), "ApproximateCreationDateTime")
    raw_times = [r["dynamodb"]["ApproximateCreationDateTime"] for r in json.loads(raw["body"])["Records"]]
    say(f"SequenceNumbers: {seqs} (lengths {sorted({len(s) for s in seqs})}; "
        f"shard StartingSequenceNumber {shards[0]['SequenceNumberRange'].get('StartingSequenceNumber')})")
    say(f"ApproximateCreationDateTime on the wire: {raw_times}")

    nxt = got.get("NextShardIterator")
    check(nxt, "no NextShardIterator on an open shard")
    check(streams.get_records(ShardIterator=nxt)["Records"] == [], "records past the end")
    it2 = streams.get_shard_iterator(
        StreamArn=arn, ShardId=shard, ShardIteratorType="AFTER_SEQUENCE_NUMBER", SequenceNumber=seqs[1]
    )["ShardIterator"]
    after = [r["eventName"] for r in streams.get_records(ShardIterator=it2)["Records"]]
    check(after == ["MODIFY", "REMOVE"], f"AFTER_SEQUENCE_NUMBER {seqs[1]}: {after}")
finally:
    ddb.delete_table(TableName=name)

# ---- Timestream Write
ep = tsw.describe_endpoints()["Endpoints"]
check(ep and ep[0].get("Address"), f"describe_endpoints: {ep}")
say(f"timestream-write describe_endpoints: {json.dumps(ep)}")
db = name.replace("-", "_")
tsw.create_database(DatabaseName=db)
try:
    tsw.create_table(DatabaseName=db, TableName="t")
    now = str(int(time.time() * 1000))

    def record(version, a):
        return {
            "Dimensions": [{"Name": "host", "Value": "h1"}],
            "MeasureName": "row",
            "MeasureValueType": "MULTI",
            "MeasureValues": [{"Name": "a", "Value": a, "Type": "DOUBLE"}, {"Name": "s", "Value": "x y", "Type": "VARCHAR"}],
            "Time": now,
            "TimeUnit": "MILLISECONDS",
            "Version": version,
        }

    out = tsw.write_records(DatabaseName=db, TableName="t", Records=[record(5, "1.5")])
    check(out["RecordsIngested"]["Total"] == 1, f"write_records: {out}")
    try:
        out = tsw.write_records(DatabaseName=db, TableName="t", Records=[record(2, "9.5")])
        say(f"timestream: lower Version (2 after 5) ACCEPTED: {out['RecordsIngested']} (AWS: RejectedRecordsException)")
    except tsw.exceptions.RejectedRecordsException as e:
        say(f"timestream: lower Version REJECTED: {e.response.get('RejectedRecords')}")
    rows = tsq.query(QueryString=f'SELECT * FROM "{db}"."t"')
    say(f"timestream-query SELECT: Rows={rows['Rows']} ColumnInfo={rows['ColumnInfo']}")
    tsw.delete_table(DatabaseName=db, TableName="t")
finally:
    tsw.delete_database(DatabaseName=db)
print("moto check ok: dynamodb, dynamodbstreams (INSERT/MODIFY/REMOVE, iterators), timestream-write")
