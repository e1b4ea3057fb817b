use std::os::unix::fs::PermissionsExt;

use super::*;

fn object(key: &str) -> PutObject<'_> {
    PutObject::new(key, Bytes::from_static(b"png"), "image/png")
}

#[tokio::test]
async fn a_symbolic_link_under_the_root_is_never_followed() {
    let (dir, store) = tests::store();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"do not read").unwrap();
    std::fs::create_dir_all(dir.path().join("images")).unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("images/b")).unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("secret"),
        dir.path().join("images/file.png"),
    )
    .unwrap();
    for key in ["images/b/secret", "images/file.png"] {
        let e = store.get(key).await.unwrap_err();
        assert_eq!(e.kind, StorageErrorKind::Invalid, "{key}");
        assert!(store.head(key).await.is_err(), "{key}");
    }
    assert!(store.put(object("images/b/j/0.png")).await.is_err());
    assert!(
        store
            .put_if_absent(object("images/b/j/1.png"))
            .await
            .is_err()
    );
    assert!(store.list("images/b/", None).await.is_err());
    assert!(
        !outside.path().join("j").exists(),
        "nothing written outside"
    );
}

#[tokio::test]
async fn objects_are_owner_only_and_dot_ids_are_listed() {
    let (dir, store) = tests::store();
    store.put(object("images/_/.hidden/0.png")).await.unwrap();
    assert!(
        store
            .put_if_absent(object("images/_/.hidden/lease"))
            .await
            .unwrap()
    );
    let mode = |p: &str| {
        std::fs::metadata(dir.path().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("images/_/.hidden/0.png"), 0o600);
    assert_eq!(mode("images/_/.hidden/lease"), 0o600);
    assert_eq!(mode("images/_/.hidden"), 0o700);
    let listed = store.list("images/_/.hidden/", None).await.unwrap().keys;
    assert_eq!(listed, ["images/_/.hidden/0.png", "images/_/.hidden/lease"]);
}

#[tokio::test]
async fn the_check_cleans_crashed_writes_and_probes_under_the_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::with_prefix(dir.path(), "tenant/").unwrap();
    let jobs = dir.path().join("tenant/images/_/j");
    std::fs::create_dir_all(&jobs).unwrap();
    let stale = jobs.join(".~0.png.tmp-0000000000000001");
    let fresh = jobs.join(".~1.png.tmp-0000000000000002");
    std::fs::write(&stale, b"half").unwrap();
    std::fs::write(&fresh, b"half").unwrap();
    let old = SystemTime::now() - STALE_TEMP - Duration::from_secs(60);
    std::fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(old)
        .unwrap();
    store.check().await.unwrap();
    assert!(!stale.exists(), "a crashed write's leftover is removed");
    assert!(fresh.exists(), "a write that may be in progress is kept");
    // Nothing was written beside the prefix.
    let beside: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(beside, ["tenant"]);
}
