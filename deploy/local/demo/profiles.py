"""The demo's DynamoDB side (moto): a `profiles` table with a stream, and a few edits.

Usage: profiles.py ENDPOINT reset|edit
"""
import sys
import time

import boto3

endpoint, command = sys.argv[1], sys.argv[2]
ddb = boto3.client("dynamodb", endpoint_url=endpoint, region_name="us-east-1",
                   aws_access_key_id="test", aws_secret_access_key="test")

if command == "reset":
    try:
        ddb.delete_table(TableName="profiles")
    except ddb.exceptions.ResourceNotFoundException:
        pass
    ddb.create_table(
        TableName="profiles",
        AttributeDefinitions=[{"AttributeName": "user_id", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "user_id", "KeyType": "HASH"}],
        BillingMode="PAY_PER_REQUEST",
        StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"},
    )
    while ddb.describe_table(TableName="profiles")["Table"]["TableStatus"] != "ACTIVE":
        time.sleep(0.2)
    ddb.put_item(TableName="profiles", Item={"user_id": {"S": "103"}, "name": {"S": "Edsger"}})
elif command == "edit":
    ddb.put_item(TableName="profiles", Item={
        "user_id": {"S": "101"}, "name": {"S": "Ada"}, "tier": {"S": "gold"},
        "lifetime_value": {"N": "12345678901234567890.123456789"},
        "tags": {"SS": ["early-adopter", "newsletter"]},
        "address": {"M": {"city": {"S": "Lisbon"}, "zip": {"S": "1100-148"}}},
    })
    ddb.update_item(TableName="profiles", Key={"user_id": {"S": "102"}},
                    UpdateExpression="SET #n = :n", ExpressionAttributeNames={"#n": "name"},
                    ExpressionAttributeValues={":n": {"S": "Grace"}})
    ddb.delete_item(TableName="profiles", Key={"user_id": {"S": "103"}})
else:
    sys.exit(f"unknown command {command}")
