-- Listings and retention on indexes (issue 11).
-- ListRuns pages newest first, (created_at DESC, id DESC) within env. Each
-- filter gets an index in that order, so a page reads about a page of index
-- entries however rare the filter is among the newest runs.
CREATE INDEX runs_list_status ON runs (env, status, created_at DESC, id DESC);
CREATE INDEX runs_list_task ON runs (env, task_id, created_at DESC, id DESC);
-- The expression is list_filter_error@sqlite's, written the same way.
CREATE INDEX runs_list_error ON runs (env, json_extract(error, '$.type'), created_at DESC, id DESC)
    WHERE error IS NOT NULL;
-- A tag's runs in the same order: one row per tag of a run, written with the
-- run. The columns are named apart from the runs' (list_source_tagged joins the two).
CREATE TABLE run_tags (
    run_id          TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    run_env         TEXT NOT NULL,
    tag             TEXT NOT NULL,
    run_created_at  DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (run_id, tag)
);
CREATE INDEX run_tags_listing ON run_tags (run_env, tag, run_created_at DESC, run_id DESC);
INSERT OR IGNORE INTO run_tags (run_id, run_env, tag, run_created_at)
SELECT r.id, r.env, j.value, r.created_at FROM runs AS r, json_each(r.tags) AS j
WHERE r.tags <> '[]';
-- Retention walks finished runs in (finished_at, id) order from a cursor.
DROP INDEX runs_finished;
CREATE INDEX runs_finished ON runs (finished_at, id) WHERE finished_at IS NOT NULL;
