//! `multipart/form-data` request bodies (RFC 7578), for the APIs that take nothing else
//! (Stability AI; image edits). Built whole in memory: its parts are a prompt's fields and, at
//! most, a few images the request holds anyway.

use bytes::{BufMut, Bytes, BytesMut};

/// A body being written.
#[derive(Debug)]
pub struct Form {
    boundary: String,
    body: BytesMut,
}

impl Default for Form {
    fn default() -> Self {
        Self::new()
    }
}

impl Form {
    pub fn new() -> Self {
        // 128 random bits: no field's value will hold it by chance.
        Self {
            boundary: format!("imagegen-{:032x}", fastrand::u128(..)),
            body: BytesMut::with_capacity(1024),
        }
    }

    /// A text field.
    pub fn text(&mut self, name: &str, value: &str) -> &mut Self {
        self.head(name, None, None);
        self.body.put_slice(value.as_bytes());
        self.body.put_slice(b"\r\n");
        self
    }

    /// A file field.
    pub fn file(
        &mut self,
        name: &str,
        filename: &str,
        content_type: &str,
        data: &[u8],
    ) -> &mut Self {
        self.head(name, Some(filename), Some(content_type));
        self.body.put_slice(data);
        self.body.put_slice(b"\r\n");
        self
    }

    fn head(&mut self, name: &str, filename: Option<&str>, content_type: Option<&str>) {
        self.body.put_slice(b"--");
        self.body.put_slice(self.boundary.as_bytes());
        self.body
            .put_slice(b"\r\nContent-Disposition: form-data; name=\"");
        self.body.put_slice(escape(name).as_bytes());
        self.body.put_slice(b"\"");
        if let Some(filename) = filename {
            self.body.put_slice(b"; filename=\"");
            self.body.put_slice(escape(filename).as_bytes());
            self.body.put_slice(b"\"");
        }
        if let Some(content_type) = content_type {
            self.body.put_slice(b"\r\nContent-Type: ");
            self.body.put_slice(content_type.as_bytes());
        }
        self.body.put_slice(b"\r\n\r\n");
    }

    /// The `Content-Type` header of the body.
    pub fn content_type(&self) -> String {
        format!("multipart/form-data; boundary={}", self.boundary)
    }

    /// The body, closed.
    pub fn finish(mut self) -> Bytes {
        self.body.put_slice(b"--");
        self.body.put_slice(self.boundary.as_bytes());
        self.body.put_slice(b"--\r\n");
        self.body.freeze()
    }
}

/// A name or file name inside quotes, as browsers write them (the HTML standard): `"` as `%22`,
/// and no line breaks.
fn escape(s: &str) -> String {
    s.replace('"', "%22")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_files_are_framed_by_the_boundary() {
        let mut form = Form::new();
        form.text("prompt", "a \"red\" fox\r\non two lines")
            .text("na\"me", "x")
            .file("image", "in.png", "image/png", b"\x89PNG");
        let content_type = form.content_type();
        let boundary = content_type
            .strip_prefix("multipart/form-data; boundary=")
            .unwrap()
            .to_string();
        let body = form.finish();
        let text = String::from_utf8_lossy(&body);
        assert!(text.starts_with(&format!("--{boundary}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na \"red\" fox\r\non two lines\r\n")));
        assert!(text.contains("name=\"na%22me\""));
        assert!(text.contains(
            "name=\"image\"; filename=\"in.png\"\r\nContent-Type: image/png\r\n\r\n\u{fffd}PNG\r\n"
        ));
        assert!(text.ends_with(&format!("--{boundary}--\r\n")));
        assert_eq!(text.matches(&format!("--{boundary}\r\n")).count(), 3);
    }
}
