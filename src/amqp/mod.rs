//! The AMQP edge: connections, the topology, confirmed publishing, result listeners and the
//! worker's own headers. The consumer loop that turns job outcomes into acks lives with the
//! worker ([`crate::worker`]).

pub mod headers;
pub mod publisher;
pub mod results;
pub mod topology;

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};
use secrecy::ExposeSecret;

use crate::config::Settings;

#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("could not connect to the broker at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: lapin::Error,
    },
    #[error("amqp.url is not a valid AMQP URI: {0}")]
    InvalidUrl(String),
    #[error("timed out after {0:?} connecting to the broker at {1}")]
    ConnectTimeout(Duration, String),
    #[error("no broker address answered: {reasons}")]
    NoBroker {
        /// Each address tried (its password masked), and why it failed.
        reasons: String,
        /// Every address refused the worker for a reason that retrying cannot fix (credentials,
        /// virtual host): start-up must fail.
        unfixable: bool,
    },
    #[error("broker: {0}")]
    Protocol(#[from] lapin::Error),
    #[error("the broker did not accept the publish to {target}: {reason}")]
    NotConfirmed { target: String, reason: String },
}

/// The broker's addresses: `amqp.url` holds one, or several (the nodes of a cluster) separated
/// by commas (a password with a comma has it percent-encoded).
pub fn addresses(url: &str) -> Vec<&str> {
    url.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

/// The order this process tries the addresses in (shuffled once, so that a fleet spreads over
/// the nodes), and where the next connection starts: after the address last connected to, so
/// that a lost connection moves to the next node.
struct Rotation {
    order: Vec<usize>,
    next: std::sync::atomic::AtomicUsize,
}

/// The rotation of each list of addresses this process connects to (by the list itself).
static ROTATIONS: std::sync::OnceLock<
    std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<Rotation>>>,
> = std::sync::OnceLock::new();

fn rotation(urls: &[&str]) -> std::sync::Arc<Rotation> {
    let mut all = ROTATIONS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    all.entry(urls.join(","))
        .or_insert_with(|| {
            let mut order: Vec<usize> = (0..urls.len()).collect();
            fastrand::shuffle(&mut order);
            std::sync::Arc::new(Rotation {
                order,
                next: std::sync::atomic::AtomicUsize::new(0),
            })
        })
        .clone()
}

/// Whether a failed connection failed for a reason retrying cannot fix: the broker refused the
/// credentials, or the virtual host does not exist (or the user may not use it).
fn unfixable(error: &lapin::Error) -> bool {
    let text = format!("{error:?} {error}").to_lowercase();
    [
        "access_refused",
        "access refused",
        "not_allowed",
        "login was refused",
        "vhost",
    ]
    .iter()
    .any(|w| text.contains(w))
}

/// Opens a connection to one of the broker's addresses (in this process's order, starting
/// after the one last used), naming it in the management UI with the address it went to, with
/// `amqp.frame_max` unless the URL sets `frame_max` itself.
pub async fn connect(settings: &Settings, role: &str) -> Result<Connection, AmqpError> {
    crate::install_crypto_provider();
    let secret = settings.amqp.url.expose_secret();
    let urls = addresses(secret);
    if urls.is_empty() {
        return Err(AmqpError::InvalidUrl(String::new()));
    }
    let rotation = rotation(&urls);
    let start = rotation.next.load(std::sync::atomic::Ordering::Relaxed);
    let mut reasons = Vec::new();
    let mut all_unfixable = true;
    for step in 0..urls.len() {
        let at = (start + step) % urls.len();
        let index = rotation.order[at];
        match connect_one(settings, role, urls[index]).await {
            Ok(connection) => {
                rotation
                    .next
                    .store(at + 1, std::sync::atomic::Ordering::Relaxed);
                return Ok(connection);
            }
            Err(AmqpError::InvalidUrl(url)) => return Err(AmqpError::InvalidUrl(url)),
            Err(e) => {
                let fixed = matches!(&e, AmqpError::Connect { source, .. } if unfixable(source));
                all_unfixable &= fixed;
                if urls.len() == 1 {
                    return Err(e);
                }
                reasons.push(e.to_string());
            }
        }
    }
    // The next attempt starts with the next address.
    rotation
        .next
        .store(start + 1, std::sync::atomic::Ordering::Relaxed);
    Err(AmqpError::NoBroker {
        reasons: reasons.join("; "),
        unfixable: all_unfixable,
    })
}

/// Whether a failed start-up may be retried: it may, unless every address refused the worker
/// for a reason that retrying cannot fix (or the URL is not one).
pub fn worth_retrying(error: &anyhow::Error) -> bool {
    match error.downcast_ref::<AmqpError>() {
        Some(AmqpError::NoBroker { unfixable, .. }) => !unfixable,
        Some(AmqpError::Connect { source, .. }) => !unfixable(source),
        Some(AmqpError::ConnectTimeout(..)) => true,
        _ => false,
    }
}

async fn connect_one(settings: &Settings, role: &str, url: &str) -> Result<Connection, AmqpError> {
    let redacted = crate::config::redact_url(url);
    let mut uri: AMQPUri = url
        .parse()
        // The parser's message may quote the URL, password included: it is not passed on.
        .map_err(|_: String| AmqpError::InvalidUrl(redacted.clone()))?;
    uri.query.frame_max.get_or_insert(settings.amqp.frame_max);
    let name = format!(
        "{} {role} pid={} node={}:{}",
        settings.amqp.connection_name,
        std::process::id(),
        uri.authority.host,
        uri.authority.port
    );
    let properties = ConnectionProperties::default().with_connection_name(LongString::from(name));
    let timeout = Duration::from_secs(settings.amqp.connect_timeout_secs);
    match tokio::time::timeout(timeout, Connection::connect_uri(uri, properties)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(source)) => Err(AmqpError::Connect {
            url: redacted,
            source,
        }),
        Err(_) => Err(AmqpError::ConnectTimeout(timeout, redacted)),
    }
}

/// Builds an argument table from `(name, value)` pairs.
pub(crate) fn table(entries: impl IntoIterator<Item = (&'static str, AMQPValue)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(k.into(), v);
    }
    t
}

pub(crate) fn string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}
