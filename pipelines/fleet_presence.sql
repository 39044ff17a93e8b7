-- Fleet presence: devices that went offline, with the time they were last seen.
-- Devices publish anything on fleet/<device_id>/telemetry, e.g.
-- fleet/van-042/telemetry:
--     {"battery": 3.9}
-- The engine marks a device online at its first message and offline once it has sent
-- nothing for the presence timeout (10 seconds here: set it to a few of your devices'
-- reporting intervals). Silence is measured on the engine's clock, not the devices'.
--
-- Devices that can also announce themselves do it on fleet/<device_id>/status: `online`
-- when they connect, and a last will of `offline` (retained) that the broker publishes
-- the moment it loses their connection. Then offline is known at once, not after the
-- timeout. With mosquitto's clients, a device with a will:
--     mosquitto_sub -i van-042 -t fleet/van-042/commands \
--         --will-topic fleet/van-042/status --will-payload offline --will-retain
--
-- Each time a device goes offline:
--   - a row in the Parquet table `offline`: device_id, last_seen (its last telemetry),
--     since (offline since when: its last telemetry when it fell silent, the will's
--     arrival when its connection dropped) and detected_at (when the engine noticed: the
--     timeout after last_seen plus up to a quarter of the timeout, or the will's arrival);
--   - an alert on fleet/alerts/offline:
--         {"device_id": "van-042", "last_seen": "2026-01-01T08:15:02.120Z"}
-- A device that comes back is online again; if it falls silent again, it gets a new row.
--
--   fleetsql run pipelines/fleet_presence.sql --simulate 5
--
-- Simulated devices never fall silent; to see a row appear, be a device for a moment
-- (the embedded broker listens on 127.0.0.1:1883) and wait 10 seconds:
--
--   mosquitto_pub -t fleet/van-042/telemetry -m '{"battery": 3.9}'
--
-- or announce a device's end yourself:
--
--   mosquitto_pub -t fleet/van-042/status -m offline
--
-- Devices still online at shutdown are not listed.

CREATE TABLE telemetry (
    battery DOUBLE
) WITH (
    connector = 'mqtt',
    type      = 'source',
    topic     = 'fleet/{device_id}/telemetry'
);

-- The presence stream: device_id, status ('online' or 'offline'), since, last_seen and
-- event_time (when the change was noticed), one row per change.
CREATE TABLE presence WITH (
    connector    = 'presence',
    timeout      = '10 seconds',
    status_topic = 'fleet/{device_id}/status'
);

CREATE TABLE offline WITH (connector = 'parquet');

CREATE TABLE offline_alerts WITH (
    connector = 'mqtt',
    type      = 'sink',
    topic     = 'fleet/alerts/offline'
);

INSERT INTO offline
SELECT device_id, last_seen, since, event_time AS detected_at
FROM presence
WHERE status = 'offline';

INSERT INTO offline_alerts
SELECT device_id, last_seen
FROM presence
WHERE status = 'offline';
