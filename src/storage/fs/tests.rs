use super::*;

/// A store in a directory of its own (which lives as long as the guard).
pub(super) fn store() -> (tempfile::TempDir, FsStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::new(dir.path()).unwrap();
    (dir, store)
}

#[tokio::test]
async fn writes_reads_lists_and_refuses_escaping_keys() {
    let (_dir, store) = store();
    store.check().await.unwrap();
    let put = |key: &'static str| PutObject {
        key,
        data: Bytes::from_static(b"png"),
        content_type: "image/png",
        metadata: &[],
        sha256: None,
    };
    store.put(put("images/_/j1/0.png")).await.unwrap();
    store.put(put("images/_/j1/1.png")).await.unwrap();
    assert_eq!(
        store.get("images/_/j1/0.png").await.unwrap().unwrap(),
        Bytes::from_static(b"png")
    );
    assert_eq!(store.get("images/_/j1/9.png").await.unwrap(), None);
    assert_eq!(
        store.head("images/_/j1/1.png").await.unwrap().unwrap().size,
        3
    );
    assert_eq!(
        store.list("images/_/j1/", None).await.unwrap(),
        ListPage {
            keys: vec![
                "images/_/j1/0.png".to_string(),
                "images/_/j1/1.png".to_string()
            ],
            truncated: false
        }
    );
    assert!(
        store
            .list("images/_/none/", None)
            .await
            .unwrap()
            .keys
            .is_empty()
    );
    let escape = store.put(put("../escape.png")).await.unwrap_err();
    assert_eq!(escape.kind, StorageErrorKind::Invalid);
    assert!(store.put(put("/abs.png")).await.is_err());
    assert!(store.uri("images/_/j1/0.png").starts_with("file:///"));
}
