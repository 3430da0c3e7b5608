-- The reconciler's invariant scan (select_unfinished_page) pages through
-- RUNNING and WAITING runs in id order every few seconds on every replica;
-- without this index it read the whole runs table, finished runs and all.
CREATE INDEX runs_unfinished ON runs (id) WHERE status IN ('RUNNING', 'WAITING');
