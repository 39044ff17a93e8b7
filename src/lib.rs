//! fleetsql: a stream processing engine for fleets of IoT devices.
//!
//! The modules follow the data, in the order a telemetry message meets them:
//!
//! ```text
//! MQTT broker (embedded `broker`, or an external one)
//!   -> ingest      one MQTT client: subscribes to every source's topic filter and hands
//!                  (topic, payload, received_at) on in batches; decodes nothing
//!   -> device      shard routers (one per actix arbiter) and one actor per device id:
//!                  presence and per-device state; rows are appended to shard-level buffers
//!   -> decode      a shard's buffered JSON payloads -> one Arrow RecordBatch per source,
//!                  bad messages isolated as dead letters
//!   -> engine      the pipeline runner: views and micro-batches, TUMBLE/HOP/SESSION windows
//!                  per query, watermarks, the compiled DataFusion plans run over each
//!                  closed window, hot reload; `engine::local` runs it in process
//!   -> sink        MQTT command publisher, rolling atomic Parquet tables
//! metrics          one Prometheus registry, served over HTTP
//! pipeline         the SQL file: parsed with sqlparser, rewritten (windows, frames), checked
//!                  and compiled with DataFusion; reference tables
//! functions        engine SQL functions whose state spans windows
//! replay           `fleetsql replay`: the runner over recorded CSV/Parquet files, in event time
//! simulate         simulated devices for zero-setup runs and tests
//! bench            load generators and measurements behind `benches/`
//! mem              resident memory, and returning freed memory to the system
//! ```

pub mod bench;
pub mod broker;
pub mod cli;
pub mod decode;
pub mod device;
pub mod durable;
pub mod engine;
pub mod functions;
pub mod ingest;
pub mod mem;
pub mod metrics;
pub mod mqtt;
pub mod pipeline;
pub mod replay;
pub mod simulate;
pub mod sink;
pub mod time;
