-- Child waits end in the last child's own transaction (issue 11): each
-- pending child-wait step counts its unfinished children here: the
-- transaction that makes a child final counts it down, and the one that
-- reaches 0 completes the parent's step and wakes the parent
-- (store/_waits.children_final_txn). A row lives while its wait is pending,
-- a replayed child counts up again. The sweep in engine/timers.py
-- (finish_child_waits) is only a safety net now.
CREATE TABLE child_waits (
    parent_run_id   TEXT NOT NULL,
    step_key        TEXT NOT NULL,
    pending         INTEGER NOT NULL,
    PRIMARY KEY (parent_run_id, step_key)
);
-- The waits pending now (one whose children have all finished is left to the sweep).
INSERT INTO child_waits (parent_run_id, step_key, pending)
SELECT s.run_id, s.key, COUNT(*)
FROM steps AS s JOIN runs AS c ON c.parent_run_id = s.run_id AND c.parent_step_key = s.key
WHERE s.status = 'RUNNING' AND s.kind = 'child' AND c.status IN ('QUEUED', 'RUNNING', 'WAITING')
GROUP BY s.run_id, s.key;
-- Unfinished children only: the sweep's "any child unfinished?" is one probe per wait.
CREATE INDEX runs_unfinished_children ON runs (parent_run_id, parent_step_key)
    WHERE parent_run_id IS NOT NULL AND status IN ('QUEUED', 'RUNNING', 'WAITING');
