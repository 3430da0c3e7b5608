-- Lost leases are counted apart from attempts (issue 10): how many times the
-- run's worker died or went silent.
ALTER TABLE runs ADD COLUMN lease_losses INTEGER NOT NULL DEFAULT 0;
-- Set once the run has failed for good without its worker's report (lease-loss
-- bound): ErrorInfo as JSON. The run's next lease is a finishing lease that
-- carries it, and whatever that lease reports, the run ends FAILED with it.
ALTER TABLE runs ADD COLUMN final_error TEXT;
-- 1 when the task's workers understand finishing leases (TaskDefinition.handles_final_error).
ALTER TABLE tasks ADD COLUMN handles_final_error INTEGER NOT NULL DEFAULT 0
