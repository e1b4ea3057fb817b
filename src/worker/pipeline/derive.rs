//! What a job asks of its images beyond the provider's bytes: the variants of its `outputs`,
//! stored beside each image (`{job dir}/variants/{name}/{index}.{ext}`), and, when it asked for a
//! transparent background, whether each image has a transparent pixel.
//!
//! A new image's variants are made from its bytes in memory, right after it is stored. An image
//! stored by an earlier delivery is read back (one GET) only when some of its variants are
//! missing or its transparency is to be checked, and only the missing variants are made. The
//! decoding, resizing and encoding run on the image threads ([`crate::imaging::ImageWork`]).

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::images::Listing;
use super::run::JobRun;
use crate::domain::error::{ErrorKind, Failure};
use crate::domain::event::{StoredImage, StoredVariant};
use crate::domain::job::OutputSpec;
use crate::domain::keys;
use crate::imaging::{Variant, decode, make_variant, size_of, uses_alpha};

/// What the image threads made of one image.
struct Worked {
    width: u32,
    height: u32,
    alpha: Option<bool>,
    /// The missing variants, by their index in the job's outputs.
    made: Vec<(usize, Variant)>,
}

impl JobRun<'_> {
    /// Whether the job asks anything of its images.
    pub(super) fn derives(&self) -> bool {
        !self.job.outputs.is_empty() || self.wants_alpha()
    }

    fn wants_alpha(&self) -> bool {
        self.request.background.as_deref() == Some("transparent")
    }

    /// Derives what the job asks of each image that lacks it: from `fresh` (the bytes of images
    /// just stored, by index), else from the stored original. `listing`: the keys stored when
    /// the delivery began (variants an earlier delivery stored are not made again). `Err`: the
    /// job's failure (a store that keeps failing stops the worker, as for its images).
    pub(super) async fn derive(
        &self,
        images: &mut [StoredImage],
        fresh: &[(u32, Bytes)],
        listing: Option<&Listing>,
    ) -> Result<(), Failure> {
        if !self.derives() {
            return Ok(());
        }
        for image in images.iter_mut() {
            let complete = image.variants.len() == self.job.outputs.len()
                && (image.alpha.is_some() || !self.wants_alpha())
                && image.width.is_some();
            if complete {
                continue;
            }
            let data = match fresh.iter().find(|(i, _)| *i == image.index) {
                Some((_, data)) => data.clone(),
                None => self.read_back(&image.key).await?,
            };
            self.derive_one(image, data, listing).await?;
            if self.job.fail_if_opaque && image.alpha == Some(false) {
                return Err(Failure::Permanent {
                    kind: ErrorKind::InvalidRequest,
                    message: format!(
                        "the provider ignored background \"transparent\": image {} has no \
                         transparent pixel (fail_if_opaque)",
                        image.index
                    ),
                    detail: Box::default(),
                });
            }
        }
        Ok(())
    }

    /// The outcome of a job whose images could not be derived: a store that keeps failing
    /// stops the worker (the job goes back); anything else fails the job.
    /// Stores the images one answer bought as the job's images `indices` (in order), then
    /// their variants, made from the bytes in hand. `Err`: how the delivery ends instead.
    pub(super) async fn store_bought(
        &self,
        indices: &[u32],
        images: Vec<crate::provider::GeneratedImage>,
        progress: &mut super::events::Progress,
    ) -> Result<(), super::Outcome> {
        let fresh: Vec<(u32, Bytes)> = if self.derives() {
            indices
                .iter()
                .zip(&images)
                .map(|(i, g)| (*i, g.data.clone()))
                .collect()
        } else {
            Vec::new()
        };
        if let Err(failure) = self
            .p
            .images
            .upload(self.job, self.dir, indices, images, &mut progress.images)
            .await
        {
            return Err(self.storage_down(failure));
        }
        if let Err(failure) = self.derive(&mut progress.images, &fresh, None).await {
            return Err(self.derive_failed(std::mem::take(progress), failure));
        }
        Ok(())
    }

    pub(super) fn derive_failed(
        &self,
        progress: super::events::Progress,
        failure: Failure,
    ) -> super::Outcome {
        match failure {
            Failure::Permanent { .. } => self.failed(progress, failure),
            other => self.storage_down(other),
        }
    }

    async fn read_back(&self, key: &str) -> Result<Bytes, Failure> {
        match self.p.images.store.get(key).await {
            Ok(Some(data)) => Ok(data),
            Ok(None) => Err(Failure::transient(format!(
                "the stored image {key} is gone: it cannot be made into its variants"
            ))),
            Err(e) => Err(Failure::from(e)),
        }
    }

    async fn derive_one(
        &self,
        image: &mut StoredImage,
        data: Bytes,
        listing: Option<&Listing>,
    ) -> Result<(), Failure> {
        let dir = self.dir.to_string();
        let index = image.index;
        let specs = self.job.outputs.clone();
        let stored: Vec<bool> = specs
            .iter()
            .map(|s| {
                listing.is_some_and(|l| {
                    l.has(&keys::variant(&dir, &s.name, index, s.encoding.extension()))
                })
            })
            .collect();
        let wants_alpha = self.wants_alpha();
        let worked = self
            .p
            .imaging
            .run(move || -> Result<Worked, String> {
                let decoded = decode(&data)?;
                let made = specs
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !stored[*i])
                    .map(|(i, spec)| {
                        make_variant(&decoded, spec)
                            .map(|v| (i, v))
                            .map_err(|e| format!("variant {:?}: {e}", spec.name))
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                Ok(Worked {
                    width: decoded.image.width(),
                    height: decoded.image.height(),
                    alpha: wants_alpha.then(|| uses_alpha(&decoded.image)),
                    made,
                })
            })
            .await
            .map_err(|why| Failure::Permanent {
                kind: ErrorKind::InvalidRequest,
                message: format!("image {index} could not be made into its outputs: {why}"),
                detail: Box::default(),
            })?;
        image.width = Some(worked.width);
        image.height = Some(worked.height);
        image.alpha = worked.alpha;
        let mut made = worked.made.into_iter().peekable();
        let mut variants = Vec::with_capacity(self.job.outputs.len());
        for (i, spec) in self.job.outputs.iter().enumerate() {
            let key = keys::variant(self.dir, &spec.name, index, spec.encoding.extension());
            let variant = match made.next_if(|(at, _)| *at == i) {
                Some((_, v)) => self.store_variant(&key, spec, v).await?,
                None => {
                    self.stored_variant(&key, spec, worked.width, worked.height)
                        .await?
                }
            };
            variants.push(variant);
        }
        image.variants = variants;
        Ok(())
    }

    async fn store_variant(
        &self,
        key: &str,
        spec: &OutputSpec,
        v: Variant,
    ) -> Result<StoredVariant, Failure> {
        let sha256 = hex::encode(Sha256::digest(&v.data));
        let bytes = v.data.len() as u64;
        self.p
            .images
            .put_image(self.job, key, Bytes::from(v.data), v.content_type, &sha256)
            .await
            .map_err(Failure::storage_down)?;
        Ok(StoredVariant {
            name: spec.name.clone(),
            key: key.to_string(),
            uri: self.p.images.store.uri(key),
            content_type: v.content_type.to_string(),
            bytes,
            sha256,
            width: v.width,
            height: v.height,
        })
    }

    /// A variant an earlier delivery stored: its size and digest from the store.
    async fn stored_variant(
        &self,
        key: &str,
        spec: &OutputSpec,
        width: u32,
        height: u32,
    ) -> Result<StoredVariant, Failure> {
        let info = self
            .p
            .images
            .store
            .head(key)
            .await
            .map_err(Failure::from)?
            .ok_or_else(|| Failure::transient(format!("the stored variant {key} is gone")))?;
        let sha256 = match info.sha256 {
            Some(sha) => sha,
            None => {
                let data = self.read_back(key).await?;
                hex::encode(Sha256::digest(&data))
            }
        };
        let (width, height) = size_of(width, height, spec);
        Ok(StoredVariant {
            name: spec.name.clone(),
            key: key.to_string(),
            uri: self.p.images.store.uri(key),
            content_type: spec.encoding.content_type().to_string(),
            bytes: info.size,
            sha256,
            width,
            height,
        })
    }
}
