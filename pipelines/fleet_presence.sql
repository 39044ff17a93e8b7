-- Fleet presence: devices that went silent longer than expected, with the time they were
-- last seen. Devices publish anything on fleet/<device_id>/telemetry, e.g.
-- fleet/van-042/telemetry:
--     {"battery": 3.9}
-- The engine marks a device online at its first message and offline once it has sent
-- nothing for the presence timeout (10 seconds here: set it to a few of your devices'
-- reporting intervals). Silence is measured on the engine's clock, not the devices'.
--
-- Each time a device goes offline:
--   - a row in the Parquet table `offline`: device_id, last_seen (its last message),
--     since (offline since when: its last message, too) and detected_at (when the engine
--     noticed: the timeout after last_seen, plus up to a quarter of the timeout);
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
    connector = 'presence',
    timeout   = '10 seconds'
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
