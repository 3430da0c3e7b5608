-- Durable waits (sleeps, tokens), run TTL and max duration.
ALTER TABLE steps ADD COLUMN wake_at DOUBLE PRECISION;
ALTER TABLE steps ADD COLUMN token_id TEXT;
CREATE UNIQUE INDEX steps_token ON steps (token_id) WHERE token_id IS NOT NULL;
-- Timers: waits that end by themselves (sleep due, token timeout).
CREATE INDEX steps_timers ON steps (wake_at) WHERE status = 'RUNNING' AND wake_at IS NOT NULL;

-- While WAITING: the JSON list of wait step keys the run is blocked on.
ALTER TABLE runs ADD COLUMN waiting_on TEXT;
-- Not started by then: EXPIRED.
ALTER TABLE runs ADD COLUMN expire_at DOUBLE PRECISION;
-- Not finished by then (set at the first lease): TIMED_OUT.
ALTER TABLE runs ADD COLUMN deadline_at DOUBLE PRECISION;
CREATE INDEX runs_expiry ON runs (expire_at) WHERE status = 'QUEUED' AND expire_at IS NOT NULL;
CREATE INDEX runs_deadline ON runs (deadline_at)
    WHERE status IN ('RUNNING', 'WAITING') AND deadline_at IS NOT NULL;
-- Child runs: which step of the parent created them, and in what order.
ALTER TABLE runs ADD COLUMN parent_step_key TEXT;
ALTER TABLE runs ADD COLUMN child_index INTEGER;
CREATE INDEX runs_parent ON runs (parent_run_id, parent_step_key, child_index)
    WHERE parent_run_id IS NOT NULL;
-- Steps waiting on child runs.
CREATE INDEX steps_child_waits ON steps (run_id) WHERE status = 'RUNNING' AND kind = 'child'
