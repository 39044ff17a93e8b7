//! The load generator: a simulated fleet publishing telemetry to an MQTT broker, at a
//! target rate or flat out, at QoS 0 or 1, and a subscriber measuring what comes back.
//!
//! Devices are topics, not connections: `connections` MQTT clients share the fleet
//! (device `d` publishes on connection `d % connections`), so ten thousand devices do not
//! cost ten thousand sockets on the load side. Each device publishes its readings in order,
//! and MQTT keeps one publisher's order to one subscriber, so the `k`-th command received
//! for a device answers that device's `k`-th reading: the round-trip latency is taken
//! from the time that reading was published.
//!
//! The same code measures the limits the broker sets, in the same run, each in a process
//! of its own: [`count`], a subscriber that only counts the telemetry (the broker's
//! delivery limit), and [`echo`], which answers each telemetry message with a fixed
//! command and parses nothing (the round trip's).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{Event, MqttOptions, Packet, QoS};
use tokio::sync::watch;

/// What devices send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Payload {
    /// `{"light": N}`, N in 0..1000; the nightlight rule answers `led_on = N < 300`.
    Light,
    /// eKuiper's published test: `{"temperature": N, "humidity": N}`, N random in 0..=100.
    Climate,
}

impl Payload {
    /// The `k`-th reading of device `d`, deterministic so a run's expected results are
    /// known (e.g. how many readings have temperature > 50).
    pub fn reading(self, d: usize, k: usize, out: &mut Vec<u8>) {
        use std::io::Write;
        out.clear();
        let r = splitmix((d as u64) << 32 | k as u64);
        let _ = match self {
            Payload::Light => write!(out, r#"{{"light": {}}}"#, r % 1000),
            Payload::Climate => write!(
                out,
                r#"{{"temperature": {}, "humidity": {}}}"#,
                r % 101,
                (r >> 20) % 101
            ),
        };
    }

    /// The temperature of the `k`-th reading of device `d` ([`Payload::Climate`]).
    pub fn temperature(d: usize, k: usize) -> u64 {
        splitmix((d as u64) << 32 | k as u64) % 101
    }
}

/// A well-mixed 64-bit hash (SplitMix64's finaliser): random-looking values, no state.
fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// What to wait for after publishing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// One message on `<device>/commands` per reading; measures latency.
    Commands,
    /// Nothing over MQTT: the caller watches the system under test (see [`run`]'s `done`).
    Nothing,
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub host: String,
    pub port: u16,
    pub devices: usize,
    /// Readings in all; rounded down to a multiple of `devices`.
    pub messages: u64,
    /// Readings per second for the whole fleet; `None` is flat out.
    pub rate: Option<f64>,
    pub qos: u8,
    pub connections: usize,
    pub payload: Payload,
    /// Device ids are `<prefix><6 digits>`.
    pub prefix: String,
    /// Give up waiting for what is expected after this long.
    pub timeout: Duration,
}

impl LoadOptions {
    pub fn per_device(&self) -> usize {
        (self.messages / self.devices.max(1) as u64) as usize
    }

    pub fn total(&self) -> u64 {
        (self.per_device() * self.devices) as u64
    }

    pub fn device_id(&self, d: usize) -> String {
        format!("{}{d:06}", self.prefix)
    }
}

#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub sent: u64,
    /// From the first publish to the last.
    pub send_seconds: f64,
    /// Messages received that were expected (commands or telemetry).
    pub received: u64,
    /// From the first publish to the last expected message received (or to `done`).
    pub seconds: f64,
    /// Round-trip latencies, microseconds, sorted ([`Expect::Commands`] only).
    pub latencies_us: Vec<u32>,
}

impl LoadReport {
    /// Messages per second through the system: all sent over the time until the last
    /// expected message came back.
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.seconds.max(1e-9)
    }

    /// The `q` quantile (0..=1) of the round-trip latency.
    pub fn latency(&self, q: f64) -> Option<Duration> {
        let n = self.latencies_us.len();
        (n > 0).then(|| {
            let i = ((n as f64 * q).ceil() as usize).clamp(1, n) - 1;
            Duration::from_micros(self.latencies_us[i] as u64)
        })
    }
}

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        2 => QoS::ExactlyOnce,
        _ => QoS::AtLeastOnce,
    }
}

fn options(id: &str, host: &str, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, host, port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(true);
    o.set_inflight(1000);
    o.set_max_packet_size(1 << 20, 1 << 20);
    o
}

/// Connects, subscribes to `filter`, and calls `on_message` for every message received
/// until `stop`. Returns once the subscription is acknowledged, with the task polling.
async fn subscribe(
    id: &str,
    host: &str,
    port: u16,
    filter: &str,
    q: u8,
    mut on_message: impl FnMut(&str) + Send + 'static,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (client, mut ev) = crate::mqtt::client(options(id, host, port), 10_000);
    client.subscribe(filter, qos(q)).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let e = tokio::time::timeout_at(deadline.into(), ev.poll())
            .await
            .map_err(|_| anyhow::anyhow!("{id}: no SUBACK from the broker within 10 s"))?;
        match e {
            Ok(Event::Incoming(Packet::SubAck(_))) => break,
            Ok(_) => {}
            Err(e) => anyhow::bail!("{id}: cannot subscribe: {e}"),
        }
    }
    Ok(tokio::spawn(async move {
        let _client = client;
        loop {
            tokio::select! {
                e = ev.poll() => match e {
                    Ok(Event::Incoming(Packet::Publish(p))) => on_message(&p.topic),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!("subscriber connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = stop.changed() => break,
            }
        }
    }))
}

/// Drives a publishing client's event loop on its own task (it writes what `publish`
/// queues; rumqttc reconnects on the next poll after an error) until `stop`.
fn drive(
    mut ev: rumqttc::EventLoop,
    mut stop: watch::Receiver<bool>,
    what: &'static str,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                e = ev.poll() => if let Err(e) = e {
                    tracing::warn!("{what} connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                },
                _ = stop.changed() => break,
            }
        }
    })
}

/// Device index of a topic `<prefix><digits>/...`.
fn device_of(prefix: &str, topic: &str) -> Option<usize> {
    let rest = topic.strip_prefix(prefix)?;
    rest[..rest.find('/')?].parse().ok()
}

/// Publishes the fleet's readings and waits for what `expect` says (or, with
/// [`Expect::Nothing`], until `done()` is true, polled every 10 ms on a blocking thread,
/// e.g. a scrape of the engine's metrics). Fails if it did not all arrive in time.
pub async fn run(
    opts: &LoadOptions,
    expect: Expect,
    done: Option<Box<dyn FnMut() -> bool + Send>>,
) -> anyhow::Result<LoadReport> {
    let per_device = opts.per_device();
    let total = opts.total();
    anyhow::ensure!(total > 0, "no readings to send (messages < devices?)");
    let origin = Instant::now();
    let nanos = move || origin.elapsed().as_nanos() as u64;
    // When each reading was published, for the round-trip latency.
    let sent_at: Arc<Vec<AtomicU64>> = Arc::new(if expect == Expect::Commands {
        (0..total).map(|_| AtomicU64::new(0)).collect()
    } else {
        Vec::new()
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let received = Arc::new(AtomicU64::new(0));
    let last_received = Arc::new(AtomicU64::new(0));
    let (lat_tx, lat_rx) = tokio::sync::oneshot::channel::<Vec<u32>>();
    let subscriber = match expect {
        Expect::Nothing => {
            drop(lat_tx);
            None
        }
        Expect::Commands => {
            let (received, last) = (received.clone(), last_received.clone());
            let sent_at = sent_at.clone();
            let prefix = opts.prefix.clone();
            let mut counts = vec![0u32; opts.devices];
            let mut lat = Vec::with_capacity(total as usize);
            let mut lat_tx = Some(lat_tx);
            let on_message = move |topic: &str| {
                // Answers to anything but the fleet (a readiness probe) are not counted.
                let Some(d) = device_of(&prefix, topic).filter(|d| *d < counts.len()) else {
                    return;
                };
                let k = counts[d] as usize;
                counts[d] += 1;
                if k < per_device {
                    let t0 = sent_at[d * per_device + k].load(Ordering::Relaxed);
                    lat.push(((nanos() - t0) / 1000).min(u32::MAX as u64) as u32);
                }
                let n = received.fetch_add(1, Ordering::Relaxed) + 1;
                last.store(nanos(), Ordering::Relaxed);
                if n == total
                    && let Some(tx) = lat_tx.take()
                {
                    let _ = tx.send(std::mem::take(&mut lat));
                }
            };
            let id = format!("bench-sub-{}", std::process::id());
            Some(
                subscribe(
                    &id,
                    &opts.host,
                    opts.port,
                    "+/commands",
                    opts.qos,
                    on_message,
                    stop_rx.clone(),
                )
                .await?,
            )
        }
    };

    // Publishers: connection c sends devices c, c + C, c + 2C, ... round by round.
    let conns = opts.connections.clamp(1, opts.devices);
    let first_sent = Arc::new(AtomicU64::new(u64::MAX));
    let last_sent = Arc::new(AtomicU64::new(0));
    let mut pubs = Vec::new();
    for c in 0..conns {
        let devices: Vec<usize> = (c..opts.devices).step_by(conns).collect();
        let topics: Vec<String> = devices
            .iter()
            .map(|d| format!("{}/telemetry", opts.device_id(*d)))
            .collect();
        let id = format!("bench-pub-{}-{c}", std::process::id());
        let (client, ev) = crate::mqtt::client(options(&id, &opts.host, opts.port), 10_000);
        let poller = drive(ev, stop_rx.clone(), "publisher");
        let (payload, q) = (opts.payload, qos(opts.qos));
        let interval = opts.rate.map(|r| Duration::from_secs_f64(conns as f64 / r));
        let (sent_at, first, last) = (sent_at.clone(), first_sent.clone(), last_sent.clone());
        let start = tokio::time::Instant::now();
        pubs.push(tokio::spawn(async move {
            let mut buf = Vec::with_capacity(64);
            let mut j = 0u32;
            for k in 0..per_device {
                for (i, &d) in devices.iter().enumerate() {
                    if let Some(iv) = interval {
                        let due = start + iv * j;
                        if due > tokio::time::Instant::now() {
                            tokio::time::sleep_until(due).await;
                        }
                    }
                    j += 1;
                    payload.reading(d, k, &mut buf);
                    let t = nanos();
                    first.fetch_min(t, Ordering::Relaxed);
                    if let Some(s) = sent_at.get(d * per_device + k) {
                        s.store(t, Ordering::Relaxed);
                    }
                    client
                        .publish(topics[i].clone(), q, false, buf.clone())
                        .await?;
                    last.store(nanos(), Ordering::Relaxed);
                }
            }
            anyhow::Ok(client)
        }));
        drop(poller);
    }
    let mut clients = Vec::new();
    for p in pubs {
        clients.push(p.await??);
    }
    let sent = total;
    let send_seconds =
        (last_sent.load(Ordering::Relaxed) - first_sent.load(Ordering::Relaxed)) as f64 / 1e9;

    // Wait for what comes back.
    let deadline = Instant::now() + opts.timeout;
    let end = match (expect, done) {
        (Expect::Nothing, Some(mut done)) => {
            tokio::task::spawn_blocking(move || {
                while !done() {
                    if Instant::now() >= deadline {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Some(nanos())
            })
            .await?
        }
        (Expect::Nothing, None) => Some(last_sent.load(Ordering::Relaxed)),
        _ => {
            while received.load(Ordering::Relaxed) < total && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (received.load(Ordering::Relaxed) >= total)
                .then(|| last_received.load(Ordering::Relaxed))
        }
    };
    let _ = stop_tx.send(true);
    for c in clients {
        let _ = c.try_disconnect();
    }
    if let Some(s) = subscriber {
        let _ = s.await;
    }
    let got = received.load(Ordering::Relaxed);
    let Some(end) = end else {
        anyhow::bail!(
            "incomplete after {:?}: sent {sent}, received {got} of {total} expected",
            opts.timeout
        );
    };
    let mut latencies_us = lat_rx.await.unwrap_or_default();
    latencies_us.sort_unstable();
    Ok(LoadReport {
        sent,
        send_seconds,
        received: got,
        seconds: (end - first_sent.load(Ordering::Relaxed)) as f64 / 1e9,
        latencies_us,
    })
}

/// Publishes one reading as `device` and waits (up to `timeout`) for a message on
/// `<device>/commands`: the system under test is connected and answering.
pub async fn probe(
    host: &str,
    port: u16,
    device: &str,
    payload: &[u8],
    timeout: Duration,
) -> anyhow::Result<()> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let id = format!("bench-probe-{}", std::process::id());
    let filter = format!("{device}/commands");
    let sub = subscribe(
        &id,
        host,
        port,
        &filter,
        1,
        move |_| {
            let _ = tx.send(());
        },
        stop_rx.clone(),
    )
    .await?;
    let (client, ev) = crate::mqtt::client(options(&format!("{id}-pub"), host, port), 10);
    let poller = drive(ev, stop_rx, "probe publisher");
    let deadline = Instant::now() + timeout;
    let mut answered = false;
    // Resend until answered: a system still subscribing misses the first ones.
    while Instant::now() < deadline {
        client
            .publish(
                format!("{device}/telemetry"),
                QoS::AtLeastOnce,
                false,
                payload.to_vec(),
            )
            .await?;
        if tokio::time::timeout(Duration::from_millis(500), rx.recv())
            .await
            .is_ok()
        {
            answered = true;
            break;
        }
    }
    let _ = stop_tx.send(true);
    let _ = sub.await;
    let _ = poller.await;
    anyhow::ensure!(
        answered,
        "no answer on {device}/commands within {timeout:?}"
    );
    Ok(())
}

/// The broker's delivery limit: counts the messages on `+/telemetry`, parsing nothing, in
/// a process of its own (so that its CPU is its own). Prints `ready` once subscribed and
/// `done` once `expect` messages have arrived, then runs until `stop`.
pub async fn count(
    host: &str,
    port: u16,
    q: u8,
    expect: u64,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let id = format!("bench-count-{}", std::process::id());
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let mut done_tx = Some(done_tx);
    let mut n = 0u64;
    let sub = subscribe(
        &id,
        host,
        port,
        "+/telemetry",
        q,
        move |_| {
            n += 1;
            if n == expect
                && let Some(tx) = done_tx.take()
            {
                let _ = tx.send(());
            }
        },
        stop.clone(),
    )
    .await?;
    println!("ready");
    tokio::select! {
        r = done_rx => if r.is_ok() { println!("done") },
        _ = stop.changed() => {},
    }
    let _ = stop.changed().await;
    let _ = sub.await;
    Ok(())
}

/// The round trip's limit: answers every message on `+/telemetry` with `{"led_on":true}`
/// on `<first topic level>/commands`, parsing nothing, until `stop`. One connection
/// subscribes, another publishes, as the engine does.
pub async fn echo(host: &str, port: u16, q: u8, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let id = format!("bench-echo-{}", std::process::id());
    let (client, ev) = crate::mqtt::client(options(&format!("{id}-pub"), host, port), 10_000);
    let poller = drive(ev, stop.clone(), "echo publisher");
    // Unbounded: the subscriber's event loop must never block, and the publisher keeps
    // up with it (what waits here is what the broker would otherwise queue).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let sub = subscribe(
        &id,
        host,
        port,
        "+/telemetry",
        q,
        move |topic| {
            let device = topic.split('/').next().unwrap_or_default();
            let _ = tx.send(format!("{device}/commands"));
        },
        stop.clone(),
    )
    .await?;
    let mut stop3 = stop;
    loop {
        tokio::select! {
            t = rx.recv() => match t {
                Some(t) => client.publish(t, qos(q), false, &b"{\"led_on\":true}"[..]).await?,
                None => break,
            },
            _ = stop3.changed() => break,
        }
    }
    let _ = sub.await;
    poller.abort();
    Ok(())
}
