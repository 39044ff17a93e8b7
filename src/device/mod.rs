//! Device actors: one actix actor per device id, grouped in shards.
//!
//! Each shard is a [`ShardRouter`] actor on its own arbiter (thread). It owns the map
//! device id -> actor, creates an actor on a device's first message and retires it after
//! the idle timeout. A [`DeviceActor`] keeps that device's state and appends its readings
//! to the shard's [`ShardBuffer`], which it shares with the router (same thread, so an
//! `Rc`): one Arrow decoder per source and shard, not one per device, keeps 100k devices
//! cheap and their rows in few, large batches. The router also keeps each device's
//! presence ([`presence`]) beside its actor's address, since it is the one that sees every
//! device's traffic and sweeps for silence.

mod actor;
pub mod presence;
mod router;

pub use actor::DeviceActor;
pub use router::{
    FlushNow, Ingest, Kind, PresenceConfig, Reading, ShardBuffer, ShardRouter, Shards,
    flush_shards, start_shards,
};

/// How many shard threads `fleetsql run` starts unless told (`--shards`): one per core,
/// except on two cores or fewer, where it is `0`, the one shard on the engine's own thread.
///
/// On such a box the broker (and often more) shares the cores with the engine, and every
/// hand-over to a shard thread is a wake-up of another CPU. Over four rounds of
/// `fleetsql bench` on two cores, one thread kept the 10,000-device aggregation at its
/// broker's limit where two shard threads fell behind (0.88-1.15 against 0.73-1.02 × the
/// limit at QoS 1), at 20-40 % less CPU per reading in every scenario; docs/benchmarks.md
/// has the runs, and the cases where two threads are ahead.
pub fn default_shards() -> usize {
    match std::thread::available_parallelism().map_or(2, |n| n.get()) {
        cores @ 3.. => cores,
        _ => 0,
    }
}

/// Runs `main` to completion on the runtime `shards` needs: with `0`, an actix system's
/// current-thread runtime, where the one shard's actors start beside the caller's tasks
/// (see [`start_shards`]); otherwise `rt`.
pub fn block_on<F: std::future::Future>(
    shards: usize,
    rt: tokio::runtime::Runtime,
    main: F,
) -> F::Output {
    if shards == 0 {
        drop(rt);
        actix::System::new().block_on(main)
    } else {
        rt.block_on(main)
    }
}
