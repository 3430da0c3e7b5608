-- 1 while the run's last attempt has been given back (a suspension, a
-- released or lost lease: `attempt` reads one less until the next lease), so
-- a cancel or time-out can restore it whatever the run's status by then.
-- Runs WAITING now gave theirs back. A run queued again after a release or a
-- lost lease before this migration cannot be told apart and reads one less.
ALTER TABLE runs ADD COLUMN attempt_given_back INTEGER NOT NULL DEFAULT 0;
UPDATE runs SET attempt_given_back = 1 WHERE status = 'WAITING';
