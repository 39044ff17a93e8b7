-- Machine health: a reading far from the machine's own last hour raises an alert and stops
-- the machine. Machines publish several times a second on
-- factory/<line>/<device_id>/telemetry, e.g. factory/line-1/press-07/telemetry:
--     {"vibration": 0.8, "temperature": 61.2, "ts": 1767225600000}   (ts: epoch ms)
--
-- For every reading, the view `scored` compares vibration and temperature with the mean
-- and standard deviation of the same machine's readings over the last hour of event time
-- (a z-score; the state is kept incrementally across micro-batches, not re-read). Once a
-- machine has 30 readings in its last hour, a reading more than 4 standard deviations
-- away on either measure:
--   - is stored in the Parquet table `alerts`, with both scores;
--   - sends factory/<line>/<device_id>/commands:
--         {"stop": true, "reason": "vibration", "vibration": 9.5, "temperature": 61.3}
-- Both read the view, so each score is computed once per reading.
--
--   fleetsql run pipelines/machine_health.sql --simulate 5
--
-- The hour includes the reading being scored, so with n readings in it a single reading
-- scores at most (n - 1) / sqrt(n): a threshold of 4 can fire from 18 readings on (5.3 at
-- 30). The warm-up of 30 keeps the first, rough estimates of the spread from stopping a
-- machine. A machine silent for an hour starts its warm-up again.

CREATE TABLE telemetry (
    vibration   DOUBLE NOT NULL,
    temperature DOUBLE NOT NULL,
    ts          BIGINT NOT NULL
) WITH (
    connector  = 'mqtt',
    type       = 'source',
    topic      = 'factory/{line}/{device_id}/telemetry',
    event_time = 'ts'
);

CREATE TABLE alerts WITH (connector = 'parquet');

CREATE TABLE commands WITH (
    connector = 'mqtt',
    type      = 'sink',
    topic     = 'factory/{line}/{device_id}/commands',
    qos       = '1'
);

-- Each reading with its z-scores against the machine's last hour.
CREATE VIEW scored AS
SELECT line, device_id, event_time, vibration, temperature, readings,
       (vibration - vibration_mean) / NULLIF(vibration_sd, 0)       AS vibration_z,
       (temperature - temperature_mean) / NULLIF(temperature_sd, 0) AS temperature_z
FROM (
    SELECT line, device_id, event_time, vibration, temperature,
           count(*) OVER (PARTITION BY device_id
                          RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) AS readings,
           avg(vibration) OVER (PARTITION BY device_id
                          RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) AS vibration_mean,
           stddev(vibration) OVER (PARTITION BY device_id
                          RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) AS vibration_sd,
           avg(temperature) OVER (PARTITION BY device_id
                          RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) AS temperature_mean,
           stddev(temperature) OVER (PARTITION BY device_id
                          RANGE BETWEEN INTERVAL '1 hour' PRECEDING AND CURRENT ROW) AS temperature_sd
    FROM telemetry
) AS last_hour;

INSERT INTO alerts
SELECT event_time, line, device_id, vibration, temperature,
       round(vibration_z, 2) AS vibration_z, round(temperature_z, 2) AS temperature_z,
       readings
FROM scored
WHERE readings >= 30 AND (abs(vibration_z) > 4 OR abs(temperature_z) > 4);

INSERT INTO commands
SELECT line, device_id, true AS stop,
       CASE WHEN abs(vibration_z) > 4 AND abs(temperature_z) > 4 THEN 'vibration and temperature'
            WHEN abs(vibration_z) > 4 THEN 'vibration'
            ELSE 'temperature' END AS reason,
       vibration, temperature
FROM scored
WHERE readings >= 30 AND (abs(vibration_z) > 4 OR abs(temperature_z) > 4);
