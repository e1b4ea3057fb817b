use super::*;
use crate::buffers::BufferPool;

fn read(text: &str) -> Result<Answer, Failure> {
    let pool = BufferPool::unbounded();
    let mut buf = pool.try_take(text.len()).expect("an unbounded pool");
    buf.extend_from_slice(text.as_bytes());
    decode_answer(buf)
}

fn b64(data: &[u8]) -> String {
    base64_simd::STANDARD.encode_to_string(data)
}

#[test]
fn images_are_taken_from_inline_data_parts_among_text_parts() {
    let png = b"\x89PNG\r\n\x1a\n-pixels-";
    let body = format!(
        r#"{{"candidates":[{{"content":{{"role":"model","parts":[
            {{"text":"Here is your fox."}},
            {{"inlineData":{{"mimeType":"image/png","data":"{}"}}}},
            {{"inline_data":{{"mime_type":"image/jpeg","data":"{}"}}}}]}},
            "finishReason":"STOP","index":0}}],
          "usageMetadata":{{"promptTokenCount":9,"candidatesTokenCount":1290}},
          "modelVersion":"gemini-2.5-flash-image","responseId":"r-1"}}"#,
        b64(png),
        b64(b"\xff\xd8\xffjpeg")
    );
    let answer = read(&body).unwrap();
    assert_eq!(answer.images.len(), 2);
    assert_eq!(&answer.images[0].data[..], png);
    assert_eq!(answer.images[0].mime_type.as_deref(), Some("image/png"));
    assert_eq!(&answer.images[1].data[..], b"\xff\xd8\xffjpeg");
    assert_eq!(answer.text.as_deref(), Some("Here is your fox."));
    assert_eq!(answer.usage.unwrap()["candidatesTokenCount"], 1290);
    assert_eq!(
        answer.model_version.as_deref(),
        Some("gemini-2.5-flash-image")
    );
    assert_eq!(answer.response_id.as_deref(), Some("r-1"));
}

#[test]
fn escaped_base64_and_thought_parts_are_read_right() {
    // A JSON writer may escape the slash; the parser unescapes it into a copy.
    let data = [0xfbu8, 0xff, 0xbf, 1, 2, 3];
    let escaped = b64(&data).replace('/', "\\/");
    assert!(escaped.contains("\\/"));
    let body = format!(
        r#"{{"candidates":[{{"content":{{"parts":[
            {{"thought":true,"inlineData":{{"mimeType":"image/png","data":"{}"}}}},
            {{"inlineData":{{"mimeType":"image/png","data":"{escaped}"}}}}]}}}}]}}"#,
        b64(b"draft")
    );
    let answer = read(&body).unwrap();
    assert_eq!(answer.images.len(), 1, "the draft is not the answer");
    assert_eq!(&answer.images[0].data[..], &data);
}

#[test]
fn refusals_on_http_200_are_content_policy_failures_never_successes() {
    for (body, code) in [
        (
            r#"{"promptFeedback":{"blockReason":"PROHIBITED_CONTENT"},"usageMetadata":{"promptTokenCount":8}}"#,
            "PROHIBITED_CONTENT",
        ),
        (
            r#"{"candidates":[{"finishReason":"IMAGE_SAFETY","finishMessage":"Unable to show the generated image."}]}"#,
            "IMAGE_SAFETY",
        ),
        (
            r#"{"candidates":[{"content":{"parts":[{"text":"I can't make that."}]},"finishReason":"NO_IMAGE"}]}"#,
            "NO_IMAGE",
        ),
        (
            r#"{"candidates":[{"content":{"parts":[]},"finishReason":"SAFETY"}]}"#,
            "SAFETY",
        ),
    ] {
        let failure = read(body).unwrap_err();
        assert_eq!(failure.kind(), Some(ErrorKind::ContentPolicy), "{body}");
        assert_eq!(failure.detail().code.as_deref(), Some(code));
        assert!(!failure.is_retryable());
    }
    let failure = read(r#"{"candidates":[{"content":{"parts":[{"text":"I can't make that."}]},"finishReason":"NO_IMAGE"}]}"#).unwrap_err();
    assert!(
        failure.message().contains("I can't make that."),
        "{failure}"
    );
}

#[test]
fn an_answer_without_an_image_for_any_other_reason_fails_and_says_what_came() {
    for body in [
        r#"{"candidates":[{"content":{"parts":[{"text":"Which fox do you mean?"}]},"finishReason":"STOP"}]}"#,
        r#"{"candidates":[{"finishReason":"MAX_TOKENS"}]}"#,
        r#"{"candidates":[{"content":{"parts":[{"inlineData":{"mimeType":"text/plain","data":"aGk="}}]}}]}"#,
        r#"{}"#,
    ] {
        let failure = read(body).unwrap_err();
        assert_eq!(failure.kind(), Some(ErrorKind::InvalidRequest), "{body}");
        assert!(failure.message().contains("without an image"), "{failure}");
    }
    let failure = read(r#"{"candidates":[{"content":{"parts":[{"text":"Which fox do you mean?"}]},"finishReason":"STOP"}]}"#).unwrap_err();
    assert!(failure.message().contains("Which fox"), "{failure}");
}

#[test]
fn broken_answers_are_billed_failures() {
    for body in [
        "not json",
        r#"{"candidates":[{"content":{"parts":[{"inlineData":{"mimeType":"image/png","data":"%%%%"}}]}}]}"#,
    ] {
        let failure = read(body).unwrap_err();
        assert!(failure.possibly_billed(), "{body}: {failure}");
    }
}
