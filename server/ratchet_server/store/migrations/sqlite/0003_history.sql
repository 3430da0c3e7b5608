-- Failed-run operations: a run created by replaying or retrying another names it.
ALTER TABLE runs ADD COLUMN replay_of TEXT
