-- Wardgate controller store: identity (issue 5). Local users' second factor, users provisioned
-- from OpenID providers, login throttling, and login sessions.
-- Never edit an applied migration: add a new numbered file instead.

-- TOTP (RFC 6238). The secret must be readable to check codes, so it cannot be hashed; it is
-- base32 as in the otpauth URI. totp_last_step is the time step of the last accepted code, so
-- a code (or an older one) is never accepted twice.
ALTER TABLE users ADD COLUMN totp_secret TEXT;
ALTER TABLE users ADD COLUMN totp_last_step BIGINT;

-- Users that come from an OpenID provider: the provider's issuer and its stable subject id.
-- Local users have both NULL (several NULL rows are allowed by the unique index on both
-- engines).
ALTER TABLE users ADD COLUMN oidc_issuer TEXT;
ALTER TABLE users ADD COLUMN oidc_subject TEXT;

CREATE UNIQUE INDEX users_oidc_identity ON users (oidc_issuer, oidc_subject);

-- Failed local logins per user name as typed (also names that do not exist, so the answer
-- does not reveal which exist). failures count within the window that started at
-- window_start_ms; locked_until_ms is set when they reach the threshold.
CREATE TABLE login_throttle (
    username        TEXT PRIMARY KEY,
    failures        BIGINT NOT NULL,
    window_start_ms BIGINT NOT NULL,
    locked_until_ms BIGINT
);

-- Login sessions: one per login of a user on a device. A device uses its newest live session;
-- grants never outlive it. groups is the JSON list of groups from the provider's claims at
-- login (OIDC), NULL for local users (their groups are read from the store at each decision).
-- No refresh token or ID token is stored: none leaves the login that made the session.
CREATE TABLE sessions (
    id            TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL REFERENCES users (id),
    device_id     TEXT NOT NULL REFERENCES devices (id),
    method        TEXT NOT NULL CHECK (method IN ('local', 'oidc')),
    provider      TEXT,
    mfa           BIGINT NOT NULL CHECK (mfa IN (0, 1)),
    groups        TEXT,
    created_ms    BIGINT NOT NULL,
    last_used_ms  BIGINT NOT NULL,
    expires_ms    BIGINT NOT NULL,
    idle_timeout_ms BIGINT NOT NULL,
    ended_ms      BIGINT,
    end_reason    TEXT
);

CREATE INDEX sessions_device_id ON sessions (device_id, created_ms);
CREATE INDEX sessions_user_id ON sessions (user_id);
CREATE INDEX sessions_open ON sessions (ended_ms, expires_ms);
