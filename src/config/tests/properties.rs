//! Properties of the settings' helpers, over generated input.

use proptest::prelude::*;

proptest! {
    /// Whatever a password holds (`@`, `:`, `/`, `?`, `#`, `://`, any text) and whatever
    /// follows the host (a path with its own `@`, a query), the password is not shown.
    #[test]
    fn redaction_removes_the_password_of_any_url(
        scheme in "[a-z][a-z0-9+.-]{0,8}",
        user in "[a-z0-9._~%-]{0,10}",
        // Marked all along, so that a piece after an `@` or a `/` would show.
        password in "(SECRET\\PC{0,5}){1,4}",
        host in "[a-z0-9.-]{1,15}(:[0-9]{1,5})?",
        rest in "(/[a-z0-9%._~/@?#=&:-]{0,20})?",
    ) {
        let url = format!("{scheme}://{user}:{password}@{host}{rest}");
        let shown = crate::config::redact_url(&url);
        prop_assert!(!shown.contains("SECRET"), "{url} -> {shown}");
        let kept = format!("{scheme}://");
        prop_assert!(shown.starts_with(&kept), "{url} -> {shown}");
    }

    /// A URL without user information is shown as it is.
    #[test]
    fn a_url_without_a_password_is_kept(
        url in "[a-z]{1,6}://[a-z0-9.-]{1,15}(:[0-9]{1,5})?(/[a-z0-9%._~/?#=&-]{0,20})?",
    ) {
        prop_assert_eq!(crate::config::redact_url(&url), url);
    }
}
