//! `enqueue --reference FILE`: local reference images, uploaded once to the store under
//! `{storage.prefix}references/{sha256}.{ext}` (by content: the same file is never stored twice,
//! and a key always names the same bytes), then named in every job's `images`.

use std::path::PathBuf;

use anyhow::Context;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::config::Settings;
use crate::storage::PutObject;

#[derive(Debug, thiserror::Error)]
pub enum RefError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Checks each file is an image, uploads those not stored yet (none with `dry_run`), and
/// returns their keys in order.
pub async fn upload(
    settings: &Settings,
    files: &[PathBuf],
    dry_run: bool,
) -> Result<Vec<String>, RefError> {
    if files.len() > crate::domain::job::references::MAX_REFERENCES {
        return Err(RefError::Usage(format!(
            "{} --reference files: a job takes at most {}",
            files.len(),
            crate::domain::job::references::MAX_REFERENCES
        )));
    }
    let mut prepared = Vec::with_capacity(files.len());
    for file in files {
        let data = std::fs::read(file)
            .map_err(|e| RefError::Usage(format!("cannot read {}: {e}", file.display())))?;
        if let Err(why) = crate::imaging::decode(&data) {
            return Err(RefError::Usage(format!("{}: {why}", file.display())));
        }
        let (content_type, extension) = crate::provider::sniff(&data, "");
        let key = format!(
            "{}references/{}.{extension}",
            settings.storage.prefix,
            hex::encode(Sha256::digest(&data))
        );
        prepared.push((key, content_type, data));
    }
    if dry_run {
        return Ok(prepared.into_iter().map(|(key, ..)| key).collect());
    }
    let store = crate::storage::from_settings(settings).await?;
    let mut keys = Vec::with_capacity(prepared.len());
    for (key, content_type, data) in prepared {
        let stored = store
            .head(&key)
            .await
            .with_context(|| format!("cannot look up {key} in the store"))?;
        if stored.is_none() {
            store
                .put(PutObject {
                    key: &key,
                    data: Bytes::from(data),
                    content_type,
                    metadata: &[],
                    sha256: None,
                })
                .await
                .with_context(|| format!("cannot upload the reference to {key}"))?;
            eprintln!("uploaded the reference {key}");
        }
        keys.push(key);
    }
    Ok(keys)
}
