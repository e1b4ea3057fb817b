//! Request validation, as the provider does it: which fields are required, their types and
//! ranges, and the error (param, code, wording) each violation gets. Unknown fields are accepted
//! and open-ended strings (model, size, quality, ...) are not checked against a list, since the
//! provider adds values faster than clients learn them.

use serde_json::Value;

use super::errors::ApiError;

/// A validated generation request.
pub(super) struct GenRequest {
    pub(super) model: String,
    pub(super) prompt: String,
    pub(super) n: u64,
    pub(super) size: Option<String>,
    pub(super) quality: Option<String>,
    pub(super) output_format: Option<String>,
    pub(super) background: Option<String>,
    pub(super) response_format: Option<String>,
}

impl GenRequest {
    /// (text input tokens, image output tokens): what the answer's usage reports, and what the
    /// account's tokens-per-minute limit is charged.
    pub(super) fn usage_tokens(&self) -> (u64, u64) {
        let text_tokens = self.prompt.split_whitespace().count().max(1) as u64;
        let per_image = match self.quality.as_deref() {
            Some("low") => 272,
            Some("high") => 4160,
            _ => 1056,
        };
        (text_tokens, per_image * self.n)
    }
}

/// The limits of the GPT image models (prompt of 1..=32000 characters, n in 1..=10, options as
/// strings, no `response_format`), which are the ones a client meets today.
pub(super) fn validate(v: &Value) -> Result<GenRequest, ApiError> {
    let Some(obj) = v.as_object() else {
        return Err(ApiError::invalid(
            None,
            "invalid_type",
            format!(
                "Invalid type for request body: expected an object, but got {} instead.",
                json_type(v)
            ),
        ));
    };
    let prompt = match obj.get("prompt") {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                Some("prompt"),
                "missing_required_parameter",
                "Missing required parameter: 'prompt'.",
            ));
        }
        Some(Value::String(s)) if s.is_empty() => {
            return Err(ApiError::invalid(
                Some("prompt"),
                "empty_string",
                "Invalid 'prompt': empty string. Expected a string with minimum length 1, but got an \
                 empty string instead.",
            ));
        }
        Some(Value::String(s)) if s.chars().count() > 32_000 => {
            return Err(ApiError::invalid(
                Some("prompt"),
                "string_above_max_length",
                format!(
                    "Invalid 'prompt': string too long. Expected a string with maximum length 32000, \
                     but got a string with length {} instead.",
                    s.chars().count()
                ),
            ));
        }
        Some(Value::String(s)) => s.clone(),
        Some(other) => return Err(wrong_type("prompt", "a string", other)),
    };
    let n = match obj.get("n") {
        None | Some(Value::Null) => 1,
        Some(Value::Number(num)) if num.is_i64() || num.is_u64() => {
            let n = num.as_i64().unwrap_or(i64::MAX);
            if n < 1 {
                return Err(ApiError::invalid(
                    Some("n"),
                    "integer_below_min_value",
                    format!(
                        "Invalid 'n': integer below minimum value. Expected a value >= 1, but got {n} instead."
                    ),
                ));
            }
            if n > 10 {
                return Err(ApiError::invalid(
                    Some("n"),
                    "integer_above_max_value",
                    format!(
                        "Invalid 'n': integer above maximum value. Expected a value <= 10, but got {num} instead."
                    ),
                ));
            }
            n as u64
        }
        Some(other) => return Err(wrong_type("n", "an integer", other)),
    };
    let text = |name: &str| match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(wrong_type(name, "a string", other)),
    };
    let model = text("model")?;
    let req = GenRequest {
        model: model.clone().unwrap_or_else(|| "gpt-image-2".into()),
        prompt,
        n,
        size: text("size")?,
        quality: text("quality")?,
        output_format: text("output_format")?,
        background: text("background")?,
        response_format: text("response_format")?,
    };
    let gpt_image = model.as_deref().is_some_and(|m| m.starts_with("gpt-image"));
    if gpt_image && obj.get("response_format").is_some_and(|v| !v.is_null()) {
        return Err(ApiError::invalid(
            Some("response_format"),
            "unknown_parameter",
            "Unknown parameter: 'response_format'.",
        ));
    }
    if let Some(format) = req.response_format.as_deref()
        && format != "url"
        && format != "b64_json"
    {
        return Err(ApiError::invalid(
            Some("response_format"),
            "invalid_value",
            format!("Invalid value: '{format}'. Supported values are: 'url' and 'b64_json'."),
        ));
    }
    Ok(req)
}

fn wrong_type(param: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::invalid(
        Some(param),
        "invalid_type",
        format!(
            "Invalid type for '{param}': expected {expected}, but got {} instead.",
            json_type(got)
        ),
    )
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a decimal",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
