//! The integration tests: one binary, so DataFusion links once. They run the real
//! `fleetsql` binary against a real `mosquitto` started on a free loopback port and against
//! the embedded broker, talk MQTT with mosquitto's own clients, scrape `/metrics`, and read
//! the Parquet output back with DataFusion.

mod backpressure;
mod bench;
mod cli;
mod decode;
mod delivery;
mod detect;
mod end_to_end;
mod event_time;
mod examples;
mod golden;
mod ingest;
mod models;
mod nab;
mod pipeline;
mod reload;
mod replay;
mod runner;
mod util;
mod window;
