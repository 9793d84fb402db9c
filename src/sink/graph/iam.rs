//! Neptune IAM authentication: the WebSocket handshake (`GET /gremlin`) is signed with SigV4
//! for the `neptune-db` service, with fresh credentials from the default chain per connection.

use std::sync::Arc;
use std::time::SystemTime;

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;

/// The headers to add to the handshake of `ws_url`, signed at `now`.
pub fn sign_handshake(
    ws_url: &str,
    region: &str,
    credentials: &aws_credential_types::Credentials,
    now: SystemTime,
) -> Result<Vec<(String, String)>, String> {
    let url = url::Url::parse(ws_url).map_err(|e| e.to_string())?;
    let host = match url.port() {
        Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_string(),
    };
    // Neptune signs the handshake as the equivalent HTTPS request.
    let https = format!("https://{host}{}", url.path());
    let identity = credentials.clone().into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("neptune-db")
        .time(now)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let request =
        SignableRequest::new("GET", &https, std::iter::once(("host", host.as_str())), SignableBody::Bytes(&[]))
            .map_err(|e| e.to_string())?;
    let (instructions, _) = sign(request, &params).map_err(|e| e.to_string())?.into_parts();
    let mut headers: Vec<(String, String)> =
        instructions.headers().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    headers.push(("host".into(), host));
    Ok(headers)
}

/// A signer for [`super::gremlin::Endpoint::sign`].
pub fn signer(provider: SharedCredentialsProvider, region: String) -> super::gremlin::HandshakeSigner {
    Arc::new(move |url: &str| {
        let (provider, region, url) = (provider.clone(), region.clone(), url.to_string());
        Box::pin(async move {
            let creds = provider.provide_credentials().await.map_err(|e| e.to_string())?;
            sign_handshake(&url, &region, &creds, SystemTime::now())
        })
    })
}
