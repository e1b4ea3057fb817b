//! Where a bucket's requests go: S3's endpoint rules (as the SDK has them) turn bucket, region,
//! endpoint and path style into the bucket's URL and signing region, once, at start-up.

use aws_sdk_s3::config::endpoint::{DefaultResolver, Params, ResolveEndpoint};
use aws_smithy_types::Document;

/// Where a bucket's requests go, from S3's endpoint rules.
#[derive(Debug, PartialEq)]
pub(super) struct BucketEndpoint {
    pub url: String,
    pub signing_region: String,
}

impl BucketEndpoint {
    pub async fn resolve(
        bucket: &str,
        region: &str,
        endpoint_url: &str,
        force_path_style: bool,
    ) -> anyhow::Result<Self> {
        let mut params = Params::builder()
            .bucket(bucket)
            .region(region)
            .force_path_style(force_path_style);
        if !endpoint_url.is_empty() {
            params = params.endpoint(endpoint_url);
        }
        let params = params.build()?;
        // Not `DefaultResolver::default()`: that one has no partitions and resolves nothing.
        let endpoint = DefaultResolver::new()
            .resolve_endpoint(&params)
            .await
            .map_err(|e| anyhow::anyhow!("no S3 endpoint for bucket {bucket:?}: {e}"))?;
        let mut signing_region = region.to_string();
        if let Some(Document::Array(schemes)) = endpoint.properties().get("authSchemes")
            && let Some(Document::Object(scheme)) = schemes.first()
        {
            match scheme.get("name") {
                Some(Document::String(name)) if name == "sigv4" => {}
                other => anyhow::bail!(
                    "bucket {bucket:?} needs the S3 auth scheme {other:?}, which imagegen does \
                     not support (S3 Express directory buckets, multi-region access points)"
                ),
            }
            if let Some(Document::String(r)) = scheme.get("signingRegion") {
                signing_region.clone_from(r);
            }
        }
        Ok(Self {
            url: endpoint.url().trim_end_matches('/').to_string(),
            signing_region,
        })
    }

    /// The URL of bucket-level requests: `url`, or `url/` when it has no path (virtual-hosted).
    pub fn bucket_url(&self) -> String {
        match reqwest::Url::parse(&self.url) {
            Ok(u) if u.path() == "/" => format!("{}/", self.url),
            _ => self.url.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn endpoint(bucket: &str, region: &str, url: &str, path_style: bool) -> BucketEndpoint {
        BucketEndpoint::resolve(bucket, region, url, path_style)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn bucket_urls_follow_s3s_endpoint_rules() {
        let aws = endpoint("my-bucket", "eu-west-1", "", false).await;
        assert_eq!(aws.url, "https://my-bucket.s3.eu-west-1.amazonaws.com");
        assert_eq!(
            aws.bucket_url(),
            "https://my-bucket.s3.eu-west-1.amazonaws.com/"
        );
        assert_eq!(aws.signing_region, "eu-west-1");
        // A dotted name cannot be a TLS host name: the rules fall back to the path style.
        let dotted = endpoint("my.bucket", "us-west-2", "", false).await;
        assert_eq!(dotted.url, "https://s3.us-west-2.amazonaws.com/my.bucket");
        let garage = endpoint("imagegen", "garage", "http://127.0.0.1:3900", true).await;
        assert_eq!(garage.url, "http://127.0.0.1:3900/imagegen");
        assert_eq!(garage.bucket_url(), garage.url);
        assert_eq!(garage.signing_region, "garage");
        let minio = endpoint(
            "my-bucket",
            "us-east-1",
            "https://minio.example:9000",
            false,
        )
        .await;
        assert_eq!(minio.url, "https://my-bucket.minio.example:9000");
        // S3 Express directory buckets sign with another scheme: refused at start-up.
        let express = BucketEndpoint::resolve("imgs--usw2-az1--x-s3", "us-west-2", "", false).await;
        assert!(
            express.unwrap_err().to_string().contains("not support"),
            "a directory bucket is refused"
        );
    }
}
