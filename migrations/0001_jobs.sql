-- Job state and history. One row per request Ferry accepted; it outlives the result (analysts
-- report on it), so everything but the payload lives here and the sweeper never deletes it.
CREATE TABLE jobs (
    id              uuid PRIMARY KEY,
    caller_hash     bytea       NOT NULL,            -- sha256 of the presented credential
    mode            text        NOT NULL DEFAULT 'async'
                    CHECK (mode IN ('async', 'sync', 'stream')),
    model           text        NOT NULL,            -- as requested by the client
    provider        text        NOT NULL,            -- provider that was asked
    status          text        NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'processing', 'completed', 'failed')),
    ttl_seconds     integer     NOT NULL CHECK (ttl_seconds >= 0),
    attempts        integer     NOT NULL DEFAULT 0,  -- provider calls made
    deliveries      integer     NOT NULL DEFAULT 0,  -- times a worker picked the job up
    worker_id       text,
    http_status     smallint,                        -- status of a failure
    error_type      text,
    input_tokens    integer,
    output_tokens   integer,
    cache_creation_input_tokens integer,
    cache_read_input_tokens     integer,
    stop_reason     text,
    submitted_at    timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    completed_at    timestamptz,
    expires_at      timestamptz                      -- completed_at + ttl: result visible until
);

CREATE INDEX jobs_submitted_at_idx ON jobs (submitted_at);
CREATE INDEX jobs_model_submitted_at_idx ON jobs (model, submitted_at);
CREATE INDEX jobs_unfinished_idx ON jobs (submitted_at) WHERE status IN ('pending', 'processing');

-- The payload: the provider's message, or the error envelope of a failed job. Deleted by the
-- sweeper past expires_at; polls treat an expired row as gone before it is deleted.
CREATE TABLE job_results (
    job_id      uuid        PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    body        json        NOT NULL,   -- json, not jsonb: stored and returned verbatim
    expires_at  timestamptz NOT NULL
);

CREATE INDEX job_results_expires_at_idx ON job_results (expires_at);
