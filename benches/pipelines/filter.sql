-- Scenario a: eKuiper's published throughput test, a stateless filter rule
-- (`SELECT * FROM demo WHERE temperature > 50`), into a Parquet table.
-- `fleetsql bench filter` runs it; see docs/benchmarks.md.
CREATE TABLE demo (temperature DOUBLE, humidity DOUBLE)
  WITH (connector = 'mqtt', type = 'source', topic = '{device_id}/telemetry');

CREATE TABLE hot WITH (connector = 'parquet');

INSERT INTO hot
SELECT * FROM demo WHERE temperature > 50;
