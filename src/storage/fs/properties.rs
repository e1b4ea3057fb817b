use proptest::prelude::*;

use super::*;

proptest! {
    /// Any key, however hostile, is refused or names a file below the store's root: no
    /// `..`, no absolute path, no root or prefix of a drive.
    #[test]
    fn a_key_is_refused_or_names_a_file_under_the_root(
        key in prop_oneof![
            "[a-z./\\\\_]{0,12}",
            "(\\.\\.|\\.|[a-z]{1,3}|)(/(\\.\\.|\\.|[a-z]{1,3}|)){0,5}",
            "/?\\PC{0,16}",
        ],
    ) {
        let (dir, store) = tests::store();
        if let Ok(path) = store.path("put", &key) {
            let below = path.strip_prefix(dir.path());
            prop_assert!(below.is_ok(), "{key:?} -> {path:?}");
            prop_assert!(
                below.unwrap().components().all(|c| matches!(c, Component::Normal(_))),
                "{key:?} -> {path:?}"
            );
        }
    }
}
