-- Stadium lights: a site's floodlights go on when MOST of its light sensors read dark over
-- the last 30 seconds, and off otherwise. A cloud, a bird or a shadow over one sensor
-- changes nothing: each sensor is first averaged over the window, then the sensors vote.
--
-- Sensors publish on stadium/<site>/<device_id>/light, e.g. stadium/north/s1/light:
--     {"lux": 412, "ts": 1767225600000}          (ts: when measured, epoch milliseconds)
-- Every 30 seconds of event time, each site that had readings gets one command on
-- stadium/<site>/lights:
--     {"on": true}    or    {"on": false}
-- (retained, so a light controller that reconnects learns the current state at once).
-- Each window's vote is also stored per site in the Parquet table `site_light`.
--
--   fleetsql run pipelines/stadium_lights.sql --simulate 5
--
-- Only sensors that reported in a window vote in it. A window closes once a reading 1 s
-- (the default watermark_delay) past its end arrives; when all sensors go quiet, event
-- time moves on with the wall clock after 2 s; at shutdown every open window closes.

CREATE TABLE light (
    lux DOUBLE NOT NULL,
    ts  BIGINT NOT NULL
) WITH (
    connector  = 'mqtt',
    type       = 'source',
    topic      = 'stadium/{site}/{device_id}/light',
    event_time = 'ts'
);

CREATE TABLE lights WITH (
    connector = 'mqtt',
    type      = 'sink',
    topic     = 'stadium/{site}/lights',
    retain    = 'true'
);

CREATE TABLE site_light WITH (connector = 'parquet');

-- The command: per sensor, its average over the window, dark below 300 lux; per site, the
-- share of dark sensors. More than half dark turns the lights on (half is not most).
INSERT INTO lights
WITH per_sensor AS (
    SELECT site, device_id, avg(lux) < 300 AS dark
    FROM TUMBLE(light, event_time, INTERVAL '30 seconds')
    GROUP BY site, device_id
)
SELECT site, avg(CASE WHEN dark THEN 1.0 ELSE 0.0 END) > 0.5 AS on
FROM per_sensor
GROUP BY site;

-- The same vote, with its numbers, for the record.
INSERT INTO site_light
WITH per_sensor AS (
    SELECT window_start, window_end, site, device_id,
           avg(lux) AS avg_lux, avg(lux) < 300 AS dark
    FROM TUMBLE(light, event_time, INTERVAL '30 seconds')
    GROUP BY window_start, window_end, site, device_id
)
SELECT window_start, window_end, site,
       count(*)                                          AS sensors,
       count(*) FILTER (WHERE dark)                      AS dark_sensors,
       round(min(avg_lux), 1)                            AS darkest_lux,
       avg(CASE WHEN dark THEN 1.0 ELSE 0.0 END) > 0.5   AS lights_on
FROM per_sensor
GROUP BY window_start, window_end, site;
