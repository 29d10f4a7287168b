-- Wardgate controller store: refresh tokens of OIDC login sessions (issue 5, S8). The controller
-- redeems the authorization code itself and keeps the provider's refresh token here, never
-- handing it to the client, so it can ask the provider now and then whether the user may
-- still be signed in: a refused refresh (account disabled, token revoked) ends the session.
-- Never edit an applied migration: add a new numbered file instead.

-- One row per refreshable session. token_sealed is the refresh token encrypted with
-- AES-256-GCM under the key file `refresh.key` in the controller's data directory (0600),
-- bound to the session id as associated data, so the database alone (a backup, a stolen
-- file) does not yield usable tokens and a row cannot be moved to another session.
-- client_id is the client the token was issued to (refresh tokens are bound to it).
-- next_refresh_ms is when it is next due (also a lease while one replica refreshes it);
-- failures counts transient provider errors in a row (backoff), last_error names the last.
CREATE TABLE session_refresh (
    session_id      TEXT PRIMARY KEY REFERENCES sessions (id),
    provider        TEXT NOT NULL,
    client_id       TEXT NOT NULL,
    token_sealed    TEXT NOT NULL,
    next_refresh_ms BIGINT NOT NULL,
    failures        BIGINT NOT NULL DEFAULT 0,
    last_error      TEXT
);

CREATE INDEX session_refresh_due ON session_refresh (next_refresh_ms);
