-- Thermostat: each home's heating follows the average of its rooms, with a dead band so
-- it does not flap. A home has a thermostat with its own sensor plus remote room sensors;
-- all of them publish on homes/<home_id>/<device_id>/temperature, e.g.
-- homes/maple-12/living-room/temperature:
--     {"celsius": 18.7, "ts": 1767225600000}     (ts: when measured, epoch milliseconds)
-- Each home's setpoint comes from pipelines/homes.csv (home_id,setpoint), reloaded when
-- the file changes; homes missing from it are left alone.
--
-- Every minute of event time, per home: each sensor is averaged, then the sensors (so a
-- chatty sensor counts as one room). Below setpoint - 0.5 the thermostat on
-- homes/<home_id>/thermostat is told {"heating": true}; above setpoint + 0.5,
-- {"heating": false} (each minute it stays there, so a missed command is repeated); in
-- between nothing is sent and the thermostat keeps its last command. Every window's
-- decision ('on', 'off' or 'hold') is stored in the Parquet table `heating_decisions`.
--
--   fleetsql run pipelines/thermostat.sql --simulate 5
--
-- (The simulated devices' homes are not in homes.csv, so they get no commands; add
-- home_id-0, home_id-1 and home_id-2 to the file to see some.)

CREATE TABLE temperature (
    celsius DOUBLE NOT NULL,
    ts      BIGINT NOT NULL
) WITH (
    connector  = 'mqtt',
    type       = 'source',
    topic      = 'homes/{home_id}/{device_id}/temperature',
    event_time = 'ts'
);

-- Reference data: the path is relative to this file.
CREATE TABLE homes (
    home_id  VARCHAR NOT NULL,
    setpoint DOUBLE NOT NULL
) WITH (
    connector = 'file',
    path      = 'homes.csv'
);

CREATE TABLE thermostat WITH (
    connector = 'mqtt',
    type      = 'sink',
    topic     = 'homes/{home_id}/thermostat'
);

CREATE TABLE heating_decisions WITH (connector = 'parquet');

-- Commands only outside the dead band.
INSERT INTO thermostat
WITH per_room AS (
    SELECT home_id, device_id, avg(celsius) AS celsius
    FROM TUMBLE(temperature, event_time, INTERVAL '1 minute')
    GROUP BY home_id, device_id
),
per_home AS (
    SELECT home_id, avg(celsius) AS celsius FROM per_room GROUP BY home_id
)
SELECT p.home_id, p.celsius < h.setpoint - 0.5 AS heating
FROM per_home AS p
JOIN homes AS h ON p.home_id = h.home_id
WHERE p.celsius < h.setpoint - 0.5 OR p.celsius > h.setpoint + 0.5;

-- Every window's decision, including the ones that sent nothing.
INSERT INTO heating_decisions
WITH per_room AS (
    SELECT window_start, window_end, home_id, device_id, avg(celsius) AS celsius
    FROM TUMBLE(temperature, event_time, INTERVAL '1 minute')
    GROUP BY window_start, window_end, home_id, device_id
),
per_home AS (
    SELECT window_start, window_end, home_id, count(*) AS rooms, avg(celsius) AS celsius
    FROM per_room
    GROUP BY window_start, window_end, home_id
)
SELECT p.window_start, p.window_end, p.home_id, p.rooms,
       round(p.celsius, 2) AS avg_celsius,
       h.setpoint,
       CASE WHEN p.celsius < h.setpoint - 0.5 THEN 'on'
            WHEN p.celsius > h.setpoint + 0.5 THEN 'off'
            ELSE 'hold' END AS decision
FROM per_home AS p
JOIN homes AS h ON p.home_id = h.home_id;
