-- Light summary: the nightlight loop plus a per-device summary every 10 seconds, stored
-- as Parquet (table `light_10s`) for datafusion-cli, DuckDB or pyarrow.
--
--   fleetsql run pipelines/light_summary.sql --simulate 5

CREATE TABLE telemetry (
    light DOUBLE NOT NULL
) WITH (
    connector = 'mqtt',
    type      = 'source',
    topic     = '{device_id}/telemetry'
);

CREATE TABLE commands WITH (
    connector = 'mqtt',
    type      = 'sink',
    topic     = '{device_id}/commands'
);

CREATE TABLE light_10s WITH (connector = 'parquet');

INSERT INTO commands
SELECT device_id, light < 300 AS led_on
FROM telemetry;

-- A tumbling window over event time (here the receive time: the payload declares none).
INSERT INTO light_10s
SELECT window_start, window_end, device_id,
       count(*)   AS readings,
       avg(light) AS avg_light,
       min(light) AS min_light,
       max(light) AS max_light
FROM TUMBLE(telemetry, event_time, INTERVAL '10 seconds')
GROUP BY window_start, window_end, device_id;
