-- Anomaly scores for recorded sensor series: the pipeline behind the NAB benchmark
-- (benches/nab.sh, docs/anomaly-detection.md), and a template for scoring any recording.
-- One row a reading, e.g. a CSV with a header `timestamp,value`:
--     2014-04-01 00:00:00,20.5
--
--   fleetsql replay pipelines/nab.sql --input machine_room.csv --set device_id=room-1
--
-- writes, for every reading in input order, its timestamp (the text as recorded) and an
-- anomaly score in [0, 1] to the Parquet table `scores` (and scores.csv with --csv). A
-- score of 0.4 or more is an alarm. `anomaly_likelihood` keeps one model per device_id:
-- replay several recordings at once with --key-from-file device_id. The same query runs
-- live on MQTT (nab/<device_id>/telemetry) with `fleetsql run`.

CREATE TABLE readings (
    timestamp VARCHAR NOT NULL,
    value     DOUBLE
) WITH (
    connector  = 'mqtt',
    type       = 'source',
    topic      = 'nab/{device_id}/telemetry',
    event_time = 'timestamp'
);

CREATE TABLE scores WITH (connector = 'parquet');

INSERT INTO scores
SELECT timestamp,
       coalesce(anomaly_likelihood(value) OVER (PARTITION BY device_id)['score'], 0) AS anomaly_score
FROM readings;
