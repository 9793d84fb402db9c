"""Smoke check of the local moto server: the services polysync uses answer for real.

Creates and deletes a DynamoDB table with a stream, lists/describes the stream through
DynamoDB Streams, and creates/deletes a Timestream database and table. Exits non-zero on failure.
"""
import os
import sys
import uuid

import boto3

endpoint = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("POLYSYNC_TEST_AWS_ENDPOINT", "http://127.0.0.1:55000")
kw = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")
name = "polysync-check-" + uuid.uuid4().hex[:8]

ddb = boto3.client("dynamodb", **kw)
streams = boto3.client("dynamodbstreams", **kw)
ts = boto3.client("timestream-write", **kw)

desc = ddb.create_table(
    TableName=name,
    KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
    AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
    BillingMode="PAY_PER_REQUEST",
    StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
)["TableDescription"]
try:
    arn = desc["LatestStreamArn"]
    ddb.put_item(TableName=name, Item={"pk": {"S": "a"}, "v": {"N": "1"}})
    listed = [s["StreamArn"] for s in streams.list_streams(TableName=name)["Streams"]]
    assert arn in listed, f"stream {arn} not listed: {listed}"
    shards = streams.describe_stream(StreamArn=arn)["StreamDescription"]["Shards"]
    assert shards, "stream has no shard"
    it = streams.get_shard_iterator(StreamArn=arn, ShardId=shards[0]["ShardId"], ShardIteratorType="TRIM_HORIZON")
    records = streams.get_records(ShardIterator=it["ShardIterator"])["Records"]
    assert records and records[0]["eventName"] == "INSERT", f"unexpected stream records: {records}"
finally:
    ddb.delete_table(TableName=name)

db = name.replace("-", "_")
ts.create_database(DatabaseName=db)
try:
    ts.create_table(DatabaseName=db, TableName="t")
    ts.write_records(
        DatabaseName=db,
        TableName="t",
        Records=[{"Dimensions": [{"Name": "host", "Value": "h1"}], "MeasureName": "cpu", "MeasureValue": "1.5",
                  "MeasureValueType": "DOUBLE", "Time": "1700000000000", "TimeUnit": "MILLISECONDS"}],
    )
    ts.delete_table(DatabaseName=db, TableName="t")
finally:
    ts.delete_database(DatabaseName=db)
print("moto check ok: dynamodb, dynamodbstreams, timestream-write")
