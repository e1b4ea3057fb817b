//! `s3` storage: AWS S3 and S3-compatible stores (Garage, MinIO, Ceph, R2) through aws-sdk-s3.
//!
//! Credentials and region come from the AWS SDK's own chain unless set in config. Checksums are
//! only computed when an operation requires them (`WhenRequired`): many S3-compatible stores
//! reject the streaming CRC32 trailers that the SDK sends by default since 1.69.

use std::sync::Mutex;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_runtime::auth::PayloadSigningOverride;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::endpoint::{DefaultResolver, EndpointFuture, Params, ResolveEndpoint};
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{
    Region, RequestChecksumCalculation, ResponseChecksumValidation, timeout::TimeoutConfig,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_smithy_http_client::tls;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeTransmitInterceptorContextMut;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use aws_smithy_types::endpoint::Endpoint;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use secrecy::ExposeSecret;

use super::{META_SHA256, ObjectInfo, ObjectStore, PutObject, StorageError};
use crate::config::StorageSettings;

pub struct S3Store {
    client: Client,
    bucket: String,
}

impl S3Store {
    pub async fn new(settings: &StorageSettings) -> anyhow::Result<Self> {
        crate::install_crypto_provider();
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http);
        if !settings.region.is_empty() {
            loader = loader.region(Region::new(settings.region.clone()));
        }
        if !settings.endpoint_url.is_empty() {
            loader = loader.endpoint_url(&settings.endpoint_url);
        }
        if !settings.access_key_id.is_empty() {
            loader = loader.credentials_provider(aws_credential_types::Credentials::new(
                settings.access_key_id.clone(),
                settings.secret_access_key.expose_secret().to_string(),
                None,
                None,
                "imagegen-config",
            ));
        }
        let shared = loader.load().await;
        let mut config =
            aws_sdk_s3::config::Builder::from(&shared)
                .force_path_style(settings.force_path_style)
                // The pipeline retries with its own policy (and classifies failures itself), and
                // bounds each request with its own timeouts: no second layer of either.
                .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
                .stalled_stream_protection(
                    aws_sdk_s3::config::StalledStreamProtectionConfig::disabled(),
                )
                .interceptor(PrecomputedSha256)
                .endpoint_resolver(CachedEndpoint::new())
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
                .timeout_config(
                    TimeoutConfig::builder()
                        .connect_timeout(Duration::from_secs(10))
                        .operation_attempt_timeout(Duration::from_secs(
                            settings.request_timeout_secs,
                        ))
                        .build(),
                );
        if shared.region().is_none() {
            config = config.region(Region::new("us-east-1"));
        }
        Ok(Self {
            client: Client::from_conf(config.build()),
            bucket: settings.bucket.clone(),
        })
    }
}

fn error<E, R>(op: &'static str, key: &str, e: SdkError<E, R>) -> StorageError
where
    E: std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    StorageError {
        op,
        key: key.into(),
        message: DisplayErrorContext(e).to_string(),
    }
}

fn is_not_found<E: ProvideErrorMetadata>(e: &SdkError<E, HttpResponse>) -> bool {
    e.raw_response().is_some_and(|r| r.status().as_u16() == 404)
        || matches!(e.code(), Some("NoSuchKey" | "NotFound"))
}

/// The metadata header that carries an upload's SHA-256 when the caller computed it.
const SHA256_HEADER: &str = "x-amz-meta-sha256";

/// Signs an upload with a SHA-256 the caller already computed (for the event and the object's
/// `sha256` metadata), instead of letting SigV4 hash the payload a second time. The header
/// `x-amz-content-sha256` then carries it, and the server verifies the body against it. One
/// interceptor for the client, not one per request: a per-request override makes the SDK
/// rebuild its configuration for that request.
#[derive(Debug)]
struct PrecomputedSha256;

impl Intercept for PrecomputedSha256 {
    fn name(&self) -> &'static str {
        "PrecomputedSha256"
    }

    fn modify_before_signing(
        &self,
        context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let hex = context
            .request()
            .headers()
            .get(SHA256_HEADER)
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        if let Some(hex) = hex {
            let hex = hex.to_ascii_lowercase();
            cfg.interceptor_state()
                .store_put(PayloadSigningOverride::Precomputed(hex));
        }
        Ok(())
    }
}

/// S3's endpoint rules (a few hundred conditions, regular expressions among them) resolved once
/// per set of parameters instead of once per request. Requests of this client differ only in
/// their object key, prefix and copy source, which the rules take but never read.
#[derive(Debug)]
struct CachedEndpoint {
    rules: DefaultResolver,
    last: Mutex<Option<(Params, Endpoint)>>,
}

impl CachedEndpoint {
    fn new() -> Self {
        Self {
            // Not `DefaultResolver::default()`: that one has no partitions and resolves nothing.
            rules: DefaultResolver::new(),
            last: Mutex::new(None),
        }
    }
}

/// Whether two requests resolve to the same endpoint: every parameter but the key, the prefix and
/// the copy source is the same.
fn same_endpoint(a: &Params, b: &Params) -> bool {
    a.bucket() == b.bucket()
        && a.region() == b.region()
        && a.endpoint() == b.endpoint()
        && [
            (a.use_fips(), b.use_fips()),
            (a.use_dual_stack(), b.use_dual_stack()),
            (a.force_path_style(), b.force_path_style()),
            (a.accelerate(), b.accelerate()),
            (a.use_global_endpoint(), b.use_global_endpoint()),
            (
                a.use_object_lambda_endpoint(),
                b.use_object_lambda_endpoint(),
            ),
            (a.disable_access_points(), b.disable_access_points()),
            (
                a.disable_multi_region_access_points(),
                b.disable_multi_region_access_points(),
            ),
            (a.use_arn_region(), b.use_arn_region()),
            (
                a.use_s3_express_control_endpoint(),
                b.use_s3_express_control_endpoint(),
            ),
            (
                a.disable_s3_express_session_auth(),
                b.disable_s3_express_session_auth(),
            ),
        ]
        .iter()
        .all(|(x, y)| x == y)
}

impl ResolveEndpoint for CachedEndpoint {
    fn resolve_endpoint<'a>(&'a self, params: &'a Params) -> EndpointFuture<'a> {
        let cached = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((p, endpoint)) = cached.as_ref()
            && same_endpoint(p, params)
        {
            return EndpointFuture::ready(Ok(endpoint.clone()));
        }
        drop(cached);
        EndpointFuture::new(async move {
            let endpoint = self.rules.resolve_endpoint(params).await?;
            *self.last.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((params.clone(), endpoint.clone()));
            Ok(endpoint)
        })
    }
}

impl S3Store {
    fn put_request(
        &self,
        object: PutObject<'_>,
    ) -> aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder {
        let mut request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(object.key)
            .content_type(object.content_type)
            .content_length(object.data.len() as i64)
            .body(ByteStream::from(object.data));
        for (k, v) in object.metadata {
            request = request.metadata(*k, v);
        }
        // Carried as metadata, and read back by `PrecomputedSha256` to sign the upload.
        if let Some(sha256) = object.sha256 {
            request = request.metadata(META_SHA256, sha256);
        }
        request
    }
}

impl ObjectStore for S3Store {
    fn put<'a>(&'a self, object: PutObject<'a>) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            let key = object.key;
            self.put_request(object)
                .send()
                .await
                .map_err(|e| error("put", key, e))?;
            Ok(())
        })
    }

    fn put_if_absent<'a>(
        &'a self,
        object: PutObject<'a>,
    ) -> BoxFuture<'a, Result<bool, StorageError>> {
        Box::pin(async move {
            let key = object.key;
            match self.put_request(object).if_none_match("*").send().await {
                Ok(_) => Ok(true),
                // 412 Precondition Failed: it exists. 409: a concurrent conditional write won.
                Err(e)
                    if e.raw_response()
                        .is_some_and(|r| matches!(r.status().as_u16(), 412 | 409)) =>
                {
                    Ok(false)
                }
                Err(e) => Err(error("put", key, e)),
            }
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| error("delete", key, e))?;
            Ok(())
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, StorageError>> {
        Box::pin(async move {
            match self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
            {
                Ok(out) => {
                    let data = out.body.collect().await.map_err(|e| StorageError {
                        op: "get",
                        key: key.into(),
                        message: e.to_string(),
                    })?;
                    Ok(Some(data.into_bytes()))
                }
                Err(e) if is_not_found(&e) => Ok(None),
                Err(e) => Err(error("get", key, e)),
            }
        })
    }

    fn head<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<ObjectInfo>, StorageError>> {
        Box::pin(async move {
            match self
                .client
                .head_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
            {
                Ok(out) => Ok(Some(ObjectInfo {
                    size: out.content_length().unwrap_or(0).max(0) as u64,
                    content_type: out.content_type().map(str::to_string),
                    sha256: out.metadata().and_then(|m| m.get(META_SHA256)).cloned(),
                })),
                Err(e) if is_not_found(&e) => Ok(None),
                Err(e) => Err(error("head", key, e)),
            }
        })
    }

    fn list<'a>(
        &'a self,
        prefix: &'a str,
        start_after: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<String>, StorageError>> {
        Box::pin(async move {
            let out = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_start_after(start_after.map(str::to_string))
                .max_keys(super::LIST_PAGE as i32)
                .send()
                .await
                .map_err(|e| error("list", prefix, e))?;
            Ok(out
                .contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_string))
                .collect())
        })
    }

    fn presigned_get<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<String>, StorageError>> {
        Box::pin(async move {
            let config =
                aws_sdk_s3::presigning::PresigningConfig::expires_in(ttl).map_err(|e| {
                    StorageError {
                        op: "presign",
                        key: key.into(),
                        message: e.to_string(),
                    }
                })?;
            let request = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .presigned(config)
                .await
                .map_err(|e| error("presign", key, e))?;
            Ok(Some(request.uri().to_string()))
        })
    }

    fn check(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move {
            self.client
                .head_bucket()
                .bucket(&self.bucket)
                .send()
                .await
                .map_err(|e| error("check", &self.bucket, e))?;
            Ok(())
        })
    }

    fn location(&self) -> &str {
        &self.bucket
    }

    fn uri(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(bucket: &str, key: &str, region: &str) -> Params {
        Params::builder()
            .bucket(bucket)
            .region(region)
            .key(key)
            .prefix(key)
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn endpoints_are_resolved_once_per_bucket_not_once_per_key() {
        let a = params("b", "1.png", "eu-west-1");
        assert!(same_endpoint(&a, &params("b", "2.png", "eu-west-1")));
        assert!(!same_endpoint(&a, &params("c", "1.png", "eu-west-1")));
        assert!(!same_endpoint(&a, &params("b", "1.png", "us-west-2")));
        let cached = CachedEndpoint::new();
        let rules = DefaultResolver::new();
        let mut urls = Vec::new();
        // Another bucket or region is resolved by the rules again, never served stale.
        for p in [
            a.clone(),
            params("b", "2.png", "eu-west-1"),
            params("c", "1.png", "eu-west-1"),
            params("c", "1.png", "us-west-2"),
            a,
        ] {
            let got = cached.resolve_endpoint(&p).await.unwrap();
            let want = rules.resolve_endpoint(&p).await.unwrap();
            assert_eq!(got.url(), want.url());
            assert_eq!(got.properties(), want.properties());
            urls.push(got.url().to_string());
        }
        assert_eq!(urls[0], urls[1]);
        assert_ne!(urls[1], urls[2]);
        assert_ne!(urls[2], urls[3]);
        assert!(urls[0].contains("eu-west-1"), "{urls:?}");
    }
}
