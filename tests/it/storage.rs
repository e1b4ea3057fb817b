//! The object stores against the real S3 server.

use crate::helpers::{Store, TestEnv};

/// Uploads are signed with the SHA-256 the worker computed for the event (no second hash of the
/// bytes), and the S3 server checks the body against it: a wrong digest is refused.
#[tokio::test]
async fn s3_uploads_carry_the_callers_sha256_and_the_server_checks_it() {
    use imagegen::storage::PutObject;
    use sha2::Digest;

    let env = TestEnv::new(Store::S3).await;
    let store = env.store().await;
    let data = bytes::Bytes::from_static(b"\x89PNG\r\n\x1a\nsigned with the caller's digest");
    let right = hex::encode(sha2::Sha256::digest(&data));
    let wrong = hex::encode(sha2::Sha256::digest(b"something else"));
    let key = format!("it/{}/digest.png", env.id);
    let put = |sha256| PutObject {
        key: &key,
        data: data.clone(),
        content_type: "image/png",
        metadata: &[],
        sha256,
    };
    let refused = store.put(put(Some(&wrong))).await;
    assert!(
        refused.is_err(),
        "a body that does not match its digest must be refused"
    );
    assert!(store.get(&key).await.unwrap().is_none());
    store
        .put(put(Some(&right)))
        .await
        .expect("the right digest is accepted");
    assert_eq!(store.get(&key).await.unwrap().unwrap(), data);
    let info = store.head(&key).await.unwrap().expect("stored");
    assert_eq!(
        info.sha256.as_deref(),
        Some(right.as_str()),
        "the digest is kept as the object's metadata"
    );
    store.delete(&key).await.unwrap();
    env.cleanup().await;
}
