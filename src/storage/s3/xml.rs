//! S3's XML answers: error documents and ListObjectsV2 pages.

use aws_smithy_xml::decode::{Document as XmlDocument, try_data};

use crate::storage::ListPage;

/// `Code` and `Message` of an S3 error document.
pub(super) fn error_body(body: &[u8]) -> Option<(String, String)> {
    let mut doc = XmlDocument::try_from(body).ok()?;
    let mut root = doc.root_element().ok()?;
    if !root.start_el().matches("Error") {
        return None;
    }
    let (mut code, mut message) = (None, String::new());
    while let Some(mut tag) = root.next_tag() {
        if tag.start_el().matches("Code") {
            code = Some(try_data(&mut tag).ok()?.into_owned());
        } else if tag.start_el().matches("Message") {
            message = try_data(&mut tag).ok()?.into_owned();
        }
    }
    Some((code?, message))
}

/// The keys of a ListObjectsV2 answer, and whether it has more (`IsTruncated`).
pub(super) fn listing_page(body: &[u8]) -> Result<ListPage, String> {
    let mut doc = XmlDocument::try_from(body).map_err(|e| e.to_string())?;
    let mut root = doc.root_element().map_err(|e| e.to_string())?;
    if !root.start_el().matches("ListBucketResult") {
        return Err("the answer is not a ListBucketResult".into());
    }
    let mut keys = Vec::new();
    let mut truncated = false;
    while let Some(mut tag) = root.next_tag() {
        if tag.start_el().matches("IsTruncated") {
            truncated = try_data(&mut tag).map_err(|e| e.to_string())?.trim() == "true";
            continue;
        }
        if !tag.start_el().matches("Contents") {
            continue;
        }
        while let Some(mut field) = tag.next_tag() {
            if field.start_el().matches("Key") {
                keys.push(
                    try_data(&mut field)
                        .map_err(|e| e.to_string())?
                        .into_owned(),
                );
            }
        }
    }
    Ok(ListPage { keys, truncated })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_and_errors_are_read_from_s3s_xml() {
        let listing = br#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name>
<Prefix>p/</Prefix><KeyCount>2</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>
<Contents><Key>p/a&amp;b.png</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified>
<Size>3</Size></Contents><Contents><Key>p/result.json</Key><Size>9</Size></Contents>
</ListBucketResult>"#;
        assert_eq!(
            listing_page(listing).unwrap(),
            ListPage {
                keys: vec!["p/a&b.png".to_string(), "p/result.json".to_string()],
                truncated: false
            }
        );
        let truncated = br#"<ListBucketResult><IsTruncated>true</IsTruncated>
<Contents><Key>k/0001</Key></Contents></ListBucketResult>"#;
        assert!(listing_page(truncated).unwrap().truncated);
        assert!(listing_page(b"<Error><Code>NoSuchBucket</Code></Error>").is_err());
        assert!(listing_page(b"not xml").is_err());
        let error = br#"<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>
<RequestId>x</RequestId></Error>"#;
        assert_eq!(
            error_body(error),
            Some((
                "SlowDown".to_string(),
                "Please reduce your request rate.".to_string()
            ))
        );
        assert_eq!(error_body(b""), None);
    }
}
