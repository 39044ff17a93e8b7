-- Scenario b: a windowed aggregation per device, 1-second tumbling windows,
-- into a Parquet table. `fleetsql bench aggregate` runs it with 10,000 devices.
CREATE TABLE climate (temperature DOUBLE, humidity DOUBLE)
  WITH (connector = 'mqtt', type = 'source', topic = '{device_id}/telemetry');

CREATE TABLE per_device_1s WITH (connector = 'parquet');

INSERT INTO per_device_1s
SELECT window_start, window_end, device_id, count(*) AS n,
       avg(temperature) AS avg_temperature,
       min(temperature) AS min_temperature,
       max(temperature) AS max_temperature
FROM TUMBLE(climate, event_time, INTERVAL '1 second')
GROUP BY window_start, window_end, device_id;
