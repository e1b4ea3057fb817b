//! The Images API's edits (`/images/edits`): a request with reference images is sent as
//! multipart, each image an `image[]` file, with the mask when the job has one.

use serde_json::Value;

use super::OpenAi;
use crate::domain::error::Failure;
use crate::provider::ImageRequest;

impl OpenAi {
    /// An edit's body (`/images/edits`): the fields of [`Self::body`] as text parts, each
    /// reference as an `image[]` file, and the mask. `Err`: a mask the API would refuse.
    pub(super) fn edit_form(
        &self,
        request: &ImageRequest,
    ) -> Result<super::super::multipart::Form, Failure> {
        let mut form = super::super::multipart::Form::new();
        if let Value::Object(fields) = self.body(request) {
            for (name, value) in fields {
                let text = match value {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                form.text(&name, &text);
            }
        }
        for (i, image) in request.refs.images.iter().enumerate() {
            form.file(
                "image[]",
                &format!("reference-{i}.{}", image.extension),
                image.content_type,
                &image.data,
            );
        }
        if let Some(mask) = &request.refs.mask {
            let first = &request.refs.images[0];
            if (mask.width, mask.height) != (first.width, first.height) {
                return Err(Failure::invalid_job(format!(
                    "the mask is {}x{}: it must be the size of the first image ({}x{})",
                    mask.width, mask.height, first.width, first.height
                )));
            }
            if mask.data.len() > 4 * 1024 * 1024 {
                return Err(Failure::invalid_job(
                    "the mask is larger than the 4 MB the API takes",
                ));
            }
            form.file("mask", "mask.png", "image/png", &mask.data);
        }
        Ok(form)
    }
}
