use super::*;
use crate::buffers::BufferPool;
use crate::openai::answer::ImageBytes;

/// What an answer reads as: each image's bytes (or URL), its revised prompt, and the usage.
type Read = (
    Vec<(Result<Vec<u8>, String>, Option<String>)>,
    Option<String>,
);

fn summary(answer: Result<Answer, Failure>) -> Result<Read, String> {
    let answer = answer.map_err(|f| f.message().to_string())?;
    Ok((
        answer
            .images
            .into_iter()
            .map(|(image, revised)| {
                let image = match image {
                    ImageBytes::Decoded(bytes) => Ok(bytes.to_vec()),
                    ImageBytes::Url(url) => Err(url),
                };
                (image, revised)
            })
            .collect(),
        answer.usage.map(|u| u.to_string()),
    ))
}

fn whole(body: &[u8]) -> Result<Read, String> {
    let pool = BufferPool::unbounded();
    let mut buf = pool.try_take(body.len()).unwrap();
    buf.extend_from_slice(body);
    summary(decode_answer(buf))
}

fn streamed(body: &[u8], cuts: &[usize]) -> Result<Read, String> {
    let pool = BufferPool::unbounded();
    let mut reader = AnswerReader::new(pool.try_take(body.len()).unwrap());
    let mut from = 0;
    for &cut in cuts.iter().chain([&body.len()]) {
        let cut = cut.clamp(from, body.len());
        reader
            .push(&body[from..cut])
            .map_err(|f| f.message().to_string())?;
        from = cut;
    }
    summary(reader.finish())
}

fn b64(data: &[u8]) -> String {
    BASE64.encode_to_string(data)
}

fn answers() -> Vec<String> {
    let image: Vec<u8> = (0..3000u32).map(|i| (i * 7 % 251) as u8).collect();
    let small = b64(b"\x89PNG tiny");
    let big = b64(&image);
    let escaped = big.replacen('/', "\\/", 3);
    vec![
        format!(
            r#"{{"created":1,"data":[{{"b64_json":"{big}","revised_prompt":"a fox"}}],"usage":{{"input_tokens":5}}}}"#
        ),
        format!(
            r#"{{"data":[{{"b64_json" : "{small}"}},{{"b64_json":"{big}"}}],"output_format":"png"}}"#
        ),
        format!(r#"{{"data":[{{"b64_json":"{escaped}"}}]}}"#),
        format!(
            r#"{{"data":[{{"b64_json":null,"url":"https://x/y.png"}},{{"b64_json":"{small}"}}]}}"#
        ),
        format!(r#"{{"usage":{{"\"b64_json\"":1}},"data":[{{"b64_json":"{small}"}}]}}"#),
        format!(r#"{{"data":[{{"b64_json":"{small}"}}],"note":"\"b64_json\":\"AAAA\""}}"#),
        r#"{"data":[{"b64_json":"AA==AA=="}]}"#.to_string(),
        r#"{"data":[{"b64_json":"AAA"}]}"#.to_string(),
        r#"{"data":[{"b64_json":"AA!A"}]}"#.to_string(),
        r#"{"data":[{"b64_json":"AAAA"#.to_string(),
        r#"{"data":[]}"#.to_string(),
        "not json".to_string(),
    ]
}

#[test]
fn every_answer_reads_the_same_streamed_in_any_two_pieces() {
    for answer in answers() {
        let body = answer.as_bytes();
        let expected = whole(body);
        // Every place a chunk can end, for the short answers; a spread of them for the rest.
        let step = (body.len() / 200).max(1);
        for cut in (0..=body.len()).step_by(step) {
            let got = streamed(body, &[cut]);
            match (&expected, &got) {
                (Ok(e), Ok(g)) => assert_eq!(e, g, "cut at {cut} of {answer:.80}"),
                (Err(_), Err(_)) => {}
                _ => panic!("cut at {cut} of {answer:.80}: {expected:?} vs {got:?}"),
            }
        }
    }
}

#[test]
fn answers_read_the_same_in_small_random_pieces() {
    let mut rng = fastrand::Rng::with_seed(3);
    for answer in answers() {
        let body = answer.as_bytes();
        let expected = whole(body).is_ok();
        for _ in 0..50 {
            let mut cuts: Vec<usize> = (0..rng.usize(1..40))
                .map(|_| rng.usize(..=body.len()))
                .collect();
            cuts.sort_unstable();
            assert_eq!(
                streamed(body, &cuts).is_ok(),
                expected,
                "{answer:.80} cut at {cuts:?}"
            );
            if expected {
                assert_eq!(streamed(body, &cuts), whole(body));
            }
        }
    }
}

#[test]
fn the_buffer_holds_the_images_alone() {
    let image: Vec<u8> = (0..30_000u32).map(|i| (i % 256) as u8).collect();
    let body = format!(r#"{{"data":[{{"b64_json":"{}"}}]}}"#, b64(&image));
    let pool = BufferPool::unbounded();
    let mut reader = AnswerReader::new(pool.try_take(image.len()).unwrap());
    for chunk in body.as_bytes().chunks(4096) {
        reader.push(chunk).unwrap();
    }
    assert!(reader.skeleton.len() < 64, "{}", reader.skeleton.len());
    assert_eq!(reader.out.len(), image.len());
    let answer = reader.finish().unwrap();
    let ImageBytes::Decoded(bytes) = &answer.images[0].0 else {
        panic!("decoded")
    };
    assert_eq!(&bytes[..], &image[..]);
}
