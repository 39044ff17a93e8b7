//! Where rows go: Parquet tables (raw telemetry, sink tables, dead letters) and MQTT
//! commands to devices.

pub mod commands;
pub mod parquet;
