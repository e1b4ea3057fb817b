//! The images of a batch's JSON edit lines (`/v1/images/edits`): uploaded files or data URLs,
//! checked as an upload's would be.

use axum::body::Bytes;
use serde_json::{Value, json};

use super::{bad_request, json_type};
use crate::digest;
use crate::openai::edits::{EditSeen, check_files};
use crate::openai::errors::ApiError;
use crate::openai::files::Content;
use crate::openai::{FakeApi, lock};

/// An image of a JSON edit: its bytes when the fake can read them, and what identifies it.
fn image_ref(
    api: &FakeApi,
    value: &Value,
    param: &str,
) -> Result<(Option<Bytes>, String), ApiError> {
    let obj = value.as_object();
    let url = obj
        .and_then(|o| o.get("image_url"))
        .filter(|v| !v.is_null());
    let file_id = obj.and_then(|o| o.get("file_id")).filter(|v| !v.is_null());
    match (url, file_id) {
        (Some(Value::String(url)), None) => {
            if url.starts_with("http://") || url.starts_with("https://") {
                return Ok((None, digest(url.as_bytes())));
            }
            let input = json!({ "image_url": url });
            match crate::data_uri_images(&input) {
                Ok(mut found) if !found.is_empty() => {
                    let (_, bytes) = found.remove(0);
                    let id = digest(&bytes);
                    Ok((Some(Bytes::from(bytes)), id))
                }
                _ => Err(bad_request(
                    Some(&format!("{param}.image_url")),
                    Some("invalid_image_url"),
                    format!(
                        "Invalid '{param}.image_url': expected a URL or a base64-encoded data URL \
                         of an image."
                    ),
                )),
            }
        }
        (None, Some(Value::String(id))) => {
            let store = lock(&api.inner.uploads);
            let Some(file) = store.get(id) else {
                return Err(bad_request(
                    Some(&format!("{param}.file_id")),
                    Some("invalid_value"),
                    format!("No such File object: {id}"),
                ));
            };
            match (&file.content, file.purpose.as_str()) {
                (Content::Uploaded(bytes), "vision" | "user_data") => {
                    Ok((Some(bytes.clone()), digest(bytes)))
                }
                _ => Err(bad_request(
                    Some(&format!("{param}.file_id")),
                    Some("invalid_value"),
                    format!(
                        "Invalid file '{id}' for '{param}.file_id': it has purpose '{}', expected \
                         'vision' or 'user_data'.",
                        file.purpose
                    ),
                )),
            }
        }
        _ => Err(bad_request(
            Some(param),
            Some("invalid_value"),
            format!("Invalid '{param}': provide exactly one of 'image_url' or 'file_id'."),
        )),
    }
}

impl FakeApi {
    /// A JSON edit's images, checked as an upload's would be and recorded as an edit; the fields
    /// left are validated like a generation's.
    pub(super) fn json_edit(&self, body: &Value) -> Result<Value, ApiError> {
        let model = body.get("model").and_then(Value::as_str);
        if model.is_some_and(|m| m.starts_with("dall-e")) {
            return Err(bad_request(
                Some("model"),
                Some("invalid_value"),
                "JSON image edits support GPT image models only; use multipart/form-data for \
                 dall-e-2.",
            ));
        }
        let images = match body.get("images") {
            None | Some(Value::Null) => {
                return Err(bad_request(
                    Some("images"),
                    Some("missing_required_parameter"),
                    "Missing required parameter: 'images'.",
                ));
            }
            Some(Value::Array(a)) if a.is_empty() => {
                return Err(bad_request(
                    Some("images"),
                    Some("empty_array"),
                    "Invalid 'images': empty array. Expected an array with minimum length 1, but \
                     got an empty array instead.",
                ));
            }
            Some(Value::Array(a)) if a.len() > 16 => {
                return Err(bad_request(
                    Some("images"),
                    Some("array_above_max_length"),
                    format!(
                        "Invalid 'images': array too long. Expected an array with maximum length \
                         16, but got an array with length {} instead.",
                        a.len()
                    ),
                ));
            }
            Some(Value::Array(a)) => a,
            Some(other) => {
                return Err(bad_request(
                    Some("images"),
                    Some("invalid_type"),
                    format!(
                        "Invalid type for 'images': expected an array, but got {} instead.",
                        json_type(other)
                    ),
                ));
            }
        };
        let mut bytes = Vec::new();
        let mut seen = EditSeen {
            prompt: body
                .get("prompt")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            ..EditSeen::default()
        };
        for (i, image) in images.iter().enumerate() {
            let (data, id) = image_ref(self, image, &format!("images[{i}]"))?;
            bytes.extend(data);
            seen.images.push(id);
        }
        let mask = match body.get("mask") {
            None | Some(Value::Null) => None,
            Some(m) => {
                let (data, id) = image_ref(self, m, "mask")?;
                seen.mask = Some(id);
                data
            }
        };
        if !bytes.is_empty() {
            check_files(&bytes, mask.as_deref())?;
        }
        lock(&self.inner.edits).push(seen);
        let mut fields = body.clone();
        if let Some(obj) = fields.as_object_mut() {
            obj.remove("images");
            obj.remove("mask");
        }
        Ok(fields)
    }
}
