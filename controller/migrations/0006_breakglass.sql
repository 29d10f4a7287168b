-- Wardgate controller store: break-glass review queue and webhook notifications (issue 7).
-- Never edit an applied migration: add a new numbered file instead.

-- One row per break-glass grant, written in the same transaction as the grant and its audit
-- rows, so no emergency access exists that the review queue does not know. An administrator
-- closes it with a comment (reviewed_by/reviewed_ms/comment set once, by a conditional UPDATE).
CREATE TABLE break_glass_events (
    id          TEXT PRIMARY KEY,
    grant_id    BIGINT NOT NULL UNIQUE REFERENCES grants (id),
    user_id     TEXT NOT NULL REFERENCES users (id),
    device_id   TEXT NOT NULL REFERENCES devices (id),
    resource    TEXT NOT NULL,
    reason      TEXT NOT NULL,
    at_ms       BIGINT NOT NULL,
    expires_ms  BIGINT NOT NULL,
    reviewed_by TEXT,
    reviewed_ms BIGINT,
    comment     TEXT
);

CREATE INDEX break_glass_events_open ON break_glass_events (reviewed_ms, at_ms);

-- Webhook sinks. The secret signs each delivery (HMAC-SHA256), so it must stay readable here;
-- the admin API never returns it.
CREATE TABLE webhooks (
    id         TEXT PRIMARY KEY,
    url        TEXT NOT NULL,
    secret     TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);

-- The outbox: one row per event and sink, written before any delivery is tried, so events
-- survive a controller restart. next_ms is when the next attempt is due; a worker claims a
-- row by moving next_ms forward (a lease) with a conditional UPDATE, so two replicas never
-- deliver the same row at once. delivered_ms or failed_ms set = done.
CREATE TABLE webhook_outbox (
    id           TEXT PRIMARY KEY,
    event_id     TEXT NOT NULL,
    webhook_id   TEXT NOT NULL,
    body         TEXT NOT NULL,
    attempts     BIGINT NOT NULL,
    next_ms      BIGINT NOT NULL,
    created_ms   BIGINT NOT NULL,
    delivered_ms BIGINT,
    failed_ms    BIGINT,
    last_error   TEXT
);

CREATE INDEX webhook_outbox_due ON webhook_outbox (delivered_ms, failed_ms, next_ms);
