-- Durable async jobs: the row is the one source of truth for a job's life. The broker carries
-- work; what happened is written here, and the reconciler reads it to repair lost messages.
ALTER TABLE jobs
    -- Outbox: when the broker last confirmed a message for this job (NULL: never, so the
    -- reconciler publishes it).
    ADD COLUMN published_at timestamptz,
    -- While processing: the worker's lease, extended while the job runs. A job whose lease ran
    -- out belongs to nobody and is picked up again.
    ADD COLUMN lease_until  timestamptz,
    -- Parked for a delayed retry: not to be run before this.
    ADD COLUMN not_before   timestamptz,
    -- Times the job was taken over from a worker that stopped under it (poison detection).
    ADD COLUMN abandoned    integer NOT NULL DEFAULT 0,
    -- The api's request id of the submit (or of the sync/stream request), joined in the logs.
    ADD COLUMN request_id   text;

-- The reconciler's scans: unfinished async jobs by when they were last published.
CREATE INDEX jobs_unfinished_published_idx ON jobs (published_at)
    WHERE status IN ('pending', 'processing');

-- Idempotent submits: the same key from the same caller names the same job for 24 hours.
CREATE TABLE idempotency_keys (
    caller_hash bytea       NOT NULL,
    key         text        NOT NULL,
    body_hash   bytea       NOT NULL,   -- sha256 of the request body and routing headers
    -- Deferred: the key is claimed first, then its job inserted, in one transaction.
    job_id      uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE
                            DEFERRABLE INITIALLY DEFERRED,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (caller_hash, key)
);

CREATE INDEX idempotency_keys_created_at_idx ON idempotency_keys (created_at);
CREATE INDEX idempotency_keys_job_id_idx ON idempotency_keys (job_id);

-- The outbox's payload: the job message (routing header and the client's body) kept until the
-- job ends, so a job whose message was lost can be published again. Deleted when it finishes.
CREATE TABLE job_payloads (
    job_id   uuid  PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    message  bytea NOT NULL
);
