//! Simulated devices (`fleetsql run --simulate N`): real MQTT clients that publish telemetry
//! fitting the pipeline's sources and subscribe to the commands its sinks send them, so the
//! whole loop runs on a fresh machine with nothing else installed.

use std::time::Duration;

use datafusion::arrow::datatypes::DataType;
use rand::Rng;
use rumqttc::{Event, Packet, QoS};
use serde_json::{Map, Value, json};
use tokio::sync::watch;

use crate::mqtt::BrokerUrl;
use crate::pipeline::CompiledPipeline;
use crate::pipeline::compile::EventTime;
use crate::pipeline::parse::{DEVICE_ID, SinkKind};
use crate::pipeline::topic::TopicPattern;

/// What devices publish and listen to, taken from the pipeline.
#[derive(Clone)]
pub struct Plan {
    sources: Vec<SimSource>,
    command_topics: Vec<TopicPattern>,
}

#[derive(Clone)]
struct SimSource {
    topic: TopicPattern,
    fields: Vec<(String, DataType)>,
    event_time: Option<String>,
}

impl Plan {
    pub fn from_pipeline(p: &CompiledPipeline) -> Plan {
        Plan {
            sources: p
                .sources
                .iter()
                .map(|s| SimSource {
                    topic: s.spec.topic.clone(),
                    fields: s
                        .payload_schema
                        .fields()
                        .iter()
                        .map(|f| (f.name().clone(), f.data_type().clone()))
                        .collect(),
                    event_time: match &s.event_time {
                        EventTime::Field { name } => Some(name.clone()),
                        EventTime::Received => None,
                    },
                })
                .collect(),
            command_topics: p
                .sinks
                .iter()
                .filter_map(|s| match &s.spec.kind {
                    SinkKind::Mqtt { topic, .. } => Some(topic.clone()),
                    _ => None,
                })
                .collect(),
        }
    }
}

/// A captured topic level for simulated device `i`: its id, or one of three groups.
fn capture_value(name: &str, i: usize) -> String {
    if name == DEVICE_ID {
        format!("sim-{i:04}")
    } else {
        format!("{name}-{}", i % 3)
    }
}

pub async fn run(
    plan: Plan,
    broker: BrokerUrl,
    n: usize,
    interval: Duration,
    stop: watch::Receiver<bool>,
) {
    tracing::info!(devices = n, "starting simulated devices");
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            tokio::spawn(device(
                plan.clone(),
                broker.clone(),
                i,
                interval,
                stop.clone(),
            ))
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

async fn device(
    plan: Plan,
    broker: BrokerUrl,
    i: usize,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let id = capture_value(DEVICE_ID, i);
    let Ok(opts) = broker.options(&format!("fleetsql-sim-{id}-{}", std::process::id())) else {
        return;
    };
    let (client, mut eventloop) = crate::mqtt::client(opts, 64);
    let topics: Vec<String> = plan
        .sources
        .iter()
        .filter_map(|s| {
            let values: Vec<(&str, String)> = s
                .topic
                .captures()
                .map(|c| (c, capture_value(c, i)))
                .collect();
            s.topic.render(|n| {
                values
                    .iter()
                    .find(|(c, _)| *c == n)
                    .map(|(_, v)| v.as_str())
            })
        })
        .collect();
    let commands: Vec<String> = plan
        .command_topics
        .iter()
        .map(|t| {
            // Levels filled from columns the device does not know become wildcards.
            let known: Vec<&str> = plan
                .sources
                .iter()
                .flat_map(|s| s.topic.captures().collect::<Vec<_>>())
                .collect();
            t.to_string()
                .split('/')
                .map(
                    |lvl| match lvl.strip_prefix('{').and_then(|l| l.strip_suffix('}')) {
                        Some(name) if known.contains(&name) => capture_value(name, i),
                        Some(_) => "+".to_string(),
                        None => lvl.to_string(),
                    },
                )
                .collect::<Vec<_>>()
                .join("/")
        })
        .collect();
    let mut state: Vec<Vec<f64>> = plan
        .sources
        .iter()
        .map(|s| {
            s.fields
                .iter()
                .map(|_| rand::rng().random_range(0.0..1000.0))
                .collect()
        })
        .collect();
    // Spread devices over the interval instead of all publishing at once.
    let jitter = rand::rng().random_range(0..interval.as_millis().max(1) as u64);
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_millis(jitter),
        interval,
    );
    // Publishing and the event loop run side by side, never one inside the other's
    // `select!`: a `poll()` dropped half-way (by a tick, every interval) starts its
    // connection over, so at intervals shorter than a connect the device never connected.
    let publish = async {
        loop {
            tick.tick().await;
            for (si, s) in plan.sources.iter().enumerate() {
                let Some(topic) = topics.get(si) else {
                    continue;
                };
                let payload = reading(s, &mut state[si]).to_string();
                // Waits while the client's queue is full (the broker is slower than the
                // device): a simulated device slows down rather than dropping readings.
                if client
                    .publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    };
    let events = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    for c in &commands {
                        let _ = client.try_subscribe(c.clone(), QoS::AtLeastOnce);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    tracing::info!(device = %id, topic = %p.topic, "simulated device received command {}", String::from_utf8_lossy(&p.payload));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    };
    tokio::select! {
        _ = stop.changed() => {}
        () = publish => {}
        () = events => {}
    }
    let _ = client.try_disconnect();
}

/// One reading: numbers wander (a random walk in 0..1000), so thresholds are crossed now
/// and then; the event-time field, if any, is now.
fn reading(s: &SimSource, state: &mut [f64]) -> Value {
    let mut m = Map::new();
    let mut rng = rand::rng();
    for ((name, ty), v) in s.fields.iter().zip(state.iter_mut()) {
        if Some(name) == s.event_time.as_ref() {
            let now = chrono::Utc::now();
            let val = match ty {
                DataType::Timestamp(_, _) | DataType::Utf8 | DataType::Utf8View => {
                    json!(now.to_rfc3339())
                }
                _ => json!(now.timestamp_millis()),
            };
            m.insert(name.clone(), val);
            continue;
        }
        *v = (*v + rng.random_range(-80.0..80.0)).clamp(0.0, 1000.0);
        let val = match ty {
            t if t.is_floating() || matches!(t, DataType::Decimal128(_, _)) => {
                json!((*v * 10.0).round() / 10.0)
            }
            t if t.is_integer() => json!(v.round() as i64),
            DataType::Boolean => json!(*v > 500.0),
            DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8 => json!("ok"),
            DataType::Timestamp(_, _) => json!(chrono::Utc::now().to_rfc3339()),
            _ => Value::Null,
        };
        m.insert(name.clone(), val);
    }
    Value::Object(m)
}
