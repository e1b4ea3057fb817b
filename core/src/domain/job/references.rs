//! A job's reference images (`images`, and an edit's `mask`): where each is to be read from.
//!
//! ```json
//! "images": [
//!   "refs/style-plate.png",                        // an object in the store (under an allowed prefix)
//!   "https://cdn.example.com/art/hero.webp",       // a URL
//!   "job:castle-07",                               // image 0 of job castle-07 of this batch
//!   {"job": "castle-07", "index": 1, "batch": "spring"}
//! ],
//! "mask": "refs/hero-mask.png"
//! ```
//!
//! A string is a URL when it starts with `https://` (or `http://`), an earlier job's image when
//! it starts with `job:` (`job:ID` or `job:ID#INDEX`), and otherwise the key of an object in
//! the store. The object form says the same with fields: `{"key"}`, `{"url"}` or `{"job",
//! "index", "batch"}`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The most reference images a job may carry.
pub const MAX_REFERENCES: usize = 16;

/// Where one reference image is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "from", rename_all = "snake_case")]
pub enum Reference {
    /// An object of the configured store, by its whole key.
    Key { key: String },
    /// An `https://` URL (plain `http://` only to hosts configured as exempt).
    Url { url: String },
    /// Image `index` of an earlier job: of the same batch unless `batch` names another.
    Job {
        id: String,
        index: u32,
        batch: Option<String>,
    },
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reference::Key { key } => write!(f, "{key}"),
            Reference::Url { url } => {
                // Without its query: it may hold a signature.
                write!(f, "{}", url.split('?').next().unwrap_or(url))
            }
            Reference::Job { id, index, batch } => match batch {
                Some(b) => write!(f, "job:{b}/{id}#{index}"),
                None => write!(f, "job:{id}#{index}"),
            },
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    key: Option<String>,
    url: Option<String>,
    job: Option<String>,
    index: Option<u32>,
    batch: Option<String>,
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 1024
        && !key.starts_with('/')
        && !key.split('/').any(|part| part == ".." || part == ".")
        && !key.chars().any(char::is_control)
}

/// Reads one reference; `at` names it in errors (`images[2]`).
pub fn parse_one(value: Value, at: &str) -> Result<Reference, String> {
    let reference = match value {
        Value::String(s) => {
            if s.starts_with("https://") || s.starts_with("http://") {
                Reference::Url { url: s }
            } else if let Some(rest) = s.strip_prefix("job:") {
                let (id, index) = match rest.split_once('#') {
                    Some((id, index)) => (
                        id,
                        index
                            .parse()
                            .map_err(|_| format!("`{at}`: {s:?} has no image index after '#'"))?,
                    ),
                    None => (rest, 0),
                };
                Reference::Job {
                    id: id.to_string(),
                    index,
                    batch: None,
                }
            } else {
                Reference::Key { key: s }
            }
        }
        Value::Object(_) => {
            let wire: Wire = serde_json::from_value(value).map_err(|e| format!("`{at}`: {e}"))?;
            match (wire.key, wire.url, wire.job) {
                (Some(key), None, None) if wire.index.is_none() && wire.batch.is_none() => {
                    Reference::Key { key }
                }
                (None, Some(url), None) if wire.index.is_none() && wire.batch.is_none() => {
                    Reference::Url { url }
                }
                (None, None, Some(id)) => Reference::Job {
                    id,
                    index: wire.index.unwrap_or(0),
                    batch: wire.batch,
                },
                _ => {
                    return Err(format!(
                        "`{at}` must have one of key, url or job (index and batch go with job)"
                    ));
                }
            }
        }
        _ => {
            return Err(format!(
                "`{at}` must be a string (a key, an https:// URL or job:ID) or an object"
            ));
        }
    };
    match &reference {
        Reference::Key { key } if !valid_key(key) => Err(format!(
            "`{at}`: {:?} is not an object key (no leading '/', no '.' or '..' parts)",
            super::truncate(key, 80)
        )),
        Reference::Url { url } if url.len() > 2048 || url.contains(char::is_whitespace) => Err(
            format!("`{at}`: {:?} is not a URL", super::truncate(url, 80)),
        ),
        Reference::Job { id, .. } if !super::is_valid_name(id) => Err(format!(
            "`{at}`: job id {:?} must be 1-128 characters of [A-Za-z0-9._-]",
            super::truncate(id, 80)
        )),
        Reference::Job { index, .. } if *index >= 10 => Err(format!(
            "`{at}`: image index {index} is past any job's last image (at most 9)"
        )),
        Reference::Job {
            batch: Some(batch), ..
        } if !super::is_valid_name(batch) => Err(format!(
            "`{at}`: batch {:?} must be 1-128 characters of [A-Za-z0-9._-]",
            super::truncate(batch, 80)
        )),
        _ => Ok(reference),
    }
}

/// Reads `images`.
pub fn parse(values: Vec<Value>) -> Result<Vec<Reference>, String> {
    if values.len() > MAX_REFERENCES {
        return Err(format!(
            "`images` has {} references, at most {MAX_REFERENCES}",
            values.len()
        ));
    }
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| parse_one(v, &format!("images[{i}]")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn each_form_of_reference_is_read() {
        let refs = parse(vec![
            json!("refs/plate.png"),
            json!("https://cdn.example.com/a.webp?sig=x"),
            json!("job:castle-07"),
            json!("job:castle-07#2"),
            json!({"job": "c", "index": 1, "batch": "other"}),
            json!({"key": "k.png"}),
            json!({"url": "https://x.example/y.png"}),
        ])
        .unwrap();
        assert_eq!(
            refs[0],
            Reference::Key {
                key: "refs/plate.png".into()
            }
        );
        assert!(matches!(&refs[1], Reference::Url { .. }));
        assert_eq!(
            refs[1].to_string(),
            "https://cdn.example.com/a.webp",
            "no query shown"
        );
        assert_eq!(
            refs[3],
            Reference::Job {
                id: "castle-07".into(),
                index: 2,
                batch: None
            }
        );
        assert_eq!(refs[4].to_string(), "job:other/c#1");
    }

    #[test]
    fn bad_references_say_which_and_why() {
        for (value, why) in [
            (json!("../etc/passwd"), "not an object key"),
            (json!("/abs/key"), "not an object key"),
            (json!("job:bad id"), "job id"),
            (json!("job:a#x"), "no image index"),
            (json!("job:a#12"), "at most 9"),
            (
                json!({"key": "a", "url": "https://b"}),
                "one of key, url or job",
            ),
            (
                json!({"key": "a", "index": 1}),
                "index and batch go with job",
            ),
            (json!(7), "must be a string"),
            (json!({"path": "a"}), "unknown field"),
        ] {
            let e = parse(vec![value]).unwrap_err();
            assert!(e.contains(why) && e.contains("images[0]"), "{why}: {e}");
        }
        assert!(
            parse(vec![json!("a.png"); 17])
                .unwrap_err()
                .contains("at most 16")
        );
    }
}
