-- Wardgate controller store: vendor organisations and access requests (issue 7).
-- Never edit an applied migration: add a new numbered file instead.

-- A vendor organisation: a sponsor (a staff user who answers for it), the contract or BAA it
-- works under, and the contract's last day. contract_end is that day as written
-- (YYYY-MM-DD) in contract_zone; contract_end_ms is the instant the day ends there, after
-- which no grant is issued to its members and no request is accepted.
CREATE TABLE vendors (
    name            TEXT PRIMARY KEY,
    sponsor_user_id TEXT NOT NULL REFERENCES users (id),
    contract_ref    TEXT NOT NULL,
    contract_end    TEXT NOT NULL,
    contract_zone   TEXT NOT NULL,
    contract_end_ms BIGINT NOT NULL,
    created_ms      BIGINT NOT NULL
);

-- Members are ordinary users (local with TOTP, or provisioned from the vendor's identity
-- provider); a user belongs to at most one vendor, so their contract is never ambiguous.
CREATE TABLE vendor_members (
    vendor  TEXT NOT NULL REFERENCES vendors (name),
    user_id TEXT NOT NULL REFERENCES users (id),
    PRIMARY KEY (vendor, user_id)
);

CREATE UNIQUE INDEX vendor_members_user_id ON vendor_members (user_id);

-- Access requests: a user asks, from one device, for one resource during [from_ms, until_ms)
-- with a reason (and a ticket). Someone else decides. id is a small number people type
-- (max + 1, settled by the primary key). State changes are conditional UPDATEs on state, so
-- two approvers racing get exactly one decision. notice_sent_ms marks the "ends soon" notice
-- as sent, once, whichever replica sent it.
CREATE TABLE access_requests (
    id               BIGINT PRIMARY KEY CHECK (id > 0),
    user_id          TEXT NOT NULL REFERENCES users (id),
    device_id        TEXT NOT NULL REFERENCES devices (id),
    resource         TEXT NOT NULL,
    from_ms          BIGINT NOT NULL,
    until_ms         BIGINT NOT NULL,
    reason           TEXT NOT NULL,
    ticket           TEXT,
    state            TEXT NOT NULL
        CHECK (state IN ('pending', 'approved', 'denied', 'revoked', 'expired')),
    created_ms       BIGINT NOT NULL,
    decided_ms       BIGINT,
    decided_by       TEXT,
    approver_user_id TEXT REFERENCES users (id),
    decision_reason  TEXT,
    notice_sent_ms   BIGINT,
    CHECK (until_ms > from_ms)
);

CREATE INDEX access_requests_state_until ON access_requests (state, until_ms);
CREATE INDEX access_requests_user_device ON access_requests (user_id, device_id);
