use super::*;

#[tokio::test]
async fn a_listing_longer_than_a_page_says_so_and_pages_on() {
    let (_dir, store) = tests::store();
    let many = super::super::LIST_PAGE + 5;
    for i in 0..many {
        let key = format!("spend/b/{i:05}");
        store
            .put(PutObject::new(
                &key,
                Bytes::new(),
                "application/octet-stream",
            ))
            .await
            .unwrap();
    }
    let first = store.list("spend/b/", None).await.unwrap();
    assert!(first.truncated);
    assert_eq!(first.keys.len(), super::super::LIST_PAGE);
    let all = super::super::list_all(&store, "spend/b/", None)
        .await
        .unwrap();
    assert_eq!(all.len(), many);
    assert_eq!(all.last().map(String::as_str), Some("spend/b/01004"));
}

#[test]
fn a_directory_the_worker_may_not_write_is_denied_not_unavailable() {
    let e = io_error(
        "put",
        "k",
        std::io::Error::from(ErrorKind::PermissionDenied),
    );
    assert_eq!(e.kind, StorageErrorKind::Denied);
    assert!(matches!(
        crate::domain::error::Failure::from(e),
        crate::domain::error::Failure::Stop { .. }
    ));
    let e = io_error("put", "k", std::io::Error::from(ErrorKind::TimedOut));
    assert!(crate::domain::error::Failure::from(e).is_retryable());
}
