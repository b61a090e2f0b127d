-- Gateway keys: who may call Ferry, with which models, how much. Secrets are never stored:
-- only their SHA-256, and a short prefix for humans to recognise a key by.
CREATE TABLE api_keys (
    id           uuid        PRIMARY KEY,
    name         text        NOT NULL UNIQUE,
    prefix       text        NOT NULL,
    secret_hash  bytea       NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz,
    revoked_at   timestamptz,
    rpm          integer CHECK (rpm > 0),          -- requests per minute
    tpm          bigint  CHECK (tpm > 0),          -- tokens per minute (as providers report)
    concurrency  integer CHECK (concurrency > 0),  -- sync/stream requests in flight
    max_pending  integer CHECK (max_pending > 0),  -- async jobs not finished yet
    models       text[]                            -- glob patterns; NULL: every model
);

-- Per key and minute: requests admitted (taken in chunks by each api) and tokens used (added
-- by workers from the usage providers report). Old windows are deleted by the sweeper.
CREATE TABLE key_usage (
    key_id        uuid        NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    window_start  timestamptz NOT NULL,
    requests      integer     NOT NULL DEFAULT 0,
    tokens        bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, window_start)
);

-- Sync and stream requests in flight, for keys with a concurrency limit. A lease outlives an
-- api that died holding it only until it expires.
CREATE TABLE key_leases (
    id          uuid        PRIMARY KEY,
    key_id      uuid        NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    expires_at  timestamptz NOT NULL
);

CREATE INDEX key_leases_key_id_idx ON key_leases (key_id, expires_at);

-- Jobs (and history rows) belong to a key; reports group by it.
ALTER TABLE jobs ADD COLUMN key_id uuid;

CREATE INDEX jobs_key_submitted_at_idx ON jobs (key_id, submitted_at);
CREATE INDEX jobs_key_unfinished_idx ON jobs (key_id) WHERE status IN ('pending', 'processing');
