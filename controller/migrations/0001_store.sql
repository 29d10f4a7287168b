-- Wardgate controller store, first schema.
--
-- One migration set for SQLite and PostgreSQL, so only portable types are used:
-- ids and text are TEXT, instants are BIGINT milliseconds since the Unix epoch, flags are
-- BIGINT 0/1, enums are TEXT with a CHECK, lists and JSON documents are TEXT holding JSON.
-- Never edit an applied migration: add a new numbered file instead.

-- Small key/value settings (e.g. the controller's own id or schema-independent knobs).
CREATE TABLE settings (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Admin API tokens. Only the SHA-256 hex of the token is stored.
CREATE TABLE admin_tokens (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT,
    revoked_ms BIGINT
);

-- Local users. password_hash is an argon2id PHC string, NULL for users who sign in elsewhere.
CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    username      TEXT NOT NULL UNIQUE,
    display_name  TEXT NOT NULL,
    password_hash TEXT,
    disabled      BIGINT NOT NULL DEFAULT 0 CHECK (disabled IN (0, 1)),
    created_ms    BIGINT NOT NULL
);

-- Single-use, expiring tokens a gateway presents once to join.
CREATE TABLE join_tokens (
    id           TEXT PRIMARY KEY,
    gateway_name TEXT NOT NULL,
    networks     TEXT NOT NULL,
    token_hash   TEXT NOT NULL UNIQUE,
    created_ms   BIGINT NOT NULL,
    expires_ms   BIGINT NOT NULL,
    used_ms      BIGINT
);

CREATE TABLE gateways (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL UNIQUE,
    wg_public_key     TEXT NOT NULL,
    endpoint          TEXT NOT NULL,
    networks          TEXT NOT NULL,
    cert_fingerprint  TEXT NOT NULL UNIQUE,
    status            TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    created_ms        BIGINT NOT NULL,
    last_seen_ms      BIGINT,
    status_changed_ms BIGINT
);

-- Enrolled (or enrolling) client devices. cert_* are set when the device is approved and kept
-- afterwards, so a revoked device's certificate still resolves to a revoked device.
CREATE TABLE devices (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL,
    owner_user_id    TEXT NOT NULL REFERENCES users (id),
    status           TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'denied', 'revoked')),
    csr_pem          TEXT NOT NULL,
    cert_pem         TEXT,
    cert_fingerprint TEXT UNIQUE,
    poll_token_hash  TEXT NOT NULL UNIQUE,
    os               TEXT NOT NULL,
    hostname         TEXT NOT NULL,
    created_ms       BIGINT NOT NULL,
    decided_ms       BIGINT
);

CREATE INDEX devices_owner_user_id ON devices (owner_user_id);

-- Append-only, hash-chained audit log. seq is assigned by the store (last + 1) and is the
-- primary key, so two writers that raced would collide instead of forking the chain.
CREATE TABLE audit_log (
    seq       BIGINT PRIMARY KEY,
    at_ms     BIGINT NOT NULL,
    actor     TEXT NOT NULL,
    action    TEXT NOT NULL,
    target    TEXT NOT NULL,
    outcome   TEXT NOT NULL,
    detail    TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL UNIQUE
);

CREATE INDEX audit_log_at_ms ON audit_log (at_ms);
