//! What the bridge needs to run.

use std::time::Duration;

use url::Url;

use crate::error::BridgeError;

/// Where the bridge's MQTT broker is.
#[derive(Debug, Clone)]
pub enum MqttTarget {
    /// Start the embedded broker in-process with this configuration and connect to it.
    Embedded(broker::BrokerConfig),
    /// Connect to an external broker.
    External(MqttEndpoint),
}

/// An MQTT broker address, with optional credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttEndpoint {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Username and password, if the broker wants them.
    pub credentials: Option<(String, String)>,
}

impl MqttEndpoint {
    /// Parses `mqtt://[user[:password]@]host[:port]` (`tcp://` is accepted too; the port
    /// defaults to 1883).
    ///
    /// # Errors
    /// [`BridgeError::MqttUrl`] if the URL is not of that form.
    pub fn parse(raw: &str) -> Result<Self, BridgeError> {
        let bad = |reason: &str| BridgeError::MqttUrl {
            url: raw.to_owned(),
            reason: reason.to_owned(),
        };
        let url = Url::parse(raw).map_err(|e| bad(&e.to_string()))?;
        if !matches!(url.scheme(), "mqtt" | "tcp") {
            return Err(bad("scheme must be mqtt:// or tcp://"));
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let credentials = match url.username() {
            "" => None,
            user => Some((
                user.to_owned(),
                url.password().unwrap_or_default().to_owned(),
            )),
        };
        Ok(Self {
            host,
            port: url.port().unwrap_or(1883),
            credentials,
        })
    }
}

/// Everything the bridge needs to run.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// The MQTT broker to use.
    pub mqtt: MqttTarget,
    /// The MQTT client id of this bridge. With a persistent session, it must be stable across
    /// restarts and unique among bridges.
    pub client_id: String,
    /// MQTT keep-alive interval.
    pub keep_alive: Duration,
    /// Upper bound of the reconnect backoff.
    pub max_backoff: Duration,
    /// How long graceful shutdown may take before remaining tasks are abandoned.
    pub shutdown_grace: Duration,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            mqtt: MqttTarget::Embedded(broker::BrokerConfig::default()),
            client_id: "fleetbeat-bridge".to_owned(),
            keep_alive: Duration::from_secs(15),
            max_backoff: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mqtt_urls() {
        let e = MqttEndpoint::parse("mqtt://127.0.0.1:18830").expect("valid");
        assert_eq!(
            (e.host.as_str(), e.port, e.credentials),
            ("127.0.0.1", 18830, None)
        );
        let e = MqttEndpoint::parse("tcp://bridge:s3cret@broker.local").expect("valid");
        assert_eq!(e.port, 1883);
        assert_eq!(e.credentials, Some(("bridge".into(), "s3cret".into())));
        let e = MqttEndpoint::parse("mqtt://[::1]:1884").expect("valid");
        assert_eq!(e.host, "::1");
    }

    #[test]
    fn rejects_bad_urls() {
        assert!(MqttEndpoint::parse("http://x:1").is_err());
        assert!(MqttEndpoint::parse("127.0.0.1:1883").is_err());
        assert!(MqttEndpoint::parse("mqtt://").is_err());
    }
}
