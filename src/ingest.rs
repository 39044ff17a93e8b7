//! MQTT in: one client subscribed to every source's topic filter. It decodes nothing:
//! - the poll task timestamps messages;
//! - the log task writes them to the write-ahead log, and only then acknowledges them to
//!   the broker (manual acks): a message acknowledged is on disk;
//! - the router task matches topics to sources, finds the device id, hands batches to the
//!   shards, and every commit interval has the runner take a checkpoint.
//!
//! The tasks are joined by bounded channels: when the shards fall behind, the router
//! waits, the channels fill, the poll task stops reading the socket, and the broker holds
//! the backlog (QoS 1, persistent session) instead of this process's memory.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Packet, Publish, QoS};
use tokio::sync::{mpsc, oneshot, watch};

use crate::decode::{DeadLetter, Message, SourceShape, reason};
use crate::device::{Ingest, Kind, Reading, ShardRouter};
use crate::durable::wal::{Pending, Redeliveries, Wal};
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
    /// The log, opened after what a restart found in it.
    pub wal: Wal,
    pub redeliveries: Redeliveries,
}

/// A message as the poll task hands it to the log task.
struct Incoming {
    msg: Message,
    pkid: u16,
    /// Sent before: the broker is redelivering it.
    dup: bool,
    /// What to acknowledge once the message is logged (QoS 1 and 2).
    ack: Option<Publish>,
}

impl Incoming {
    fn new(p: Publish, received_at: i64) -> Incoming {
        let ack = (p.qos != QoS::AtMostOnce).then(|| {
            let mut a = Publish::new("", p.qos, Vec::<u8>::new());
            a.pkid = p.pkid;
            a
        });
        Incoming {
            pkid: p.pkid,
            dup: p.dup,
            ack,
            msg: Message {
                topic: p.topic,
                payload: p.payload,
                received_at,
            },
        }
    }
}

/// Reads (batches of publishes) received and not yet logged: see `run`.
const INCOMING_READS: usize = 128;

/// Runs until `shutdown` turns true; then disconnects and returns once every message
/// logged has been handed to the shards. Returns the log position after the last message
/// routed (or why ingest had to stop: the log or a checkpoint could not be written).
pub async fn run(
    cfg: IngestConfig,
    router: Router,
    replay: Vec<Message>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<u64> {
    let metrics = router.metrics.clone();
    let mut opts = cfg.broker.options(&cfg.client_id)?;
    // A persistent session: while the engine is away the broker keeps its QoS 1 messages.
    opts.set_clean_session(false);
    // Acknowledged by the log task once a message is on disk. MQTT lets a broker have no more
    // than 65,535 unacknowledged messages out to one client (each holds a packet id, ids are
    // 16 bits), so acks never fill the request channel (which only the poll task drains).
    // Not its in-flight window: mosquitto 2.0.11 let out more than its
    // `max_inflight_messages` (docs/benchmarks.md, ninth round).
    opts.set_manual_acks(true);
    opts.set_request_channel_capacity(65_536);
    let (client, mut eventloop) = crate::mqtt::client(opts, 65_536);
    let filters: Vec<(String, QoS)> = cfg
        .sources
        .iter()
        .zip(&cfg.qos)
        .map(|(s, q)| (s.topic.filter(), qos(*q)))
        .chain(cfg.status.iter().map(|t| (t.filter(), QoS::AtLeastOnce)))
        .collect();

    // Received, not yet logged: no more than the broker's in-flight window, since none of
    // it is acknowledged (at QoS 0, at most this many reads of up to 100 packets each).
    // Logged, not yet routed: bounded in messages, so a backlog of large payloads stays at
    // the broker rather than here.
    let (tx, rx) = mpsc::channel::<Vec<Incoming>>(INCOMING_READS);
    let (logged_tx, logged_rx) = mpsc::channel::<Message>(1024);
    // Everything the log holds at start is on disk.
    let (durable_tx, durable_rx) = watch::channel(cfg.wal.next_seq());
    let mut router = router;
    router.durable = Some(durable_rx);
    let router = tokio::spawn(router.run(replay, logged_rx));
    let logger = tokio::spawn(log(
        rx,
        cfg.wal,
        cfg.redeliveries,
        client.clone(),
        logged_tx,
        durable_tx,
        metrics.clone(),
    ));

    let connected = metrics.broker_connected.with_label_values(&["ingest"]);
    let reconnects = metrics.broker_reconnects.with_label_values(&["ingest"]);
    let mut backoff = Duration::from_millis(100);
    let mut ever_connected = false;
    // Made once: a `changed()` per poll registered and dropped a waiter per message.
    let stop = async {
        let _ = shutdown.changed().await;
    };
    tokio::pin!(stop);
    loop {
        let ev = tokio::select! {
            ev = eventloop.poll() => ev,
            _ = &mut stop => break,
        };
        match ev {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                // The client decodes a whole read before it returns its first packet: the
                // publishes queued behind this one go to the log task with it, one send
                // and one timestamp (they arrived together) per read instead of per
                // message. Other events stay queued for `poll`, in order.
                let received_at = crate::time::now_ms();
                let queued = &mut eventloop.state.events;
                let mut read = Vec::with_capacity(1 + queued.len());
                read.push(Incoming::new(p, received_at));
                while let Some(Event::Incoming(Packet::Publish(_))) = queued.front() {
                    if let Some(Event::Incoming(Packet::Publish(p))) = queued.pop_front() {
                        read.push(Incoming::new(p, received_at));
                    }
                }
                if tx.send(read).await.is_err() {
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
                    _ = &mut stop => break,
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
    // Messages received but not logged are not acknowledged: the broker sends them again.
    drop(tx);
    let logged = logger.await?;
    let routed = router.await?;
    logged?;
    routed.map_err(anyhow::Error::msg)
}

/// The log task: appends each batch of messages to the log's pending part and hands them
/// to the router; the syncer writes them to the log and forces them to disk (with
/// `--fsync always`), then acknowledges them, and `durable` follows the position up to
/// which they are on disk. A failed write or fsync stops ingest: nothing more is
/// acknowledged.
async fn log(
    mut rx: mpsc::Receiver<Vec<Incoming>>,
    wal: Wal,
    mut redeliveries: Redeliveries,
    client: AsyncClient,
    out: mpsc::Sender<Message>,
    durable: watch::Sender<u64>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    // Positions are given here, in the order the syncer writes the messages.
    let mut next_seq = wal.next_seq();
    let pending = Arc::new(std::sync::Mutex::new(Pending::default()));
    let (to_sync, unsynced) = mpsc::unbounded_channel();
    let mut syncer = tokio::spawn(sync(
        unsynced,
        wal,
        pending.clone(),
        client.clone(),
        durable,
        metrics.clone(),
    ));
    let mut buf = Vec::with_capacity(16);
    'batches: loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut buf, 16) => n,
            // The syncer stops before this task only on an error (a failed write or
            // fsync). Nothing is acknowledged after it, so the broker may send nothing
            // more: waiting for the next message to notice could be waiting forever.
            stopped = &mut syncer => return stopped?,
        };
        if n == 0 {
            break;
        }
        let total = buf.iter().map(Vec::len).sum();
        let mut acks = Vec::with_capacity(total);
        let mut fresh = Vec::with_capacity(total);
        for inc in buf.drain(..).flatten() {
            acks.extend(inc.ack);
            if inc.dup
                && redeliveries.is_logged(inc.pkid, &inc.msg.topic, &inc.msg.payload, next_seq)
            {
                metrics.redeliveries.inc();
                continue;
            }
            fresh.push((inc.msg, inc.pkid));
        }
        let first = next_seq;
        lock(&pending).append(first, &fresh);
        next_seq += fresh.len() as u64;
        for (i, (m, pkid)) in fresh.iter().enumerate() {
            redeliveries.note(first + i as u64, *pkid, &m.topic, &m.payload);
        }
        // Written and acknowledged by the syncer, in order and grouped: with fsync once
        // on disk, without once written (grouping the acks is what makes the broker cheap
        // to feed: one burst of PUBACKs per interval instead of one per batch).
        let unsynced = Unsynced {
            end: next_seq,
            acks,
        };
        if to_sync.send(unsynced).is_err() {
            // The syncer failed and said why; its error is returned below.
            break 'batches;
        }
        // Routed before they are on disk: commands do not wait for the fsync, which
        // only holds back the broker's acknowledgements (and checkpoints, see
        // `Router::checkpoint`). A crash before the fsync loses nothing: the broker
        // sends again what was not acknowledged.
        for (m, _) in fresh {
            if out.send(m).await.is_err() {
                // The router has stopped: shutting down.
                break 'batches;
            }
        }
    }
    drop(to_sync);
    syncer.await?
}

fn lock(pending: &std::sync::Mutex<Pending>) -> std::sync::MutexGuard<'_, Pending> {
    // Appending and taking cannot panic half-way; a poisoned lock still holds whole batches.
    pending.lock().unwrap_or_else(|e| e.into_inner())
}

/// Messages appended to the log's pending part and not yet on disk.
struct Unsynced {
    /// The log position after them.
    end: u64,
    acks: Vec<Publish>,
}

async fn ack_all(client: &AsyncClient, acks: &[Publish]) {
    for a in acks {
        if client.ack(a).await.is_err() {
            break;
        }
    }
}

/// The longest a sync of the log waits for more messages while acknowledgements wait for
/// it (see `sync`). Each sync costs the same whatever it carries (a `write`, an
/// `fdatasync`, a burst of PUBACKs); at 100,000 readings/s one every 5 ms instead of every
/// 2 ms cut the engine's CPU per reading at QoS 1 by about a seventh (docs/benchmarks.md,
/// change 25).
const ACKED_SYNC_INTERVAL: Duration = Duration::from_millis(5);

/// ... unless nothing more has arrived for this long: a broker with an in-flight window
/// (rumqttd: 100, EMQX: 32 by default) sends no more until it has acknowledgements, and
/// would otherwise idle through the rest of the interval. The embedded broker delivered
/// 16-17k readings/s with syncs every 2 ms, 8k with every 5 ms, 19-20k with this.
const ACKED_SYNC_IDLE: Duration = Duration::from_millis(1);

/// The same when nothing waits but the log itself: QoS 0 messages, which the broker does
/// not keep and nobody acknowledges. A crash of the engine or of the machine can lose the
/// last this-much of them (as it could lose them in the network or the broker);
/// checkpoints wait at most this long.
const UNACKED_SYNC_INTERVAL: Duration = Duration::from_millis(10);

/// Writes what the log task appended and forces it to disk (with `--fsync always`), as
/// many batches per sync as have queued up meanwhile (group commit), then acknowledges
/// them to the broker in order and moves the durable position on.
async fn sync(
    mut rx: mpsc::UnboundedReceiver<Unsynced>,
    wal: Wal,
    pending: Arc<std::sync::Mutex<Pending>>,
    client: AsyncClient,
    durable: watch::Sender<u64>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let mut group: Vec<Unsynced> = Vec::new();
    // Lent to the blocking thread for each sync.
    let mut wal = Some(wal);
    let mut last = tokio::time::Instant::now();
    while rx.recv_many(&mut group, 4096).await > 0 {
        // At most one sync per interval: a write and an fsync cost the same whatever
        // they carry, and nothing but the broker's acknowledgements (and checkpoints)
        // waits for them. Batches that arrive meanwhile join this one. Acknowledgements
        // waiting shorten the interval, and end it once the log task has gone quiet.
        loop {
            let acks_wait = group.iter().any(|u| !u.acks.is_empty());
            let now = tokio::time::Instant::now();
            let due = if acks_wait {
                (last + ACKED_SYNC_INTERVAL).min(now + ACKED_SYNC_IDLE)
            } else {
                last + UNACKED_SYNC_INTERVAL
            };
            if now >= due {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {
                    while let Ok(u) = rx.try_recv() {
                        group.push(u);
                    }
                    break;
                }
                n = rx.recv_many(&mut group, 4096) => if n == 0 {
                    break;
                },
            }
        }
        last = tokio::time::Instant::now();
        // Every batch of the group was appended before it was sent here.
        let batch = lock(&pending).take();
        let Some(mut log) = wal.take() else {
            anyhow::bail!("the write-ahead log was lost by a failed sync");
        };
        let (log, written) = tokio::task::spawn_blocking(move || {
            let written = match batch {
                Ok(Some(b)) => log.write(&b).map(|()| b.num_rows()),
                Ok(None) => Ok(0),
                Err(e) => Err(e),
            };
            let synced = match written {
                Ok(n) => log.sync().map(|()| n).map_err(|e| ("force", " to disk", e)),
                Err(e) => Err(("write", "", e)),
            };
            (log, synced)
        })
        .await?;
        wal = Some(log);
        match written {
            Ok(n) => {
                metrics.wal_messages.inc_by(n as u64);
                metrics.wal_syncs.inc();
            }
            Err((verb, where_, e)) => {
                metrics.wal_errors.inc();
                anyhow::bail!(
                    "cannot {verb} the write-ahead log{where_}: {e}. Stopped taking messages: \
                     nothing after the last message logged was acknowledged, and the broker \
                     keeps it (free the disk, then start again)"
                );
            }
        }
        for u in group.drain(..) {
            ack_all(&client, &u.acks).await;
            durable.send_replace(u.end);
        }
    }
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
/// at once (`recv_many`), so batches grow with load and latency stays low when idle. Every
/// commit interval it has the runner take a checkpoint at its position in the log.
pub struct Router {
    pub sources: Vec<Arc<SourceShape>>,
    pub status: Option<TopicPattern>,
    pub shards: Vec<actix::Addr<ShardRouter>>,
    pub engine: mpsc::UnboundedSender<EngineEvent>,
    pub backlog: Arc<Backlog>,
    pub metrics: Arc<Metrics>,
    /// Log position of the first message routed.
    pub position: u64,
    pub checkpoint_interval: Duration,
    /// When to hold a small batch for the readings that follow; `None` (the default):
    /// never, and the routing loop carries no rate bookkeeping.
    pub linger: Option<Linger>,
    /// Payload bytes handed to the shards since they last flushed.
    pub unflushed: usize,
    /// The log position up to which messages are on disk (`None`: not logged, e.g. the
    /// in-process input). Messages are routed before they are; a checkpoint waits for it.
    pub durable: Option<watch::Receiver<u64>>,
}

impl Router {
    /// Routes `replay` (messages from the log after the last checkpoint), then what `rx`
    /// delivers, until it closes; returns the position after the last message.
    pub async fn run(
        mut self,
        replay: Vec<Message>,
        mut rx: mpsc::Receiver<Message>,
    ) -> Result<u64, String> {
        let hasher = std::collections::hash_map::RandomState::new();
        let mut replay = replay.into_iter().peekable();
        while replay.peek().is_some() {
            let chunk: Vec<Message> = replay.by_ref().take(4096).collect();
            self.metrics.replayed.inc_by(chunk.len() as u64);
            self.route(&hasher, chunk).await;
        }
        let mut buf = Vec::with_capacity(4096);
        let mut next = tokio::time::Instant::now() + self.checkpoint_interval;
        loop {
            tokio::select! {
                n = rx.recv_many(&mut buf, 4096) => {
                    if n == 0 {
                        return Ok(self.position);
                    }
                    if let Some(linger) = &mut self.linger {
                        linger.fill(&mut rx, &mut buf).await;
                    }
                    self.route(&hasher, std::mem::take(&mut buf)).await;
                }
                _ = tokio::time::sleep_until(next) => {
                    self.checkpoint().await?;
                    next = tokio::time::Instant::now() + self.checkpoint_interval;
                }
            }
        }
    }

    /// Everything routed so far reaches the runner, which commits it with its state.
    async fn checkpoint(&self) -> Result<(), String> {
        crate::device::flush_shards(&self.shards).await;
        // The checkpoint says: replay the log from here. What it holds must be in the
        // log for good first, or a power cut could leave state for messages that were
        // never acknowledged, and that the broker would then deliver again.
        if let Some(durable) = &self.durable {
            let position = self.position;
            if durable.clone().wait_for(|d| *d >= position).await.is_err() {
                return Err(
                    "the write-ahead log stopped before the checkpoint's messages \
                            were on disk"
                        .to_string(),
                );
            }
        }
        let (done, answer) = oneshot::channel();
        self.engine
            .send(EngineEvent::Checkpoint {
                wal_next: self.position,
                done,
            })
            .map_err(|_| "the pipeline runner is gone".to_string())?;
        let result = answer
            .await
            .map_err(|_| "the pipeline runner is gone".to_string())
            .and_then(|r| r);
        if let Err(e) = &result {
            self.metrics.checkpoint_errors.inc();
            tracing::error!("checkpoint failed, stopping: {e}");
        }
        result
    }

    /// Routes messages in parts of at most a quarter of the backlog limit in payload
    /// bytes (at least one message each), each admitted on its own: the backlog overshoots
    /// its limit by no more than a part, however large the payloads.
    async fn route(
        &mut self,
        hasher: &std::collections::hash_map::RandomState,
        msgs: Vec<Message>,
    ) {
        let max = (self.backlog.limit() / 4).max(1);
        let mut part = Vec::new();
        let mut bytes = 0;
        for m in msgs {
            if !part.is_empty() && bytes + m.payload.len() > max {
                self.route_part(hasher, std::mem::take(&mut part)).await;
                bytes = 0;
            }
            bytes += m.payload.len();
            part.push(m);
        }
        if !part.is_empty() {
            self.route_part(hasher, part).await;
        }
    }

    async fn route_part(
        &mut self,
        hasher: &std::collections::hash_map::RandomState,
        msgs: Vec<Message>,
    ) {
        let shards = &self.shards;
        self.position += msgs.len() as u64;
        let bytes: usize = msgs.iter().map(|m| m.payload.len()).sum();
        self.metrics.messages_received.inc_by(msgs.len() as u64);
        let mut per_shard: Vec<Vec<Reading>> = (0..shards.len()).map(|_| Vec::new()).collect();
        let mut dead = Vec::new();
        for m in msgs {
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
            let routed = crate::decode::route(&self.sources, &m.topic)
                .map(|(source, device)| (Kind::Source(source), device))
                .or_else(|| {
                    let device = status_device(self.status.as_ref()?, &m.topic)?;
                    Some((Kind::Status, device))
                });
            match routed {
                Some((kind, device)) => {
                    // A device's telemetry and status go to the same shard: one place
                    // holds its presence.
                    let shard =
                        (hasher.hash_one(&m.topic[device.clone()]) % shards.len() as u64) as usize;
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
            let _ = self.engine.send(EngineEvent::DeadLetters(dead));
        }
        // Rows waiting for the runner are bounded: past the limit, wait here (and so stop
        // reading from the broker) until the runner catches up.
        self.backlog.admit().await;
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
        // Readings in device mailboxes and shard buffers are not in the backlog yet: once
        // a backlog's worth has gone out, have the shards decode and hand on everything,
        // so the backlog counts it before more is taken.
        self.unflushed += bytes;
        if self.unflushed >= self.backlog.limit() {
            crate::device::flush_shards(&self.shards).await;
            self.unflushed = 0;
        }
    }
}

/// Under load (and with `fleetsql run --linger`), the topic router waits a little for a
/// small batch to grow before routing it.
///
/// Every batch routed costs the same fixed work whatever its size: a wake-up of each shard
/// thread, a hand-over to the pipeline runner and a run of its SQL, a write to the broker
/// for the commands. At tens of thousands of readings a second the broker delivers in
/// bursts of a few dozen, and that fixed work was a fifth of the engine's CPU (nightlight
/// at QoS 0, docs/benchmarks.md). At low rates the wait would be pure latency, and the CPU
/// it saves is small in absolute terms, so the router holds batches only while the rate
/// it measures over the last 100 ms is above `BUSY_RATE`.
pub struct Linger {
    max_wait: Duration,
    /// Start of the current measurement window and the readings routed in it.
    window_start: tokio::time::Instant,
    in_window: u64,
    /// The last full window's rate was above `BUSY_RATE`.
    busy: bool,
}

impl Linger {
    /// `fleetsql run --linger`'s default: off. Measured at 25k msg/s (QoS 0, nightlight),
    /// 1 ms saved a third of the CPU per reading but took p50 latency from 0.9 to 3 ms
    /// (docs/benchmarks.md, fifth round), and flat out its saving is now within the
    /// noise: latency is what most pipelines that send commands want. tokio's timers
    /// tick every millisecond, so any wait is 1-2 ms in practice.
    pub const DEFAULT: Duration = Duration::ZERO;
    /// Readings per second above which batches are held.
    pub const BUSY_RATE: f64 = 20_000.0;
    /// A batch this large goes on at once.
    pub const ENOUGH: usize = 256;
    /// How long the rate is measured over.
    pub const WINDOW: Duration = Duration::from_millis(100);

    /// Whether the last full window's rate was above `BUSY_RATE`.
    pub fn is_busy(&self) -> bool {
        self.busy
    }

    pub fn new(max_wait: Duration) -> Self {
        Linger {
            max_wait,
            window_start: tokio::time::Instant::now(),
            in_window: 0,
            busy: false,
        }
    }

    /// Adds to `buf` what arrives on `rx` until it holds `ENOUGH` readings or `max_wait`
    /// has passed, if the router is busy; and counts what `buf` then holds towards the
    /// rate.
    pub async fn fill<T>(&mut self, rx: &mut mpsc::Receiver<T>, buf: &mut Vec<T>) {
        let now = tokio::time::Instant::now();
        // A window that ended long ago (the fleet went quiet) says nothing about now.
        let busy = self.busy && now - self.window_start < 2 * Self::WINDOW;
        if busy && !self.max_wait.is_zero() && buf.len() < Self::ENOUGH {
            let until = now + self.max_wait;
            while buf.len() < Self::ENOUGH {
                tokio::select! {
                    biased;
                    n = rx.recv_many(buf, 4096) => if n == 0 { break },
                    _ = tokio::time::sleep_until(until) => break,
                }
            }
        }
        self.in_window += buf.len() as u64;
        let now = tokio::time::Instant::now();
        let elapsed = now - self.window_start;
        if elapsed >= Self::WINDOW {
            self.busy = self.in_window as f64 / elapsed.as_secs_f64() >= Self::BUSY_RATE;
            self.window_start = now;
            self.in_window = 0;
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
