-- Nightlight: every light reading gets an answer. A device publishes {"light": 412} on
-- <device_id>/telemetry; the engine answers {"led_on": true} when light < 300, else
-- {"led_on": false}, on <device_id>/commands.
--
--   fleetsql run pipelines/nightlight.sql --simulate 5

-- A source: JSON payloads on an MQTT topic pattern. {device_id} is taken from the topic
-- and becomes a column, as do event_time and received_at.
CREATE TABLE telemetry (
    light DOUBLE NOT NULL
) WITH (
    connector = 'mqtt',
    type      = 'source',
    topic     = '{device_id}/telemetry'
);

-- A command sink: each row becomes one message; the topic is filled from the row, the
-- payload is the row's other columns as a JSON object.
CREATE TABLE commands WITH (
    connector = 'mqtt',
    type      = 'sink',
    topic     = '{device_id}/commands',
    qos       = '1'
);

-- No window: the query runs on micro-batches and answers every reading.
INSERT INTO commands
SELECT device_id, light < 300 AS led_on
FROM telemetry;
