//! Shard routers: device id -> actor, the shard's row buffer, periodic flushes to the engine,
//! and retirement of idle devices.

use hashbrown::HashMap;
use hashbrown::hash_map::EntryRef;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::mpsc::UnboundedSender;

use super::actor::{DeviceActor, DeviceReading, Retire, Sync};
use super::presence::{self, Change, Signal, Status};
use crate::decode::{DeadLetter, Message as Msg, SourceDecoder, SourceShape, reason};
use crate::engine::EngineEvent;
use crate::engine::backlog::Backlog;
use crate::metrics::Metrics;
use crate::pipeline::parse::StatusTopicSpec;

/// One message routed to a shard: what it is and where the device id sits in its topic
/// (so the router looks the actor up without allocating).
pub struct Reading {
    pub kind: Kind,
    pub device: std::ops::Range<usize>,
    pub msg: Msg,
}

/// What a device's message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Telemetry of the source with this index.
    Source(usize),
    /// An announcement on the presence table's status topic.
    Status,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Ingest(pub Vec<Reading>);

/// Hand every buffered row to the engine, including readings still in device mailboxes.
#[derive(Message)]
#[rtype(result = "()")]
pub struct FlushNow;

/// Rows buffered in one shard, one decoder per source. Flushed once the device actors have
/// pushed every reading routed to them, when a source's buffer is full, on a timer, and
/// when asked (`FlushNow`: checkpoints, backpressure, shutdown).
pub struct ShardBuffer {
    decoders: Vec<SourceDecoder>,
    out: UnboundedSender<EngineEvent>,
    max_rows: usize,
    /// Presence changes noticed since the last flush, for the presence stream.
    changes: Vec<Change>,
    /// Bytes on their way to the runner: the topic router pauses while it is full.
    backlog: Arc<Backlog>,
    /// Readings routed to device actors and not yet pushed here. When the last one
    /// arrives, everything routed so far is here: flush then, so a reading waits for its
    /// batch's turn through the actors, not for the flush interval. Flushing only whole
    /// batches keeps the shards in step: a flush of part of a burst would carry event
    /// times that move the watermark past readings still in other device mailboxes.
    in_flight: usize,
    /// Flushes (`FlushNow`) waiting for `in_flight` to reach zero.
    waiting: Vec<tokio::sync::oneshot::Sender<()>>,
}

/// Where presence changes go, after how long a silent device is offline, and what its
/// status topic says.
#[derive(Debug, Clone)]
pub struct PresenceConfig {
    /// The presence table, for dead letters of its status topic.
    pub name: Arc<str>,
    pub stream: usize,
    pub timeout: Duration,
    pub status: Option<Arc<StatusTopicSpec>>,
}

impl PresenceConfig {
    pub fn of(p: &crate::pipeline::CompiledPipeline) -> Option<PresenceConfig> {
        p.presence.as_ref().map(|(spec, stream)| PresenceConfig {
            name: Arc::from(spec.name.as_str()),
            stream: *stream,
            timeout: spec.timeout,
            status: spec.status.clone().map(Arc::new),
        })
    }
}

impl ShardBuffer {
    pub fn new(
        shapes: &[Arc<SourceShape>],
        out: UnboundedSender<EngineEvent>,
        max_rows: usize,
        backlog: Arc<Backlog>,
    ) -> anyhow::Result<Self> {
        let decoders = shapes
            .iter()
            .map(|s| SourceDecoder::new(s.clone()))
            .collect::<Result<_, _>>()?;
        Ok(ShardBuffer {
            decoders,
            out,
            max_rows,
            changes: Vec::new(),
            backlog,
            in_flight: 0,
            waiting: Vec::new(),
        })
    }

    pub fn push(&mut self, source: usize, msg: Msg) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let Some(d) = self.decoders.get_mut(source) else {
            return;
        };
        d.push(msg);
        if d.len() >= self.max_rows {
            self.flush_source(source);
        }
        if self.in_flight == 0 {
            self.flush_sources();
            for w in self.waiting.drain(..) {
                let _ = w.send(());
            }
        }
    }

    fn flush_source(&mut self, source: usize) {
        let (batch, dead) = self.decoders[source].flush();
        // A closed channel means the engine is gone (shutdown); nothing left to tell.
        if let Some(batch) = batch {
            self.backlog.add(batch.get_array_memory_size());
            let _ = self.out.send(EngineEvent::Rows {
                stream: source,
                batch,
            });
        }
        if !dead.is_empty() {
            let _ = self.out.send(EngineEvent::DeadLetters(dead));
        }
    }

    /// Hands on every source's buffered rows.
    fn flush_sources(&mut self) {
        for i in 0..self.decoders.len() {
            if !self.decoders[i].is_empty() {
                self.flush_source(i);
            }
        }
    }

    pub fn flush_all(&mut self, presence: Option<&PresenceConfig>) {
        self.flush_sources();
        if let (Some(p), false) = (presence, self.changes.is_empty()) {
            match presence::rows(&std::mem::take(&mut self.changes)) {
                Ok(batch) => {
                    self.backlog.add(batch.get_array_memory_size());
                    let _ = self.out.send(EngineEvent::Rows {
                        stream: p.stream,
                        batch,
                    });
                }
                Err(e) => tracing::error!("presence rows: {e}"),
            }
        }
    }
}

struct Entry {
    addr: Addr<DeviceActor>,
    last_seen: Instant,
    presence: Status,
}

pub struct ShardRouter {
    devices: HashMap<Arc<str>, Entry>,
    buffer: Rc<RefCell<ShardBuffer>>,
    metrics: Arc<Metrics>,
    idle_timeout: Duration,
    flush_interval: Duration,
    presence: Option<PresenceConfig>,
    /// Devices online and offline in this shard as last added to `fleetsql_devices`.
    counted: [i64; 2],
    /// Many actors retired at the last sweep: give their memory back at this one, once
    /// they have stopped and freed it.
    trim_pending: bool,
}

/// Retiring at least this many actors at once is worth returning memory to the system.
const TRIM_AFTER_RETIRING: usize = 1000;

impl Actor for ShardRouter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Readings arriving faster than they are handled wait here, not in an unbounded queue.
        ctx.set_mailbox_capacity(64);
        ctx.run_interval(self.flush_interval, |act, _| {
            act.buffer.borrow_mut().flush_all(act.presence.as_ref())
        });
        let shortest = match &self.presence {
            Some(p) => p.timeout.min(self.idle_timeout),
            None => self.idle_timeout,
        };
        let sweep = (shortest / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
        ctx.run_interval(sweep, |act, _| act.retire_idle());
    }
}

impl ShardRouter {
    /// Marks silent devices offline and retires idle actors (offline first, if the idle
    /// timeout is the shorter).
    fn retire_idle(&mut self) {
        let now = Instant::now();
        let now_ms = crate::time::now_ms();
        let timeout = self.idle_timeout;
        let presence = self.presence.as_ref().map(|p| p.timeout.as_millis() as i64);
        if std::mem::take(&mut self.trim_pending) {
            crate::mem::trim();
        }
        let before = self.devices.len();
        let mut changes = Vec::new();
        self.devices.retain(|id, e| {
            if let Some(p) = presence {
                changes.extend(e.presence.check(id, now_ms, p));
            }
            let keep = now.duration_since(e.last_seen) < timeout;
            if !keep {
                if presence.is_some() {
                    changes.extend(e.presence.retire(id, now_ms));
                }
                e.addr.do_send(Retire);
            }
            keep
        });
        if before - self.devices.len() >= TRIM_AFTER_RETIRING {
            self.devices.shrink_to_fit();
            self.trim_pending = true;
        }
        self.record(changes);
        self.count_devices();
    }

    /// Brings this shard's share of `fleetsql_devices` up to date (recounted rather than
    /// tracked change by change: retirement forgets devices in either state).
    fn count_devices(&mut self) {
        if self.presence.is_none() {
            return;
        }
        let online = self
            .devices
            .values()
            .filter(|e| e.presence.is_online())
            .count() as i64;
        let now = [online, self.devices.len() as i64 - online];
        for (i, status) in [presence::ONLINE, presence::OFFLINE].iter().enumerate() {
            self.metrics
                .devices
                .with_label_values(&[status])
                .add(now[i] - self.counted[i]);
        }
        self.counted = now;
    }

    fn record(&mut self, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        for c in &changes {
            self.metrics
                .presence_changes
                .with_label_values(&[c.status])
                .inc();
        }
        self.buffer.borrow_mut().changes.extend(changes);
    }

    /// What a status topic message says; a payload meaning neither is a dead letter.
    fn status_of(&self, msg: &Msg) -> Result<Option<bool>, Box<DeadLetter>> {
        let Some((p, spec)) = self
            .presence
            .as_ref()
            .and_then(|p| Some((p, p.status.as_ref()?)))
        else {
            return Ok(None);
        };
        presence::parse_status(spec, &msg.payload).map_err(|error| {
            Box::new(DeadLetter {
                source: Some(p.name.to_string()),
                error,
                topic: msg.topic.clone(),
                payload: msg.payload.clone(),
                reason: reason::BAD_STATUS,
                received_at: msg.received_at,
            })
        })
    }

    /// The device's entry, created with its actor on its first message.
    fn entry(&mut self, id: &str, status: impl FnOnce(&Arc<str>) -> Status) -> &mut Entry {
        // One lookup per reading (this runs for every one): hashbrown's entry_ref finds
        // by &str and only allocates the key when the device is new.
        match self.devices.entry_ref(id) {
            EntryRef::Occupied(e) => e.into_mut(),
            EntryRef::Vacant(v) => {
                let id: Arc<str> = Arc::from(id);
                let actor = DeviceActor::new(id.clone(), self.buffer.clone(), self.metrics.clone());
                let presence = status(&id);
                v.insert(Entry {
                    addr: actor.start(),
                    last_seen: Instant::now(),
                    presence,
                })
            }
        }
    }
}

impl Handler<Ingest> for ShardRouter {
    type Result = ();

    fn handle(&mut self, Ingest(readings): Ingest, _ctx: &mut Self::Context) {
        let now = Instant::now();
        let mut changes = Vec::new();
        let mut dead = Vec::new();
        let tracked = self.presence.is_some();
        // Every source reading goes to its device actor below.
        self.buffer.borrow_mut().in_flight += readings
            .iter()
            .filter(|r| matches!(r.kind, Kind::Source(_)))
            .count();
        for r in readings {
            let at = r.msg.received_at;
            let signal = match r.kind {
                Kind::Source(_) => Signal::Reading,
                Kind::Status => match self.status_of(&r.msg) {
                    Ok(Some(online)) => Signal::Announced(online),
                    Ok(None) => continue,
                    Err(d) => {
                        dead.push(*d);
                        continue;
                    }
                },
            };
            let id = &r.msg.topic[r.device.clone()];
            let mut first = None;
            let entry = self.entry(id, |id| {
                let (s, c) = Status::first(id, signal, at);
                first = Some(c);
                s
            });
            let change = first.or_else(|| entry.presence.next(|| Arc::from(id), signal, at));
            if tracked {
                changes.extend(change);
            }
            entry.last_seen = now;
            if let Kind::Source(source) = r.kind {
                entry.addr.do_send(DeviceReading { source, msg: r.msg });
            }
        }
        self.record(changes);
        if !dead.is_empty() {
            let _ = self
                .buffer
                .borrow()
                .out
                .send(EngineEvent::DeadLetters(dead));
        }
    }
}

impl Handler<FlushNow> for ShardRouter {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: FlushNow, ctx: &mut Self::Context) -> Self::Result {
        let flush = |act: &mut Self| act.buffer.borrow_mut().flush_all(act.presence.as_ref());
        let last = {
            let mut buffer = self.buffer.borrow_mut();
            if buffer.in_flight == 0 {
                None
            } else {
                let (tx, rx) = tokio::sync::oneshot::channel();
                buffer.waiting.push(tx);
                Some(rx)
            }
        };
        // Every reading routed is already in the buffer.
        let Some(last) = last else {
            flush(self);
            return Box::pin(async {});
        };
        // Readings are still in device mailboxes: the buffer says when the last one is
        // pushed. The shard takes no new readings meanwhile (`ctx.wait`), so the count only
        // goes down. Asking every device actor instead (a `Sync` each, answered in mailbox
        // order) costs a message per device per flush, which with 100,000 devices and a
        // checkpoint every few seconds was most of the shard's work; it stays as a
        // backstop, should a count ever go astray.
        let (done, answer) = tokio::sync::oneshot::channel();
        ctx.wait(
            async move { tokio::time::timeout(FLUSH_BACKSTOP, last).await.is_ok() }
                .into_actor(self)
                .then(|counted, act, _| {
                    let syncs: Vec<_> = if counted {
                        Vec::new()
                    } else {
                        tracing::warn!("a shard flush fell back to asking every device actor");
                        act.devices.values().map(|e| e.addr.send(Sync)).collect()
                    };
                    async move {
                        futures::future::join_all(syncs).await;
                        counted
                    }
                    .into_actor(act)
                })
                .map(move |counted, act, _| {
                    if !counted {
                        // Every device has answered: nothing routed is still on its way.
                        act.buffer.borrow_mut().in_flight = 0;
                    }
                    flush(act);
                    let _ = done.send(());
                }),
        );
        Box::pin(async move {
            let _ = answer.await;
        })
    }
}

/// How long a flush waits for the readings in device mailboxes before asking each device.
const FLUSH_BACKSTOP: Duration = Duration::from_secs(5);

/// The running shards: their addresses and the actix system that hosts them.
pub struct Shards {
    pub routers: Vec<Addr<ShardRouter>>,
    /// `None` for a shard inline on the caller's actix system.
    system: Option<actix::System>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Shards {
    /// Flushes every shard; returns once their rows are on the engine's channel.
    pub async fn flush(&self) {
        flush_shards(&self.routers).await
    }

    pub fn stop(mut self) {
        if let Some(system) = &self.system {
            system.stop();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Flushes the shards; returns once every reading routed to them before is on the engine's
/// channel, as rows or dead letters.
pub async fn flush_shards(routers: &[Addr<ShardRouter>]) {
    let all: Vec<_> = routers.iter().map(|r| r.send(FlushNow)).collect();
    for r in futures::future::join_all(all).await {
        if let Err(e) = r {
            tracing::warn!("shard flush failed: {e}");
        }
    }
}

/// Starts an actix system on its own thread with `n` arbiters, one shard router on each;
/// with `n == 0`, one shard router on the caller's own actix system instead (`fleetsql run
/// --shards 0`): the topic router's hand-over is then a wake on the same thread, not the
/// `write(2)` to an eventfd that wakes a sleeping arbiter, which profiles showed was an
/// eighth of the engine's CPU on a round trip (docs/benchmarks.md).
// Each argument is a different part of the engine the shards are wired to; a struct
// gathering them would only be unpacked here.
#[allow(clippy::too_many_arguments)]
pub fn start_shards(
    n: usize,
    shapes: Vec<Arc<SourceShape>>,
    out: UnboundedSender<EngineEvent>,
    metrics: Arc<Metrics>,
    idle_timeout: Duration,
    flush_interval: Duration,
    presence: Option<PresenceConfig>,
    backlog: Arc<Backlog>,
) -> anyhow::Result<Shards> {
    let shard = move |buffer: ShardBuffer, metrics: Arc<Metrics>, presence| ShardRouter {
        devices: HashMap::new(),
        buffer: Rc::new(RefCell::new(buffer)),
        metrics,
        idle_timeout,
        flush_interval,
        presence,
        counted: [0, 0],
        trim_pending: false,
    };
    if n == 0 {
        if actix::System::try_current().is_none() {
            anyhow::bail!("shards = 0 (inline) needs the engine to run on an actix system");
        }
        let buffer = ShardBuffer::new(&shapes, out, crate::decode::MAX_BUFFERED_ROWS, backlog)?;
        let router = shard(buffer, metrics, presence);
        return Ok(Shards {
            routers: vec![router.start()],
            system: None,
            thread: None,
        });
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("actix-system".into())
        .spawn(move || {
            let sys = actix::System::new();
            sys.block_on(async move {
                let mut routers = Vec::with_capacity(n);
                for i in 0..n {
                    let arbiter = actix::Arbiter::new();
                    let (shapes, out, metrics) = (shapes.clone(), out.clone(), metrics.clone());
                    let presence = presence.clone();
                    let buffer = ShardBuffer::new(
                        &shapes,
                        out,
                        crate::decode::MAX_BUFFERED_ROWS,
                        backlog.clone(),
                    );
                    let buffer = match buffer {
                        Ok(b) => b,
                        Err(e) => {
                            let _ = tx.send(Err(anyhow::anyhow!("shard {i}: {e}")));
                            return;
                        }
                    };
                    // The buffer is Send; it becomes an Rc inside the arbiter that owns it.
                    let router = ShardRouter::start_in_arbiter(&arbiter.handle(), move |_| {
                        shard(buffer, metrics, presence)
                    });
                    routers.push(router);
                }
                let _ = tx.send(Ok((routers, actix::System::current())));
            });
            let _ = sys.run();
        })?;
    let (routers, system) = rx
        .recv()
        .map_err(|_| anyhow::anyhow!("actix system did not start"))??;
    Ok(Shards {
        routers,
        system: Some(system),
        thread: Some(thread),
    })
}
