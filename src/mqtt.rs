//! Connection settings shared by every MQTT client of the engine (ingest, command
//! publisher, simulated devices): the broker URL (`mqtt://` or `mqtts://`) and TLS.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};

#[derive(Debug, Clone)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// PEM file of the CA that signed the broker's certificate; the system roots when absent.
    pub ca_file: Option<PathBuf>,
}

impl BrokerUrl {
    pub fn parse(text: &str) -> Result<BrokerUrl, String> {
        let (tls, rest) = if let Some(r) = text
            .strip_prefix("mqtt://")
            .or_else(|| text.strip_prefix("tcp://"))
        {
            (false, r)
        } else if let Some(r) = text
            .strip_prefix("mqtts://")
            .or_else(|| text.strip_prefix("ssl://"))
        {
            (true, r)
        } else {
            return Err(format!(
                "broker URL `{text}` must start with mqtt:// or mqtts://"
            ));
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("bad port in broker URL `{text}`"))?,
            ),
            None => (rest, if tls { 8883 } else { 1883 }),
        };
        if host.is_empty() {
            return Err(format!("broker URL `{text}` has no host"));
        }
        Ok(BrokerUrl {
            host: host.trim_matches(['[', ']']).to_string(),
            port,
            tls,
            ca_file: None,
        })
    }

    pub fn local(addr: std::net::SocketAddr) -> BrokerUrl {
        BrokerUrl {
            host: addr.ip().to_string(),
            port: addr.port(),
            tls: false,
            ca_file: None,
        }
    }

    pub fn options(&self, client_id: &str) -> anyhow::Result<MqttOptions> {
        let mut o = MqttOptions::new(client_id, &self.host, self.port);
        o.set_keep_alive(Duration::from_secs(15));
        // rumqttc drops the connection on a packet over its limit, and a persistent session
        // would redeliver it forever; take what the broker sends and let the engine turn
        // oversized payloads into dead letters (see `ingest::MAX_PAYLOAD`).
        o.set_max_packet_size(256 << 20, 1 << 20);
        if self.tls {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let tls = match &self.ca_file {
                Some(path) => TlsConfiguration::Simple {
                    ca: std::fs::read(path).map_err(|e| {
                        anyhow::anyhow!("cannot read CA file {}: {e}", path.display())
                    })?,
                    alpn: None,
                    client_auth: None,
                },
                None => {
                    let mut roots = rustls::RootCertStore::empty();
                    for cert in rustls_native_certs::load_native_certs().certs {
                        let _ = roots.add(cert);
                    }
                    let config = rustls::ClientConfig::builder()
                        .with_root_certificates(roots)
                        .with_no_client_auth();
                    TlsConfiguration::Rustls(Arc::new(config))
                }
            };
            o.set_transport(Transport::tls_with_config(tls));
        }
        Ok(o)
    }
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}://{}:{}",
            if self.tls { "mqtts" } else { "mqtt" },
            self.host,
            self.port
        )
    }
}

/// A client and its event loop, with Nagle's algorithm off: commands and acks are small
/// writes that must go out now (with it on, a lone write waits for the peer's delayed ACK,
/// tens of milliseconds). Writes under load are batched by the event loop anyway.
pub fn client(opts: MqttOptions, capacity: usize) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, capacity);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    (client, eventloop)
}
