//! Shared AWS settings (`[aws]` in the config): region, an endpoint override for local
//! emulators or VPC endpoints, and the SDK config built from the default credential chain
//! (environment, profile, web identity, ECS task role, instance metadata).

use aws_config::{BehaviorVersion, Region};
use serde::Deserialize;

/// `[aws]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AwsSettings {
    /// Region (default: `AWS_REGION` / profile).
    #[serde(default)]
    pub region: Option<String>,
    /// Endpoint for every AWS service client (a local emulator, a VPC endpoint).
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Named profile from `~/.aws/config`.
    #[serde(default)]
    pub profile: Option<String>,
}

/// Every IAM action polysync's code calls, by the module that calls it. The least-privilege
/// policy in `deploy/iam/policy.json` is tested against this list.
pub const IAM_ACTIONS: &[(&str, &str)] = &[
    ("source::dynamodb", "dynamodb:DescribeTable"),
    ("source::dynamodb", "dynamodb:DescribeStream"),
    ("source::dynamodb", "dynamodb:GetShardIterator"),
    ("source::dynamodb", "dynamodb:GetRecords"),
    ("checkpoint::lease", "dynamodb:CreateTable"),
    ("checkpoint::lease", "dynamodb:Scan"),
    ("checkpoint::lease", "dynamodb:PutItem"),
    ("checkpoint::lease", "dynamodb:UpdateItem"),
    ("checkpoint::lease", "dynamodb:DeleteItem"),
    ("sink::search", "es:DescribeDomain"),
    ("sink::search", "es:ESHttpGet"),
    ("sink::search", "es:ESHttpHead"),
    ("sink::search", "es:ESHttpPost"),
    ("sink::search", "es:ESHttpPut"),
    ("sink::search", "aoss:APIAccessAll"),
    ("sink::graph", "neptune-db:ReadDataViaQuery"),
    ("sink::graph", "neptune-db:WriteDataViaQuery"),
    ("sink::graph", "neptune-db:DeleteDataViaQuery"),
    ("sink::timeseries", "timestream:DescribeEndpoints"),
    ("sink::timeseries", "timestream:DescribeDatabase"),
    ("sink::timeseries", "timestream:DescribeTable"),
    ("sink::timeseries", "timestream:CreateDatabase"),
    ("sink::timeseries", "timestream:CreateTable"),
    ("sink::timeseries", "timestream:WriteRecords"),
    ("dlq::s3", "s3:PutObject"),
    ("dlq::s3", "s3:GetObject"),
    ("dlq::s3", "s3:ListBucket"),
];

/// Load the SDK config once for a component.
pub async fn sdk_config(settings: &AwsSettings) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(r) = &settings.region {
        loader = loader.region(Region::new(r.clone()));
    }
    if let Some(e) = &settings.endpoint_url {
        loader = loader.endpoint_url(e);
    }
    if let Some(p) = &settings.profile {
        loader = loader.profile_name(p);
    }
    loader.load().await
}
