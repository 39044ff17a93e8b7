//! The embedded MQTT broker (rumqttd), so `fleetsql run` works with nothing else installed.
//!
//! It keeps nothing on disk and has no shutdown call: good for a first run, a demo or a
//! test, not for production, where an external broker (`--broker`) keeps the backlog.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Starts the broker on its own thread and waits until it accepts connections.
pub fn start(listen: SocketAddr) -> anyhow::Result<()> {
    // rumqttd only logs a failed bind from its server thread; check first for a clear error.
    drop(TcpListener::bind(listen).map_err(|e| {
        anyhow::anyhow!("embedded broker cannot listen on {listen}: {e} (choose another with --listen, or use --broker)")
    })?);
    let server = ServerSettings {
        name: "fleetsql-embedded".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 1 << 20,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    // The Default config is all zeros (no connections allowed): set the router explicitly.
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 100_010,
            max_outgoing_packet_count: 1_000,
            max_segment_size: 100 * 1024 * 1024,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!("embedded broker stopped: {e}");
            }
        })?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            anyhow::bail!("embedded broker did not start listening on {listen}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::info!("embedded MQTT broker listening on {listen}");
    Ok(())
}
