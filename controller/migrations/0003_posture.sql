-- Wardgate controller store: device posture. The latest accepted report per device, with the
-- anti-replay counter it carried and when the controller received it (its own clock, so a
-- report's age never depends on the device's). Same portable types as 0001/0002.
-- Never edit an applied migration: add a new numbered file instead.

CREATE TABLE posture_reports (
    device_id   TEXT PRIMARY KEY REFERENCES devices (id),
    counter     BIGINT NOT NULL CHECK (counter > 0),
    report      TEXT NOT NULL,
    received_ms BIGINT NOT NULL
);

CREATE INDEX posture_reports_received_ms ON posture_reports (received_ms);
