-- Listings and retention on indexes (issue 11).
-- ListRuns pages newest first, (created_at DESC, id DESC) within env. Each
-- filter gets an index in that order, so a page of 50 reads about 50 index
-- entries however rare the filter is among the newest runs. A list of
-- several statuses is not in order on these: it reads the matching rows and
-- sorts them.
CREATE INDEX runs_list_status ON runs (env, status, created_at DESC, id DESC);
CREATE INDEX runs_list_task ON runs (env, task_id, created_at DESC, id DESC);
-- The expression is list_filter_error@postgres's, written the same way.
CREATE INDEX runs_list_error ON runs (env, (CAST(error AS jsonb) ->> 'type'), created_at DESC, id DESC)
    WHERE error IS NOT NULL;
-- A tag's runs in the same order: one row per tag of a run, written with the
-- run (a GIN index on the tags finds a tag's runs but not in page order, so a
-- common tag meant sorting all of its runs, and the planner, which cannot
-- estimate a tag's share, walked runs_listing instead for a rare one). The
-- columns are named apart from the runs' (list_source_tagged joins the two).
CREATE TABLE run_tags (
    run_id          TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    run_env         TEXT NOT NULL,
    tag             TEXT NOT NULL,
    run_created_at  DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (run_id, tag)
);
CREATE INDEX run_tags_listing ON run_tags (run_env, tag, run_created_at DESC, run_id DESC);
INSERT INTO run_tags (run_id, run_env, tag, run_created_at)
SELECT r.id, r.env, t.tag, r.created_at
FROM runs AS r CROSS JOIN LATERAL jsonb_array_elements_text(CAST(r.tags AS jsonb)) AS t(tag)
WHERE r.tags <> '[]'
ON CONFLICT DO NOTHING;
-- Retention walks finished runs in (finished_at, id) order from a cursor.
DROP INDEX runs_finished;
CREATE INDEX runs_finished ON runs (finished_at, id) WHERE finished_at IS NOT NULL;
