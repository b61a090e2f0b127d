-- Anthropic's Message Batches, run as Ferry jobs. A batch is a row here; each of its requests is
-- a row in `jobs` (mode 'batch'), so batch work shares the job history, the workers, their
-- retries and the reports. Request counts are read from the jobs and written here once the
-- batch has ended.
CREATE TABLE batches (
    id                  uuid        PRIMARY KEY,
    caller_hash         bytea       NOT NULL,      -- whose batch: sha256 of the credential
    key_id              uuid,                      -- the gateway key that created it
    request_count       integer     NOT NULL CHECK (request_count > 0),
    created_at          timestamptz NOT NULL DEFAULT now(),
    expires_at          timestamptz NOT NULL,      -- requests not started by then expire
    cancel_initiated_at timestamptz,
    ended_at            timestamptz,               -- when the last request ended
    -- The api publishing the requests last made progress then: until this is
    -- FERRY_OUTBOX_GRACE old, the reconciler leaves the unpublished ones to it.
    publishing_at       timestamptz,
    -- Final counts, written when the batch is seen to have ended.
    succeeded           integer,
    errored             integer,
    canceled            integer,
    expired             integer,
    request_id          text                       -- the api's id of the create request
);

CREATE INDEX batches_caller_created_idx ON batches (caller_hash, created_at DESC, id DESC);
CREATE INDEX batches_in_progress_idx ON batches (expires_at) WHERE ended_at IS NULL;
CREATE INDEX batches_created_at_idx ON batches (created_at);

ALTER TABLE jobs
    ADD COLUMN batch_id    uuid,     -- the batch a request belongs to (kept after the batch)
    ADD COLUMN batch_index integer,  -- its place in the create request
    ADD COLUMN custom_id   text;

CREATE INDEX jobs_batch_idx ON jobs (batch_id, batch_index) WHERE batch_id IS NOT NULL;
CREATE INDEX jobs_batch_status_idx ON jobs (batch_id, status) WHERE batch_id IS NOT NULL;

-- A batch request is a job of mode 'batch'; one that never ran ends `canceled` or `expired`.
-- Replacing the checks rescans the job history with the table locked (the migration is one
-- transaction): on a large history, run `ferry migrate` in a quiet moment.
ALTER TABLE jobs DROP CONSTRAINT jobs_mode_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_mode_check
    CHECK (mode IN ('async', 'sync', 'stream', 'batch'));
ALTER TABLE jobs DROP CONSTRAINT jobs_status_check;
ALTER TABLE jobs ADD CONSTRAINT jobs_status_check
    CHECK (status IN ('pending', 'processing', 'completed', 'failed', 'canceled', 'expired'));
