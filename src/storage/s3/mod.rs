//! `s3` storage: AWS S3 and S3-compatible stores (Garage, MinIO, Ceph, R2).
//!
//! The AWS SDK sets the store up: its provider chain finds the credentials (environment,
//! profile, web identity on Kubernetes, container and instance metadata) unless they are in the
//! config, its region chain finds the region, and S3's endpoint rules turn bucket, region,
//! `endpoint_url` and `force_path_style` into the bucket's URL, once, at start-up. Presigned
//! URLs come from the SDK too.
//!
//! The requests themselves (PUT, GET, HEAD, DELETE, ListObjectsV2) are plain HTTP requests signed
//! with SigV4 by `aws-sigv4`, the SDK's own signer. A job makes three of them (the listing of its
//! directory, the image, the result record), and the SDK's per-request machinery (interceptors,
//! configuration layers, endpoint rules, response conversion) cost the worker more CPU than
//! everything else it does for a job but hashing the image: see BENCHMARKS.md.
//!
//! No retries and no redirects here: the pipeline retries with its own policy, and a signed
//! request is not replayed to another host. Checksums: uploads are signed with the payload's
//! SHA-256 (`x-amz-content-sha256`), which the server checks; no CRC trailers, which several
//! S3-compatible stores reject.

mod credentials;
mod endpoint;
mod request;
mod xml;

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_credential_types::Credentials;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_smithy_http_client::tls;
use aws_types::service_config::ServiceConfigKey;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::{Method, StatusCode};
use secrecy::ExposeSecret;

use self::credentials::CredentialsCache;
use self::endpoint::BucketEndpoint;
use self::request::{Request, failure, unavailable};
use self::xml::listing_page;
use super::{
    ListPage, META_FINGERPRINT, META_SHA256, ObjectInfo, ObjectStore, PutObject, StorageError,
    StorageErrorKind,
};
use crate::config::StorageSettings;
use crate::domain::error::with_causes;

/// Object keys in URL paths: everything but S3's unreserved characters and `/` is escaped.
const KEY: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');
/// Query values: as keys, and `/` too.
const QUERY: &AsciiSet = &KEY.add(b'/');

pub struct S3Store {
    bucket: String,
    /// The bucket's URL from S3's endpoint rules, without a trailing `/`:
    /// `https://bucket.s3.eu-west-1.amazonaws.com`, `http://127.0.0.1:3900/bucket`.
    base: String,
    /// `base` with a path: the URL of bucket-level requests (listing, HEAD).
    bucket_url: String,
    signing_region: String,
    http: reqwest::Client,
    credentials: CredentialsCache,
    /// For presigned URLs.
    sdk: Client,
}

impl S3Store {
    pub async fn new(settings: &StorageSettings) -> anyhow::Result<Self> {
        crate::install_crypto_provider();
        // For the credential providers that ask a service (STS for web identity, instance and
        // container metadata) and for nothing else.
        let sdk_http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(sdk_http);
        if !settings.region.is_empty() {
            loader = loader.region(Region::new(settings.region.clone()));
        }
        if !settings.endpoint_url.is_empty() {
            loader = loader.endpoint_url(&settings.endpoint_url);
        }
        if !settings.access_key_id.is_empty() {
            loader = loader.credentials_provider(Credentials::new(
                settings.access_key_id.clone(),
                settings.secret_access_key.expose_secret().to_string(),
                None,
                None,
                "imagegen-config",
            ));
        }
        let shared = loader.load().await;
        let region = shared
            .region()
            .map_or_else(|| "us-east-1".to_string(), |r| r.to_string());
        let credentials = shared.credentials_provider().ok_or_else(|| {
            anyhow::anyhow!(
                "no AWS credentials provider: set storage.access_key_id and \
                 storage.secret_access_key, or the AWS SDK's usual sources"
            )
        })?;
        // As the SDK's S3 client finds it: the config, else AWS_ENDPOINT_URL_S3 (or the profile's
        // S3 `endpoint_url`), else AWS_ENDPOINT_URL.
        let endpoint_url = if !settings.endpoint_url.is_empty() {
            settings.endpoint_url.clone()
        } else {
            shared
                .service_config()
                .and_then(|c| {
                    let key = ServiceConfigKey::builder()
                        .service_id("S3")
                        .env("AWS_ENDPOINT_URL")
                        .profile("endpoint_url")
                        .build()
                        .ok()?;
                    c.load_config(key)
                })
                .or_else(|| shared.endpoint_url().map(str::to_string))
                .unwrap_or_default()
        };
        let endpoint = BucketEndpoint::resolve(
            &settings.bucket,
            &region,
            &endpoint_url,
            settings.force_path_style,
        )
        .await?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("imagegen/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(settings.request_timeout_secs))
            .pool_idle_timeout(Duration::from_secs(60))
            .redirect(reqwest::redirect::Policy::none())
            // As the SDK's client: the store is reached directly, whatever HTTP(S)_PROXY says
            // for the image provider.
            .no_proxy()
            .build()?;
        let sdk = Client::from_conf(
            aws_sdk_s3::config::Builder::from(&shared)
                .region(Region::new(region.clone()))
                .force_path_style(settings.force_path_style)
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
                .build(),
        );
        Ok(Self {
            bucket: settings.bucket.clone(),
            bucket_url: endpoint.bucket_url(),
            base: endpoint.url,
            signing_region: endpoint.signing_region,
            http,
            credentials: CredentialsCache::new(credentials),
            sdk,
        })
    }

    fn object_url(&self, key: &str) -> String {
        format!("{}/{}", self.base, utf8_percent_encode(key, KEY))
    }

    async fn put_object(
        &self,
        object: PutObject<'_>,
        only_if_absent: bool,
    ) -> Result<bool, StorageError> {
        let mut headers = Vec::with_capacity(object.metadata.len() + 3);
        headers.push(("content-type".to_string(), object.content_type.to_string()));
        for (k, v) in object.metadata {
            headers.push((format!("x-amz-meta-{k}"), v.clone()));
        }
        if let Some(sha256) = object.sha256
            && !object.metadata.iter().any(|(k, _)| *k == META_SHA256)
        {
            headers.push((format!("x-amz-meta-{META_SHA256}"), sha256.to_string()));
        }
        if only_if_absent {
            headers.push(("if-none-match".to_string(), "*".to_string()));
        }
        let response = self
            .send(Request {
                op: "put",
                key: object.key,
                method: Method::PUT,
                url: self.object_url(object.key),
                headers,
                body: object.data,
                payload_sha256: object.sha256,
            })
            .await?;
        match response.status() {
            s if s.is_success() => Ok(true),
            // 412 Precondition Failed: it exists. 409: a concurrent conditional write won.
            StatusCode::PRECONDITION_FAILED | StatusCode::CONFLICT if only_if_absent => Ok(false),
            _ => Err(failure("put", object.key, response).await),
        }
    }

    /// GET or HEAD of an object; `None` on 404.
    async fn fetch(
        &self,
        op: &'static str,
        method: Method,
        key: &str,
    ) -> Result<Option<reqwest::Response>, StorageError> {
        let response = self
            .send(Request::empty(op, key, method, self.object_url(key)))
            .await?;
        match response.status() {
            s if s.is_success() => Ok(Some(response)),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(failure(op, key, response).await),
        }
    }
}

impl ObjectStore for S3Store {
    fn put<'a>(&'a self, object: PutObject<'a>) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move { self.put_object(object, false).await.map(|_| ()) })
    }

    fn put_if_absent<'a>(
        &'a self,
        object: PutObject<'a>,
    ) -> BoxFuture<'a, Result<bool, StorageError>> {
        Box::pin(self.put_object(object, true))
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            let response = self
                .send(Request::empty(
                    "delete",
                    key,
                    Method::DELETE,
                    self.object_url(key),
                ))
                .await?;
            match response.status() {
                s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
                _ => Err(failure("delete", key, response).await),
            }
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, StorageError>> {
        Box::pin(async move {
            let Some(response) = self.fetch("get", Method::GET, key).await? else {
                return Ok(None);
            };
            let data = response
                .bytes()
                .await
                .map_err(|e| unavailable("get", key, with_causes(&e.without_url())))?;
            Ok(Some(data))
        })
    }

    fn head<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<ObjectInfo>, StorageError>> {
        Box::pin(async move {
            let Some(response) = self.fetch("head", Method::HEAD, key).await? else {
                return Ok(None);
            };
            let header = |name: &str| {
                response
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            Ok(Some(ObjectInfo {
                size: header("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
                content_type: header("content-type"),
                sha256: header(&format!("x-amz-meta-{META_SHA256}")),
                fingerprint: header(&format!("x-amz-meta-{META_FINGERPRINT}")),
            }))
        })
    }

    fn list<'a>(
        &'a self,
        prefix: &'a str,
        start_after: Option<&'a str>,
    ) -> BoxFuture<'a, Result<ListPage, StorageError>> {
        Box::pin(async move {
            let mut url = format!(
                "{}?list-type=2&max-keys={}&prefix={}",
                self.bucket_url,
                super::LIST_PAGE,
                utf8_percent_encode(prefix, QUERY)
            );
            if let Some(after) = start_after {
                url.push_str("&start-after=");
                url.extend(utf8_percent_encode(after, QUERY));
            }
            let response = self
                .send(Request::empty("list", prefix, Method::GET, url))
                .await?;
            if !response.status().is_success() {
                return Err(failure("list", prefix, response).await);
            }
            let body = response
                .bytes()
                .await
                .map_err(|e| unavailable("list", prefix, with_causes(&e.without_url())))?;
            listing_page(&body).map_err(|message| StorageError {
                op: "list",
                key: prefix.into(),
                kind: StorageErrorKind::Invalid,
                message,
            })
        })
    }

    fn presigned_get<'a>(
        &'a self,
        key: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<String>, StorageError>> {
        Box::pin(async move {
            let failed = |message: String| StorageError {
                op: "presign",
                key: key.into(),
                kind: StorageErrorKind::Invalid,
                message,
            };
            let config = aws_sdk_s3::presigning::PresigningConfig::expires_in(ttl)
                .map_err(|e| failed(e.to_string()))?;
            let request = self
                .sdk
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .presigned(config)
                .await
                .map_err(|e| failed(aws_sdk_s3::error::DisplayErrorContext(e).to_string()))?;
            Ok(Some(request.uri().to_string()))
        })
    }

    /// HEAD of the bucket: it exists and the credentials are accepted.
    fn check(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move {
            let response = self
                .send(Request::empty(
                    "check",
                    &self.bucket,
                    Method::HEAD,
                    self.bucket_url.clone(),
                ))
                .await?;
            match response.status() {
                s if s.is_success() => Ok(()),
                StatusCode::NOT_FOUND => Err(StorageError {
                    kind: StorageErrorKind::NotFound,
                    op: "check",
                    key: self.bucket.clone(),
                    message: "HTTP 404: the bucket does not exist".into(),
                }),
                StatusCode::FORBIDDEN => Err(StorageError {
                    kind: StorageErrorKind::Denied,
                    op: "check",
                    key: self.bucket.clone(),
                    message: "HTTP 403: access denied (credentials, or the bucket's region)".into(),
                }),
                _ => Err(failure("check", &self.bucket, response).await),
            }
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

    #[test]
    fn keys_are_escaped_as_s3_signs_them() {
        let key = "p/images/batch 1/j\u{fc}+b=c/0.png";
        assert_eq!(
            utf8_percent_encode(key, KEY).to_string(),
            "p/images/batch%201/j%C3%BC%2Bb%3Dc/0.png"
        );
        assert_eq!(utf8_percent_encode("a/b c", QUERY).to_string(), "a%2Fb%20c");
    }
}
