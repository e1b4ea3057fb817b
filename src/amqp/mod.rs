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
    #[error("broker: {0}")]
    Protocol(#[from] lapin::Error),
    #[error("the broker did not accept the publish to {target}: {reason}")]
    NotConfirmed { target: String, reason: String },
}

/// Opens a connection, naming it in the management UI, with `amqp.frame_max` unless the URL
/// sets `frame_max` itself.
pub async fn connect(settings: &Settings, role: &str) -> Result<Connection, AmqpError> {
    crate::install_crypto_provider();
    let redacted = settings.amqp_url_redacted();
    let mut uri: AMQPUri = settings
        .amqp
        .url
        .expose_secret()
        .parse()
        // The parser's message may quote the URL, password included: it is not passed on.
        .map_err(|_: String| AmqpError::InvalidUrl(redacted.clone()))?;
    uri.query.frame_max.get_or_insert(settings.amqp.frame_max);
    let name = format!(
        "{} {role} pid={}",
        settings.amqp.connection_name,
        std::process::id()
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
