-- Pacing to the providers' rate limits, shared by every worker: one row per provider key
-- (its SHA-256 prefix, never the key). `tat` is the theoretical arrival time of the generic
-- cell rate algorithm: the next free request slot. A worker reserves the slots of the calls it
-- is about to make in one statement (ferry_pace_reserve), and a 429 pushes `blocked_until`
-- out by the provider's retry-after, for every worker at once. Rows are few: one per key
-- that was ever paced.
CREATE TABLE provider_pace (
    provider       text        NOT NULL,
    key_fp         text        NOT NULL,
    interval_s     double precision NOT NULL CHECK (interval_s > 0),  -- 1 / requests per second
    tat            timestamptz NOT NULL DEFAULT now(),
    blocked_until  timestamptz NOT NULL DEFAULT now(),
    -- Tokens: each answer's usage pushes this out by tokens / (tokens per second), for keys
    -- with a token limit; no request slot is given out before it.
    tok_tat        timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, key_fp)
);

-- Reserve up to `wanted` consecutive slots of `interval_s` seconds, none later than `horizon_s`
-- from now. Returns the first slot's offset from now in seconds and how many were granted
-- (0: the first free slot is beyond the horizon; `first_s` then says when it is).
CREATE FUNCTION ferry_pace_reserve(p_provider text, p_key_fp text, p_interval_s double precision,
                                   p_wanted integer, p_horizon_s double precision,
                                   OUT first_s double precision, OUT granted integer)
LANGUAGE plpgsql AS $$
DECLARE
    t_now timestamptz := clock_timestamp();
    base timestamptz;
BEGIN
    INSERT INTO provider_pace (provider, key_fp, interval_s, tat, blocked_until)
    VALUES (p_provider, p_key_fp, p_interval_s, t_now, t_now)
    ON CONFLICT (provider, key_fp) DO NOTHING;
    SELECT greatest(tat, blocked_until, tok_tat, t_now) INTO base FROM provider_pace
    WHERE provider = p_provider AND key_fp = p_key_fp FOR UPDATE;
    first_s := extract(epoch FROM base - t_now);
    granted := least(p_wanted, greatest(0, floor((p_horizon_s - first_s) / p_interval_s)::integer + 1));
    UPDATE provider_pace
    SET tat = base + make_interval(secs => granted * p_interval_s), interval_s = p_interval_s,
        updated_at = t_now
    WHERE provider = p_provider AND key_fp = p_key_fp;
END $$;

-- Calls in flight on keys with `max_concurrency` in the providers file: a lease row per call,
-- taken under the key's pace row lock (so two workers never both take the last one); a worker
-- that died holding one loses it when it expires.
CREATE TABLE provider_leases (
    id          uuid        PRIMARY KEY,
    provider    text        NOT NULL,
    key_fp      text        NOT NULL,
    expires_at  timestamptz NOT NULL
);

CREATE INDEX provider_leases_key_idx ON provider_leases (provider, key_fp, expires_at);

-- Provider 429s a job met: waits for a rate limit, not attempts (those count only failures).
ALTER TABLE jobs ADD COLUMN rate_limited integer NOT NULL DEFAULT 0;
