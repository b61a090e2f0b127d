-- Webhooks: a signed POST to an endpoint the operator registered, when an async job ends.
-- Callers name an endpoint (x-bf-async-webhook: NAME); they never give a URL.
CREATE TABLE webhook_endpoints (
    id               uuid        PRIMARY KEY,
    name             text        NOT NULL,
    url              text        NOT NULL,             -- http(s); redirects are not followed
    -- The signing secret (whsec_ + base64). Kept in clear: signing needs it.
    secret           text        NOT NULL,
    -- After a rotation the previous secret still signs (a second signature) until then.
    previous_secret  text,
    previous_until   timestamptz,
    include_response boolean     NOT NULL DEFAULT false, -- the result inline in the payload
    enabled          boolean     NOT NULL DEFAULT true,  -- disabled: refused on submit, not sent
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    removed_at       timestamptz                         -- removed: hidden, kept for history
);

-- A name names one live endpoint; a removed endpoint's name may be used again.
CREATE UNIQUE INDEX webhook_endpoints_name_idx ON webhook_endpoints (name)
    WHERE removed_at IS NULL;

-- An endpoint bound to keys may be named only by jobs of those keys; unbound: by any caller.
CREATE TABLE webhook_endpoint_keys (
    endpoint_id  uuid NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    key_id       uuid NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    PRIMARY KEY (endpoint_id, key_id)
);

-- The endpoint a job's end is announced to (NULL: none, the usual case).
ALTER TABLE jobs ADD COLUMN webhook_endpoint_id uuid REFERENCES webhook_endpoints (id);

-- The outbox of webhooks: one row per job that named an endpoint, written in the transaction
-- that finishes the job, so no crash can lose it. The row is the truth; a message on
-- <ns>.webhooks only says "look at this delivery".
CREATE TABLE webhook_deliveries (
    id               uuid        PRIMARY KEY,            -- webhook-id: msg_ + 32 hex digits
    job_id           uuid        NOT NULL UNIQUE REFERENCES jobs (id) ON DELETE CASCADE,
    endpoint_id      uuid        NOT NULL REFERENCES webhook_endpoints (id),
    event_type       text        NOT NULL
                     CHECK (event_type IN ('async_job.completed', 'async_job.failed')),
    -- The exact body signed and sent on every attempt. Dropped once the delivery is final:
    -- it may hold the job's response, which must not outlive the result by much.
    payload          bytea,
    state            text        NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts         integer     NOT NULL DEFAULT 0,     -- attempts started
    lease_until      timestamptz,                        -- a worker is sending it until then
    next_attempt_at  timestamptz,                        -- waiting for a retry until then
    published_at     timestamptz,                        -- broker confirmed a message (NULL: never)
    last_status      smallint,                           -- the receiver's last HTTP status
    last_error       text,                               -- why the last attempt failed
    created_at       timestamptz NOT NULL DEFAULT now(), -- = the job's end
    finished_at      timestamptz                         -- delivered or failed
);

-- The reconciler's scans (unpublished, overdue, stale): pending deliveries only.
CREATE INDEX webhook_deliveries_pending_idx ON webhook_deliveries (created_at)
    WHERE state = 'pending';
-- Reports and `ferry webhooks list`: deliveries per endpoint over time.
CREATE INDEX webhook_deliveries_endpoint_created_idx
    ON webhook_deliveries (endpoint_id, created_at);

-- One row per attempt, written when it starts and completed when it ends: an attempt whose
-- worker died under it keeps duration_ms, status_code and error NULL.
CREATE TABLE webhook_attempts (
    delivery_id  uuid        NOT NULL REFERENCES webhook_deliveries (id) ON DELETE CASCADE,
    attempt      integer     NOT NULL,
    worker_id    text        NOT NULL,
    started_at   timestamptz NOT NULL DEFAULT now(),
    duration_ms  integer,
    status_code  smallint,                               -- NULL: no HTTP answer
    error        text,                                   -- timeout, connection error, or the
                                                         -- start of a non-2xx answer's body
    PRIMARY KEY (delivery_id, attempt)
);

CREATE INDEX webhook_attempts_started_at_idx ON webhook_attempts (started_at);
