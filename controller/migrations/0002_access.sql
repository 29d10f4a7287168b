-- Wardgate controller store: the access model (groups, policy documents, tunnel addresses,
-- grants). Same portable types as 0001: TEXT ids and JSON, BIGINT ms instants and counters.
-- Never edit an applied migration: add a new numbered file instead.

-- Groups of users; policies grant access to groups, never to single users.
CREATE TABLE groups (
    name        TEXT PRIMARY KEY,
    description TEXT NOT NULL,
    created_ms  BIGINT NOT NULL
);

CREATE TABLE group_members (
    group_name TEXT NOT NULL REFERENCES groups (name),
    user_id    TEXT NOT NULL REFERENCES users (id),
    PRIMARY KEY (group_name, user_id)
);

CREATE INDEX group_members_user_id ON group_members (user_id);

-- Resources, policies and posture profiles are JSON documents whose types belong to the policy
-- engine: the store keeps them by name and does not read inside them.
CREATE TABLE resources (
    name       TEXT PRIMARY KEY,
    spec       TEXT NOT NULL,
    updated_ms BIGINT NOT NULL
);

CREATE TABLE policies (
    name       TEXT PRIMARY KEY,
    spec       TEXT NOT NULL,
    updated_ms BIGINT NOT NULL
);

CREATE TABLE posture_profiles (
    name       TEXT PRIMARY KEY,
    spec       TEXT NOT NULL,
    updated_ms BIGINT NOT NULL
);

-- One row, bumped in the same transaction as every change to groups, memberships and the
-- documents above, so a replica notices another replica's changes by reading one number.
-- Writers update it first, so its row lock also serializes policy changes on PostgreSQL.
CREATE TABLE policy_version (
    id      BIGINT PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL
);

INSERT INTO policy_version (id, version) VALUES (1, 0);

-- A device's address inside the tunnel, shared by all its grants. SQLite cannot add a UNIQUE
-- column, so uniqueness is a separate index (both engines let several rows be NULL).
ALTER TABLE devices ADD COLUMN tunnel_addr TEXT;

CREATE UNIQUE INDEX devices_tunnel_addr ON devices (tunnel_addr);

-- Short-lived, per-resource grants. id is a random positive 62-bit number chosen by the store
-- (it travels as u64 on the wire). Rows are never deleted once issued, except to roll back a
-- grant whose issuance failed; ending one sets status, ended_ms and end_reason.
CREATE TABLE grants (
    id                BIGINT PRIMARY KEY CHECK (id > 0),
    device_id         TEXT NOT NULL REFERENCES devices (id),
    user_id           TEXT NOT NULL REFERENCES users (id),
    resource          TEXT NOT NULL,
    policy            TEXT NOT NULL,
    client_public_key TEXT NOT NULL UNIQUE,
    preshared_key     TEXT NOT NULL,
    tunnel_addr       TEXT NOT NULL,
    rules             TEXT NOT NULL,
    gateway_ids       TEXT NOT NULL,
    issued_ms         BIGINT NOT NULL,
    expires_ms        BIGINT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('active', 'ended')),
    ended_ms          BIGINT,
    end_reason        TEXT,
    renewed_from      BIGINT
);

CREATE INDEX grants_status_expires_ms ON grants (status, expires_ms);
CREATE INDEX grants_device_id ON grants (device_id);
CREATE INDEX grants_user_id ON grants (user_id);

-- Which gateways serve each grant: the same list as grants.gateway_ids (which is what reads
-- return), kept as rows so "the live grants of gateway X" is an indexed lookup. Written once
-- with the grant and never changed.
CREATE TABLE grant_gateways (
    grant_id   BIGINT NOT NULL REFERENCES grants (id),
    gateway_id TEXT NOT NULL REFERENCES gateways (id),
    PRIMARY KEY (grant_id, gateway_id)
);

CREATE INDEX grant_gateways_gateway_id ON grant_gateways (gateway_id);
