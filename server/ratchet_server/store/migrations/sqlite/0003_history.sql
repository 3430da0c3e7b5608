-- Failed-run operations: a run created by replaying or retrying another names it.
ALTER TABLE runs ADD COLUMN replay_of TEXT;
-- A person hid the run from listings (DiscardRun).
ALTER TABLE runs ADD COLUMN discarded_at DOUBLE PRECISION;
-- Retention: finished runs, oldest first.
CREATE INDEX runs_finished ON runs (finished_at) WHERE finished_at IS NOT NULL
