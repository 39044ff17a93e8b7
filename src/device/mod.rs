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
