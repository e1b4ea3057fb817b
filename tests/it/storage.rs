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

/// Every operation of the S3 store against the real server: keys that need escaping, metadata,
/// listings with `start_after`, HEAD and GET of missing objects, deletes, presigned URLs that a
/// plain HTTP client can use, and the start-up check against a bucket that does not exist.
#[tokio::test]
async fn s3_store_operations_work_against_the_server() {
    use imagegen::storage::{PutObject, StorageErrorKind, list_all};

    let env = TestEnv::new(Store::S3).await;
    let store = env.store().await;
    store.check().await.expect("the test bucket is there");
    let dir = format!("it/{}/ops", env.id);
    let names = [
        "0.png",
        "a b+c=d&e.png",
        "caf\u{e9}/\u{1f600}.webp",
        "z~_-.json",
    ];
    for (i, name) in names.iter().enumerate() {
        let metadata = [("job-id", format!("job {i}"))];
        store
            .put(PutObject {
                key: &format!("{dir}/{name}"),
                data: bytes::Bytes::from(vec![i as u8; 10 + i]),
                content_type: "image/png",
                metadata: &metadata,
                sha256: None,
            })
            .await
            .unwrap_or_else(|e| panic!("put {name}: {e}"));
    }
    let mut want: Vec<String> = names.iter().map(|n| format!("{dir}/{n}")).collect();
    want.sort();
    let page = store.list(&format!("{dir}/"), None).await.unwrap();
    assert_eq!(page.keys, want);
    assert!(!page.truncated, "the store says there is nothing more");
    assert_eq!(
        store
            .list(&format!("{dir}/"), Some(&want[1]))
            .await
            .unwrap()
            .keys,
        want[2..].to_vec(),
        "start_after skips up to and including the key"
    );
    assert_eq!(
        list_all(&*store, &format!("{dir}/"), None).await.unwrap(),
        want
    );
    assert!(
        store
            .list(&format!("{dir}/none/"), None)
            .await
            .unwrap()
            .keys
            .is_empty()
    );

    let empty = format!("{dir}-empty/nothing");
    store
        .put(PutObject {
            key: &empty,
            data: bytes::Bytes::new(),
            content_type: "application/octet-stream",
            metadata: &[],
            sha256: None,
        })
        .await
        .expect("an empty object");
    assert_eq!(store.get(&empty).await.unwrap().unwrap().len(), 0);
    store.delete(&empty).await.unwrap();

    let key = format!("{dir}/{}", names[2]);
    assert_eq!(store.get(&key).await.unwrap().unwrap(), vec![2u8; 12]);
    let info = store.head(&key).await.unwrap().expect("stored");
    assert_eq!(info.size, 12);
    assert_eq!(info.content_type.as_deref(), Some("image/png"));
    assert!(
        store
            .get(&format!("{dir}/missing"))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .head(&format!("{dir}/missing"))
            .await
            .unwrap()
            .is_none()
    );

    let url = store
        .presigned_get(&key, std::time::Duration::from_secs(60))
        .await
        .unwrap()
        .expect("S3 presigns");
    let fetched = reqwest::get(&url).await.unwrap();
    assert!(fetched.status().is_success(), "{url}: {}", fetched.status());
    assert_eq!(fetched.bytes().await.unwrap(), vec![2u8; 12]);

    for k in &want {
        store.delete(k).await.unwrap();
    }
    store
        .delete(&format!("{dir}/missing"))
        .await
        .expect("deleting nothing is fine");
    assert!(
        store
            .list(&format!("{dir}/"), None)
            .await
            .unwrap()
            .keys
            .is_empty()
    );

    let mut other = env.settings.clone();
    other.storage.bucket = format!("imagegen-missing-{}", env.id);
    let missing = imagegen::storage::from_settings(&other).await.unwrap();
    let err = missing.check().await.expect_err("no such bucket");
    assert!(err.to_string().contains("404"), "{err}");
    assert_eq!(err.kind, StorageErrorKind::NotFound);
    let mut wrong = env.settings.clone();
    wrong.storage.secret_access_key = "not-the-secret".to_string().into();
    let refused = imagegen::storage::from_settings(&wrong).await.unwrap();
    let err = refused
        .list(&format!("{dir}/"), None)
        .await
        .expect_err("bad signature");
    assert!(err.to_string().contains("HTTP 403"), "{err}");
    // A refused key is no outage: the worker must not retry it as one.
    assert_eq!(err.kind, StorageErrorKind::Denied);
    assert!(!imagegen::domain::error::Failure::from(err).is_retryable());
    let err = refused
        .check()
        .await
        .expect_err("bad signature at start-up");
    assert!(err.to_string().contains("HTTP 403"), "{err}");
    env.cleanup().await;
}

/// With `storage.endpoint_url` empty, the endpoint is found where the AWS SDK's S3 client would
/// find it (`AWS_ENDPOINT_URL_S3`), not in AWS's own domain.
#[tokio::test]
async fn s3_endpoint_comes_from_the_sdks_environment_when_the_config_has_none() {
    let env = TestEnv::new(Store::S3).await;
    let mut settings = env.settings.clone();
    let url = std::mem::take(&mut settings.storage.endpoint_url);
    assert!(!url.is_empty(), "the test store has an endpoint");
    // SAFETY: nextest runs each test in its own process, and every other test sets
    // storage.endpoint_url, which wins over the variable.
    unsafe { std::env::set_var("AWS_ENDPOINT_URL_S3", &url) };
    let store = imagegen::storage::from_settings(&settings).await.unwrap();
    let checked = store.check().await;
    unsafe { std::env::remove_var("AWS_ENDPOINT_URL_S3") };
    checked.expect("the bucket is reached through AWS_ENDPOINT_URL_S3");
    env.cleanup().await;
}
