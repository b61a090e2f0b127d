-- Routing (provider/model prefixes and fallbacks): record what was asked of whom, and who
-- actually answered, for reports on fallbacks and per-provider failure rates.
ALTER TABLE jobs
    ADD COLUMN upstream_model  text,   -- model name sent to the provider (prefix stripped)
    ADD COLUMN served_provider text,   -- provider that produced the outcome
    ADD COLUMN served_model    text;   -- upstream model that produced the outcome

CREATE INDEX jobs_provider_submitted_at_idx ON jobs (provider, submitted_at);
