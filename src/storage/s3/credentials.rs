//! The provider chain's credentials, fetched once and kept until shortly before they expire
//! (web identity and instance credentials expire; static ones do not).

use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};

/// Credentials are fetched again this long before they expire.
const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(300);

/// The provider chain's credentials, kept until shortly before they expire.
pub(super) struct CredentialsCache {
    provider: SharedCredentialsProvider,
    current: Mutex<Option<Credentials>>,
    /// One refresh at a time.
    refresh: tokio::sync::Mutex<()>,
}

impl CredentialsCache {
    pub fn new(provider: SharedCredentialsProvider) -> Self {
        Self {
            provider,
            current: Mutex::new(None),
            refresh: tokio::sync::Mutex::new(()),
        }
    }

    fn fresh(&self) -> Option<Credentials> {
        let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        current
            .as_ref()
            .filter(|c| {
                c.expiry()
                    .is_none_or(|at| at > SystemTime::now() + REFRESH_BEFORE_EXPIRY)
            })
            .cloned()
    }

    pub async fn get(&self) -> Result<Credentials, String> {
        if let Some(c) = self.fresh() {
            return Ok(c);
        }
        let _one = self.refresh.lock().await;
        if let Some(c) = self.fresh() {
            return Ok(c);
        }
        let c = self.provider.provide_credentials().await.map_err(|e| {
            format!(
                "no AWS credentials: {}",
                aws_sdk_s3::error::DisplayErrorContext(e)
            )
        })?;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(c.clone());
        Ok(c)
    }
}
