-- Long-poll (`x-ferry-wait`): a poll that waits for a job marks it watched; finishing a watched
-- job sends NOTIFY ferry_job_done with its id, which wakes the waiting api at once. Jobs
-- nobody waits for send nothing (PostgreSQL serialises the commits of notifying transactions).
ALTER TABLE jobs ADD COLUMN watched boolean NOT NULL DEFAULT false;
