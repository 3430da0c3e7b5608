-- Dispatch that does not grow with the backlog (issue 11). runs_ready led
-- with priority, so "ready now" (run_at <= now) could not bound its range and
-- leasing read every delayed run of the task. Ready runs of priority 0 (nearly
-- all) are now found on runs_due, in run_at order, which also gives a task's
-- next due time in one look-up, and the rare others on a small partial index.
DROP INDEX runs_ready;
CREATE INDEX runs_due ON runs (env, task_id, run_at, id) WHERE status = 'QUEUED';
CREATE INDEX runs_ready_priority ON runs (env, task_id, priority DESC, run_at, id)
    WHERE status = 'QUEUED' AND priority <> 0;
