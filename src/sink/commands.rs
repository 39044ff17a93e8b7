//! MQTT commands: each output row of a query into an MQTT sink becomes one message. The
//! topic is the sink's template filled from the row (`{device_id}/commands`); the payload is
//! the row's other columns as one JSON object, written by arrow-json.

use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{Array, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::record_batch::RecordBatch;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::mqtt::BrokerUrl;
use crate::pipeline::topic::TopicPattern;

/// One MQTT connection for every command sink of the pipeline.
#[derive(Clone)]
pub struct CommandPublisher {
    client: AsyncClient,
    metrics: Arc<Metrics>,
}

impl CommandPublisher {
    /// Connects in the background (and reconnects, with backoff); publishing waits in
    /// rumqttc's request queue meanwhile.
    pub fn start(
        broker: &BrokerUrl,
        client_id: &str,
        metrics: Arc<Metrics>,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<(CommandPublisher, tokio::task::JoinHandle<()>)> {
        let mut opts = broker.options(client_id)?;
        opts.set_clean_session(true);
        opts.set_inflight(1000);
        let (client, mut eventloop) = crate::mqtt::client(opts, 10_000);
        let m = metrics.clone();
        let broker = broker.clone();
        let task = tokio::spawn(async move {
            let connected = m.broker_connected.with_label_values(&["commands"]);
            let reconnects = m.broker_reconnects.with_label_values(&["commands"]);
            let mut ever = false;
            let mut backoff = Duration::from_millis(100);
            let mut stopping = false;
            loop {
                let ev = if stopping {
                    // Drain: keep the connection until the disconnect we queued goes out.
                    match tokio::time::timeout(Duration::from_secs(5), eventloop.poll()).await {
                        Ok(ev) => ev,
                        Err(_) => break,
                    }
                } else {
                    tokio::select! {
                        ev = eventloop.poll() => ev,
                        _ = stop.changed() => { stopping = true; continue; }
                    }
                };
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connected.set(1);
                        if ever {
                            reconnects.inc();
                        }
                        ever = true;
                        backoff = Duration::from_millis(100);
                        tracing::info!(broker = %broker, "command publisher connected");
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) if stopping => break,
                    Ok(_) => {}
                    Err(e) => {
                        connected.set(0);
                        if stopping {
                            break;
                        }
                        tracing::warn!(broker = %broker, "command connection: {e}; retrying in {backoff:?}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            connected.set(0);
        });
        Ok((CommandPublisher { client, metrics }, task))
    }

    /// Queues a disconnect behind every command already queued.
    pub async fn close(&self) {
        let _ = self.client.disconnect().await;
    }

    /// Publishes one message per row.
    pub async fn publish(
        &self,
        sink: &str,
        topic: &TopicPattern,
        qos: u8,
        retain: bool,
        batch: &RecordBatch,
    ) {
        let messages = match encode(topic, batch) {
            Ok(m) => m,
            Err(e) => {
                self.metrics
                    .command_errors
                    .with_label_values(&[sink, "encode"])
                    .inc_by(batch.num_rows() as u64);
                tracing::error!(sink, "cannot encode commands: {e}");
                return;
            }
        };
        let qos = match qos {
            0 => QoS::AtMostOnce,
            2 => QoS::ExactlyOnce,
            _ => QoS::AtLeastOnce,
        };
        let mut sent = 0u64;
        for (t, payload) in messages {
            match t {
                Some(t) => match self.client.publish(t, qos, retain, payload).await {
                    Ok(()) => sent += 1,
                    Err(e) => {
                        self.metrics
                            .command_errors
                            .with_label_values(&[sink, "publish"])
                            .inc();
                        tracing::error!(sink, "cannot publish command: {e}");
                    }
                },
                None => {
                    self.metrics
                        .command_errors
                        .with_label_values(&[sink, "bad_topic"])
                        .inc();
                    tracing::warn!(
                        sink,
                        "a command row has a null or unusable topic column; not published"
                    );
                }
            }
        }
        self.metrics
            .commands_published
            .with_label_values(&[sink])
            .inc_by(sent);
    }
}

/// (topic, JSON payload) per row; the topic is `None` when its columns cannot fill it.
pub fn encode(
    topic: &TopicPattern,
    batch: &RecordBatch,
) -> anyhow::Result<Vec<(Option<String>, Vec<u8>)>> {
    let schema = batch.schema();
    let captures: Vec<&str> = topic.captures().collect();
    let mut topic_cols: Vec<(&str, StringArray)> = Vec::new();
    for c in &captures {
        let i = schema.index_of(c)?;
        let col = cast(batch.column(i), &DataType::Utf8)?;
        let col = col
            .as_any()
            .downcast_ref::<StringArray>()
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("topic column {c}"))?;
        topic_cols.push((c, col));
    }
    let keep: Vec<usize> = (0..schema.fields().len())
        .filter(|i| !captures.contains(&schema.field(*i).name().as_str()))
        .collect();
    let payload = batch.project(&keep)?;
    let mut out = Vec::with_capacity(batch.num_rows());
    for (row, line) in super::json_rows(&payload)?.into_iter().enumerate() {
        let t = topic.render(|name| {
            topic_cols
                .iter()
                .find(|(n, _)| *n == name)
                .and_then(|(_, a)| {
                    if a.is_valid(row) {
                        Some(a.value(row))
                    } else {
                        None
                    }
                })
        });
        out.push((t, line.into_bytes()));
    }
    Ok(out)
}
