//! Fetching what a URL from an answer (or, later, a job) points at, without letting that URL
//! make the worker reach where it must not: only `https://`, never a loopback, private,
//! link-local (cloud metadata) or otherwise non-public address, checked after DNS resolution
//! and again on every redirect, with the body's size capped while it streams.
//!
//! A provider's own hosts are exempt (its base URL's host and port, and hosts configured for
//! it, exactly), so that self-hosted providers and local tests work. The addresses are checked
//! in the resolver the HTTP client connects through ([`GuardedResolver`]), so that a name that
//! resolves to a private address is refused before any connection, and a URL that names an
//! address directly is checked before the request ([`FetchRules::check`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Most redirects followed for one fetch.
const MAX_REDIRECTS: usize = 5;

/// What a fetched URL may be.
#[derive(Debug, Clone, Default)]
pub struct FetchRules {
    /// `host:port` pairs exempt from the scheme and address rules (a provider's own hosts).
    exempt: Vec<String>,
}

impl FetchRules {
    /// Rules that exempt `hosts` (each `host:port`, or a URL whose host and port are taken).
    pub fn exempting<'a>(hosts: impl IntoIterator<Item = &'a str>) -> Self {
        let exempt = hosts
            .into_iter()
            .filter_map(|h| {
                let url = if h.contains("://") {
                    Url::parse(h).ok()?
                } else {
                    Url::parse(&format!("https://{h}")).ok()?
                };
                Some(host_port(&url)?.to_ascii_lowercase())
            })
            .collect();
        Self { exempt }
    }

    fn is_exempt(&self, url: &Url) -> bool {
        host_port(url).is_some_and(|hp| self.exempt.iter().any(|e| e.eq_ignore_ascii_case(&hp)))
    }

    fn exempt_name(&self, name: &str) -> bool {
        self.exempt.iter().any(|e| {
            e.rsplit_once(':')
                .is_some_and(|(host, _)| host.trim_matches(['[', ']']).eq_ignore_ascii_case(name))
        })
    }

    /// Why `url` must not be fetched, before any connection: a scheme other than `https`, or an
    /// address that is not public. Names are checked again when they resolve.
    pub fn check(&self, url: &Url) -> Result<(), String> {
        if self.is_exempt(url) {
            return Ok(());
        }
        if url.scheme() != "https" {
            return Err(format!(
                "only https:// URLs are fetched, not {}://",
                url.scheme()
            ));
        }
        match url.host() {
            Some(url::Host::Ipv4(ip)) if !is_public(IpAddr::V4(ip)) => {
                Err(format!("{ip} is not a public address"))
            }
            Some(url::Host::Ipv6(ip)) if !is_public(IpAddr::V6(ip)) => {
                Err(format!("{ip} is not a public address"))
            }
            Some(_) => Ok(()),
            None => Err("the URL has no host".into()),
        }
    }

    /// An HTTP client that follows these rules (no credentials of any provider: downloads
    /// carry none). `timeout`: of a whole request, body included (`None`: the caller keeps it). `inner` resolves names (the system's resolver when `None`; tests give
    /// their own).
    pub fn client(
        &self,
        connect_timeout: Duration,
        timeout: Option<Duration>,
        inner: Option<Arc<dyn Resolve>>,
    ) -> reqwest::Result<reqwest::Client> {
        let rules = self.clone();
        let redirects = self.clone();
        let mut builder = reqwest::Client::builder();
        if let Some(timeout) = timeout {
            builder = builder.timeout(timeout);
        }
        builder
            .user_agent(super::http::USER_AGENT)
            .connect_timeout(connect_timeout)
            .http1_max_buf_size(super::http::READ_BUFFER)
            .dns_resolver(Arc::new(GuardedResolver { rules, inner }))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
                }
                match redirects.check(attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(why) => attempt.error(format!("a redirect refused: {why}")),
                }
            }))
            .build()
    }
}

fn host_port(url: &Url) -> Option<String> {
    let host = match url.host()? {
        url::Host::Domain(d) => d.to_string(),
        url::Host::Ipv4(ip) => ip.to_string(),
        url::Host::Ipv6(ip) => format!("[{ip}]"),
    };
    Some(format!("{host}:{}", url.port_or_known_default()?))
}

/// Whether an address is on the public internet: not loopback, private, link-local (the cloud
/// metadata service at 169.254.169.254), shared (CGNAT), unspecified, broadcast, multicast or
/// reserved, nor an IPv6 form of one of those.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public_v4(v4);
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link-local
                || (first == 0x2001 && v6.segments()[1] == 0x0db8) // documentation
                || (first == 0x0064 && v6.segments()[1] == 0xff9b) // NAT64 of any v4
                || v6 == Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 0))
        }
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240)
}

/// Resolves names for the fetch client and refuses any name that resolves to an address that
/// is not public (unless the name is one of the exempt hosts): the check sits where the client
/// connects, so that a name cannot resolve one way when checked and another when used.
struct GuardedResolver {
    rules: FetchRules,
    inner: Option<Arc<dyn Resolve>>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let exempt = self.rules.exempt_name(name.as_str());
        let host = name.as_str().to_string();
        let inner = self.inner.clone();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = match inner {
                Some(inner) => inner.resolve(name).await?.collect(),
                None => tokio::net::lookup_host((host.as_str(), 0)).await?.collect(),
            };
            if !exempt && let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
                return Err(
                    format!("{host} resolves to {}, not a public address", bad.ip()).into(),
                );
            }
            if addrs.is_empty() {
                return Err(format!("{host} resolves to no address").into());
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["93.184.216.34", "8.8.8.8", "2606:4700::1111"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn urls_are_https_to_public_addresses_unless_exempt() {
        let rules = FetchRules::exempting(["http://127.0.0.1:8080/v1", "files.example:9000"]);
        let check = |u: &str| rules.check(&Url::parse(u).unwrap());
        assert!(check("https://images.example/a.png").is_ok());
        assert!(
            check("http://images.example/a.png")
                .unwrap_err()
                .contains("https")
        );
        assert!(
            check("https://10.0.0.1/a.png")
                .unwrap_err()
                .contains("public")
        );
        assert!(check("https://[::1]/a.png").unwrap_err().contains("public"));
        assert!(check("https://169.254.169.254/latest/meta-data").is_err());
        assert!(check("file:///etc/passwd").is_err());
        // The provider's own host and port, exactly.
        assert!(check("http://127.0.0.1:8080/_fake/files/1.png").is_ok());
        assert!(check("http://127.0.0.1:8081/x").is_err());
        assert!(check("https://files.example:9000/x").is_ok());
        assert!(check("https://files.example/x").is_ok(), "a public name");
    }

    /// A resolver that answers every name with the given addresses, never the network.
    struct Fixed(Vec<IpAddr>);

    impl Resolve for Fixed {
        fn resolve(&self, _: Name) -> Resolving {
            let addrs: Vec<SocketAddr> = self.0.iter().map(|ip| SocketAddr::new(*ip, 0)).collect();
            Box::pin(async move { Ok(Box::new(addrs.into_iter()) as Addrs) })
        }
    }

    fn guarded(exempt: &[&str], addrs: &[&str]) -> GuardedResolver {
        GuardedResolver {
            rules: FetchRules::exempting(exempt.iter().copied()),
            inner: Some(Arc::new(Fixed(
                addrs.iter().map(|a| a.parse().unwrap()).collect(),
            ))),
        }
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_a_private_address_is_refused() {
        let name = |n: &str| n.parse::<Name>().unwrap();
        // One private address among public ones is enough to refuse.
        let r = guarded(&[], &["93.184.216.34", "10.0.0.7"]);
        let err = r.resolve(name("images.example")).await.err().unwrap();
        assert!(err.to_string().contains("10.0.0.7"), "{err}");
        let r = guarded(&[], &["93.184.216.34"]);
        assert!(r.resolve(name("images.example")).await.is_ok());
        // An exempt host may resolve to anything.
        let r = guarded(&["files.internal:443"], &["10.0.0.7"]);
        assert!(r.resolve(name("files.internal")).await.is_ok());
    }
}
