//! The per-device actor: presence (first and last message), message count, and the hand-off
//! of each reading to the shard's buffer.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use actix::prelude::*;

use super::router::ShardBuffer;
use crate::decode::Message as Msg;
use crate::metrics::Metrics;

pub struct DeviceActor {
    id: Arc<str>,
    buffer: Rc<RefCell<ShardBuffer>>,
    metrics: Arc<Metrics>,
    first_seen: i64,
    last_seen: i64,
    messages: u64,
}

impl DeviceActor {
    pub fn new(id: Arc<str>, buffer: Rc<RefCell<ShardBuffer>>, metrics: Arc<Metrics>) -> Self {
        DeviceActor {
            id,
            buffer,
            metrics,
            first_seen: 0,
            last_seen: 0,
            messages: 0,
        }
    }
}

impl Actor for DeviceActor {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Self::Context) {
        self.metrics.device_actors.inc();
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        self.metrics.device_actors.dec();
        tracing::debug!(device = %self.id, messages = self.messages, first_seen = self.first_seen, last_seen = self.last_seen, "device actor retired");
    }
}

/// One telemetry message of this device for source `source`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct DeviceReading {
    pub source: usize,
    pub msg: Msg,
}

impl Handler<DeviceReading> for DeviceActor {
    type Result = ();

    fn handle(&mut self, r: DeviceReading, _ctx: &mut Self::Context) {
        if self.messages == 0 {
            self.first_seen = r.msg.received_at;
        }
        self.messages += 1;
        self.last_seen = r.msg.received_at;
        self.buffer.borrow_mut().push(r.source, r.msg);
    }
}

/// Answered once every message sent to the actor before it has been handled.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Sync;

impl Handler<Sync> for DeviceActor {
    type Result = ();
    fn handle(&mut self, _: Sync, _ctx: &mut Self::Context) {}
}

/// Stop: the device has been idle longer than the timeout.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Retire;

impl Handler<Retire> for DeviceActor {
    type Result = ();
    fn handle(&mut self, _: Retire, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
