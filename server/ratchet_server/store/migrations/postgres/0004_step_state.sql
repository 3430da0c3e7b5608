-- ctx.state as saved with the step's COMPLETED checkpoint: a worker replaying
-- the run's completed steps restores it as the replay passes each one, so
-- updates made between steps are not applied twice after a crash.
ALTER TABLE steps ADD COLUMN state TEXT
