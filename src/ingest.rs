//! MQTT in: one client subscribed to every source's topic filter. It decodes nothing: the
//! poll task only timestamps messages; the router task matches topics to sources, finds the
//! device id and hands batches to the shards.
//!
//! The two tasks are joined by a bounded channel: when the shards fall behind, the router
//! waits, the channel fills, the poll task stops reading the socket, and the broker holds
//! the backlog (QoS 1, persistent session) instead of this process's memory.

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Packet, QoS};
use tokio::sync::{mpsc, watch};

use crate::decode::{DeadLetter, Message, SourceShape, reason};
use crate::device::{Ingest, Kind, Reading, ShardRouter};
use crate::engine::EngineEvent;
use crate::engine::backlog::Backlog;
use crate::metrics::Metrics;
use crate::mqtt::BrokerUrl;
use crate::pipeline::topic::TopicPattern;

/// Payloads above this many bytes are dead letters, not rows: one reading is small, and a
/// runaway device must not fill the engine's memory.
pub const MAX_PAYLOAD: usize = 1 << 20;

pub struct IngestConfig {
    pub broker: BrokerUrl,
    pub client_id: String,
    pub sources: Vec<Arc<SourceShape>>,
    /// Subscription QoS per source.
    pub qos: Vec<u8>,
    /// The presence table's status topic, subscribed at QoS 1 when there is one.
    pub status: Option<TopicPattern>,
}

/// Runs until `shutdown` turns true; then disconnects and returns once every message
/// received has been handed to the shards.
pub async fn run(
    cfg: IngestConfig,
    shards: Vec<actix::Addr<ShardRouter>>,
    engine: mpsc::UnboundedSender<EngineEvent>,
    backlog: Arc<Backlog>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut opts = cfg.broker.options(&cfg.client_id)?;
    // A persistent session: while the engine is away the broker keeps its QoS 1 messages.
    opts.set_clean_session(false);
    opts.set_request_channel_capacity(1024);
    let (client, mut eventloop) = AsyncClient::new(opts, 1024);
    let filters: Vec<(String, QoS)> = cfg
        .sources
        .iter()
        .zip(&cfg.qos)
        .map(|(s, q)| (s.topic.filter(), qos(*q)))
        .chain(cfg.status.iter().map(|t| (t.filter(), QoS::AtLeastOnce)))
        .collect();

    let (tx, rx) = mpsc::channel::<Message>(16_384);
    let router = tokio::spawn(route(
        rx,
        cfg.sources.clone(),
        cfg.status.clone(),
        shards,
        engine,
        backlog,
        metrics.clone(),
    ));

    let connected = metrics.broker_connected.with_label_values(&["ingest"]);
    let reconnects = metrics.broker_reconnects.with_label_values(&["ingest"]);
    let mut backoff = Duration::from_millis(100);
    let mut ever_connected = false;
    loop {
        let ev = tokio::select! {
            ev = eventloop.poll() => ev,
            _ = shutdown.changed() => break,
        };
        match ev {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let m = Message {
                    topic: p.topic,
                    payload: p.payload,
                    received_at: crate::time::now_ms(),
                };
                if tx.send(m).await.is_err() {
                    break;
                }
            }
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                // Connected means subscribed: with a session already present right away,
                // otherwise once the broker acknowledges the subscriptions.
                if ack.session_present {
                    connected.set(1);
                }
                if ever_connected {
                    reconnects.inc();
                }
                ever_connected = true;
                backoff = Duration::from_millis(100);
                tracing::info!(broker = %cfg.broker, session_present = ack.session_present, "ingest connected");
                if !ack.session_present {
                    let subs = filters
                        .iter()
                        .map(|(f, q)| rumqttc::SubscribeFilter::new(f.clone(), *q));
                    if let Err(e) = client.try_subscribe_many(subs) {
                        tracing::error!("cannot subscribe: {e}");
                    }
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => connected.set(1),
            Ok(_) => {}
            Err(e) => {
                connected.set(0);
                tracing::warn!(broker = %cfg.broker, "ingest connection: {e}; retrying in {backoff:?}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {},
                    _ = shutdown.changed() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    connected.set(0);
    let _ = client.try_disconnect();
    // Let the disconnect go out; the broker may already be gone.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Ok(ev) = eventloop.poll().await {
            if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
    drop(tx);
    router.await?;
    Ok(())
}

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

/// Matches topics to sources and batches readings per shard: whatever is queued is taken
/// at once (`recv_many`), so batches grow with load and latency stays low when idle.
pub async fn route(
    mut rx: mpsc::Receiver<Message>,
    sources: Vec<Arc<SourceShape>>,
    status: Option<TopicPattern>,
    shards: Vec<actix::Addr<ShardRouter>>,
    engine: mpsc::UnboundedSender<EngineEvent>,
    backlog: Arc<Backlog>,
    metrics: Arc<Metrics>,
) {
    let hasher = std::collections::hash_map::RandomState::new();
    let mut buf = Vec::with_capacity(4096);
    loop {
        if rx.recv_many(&mut buf, 4096).await == 0 {
            return;
        }
        metrics.messages_received.inc_by(buf.len() as u64);
        let mut per_shard: Vec<Vec<Reading>> = (0..shards.len()).map(|_| Vec::new()).collect();
        let mut dead = Vec::new();
        for m in buf.drain(..) {
            if m.payload.len() > MAX_PAYLOAD {
                dead.push(DeadLetter {
                    source: None,
                    error: format!(
                        "payload of {} bytes exceeds {MAX_PAYLOAD}; its first 1 KiB is kept",
                        m.payload.len()
                    ),
                    topic: m.topic,
                    payload: m.payload.slice(..1024),
                    reason: reason::TOO_LARGE,
                    received_at: m.received_at,
                });
                continue;
            }
            let routed = crate::decode::route(&sources, &m.topic)
                .map(|(source, device)| (Kind::Source(source), device))
                .or_else(|| {
                    let device = status_device(status.as_ref()?, &m.topic)?;
                    Some((Kind::Status, device))
                });
            match routed {
                Some((kind, device)) => {
                    // A device's telemetry and status go to the same shard: one place
                    // holds its presence.
                    let mut h = hasher.build_hasher();
                    m.topic[device.clone()].hash(&mut h);
                    let shard = (h.finish() % shards.len() as u64) as usize;
                    per_shard[shard].push(Reading {
                        kind,
                        device,
                        msg: m,
                    });
                }
                None => dead.push(DeadLetter {
                    source: None,
                    error: format!("topic `{}` matches no source", m.topic),
                    topic: m.topic,
                    payload: m.payload,
                    reason: reason::NO_SOURCE,
                    received_at: m.received_at,
                }),
            }
        }
        if !dead.is_empty() {
            let _ = engine.send(EngineEvent::DeadLetters(dead));
        }
        // Rows waiting for the runner are bounded: past the limit, wait here (and so stop
        // reading from the broker) until the runner catches up.
        backlog.admit().await;
        // `send` respects the shard's mailbox capacity: a slow shard slows this loop down.
        let sends: Vec<_> = per_shard
            .into_iter()
            .enumerate()
            .filter(|(_, r)| !r.is_empty())
            .map(|(i, r)| shards[i].send(Ingest(r)))
            .collect();
        for r in futures::future::join_all(sends).await {
            if let Err(e) = r {
                tracing::error!("shard unavailable: {e}");
            }
        }
    }
}

/// Where the device id sits in a status topic, if `topic` is one.
pub fn status_device(pattern: &TopicPattern, topic: &str) -> Option<std::ops::Range<usize>> {
    let mut caps = Vec::with_capacity(4);
    if !pattern.match_into(topic, &mut caps) {
        return None;
    }
    let i = pattern
        .captures()
        .position(|c| c == crate::pipeline::parse::DEVICE_ID)?;
    let id = caps.get(i)?;
    let start = id.as_ptr() as usize - topic.as_ptr() as usize;
    Some(start..start + id.len())
}
