//! The batch's input file: its lines, checked as the provider checks them when the batch
//! validates.

use std::collections::HashSet;

use serde_json::{Value, json};

use super::json_type;

/// Most validation errors listed in a failed batch.
const MAX_ERRORS: usize = 100;

/// A line of the input file that validated.
#[derive(Debug)]
pub(super) struct InputLine {
    pub(super) custom_id: String,
    pub(super) body: Value,
}

/// The input file's lines, or why the batch fails (`errors.data`).
pub(super) fn parse_input(
    input: &[u8],
    endpoint: &str,
    max_lines: usize,
) -> Result<Vec<InputLine>, Vec<Value>> {
    let error = |code: &str, message: String, param: Option<&str>, line: Option<usize>| json!({"code": code, "message": message, "param": param, "line": line});
    let mut raw: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
    if raw.last().is_some_and(|l| l.is_empty()) {
        raw.pop();
    }
    if raw.is_empty() {
        return Err(vec![error(
            "empty_file",
            "The batch input file is empty.".into(),
            None,
            None,
        )]);
    }
    if raw.len() > max_lines {
        return Err(vec![error(
            "too_many_requests",
            format!(
                "The batch input file has {} requests; a batch can have at most {max_lines}.",
                raw.len()
            ),
            None,
            None,
        )]);
    }
    let mut errors = Vec::new();
    let mut lines = Vec::with_capacity(raw.len());
    let mut seen: HashSet<String> = HashSet::new();
    let mut model: Option<String> = None;
    for (i, text) in raw.iter().enumerate() {
        let n = Some(i + 1);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(text) else {
            errors.push(error(
                "invalid_json_line",
                "This line is not parseable as valid JSON.".into(),
                None,
                n,
            ));
            continue;
        };
        let missing = |name: &str| {
            error(
                "missing_required_parameter",
                format!("Missing required parameter: '{name}'."),
                Some(name),
                n,
            )
        };
        let custom_id = match obj.get("custom_id") {
            None | Some(Value::Null) => {
                errors.push(missing("custom_id"));
                continue;
            }
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                errors.push(error(
                    "invalid_type",
                    format!(
                        "Invalid type for 'custom_id': expected a string, but got {} instead.",
                        json_type(other)
                    ),
                    Some("custom_id"),
                    n,
                ));
                continue;
            }
        };
        match obj.get("method") {
            None | Some(Value::Null) => {
                errors.push(missing("method"));
                continue;
            }
            Some(Value::String(m)) if m == "POST" => {}
            Some(other) => {
                errors.push(error(
                    "invalid_value",
                    format!("Invalid value: {other}. Supported values are: 'POST'."),
                    Some("method"),
                    n,
                ));
                continue;
            }
        }
        match obj.get("url") {
            None | Some(Value::Null) => {
                errors.push(missing("url"));
                continue;
            }
            Some(Value::String(u)) if u == endpoint => {}
            Some(_) => {
                errors.push(error(
                    "invalid_url",
                    "The URL provided for this request does not match the batch endpoint.".into(),
                    Some("url"),
                    n,
                ));
                continue;
            }
        }
        let body = match obj.remove("body") {
            None | Some(Value::Null) => {
                errors.push(missing("body"));
                continue;
            }
            Some(body @ Value::Object(_)) => body,
            Some(other) => {
                errors.push(error(
                    "invalid_type",
                    format!(
                        "Invalid type for 'body': expected an object, but got {} instead.",
                        json_type(&other)
                    ),
                    Some("body"),
                    n,
                ));
                continue;
            }
        };
        if !seen.insert(custom_id.clone()) {
            errors.push(error(
                "duplicate_custom_id",
                "The custom_id for this request is a duplicate of another request. The custom_id \
                 parameter must be unique for each request in a batch."
                    .into(),
                Some("custom_id"),
                n,
            ));
            continue;
        }
        let line_model = body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("gpt-image-2");
        match &model {
            None => model = Some(line_model.to_owned()),
            Some(m) if m == line_model => {}
            Some(m) => {
                errors.push(error(
                    "mismatched_model",
                    format!(
                        "The model '{line_model}' of this request differs from the model '{m}' of \
                         the other requests: a batch can only include requests to a single model."
                    ),
                    Some("body.model"),
                    n,
                ));
                continue;
            }
        }
        lines.push(InputLine { custom_id, body });
    }
    if errors.is_empty() {
        Ok(lines)
    } else {
        errors.truncate(MAX_ERRORS);
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::batch::{EDITS, GENERATIONS};

    #[test]
    fn input_files_are_validated_like_the_provider() {
        let ok = br#"{"custom_id":"a","method":"POST","url":"/v1/images/generations","body":{"prompt":"p"}}
{"custom_id":"b","method":"POST","url":"/v1/images/generations","body":{"prompt":"q"}}
"#;
        assert_eq!(parse_input(ok, GENERATIONS, 10).unwrap().len(), 2);
        let errors = parse_input(ok, EDITS, 10).unwrap_err();
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0]["code"], "invalid_url");
        assert_eq!(errors[1]["line"], 2);
        assert_eq!(
            parse_input(ok, GENERATIONS, 1).unwrap_err()[0]["code"],
            "too_many_requests"
        );
        assert_eq!(
            parse_input(b"", GENERATIONS, 1).unwrap_err()[0]["code"],
            "empty_file"
        );
        let bad = br#"not json
{"custom_id":"a","method":"GET","url":"/v1/images/generations","body":{}}
{"method":"POST","url":"/v1/images/generations","body":{}}
{"custom_id":"b","method":"POST","url":"/v1/images/generations"}
{"custom_id":"c","method":"POST","url":"/v1/images/generations","body":{"model":"gpt-image-1"}}
{"custom_id":"c","method":"POST","url":"/v1/images/generations","body":{"model":"gpt-image-1"}}
{"custom_id":"d","method":"POST","url":"/v1/images/generations","body":{"model":"gpt-image-2"}}
"#;
        let errors = parse_input(bad, GENERATIONS, 100).unwrap_err();
        let codes: Vec<(&str, u64)> = errors
            .iter()
            .map(|e| (e["code"].as_str().unwrap(), e["line"].as_u64().unwrap()))
            .collect();
        assert_eq!(
            codes,
            [
                ("invalid_json_line", 1),
                ("invalid_value", 2),
                ("missing_required_parameter", 3),
                ("missing_required_parameter", 4),
                ("duplicate_custom_id", 6),
                ("mismatched_model", 7),
            ]
        );
    }
}
