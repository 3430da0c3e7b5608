-- Every SQL statement Ratchet runs, by name (store/_dialect.py loads this file).
--
-- Parameters are written `:name` (sqlite3's style; the Postgres dialect rewrites
-- them to psycopg's `%(name)s`). `{fragment}` placeholders are filled by the
-- store with a dialect's piece of SQL (set membership, row locks). A statement
-- that differs between the dialects has one version per dialect, named
-- `name@sqlite` and `name@postgres`. No statement decides an outcome: each
-- stores what the engine decided, fenced so that a stale writer changes nothing.

-- name: create_migrations_table
-- Which numbered migrations (store/migrations/<dialect>/NNNN_*.sql) have run.
CREATE TABLE IF NOT EXISTS ratchet_migrations (
    version     INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    applied_at  DOUBLE PRECISION NOT NULL
)

-- name: select_migration_versions
SELECT version FROM ratchet_migrations

-- name: insert_migration
INSERT INTO ratchet_migrations (version, name, applied_at) VALUES (:v, :n, :t)

-- name: insert_api_key
INSERT INTO api_keys (id, env, role, name, key_hash, created_at)
VALUES (:id, :env, :role, :name, :key_hash, :now)

-- name: select_api_key
SELECT id, env, role, name FROM api_keys WHERE key_hash = :key_hash AND revoked_at IS NULL

-- name: list_api_keys
SELECT id, env, role, name, created_at, revoked_at FROM api_keys ORDER BY created_at, id

-- name: revoke_api_key
-- Only a key not revoked yet: a second revoke changes nothing (and says so).
UPDATE api_keys SET revoked_at = :now WHERE id = :id AND revoked_at IS NULL RETURNING id

-- name: upsert_task
INSERT INTO tasks (env, id, version, queue, retry, payload_schema, output_schema, max_duration,
                   handles_final_error, updated_at)
VALUES (:env, :id, :version, :queue, :retry, :payload_schema, :output_schema, :max_duration,
        :handles_final_error, :now)
ON CONFLICT (env, id) DO UPDATE SET
    version = excluded.version, queue = excluded.queue, retry = excluded.retry,
    payload_schema = excluded.payload_schema, output_schema = excluded.output_schema,
    max_duration = excluded.max_duration, handles_final_error = excluded.handles_final_error,
    updated_at = excluded.updated_at

-- name: select_task
SELECT * FROM tasks WHERE env = :env AND id = :id

-- name: select_tasks
-- The environment's registered tasks (ListTasks), in id order; :id '' = all.
SELECT * FROM tasks WHERE env = :env AND (:id = '' OR id = :id) ORDER BY id

-- name: select_run_by_idempotency_key
SELECT * FROM runs WHERE env = :env AND task_id = :task_id AND idempotency_key = :key

-- name: forget_idempotency_key
-- By the expired row's id: matching by key could clear the key of a run a
-- concurrent trigger has just inserted with it.
UPDATE runs SET idempotency_key = NULL WHERE id = :id AND idempotency_key = :key

-- name: insert_run
INSERT INTO runs (id, env, task_id, status, attempt, payload, queue, priority, retry, run_at,
                  idempotency_key, idempotency_expires_at, concurrency_key, tags, metadata,
                  parent_run_id, parent_step_key, child_index, replay_of, ttl, max_duration,
                  expire_at, created_at, updated_at)
VALUES (:id, :env, :task_id, 'QUEUED', 0, :payload, :queue, :priority, :retry, :run_at,
        :idempotency_key, :idempotency_expires_at, :concurrency_key, :tags, :metadata,
        :parent_run_id, :parent_step_key, :child_index, :replay_of, :ttl, :max_duration,
        :expire_at, :now, :now)
ON CONFLICT DO NOTHING
RETURNING *

-- name: insert_run_plain
-- The same, for a batch of runs without idempotency keys (executemany).
INSERT INTO runs (id, env, task_id, status, attempt, payload, queue, priority, retry, run_at,
                  idempotency_key, idempotency_expires_at, concurrency_key, tags, metadata,
                  parent_run_id, parent_step_key, child_index, replay_of, ttl, max_duration,
                  expire_at, created_at, updated_at)
VALUES (:id, :env, :task_id, 'QUEUED', 0, :payload, :queue, :priority, :retry, :run_at,
        :idempotency_key, :idempotency_expires_at, :concurrency_key, :tags, :metadata,
        :parent_run_id, :parent_step_key, :child_index, :replay_of, :ttl, :max_duration,
        :expire_at, :now, :now)

-- name: select_run
SELECT * FROM runs WHERE env = :env AND id = :id

-- name: select_run_any_env
SELECT * FROM runs WHERE id = :id

-- name: select_steps
SELECT * FROM steps WHERE run_id = :run_id ORDER BY created_at, key

-- name: select_steps_of
SELECT * FROM steps WHERE run_id IN {ids} ORDER BY run_id, created_at, key

-- name: lease_ready@sqlite
-- SQLite: one writer at a time, so no row locks are needed. Ready runs of
-- priority 0 (nearly all) come from runs_due in run_at order, bounded by
-- `run_at <= :now`; the rare others from runs_ready_priority; the n-th run
-- in lease order goes to the n-th entry of :owners (a JSON list).
UPDATE runs SET
    status = 'RUNNING', attempt = attempt + 1, attempt_given_back = 0,
    lease_id = :nonce || '.' || runs.id,
    lease_owner = json_extract(:owners, '$[' || (chosen.n - 1) || ']'),
    lease_expires_at = :expires_at,
    started_at = COALESCE(started_at, :now), updated_at = :now,
    deadline_at = COALESCE(deadline_at, :now + max_duration)
FROM (
    SELECT id, row_number() OVER (ORDER BY priority DESC, run_at, id) AS n FROM (
        SELECT * FROM (
            SELECT id, priority, run_at FROM runs
            WHERE env = :env AND status = 'QUEUED' AND task_id IN {task_ids}
              AND priority <> 0 AND run_at <= :now
            ORDER BY priority DESC, run_at, id
            LIMIT :limit)
        UNION ALL
        SELECT * FROM (
            SELECT id, priority, run_at FROM runs
            WHERE env = :env AND status = 'QUEUED' AND task_id IN {task_ids}
              AND priority = 0 AND run_at <= :now
            ORDER BY run_at, id
            LIMIT :limit)
    )
    ORDER BY priority DESC, run_at, id
    LIMIT :limit
) AS chosen
WHERE runs.id = chosen.id
RETURNING *

-- name: lease_ready@postgres
-- Postgres: per task, two bounded index scans: ready runs of priority 0
-- (nearly all) on runs_due, `run_at <= :now` bounding the range so delayed
-- runs are never read, and the rare others on runs_ready_priority. The
-- top :limit of each, merged in lease order (priority DESC, run_at, id), are
-- the top :limit overall. Rows locked but not chosen by the outer LIMIT stay
-- locked only until this transaction ends. The n-th run in lease order goes
-- to the n-th entry of :owners (the dispatcher shares one lease among the
-- sessions of a task set). The same statement writes each lease's history
-- (LEASED, in lease order) and says which leased runs may have steps to load,
-- so that leasing new runs reads nothing more.
WITH ready AS (
    SELECT r.id, r.priority, r.run_at, r.started_at
    FROM unnest(CAST(:task_ids AS text[])) AS t(task_id)
    CROSS JOIN LATERAL (
        SELECT id, priority, run_at, started_at FROM runs
        WHERE env = :env AND status = 'QUEUED' AND task_id = t.task_id
          AND priority <> 0 AND run_at <= :now
        ORDER BY priority DESC, run_at, id
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ) AS r
    UNION ALL
    SELECT r.id, r.priority, r.run_at, r.started_at
    FROM unnest(CAST(:task_ids AS text[])) AS t(task_id)
    CROSS JOIN LATERAL (
        SELECT id, priority, run_at, started_at FROM runs
        WHERE env = :env AND status = 'QUEUED' AND task_id = t.task_id
          AND priority = 0 AND run_at <= :now
        ORDER BY run_at, id
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ) AS r
), chosen AS (
    SELECT id, started_at AS was_started,
           row_number() OVER (ORDER BY priority DESC, run_at, id) AS n
    FROM ready
    ORDER BY priority DESC, run_at, id
    LIMIT :limit
), leased AS (
    UPDATE runs SET
        status = 'RUNNING', attempt = attempt + 1, attempt_given_back = 0,
        lease_id = :nonce || '.' || runs.id,
        lease_owner = (CAST(:owners AS text[]))[chosen.n],
        lease_expires_at = :expires_at,
        started_at = COALESCE(started_at, :now), updated_at = :now,
        deadline_at = COALESCE(deadline_at, :now + max_duration)
    FROM chosen
    WHERE runs.id = chosen.id
    RETURNING runs.*, chosen.n, chosen.was_started IS NOT NULL AS leased_before
), logged AS (
    INSERT INTO run_events (run_id, at, type, attempt, lease_id, data)
    SELECT id, :now, :event_type, attempt, lease_id,
           CAST(json_build_object('owner', lease_owner) AS text)
    FROM leased ORDER BY n
)
-- A run leased before may have steps this statement's snapshot does not show
-- (another coordinator's lease wrote them after it began; the row lock reads
-- the run's newest version, hence started_at): the caller reads those runs'
-- steps in a later statement, which sees them.
SELECT leased.*,
       leased_before OR EXISTS (SELECT 1 FROM steps WHERE steps.run_id = leased.id)
           AS has_steps
FROM leased

-- name: next_run_at@sqlite
-- The earliest run_at among QUEUED runs of the tasks: one bounded look-up
-- per task on runs_due (ORDER BY run_at LIMIT 1), not a scan of the backlog.
SELECT MIN((SELECT run_at FROM runs
            WHERE env = :env AND status = 'QUEUED' AND task_id = t.value
            ORDER BY run_at LIMIT 1)) AS next
FROM json_each(:task_ids) AS t

-- name: next_run_at@postgres
-- The earliest run_at among QUEUED runs of the tasks: one bounded look-up
-- per task on runs_due (ORDER BY run_at LIMIT 1), not a scan of the backlog.
SELECT MIN(n.run_at) AS next FROM unnest(CAST(:task_ids AS text[])) AS t(task_id)
CROSS JOIN LATERAL (
    SELECT run_at FROM runs
    WHERE env = :env AND status = 'QUEUED' AND task_id = t.task_id
    ORDER BY run_at
    LIMIT 1
) AS n

-- name: renew_leases
UPDATE runs SET lease_expires_at = :expires_at
WHERE lease_owner = :owner AND status = 'RUNNING' AND lease_id IN {lease_ids}

-- name: adopt_leases
UPDATE runs SET lease_owner = :owner, lease_expires_at = :expires_at
WHERE lease_id IN {lease_ids} AND status = 'RUNNING' AND env = :env
RETURNING id, lease_id, attempt

-- name: select_expired_leases
-- The lease columns (_rows.lease_ref_from_row), with whether the run's task
-- handles final errors (the lease-loss rule needs it).
SELECT id, lease_id, attempt, retry, lease_owner, lease_losses, final_error,
       COALESCE((SELECT t.handles_final_error FROM tasks AS t
                 WHERE t.env = runs.env AND t.id = runs.task_id), 0) AS handles_final_error
FROM runs
WHERE status = 'RUNNING' AND lease_expires_at < :now
ORDER BY lease_expires_at
LIMIT :limit

-- name: select_owned_leases
SELECT id, lease_id, attempt, retry, lease_owner, lease_losses, final_error,
       COALESCE((SELECT t.handles_final_error FROM tasks AS t
                 WHERE t.env = runs.env AND t.id = runs.task_id), 0) AS handles_final_error
FROM runs
WHERE status = 'RUNNING' AND lease_owner = :owner

-- name: select_lease
SELECT id, lease_id, attempt, retry, lease_owner, lease_losses, final_error,
       COALESCE((SELECT t.handles_final_error FROM tasks AS t
                 WHERE t.env = runs.env AND t.id = runs.task_id), 0) AS handles_final_error
FROM runs
WHERE id = :run_id AND lease_id = :lease_id AND status = 'RUNNING'

-- name: fence_run_state
UPDATE runs SET state = COALESCE(:state, state), updated_at = :now
WHERE id = :run_id AND lease_id = :lease_id AND status = 'RUNNING'
  AND (CAST(:env AS TEXT) IS NULL OR env = :env)
  AND (CAST(:owner AS TEXT) IS NULL OR lease_owner = :owner)

-- name: upsert_step
INSERT INTO steps (run_id, key, kind, status, attempts, retry_base, output, error, created_at,
                   started_at, finished_at, wake_at, token_id, state)
VALUES (:run_id, :key, :kind, :status, :attempts, :retry_base, :output, :error, :now,
        :started_at, :finished_at, :wake_at, :token_id, :state)
{step_conflict}

-- name: step_conflict
-- A fragment, not a statement (filled into upsert_step and apply_step_writes):
-- what a step write does to the step already recorded under its key. A
-- COMPLETED step never changes again.
ON CONFLICT (run_id, key) DO UPDATE SET
    wake_at = COALESCE(excluded.wake_at, steps.wake_at),
    token_id = COALESCE(steps.token_id, excluded.token_id),
    status = excluded.status,
    attempts = CASE WHEN excluded.attempts > steps.attempts
                    THEN excluded.attempts ELSE steps.attempts END,
    retry_base = excluded.retry_base,
    output = excluded.output,
    error = COALESCE(excluded.error, steps.error),
    started_at = COALESCE(steps.started_at, excluded.started_at),
    finished_at = excluded.finished_at,
    state = COALESCE(excluded.state, steps.state)
WHERE steps.status <> 'COMPLETED'

-- name: apply_step_writes@postgres
-- Step writes of many runs as one statement: fence each run by its lease (and
-- environment and session), then record the steps and the history of the
-- runs that passed; returns their ids. Sent alone in autocommit it is its own
-- transaction, so a checkpoint costs one round trip. The caller sorts :ids
-- (run-id order), but the join may visit rows in another order: a deadlock
-- with another batch is possible and is retried (the statement is its own
-- transaction, so running it again is safe). No (run, key) may appear twice
-- (ON CONFLICT cannot change a row twice in one statement).
WITH fenced AS (
    UPDATE runs AS r SET state = COALESCE(v.state, r.state), updated_at = :now
    FROM unnest(CAST(:ids AS text[]), CAST(:leases AS text[]), CAST(:states AS text[]),
                CAST(:envs AS text[]), CAST(:owners AS text[]))
         AS v(id, lease_id, state, env, owner)
    WHERE r.id = v.id AND r.lease_id = v.lease_id AND r.status = 'RUNNING'
      AND (v.env IS NULL OR r.env = v.env) AND (v.owner IS NULL OR r.lease_owner = v.owner)
    RETURNING r.id
), written AS (
    INSERT INTO steps (run_id, key, kind, status, attempts, retry_base, output, error,
                       created_at, started_at, finished_at, wake_at, token_id, state)
    SELECT s.run_id, s.key, s.kind, s.status, s.attempts, s.retry_base, s.output, s.error,
           :now, s.started_at, s.finished_at, s.wake_at, s.token_id, s.state
    FROM unnest(CAST(:s_run_ids AS text[]), CAST(:s_keys AS text[]), CAST(:s_kinds AS text[]),
                CAST(:s_statuses AS text[]), CAST(:s_attempts AS int[]),
                CAST(:s_retry_bases AS int[]), CAST(:s_outputs AS text[]),
                CAST(:s_errors AS text[]), CAST(:s_started AS float8[]),
                CAST(:s_finished AS float8[]), CAST(:s_wake_ats AS float8[]),
                CAST(:s_token_ids AS text[]), CAST(:s_states AS text[]))
         AS s(run_id, key, kind, status, attempts, retry_base, output, error, started_at,
              finished_at, wake_at, token_id, state)
    WHERE s.run_id IN (SELECT id FROM fenced)
    {step_conflict}
), logged AS (
    INSERT INTO run_events (run_id, at, type, attempt, lease_id, step_key, data)
    SELECT e.run_id, e.at, e.type, e.attempt, e.lease_id, e.step_key, e.data
    FROM unnest(CAST(:e_writers AS text[]), CAST(:e_run_ids AS text[]),
                CAST(:e_ats AS float8[]), CAST(:e_types AS text[]),
                CAST(:e_attempts AS int[]), CAST(:e_lease_ids AS text[]),
                CAST(:e_step_keys AS text[]), CAST(:e_data AS text[])) WITH ORDINALITY
         AS e(writer, run_id, at, type, attempt, lease_id, step_key, data, n)
    -- kept when the write that carries the event passed its fence
    WHERE e.writer IN (SELECT id FROM fenced)
    ORDER BY e.n
)
SELECT id FROM fenced

-- name: transition_run
UPDATE runs SET
    status = :status,
    output = COALESCE(:output, output),
    error = CASE WHEN :clear_error = 1 THEN NULL ELSE COALESCE(:error, error) END,
    state = COALESCE(:state, state),
    run_at = COALESCE(:run_at, run_at),
    attempt = attempt - :refund,
    attempt_given_back = attempt_given_back + :refund,
    lease_losses = lease_losses + :losses,
    final_error = CASE WHEN :clear_final_error = 1 THEN NULL
                       ELSE COALESCE(:final_error, final_error) END,
    lease_owner = NULL,
    lease_expires_at = NULL,
    waiting_on = :waiting_on,
    finished_at = :finished_at,
    updated_at = :now
WHERE id = :run_id AND lease_id = :lease_id AND status = :expect_status
  AND (CAST(:env AS TEXT) IS NULL OR env = :env)
  AND (CAST(:owner AS TEXT) IS NULL OR lease_owner = :owner)
  AND (CAST(:expired_before AS DOUBLE PRECISION) IS NULL OR lease_expires_at < :expired_before)
  -- an ordinary lease's outcome does not apply under a finishing lease, nor the reverse
  AND (CAST(:finishing AS INTEGER) IS NULL
       OR (CASE WHEN final_error IS NULL THEN 0 ELSE 1 END) = :finishing)
-- whether the run is a child: a final one counts its wait down (_waits.children_final_txn)
RETURNING parent_run_id

-- name: expire_runs
UPDATE runs SET status = 'EXPIRED', finished_at = :now, updated_at = :now
WHERE id IN (
    SELECT id FROM runs
    WHERE status = 'QUEUED' AND expire_at <= :now AND started_at IS NULL
    LIMIT :limit
    {skip_locked}
)
RETURNING id, attempt

-- name: time_out_runs
-- A run on a finishing lease (final_error set) has failed already: it is left
-- to run its compensations and on-failure hook.
UPDATE runs SET status = 'TIMED_OUT', finished_at = :now, updated_at = :now,
                lease_expires_at = NULL, error = :error,
                attempt = attempt + attempt_given_back, attempt_given_back = 0
WHERE id IN (
    SELECT id FROM runs
    WHERE status IN ('RUNNING', 'WAITING') AND deadline_at <= :now AND final_error IS NULL
    LIMIT :limit
    {skip_locked}
)
RETURNING id, lease_id, lease_owner, attempt

-- name: fence_parent
UPDATE runs SET updated_at = :now
WHERE id = :run_id AND lease_id = :lease_id AND status = 'RUNNING'

-- name: select_children
SELECT id, status, output, error FROM runs
WHERE parent_run_id = :run_id AND parent_step_key = :key
ORDER BY child_index

-- name: cancel_children
-- attempt: an attempt given back (a suspension, a released or lost lease;
-- attempt_given_back, set by the engine's refund_attempt) is restored, so a
-- final run reads its last attempt (cancel_run, time_out_runs alike).
UPDATE runs SET status = 'CANCELED', finished_at = :now, lease_expires_at = NULL,
                updated_at = :now,
                attempt = attempt + attempt_given_back, attempt_given_back = 0
WHERE parent_run_id = :parent AND status IN ('QUEUED', 'RUNNING', 'WAITING')
RETURNING *

-- name: cancel_run
UPDATE runs SET status = 'CANCELED', finished_at = :now, lease_expires_at = NULL,
                updated_at = :now,
                attempt = attempt + attempt_given_back, attempt_given_back = 0
WHERE env = :env AND id = :id AND status IN ('QUEUED', 'RUNNING', 'WAITING')
RETURNING *

-- name: insert_event
INSERT INTO run_events (run_id, at, type, attempt, lease_id, step_key, data)
VALUES (:run_id, :at, :type, :attempt, :lease_id, :step_key, :data)

-- name: select_events
SELECT * FROM run_events WHERE run_id = :run_id ORDER BY id

-- name: select_events_page
SELECT * FROM run_events WHERE run_id = :run_id AND id > :after ORDER BY id LIMIT :limit

-- name: replay_run
-- A person gives a final run that did not complete a new attempt (an ordinary
-- one: no final error left from a lease-loss limit).
UPDATE runs SET status = 'QUEUED', run_at = :now, finished_at = NULL, retry = :retry,
                discarded_at = NULL, final_error = NULL,
                lease_owner = NULL, lease_expires_at = NULL, waiting_on = NULL,
                deadline_at = NULL, expire_at = NULL, updated_at = :now
WHERE env = :env AND id = :id AND status IN ('FAILED', 'CANCELED', 'EXPIRED', 'TIMED_OUT')
RETURNING *

-- name: rerun_failed_step
-- With replay_run: a FAILED step (which steps: engine policy.rerun_on_replay)
-- is RUNNING again with a fresh budget (its attempts so far become its
-- retry_base) and no retry due, so the worker's next attempt runs it at once.
UPDATE steps SET status = 'RUNNING', retry_base = attempts, wake_at = NULL, finished_at = NULL
WHERE run_id = :run_id AND key = :key AND status = 'FAILED'

-- name: list_runs
-- {source} and {order}: list_source_* / list_order_* (the runs, or a tag's).
SELECT runs.* FROM {source}
WHERE env = :env {filters}
ORDER BY {order}
LIMIT :limit

-- name: list_run_summaries
-- The same without the documents (payload, output, state), for summaries: a
-- page of runs with large outputs is not read from disk at all. Lists every
-- column run_from_row reads.
SELECT id, env, task_id, status, attempt, '' AS payload, NULL AS output, error, queue,
       priority, retry, run_at, idempotency_key, concurrency_key, tags, metadata,
       parent_run_id, NULL AS state, lease_id, lease_owner, lease_expires_at, created_at,
       started_at, finished_at, replay_of, discarded_at, lease_losses, final_error
FROM {source}
WHERE env = :env {filters}
ORDER BY {order}
LIMIT :limit

-- name: list_source_runs
runs

-- name: list_order_runs
-- Every filter but a tag has an index in this order within env (migration 0009).
created_at DESC, id DESC

-- name: list_source_tagged
-- A tag's runs, walked on run_tags_listing in the same order (its columns are
-- named apart from the runs' so that the filters' names stay unambiguous).
run_tags JOIN runs ON runs.id = run_tags.run_id
    AND run_tags.run_env = :env AND run_tags.tag = :tag

-- name: list_order_tagged
run_created_at DESC, run_id DESC

-- name: list_filter_tagged_cursor
AND (run_created_at, run_id) < (:c_at, :c_id)

-- name: insert_run_tag
-- ListRuns by tag (list_source_tagged): one row per tag of a run, written
-- with the run; a tag listed twice is one row. Deleted with the run.
INSERT INTO run_tags (run_id, run_env, tag, run_created_at)
VALUES (:run_id, :env, :tag, :now)
ON CONFLICT DO NOTHING

-- name: list_filter_status
AND status IN {statuses}

-- name: list_filter_status_one
-- One status: an equality, so the scan of runs_list_status is in page order.
AND status = :status

-- name: list_filter_task
AND task_id = :task_id

-- name: list_filter_parent
AND parent_run_id = :parent_run_id

-- name: list_filter_error@sqlite
-- The expression and condition of the index runs_list_error, as written there.
AND error IS NOT NULL AND json_extract(error, '$.type') = :error_type

-- name: list_filter_error@postgres
AND error IS NOT NULL AND CAST(error AS jsonb) ->> 'type' = :error_type

-- name: list_filter_after
AND created_at >= :created_after

-- name: list_filter_before
AND created_at < :created_before

-- name: list_filter_not_discarded
AND discarded_at IS NULL

-- name: discard_run
UPDATE runs SET discarded_at = :now, updated_at = :now
WHERE env = :env AND id = :id
  AND status IN ('COMPLETED', 'FAILED', 'CANCELED', 'EXPIRED', 'TIMED_OUT')
RETURNING *

-- name: select_finished_page
-- Retention walks finished runs oldest first (runs_finished), a batch at a
-- time, from the (finished_at, id) of the last row the batch before saw,
-- kept or deleted: a child kept for its unfinished parent is read once per
-- walk, not once per batch.
SELECT id, finished_at FROM runs
WHERE finished_at < :cutoff AND (finished_at, id) > (:after_at, :after_id)
  AND status IN ('COMPLETED', 'FAILED', 'CANCELED', 'EXPIRED', 'TIMED_OUT')
ORDER BY finished_at, id
LIMIT :limit

-- name: delete_finished
-- Retention: the runs of a page go (steps and history cascade) ...
DELETE FROM runs WHERE id IN {ids}
  -- but a child stays while its parent may still collect its result
  AND NOT EXISTS (SELECT 1 FROM runs AS parent
                  WHERE parent.id = runs.parent_run_id
                    AND parent.status IN ('QUEUED', 'RUNNING', 'WAITING'))
  -- checked again on the row being deleted: a replay that re-queued the run
  -- after the page was read must win (READ COMMITTED re-evaluates these).
  AND finished_at < :cutoff
  AND status IN ('COMPLETED', 'FAILED', 'CANCELED', 'EXPIRED', 'TIMED_OUT')

-- name: list_filter_cursor
-- A row comparison: the index scan starts at the cursor instead of filtering up to it.
AND (created_at, id) < (:c_at, :c_id)

-- name: transition_run_batch
UPDATE runs AS r SET
    status = v.status,
    output = COALESCE(v.output, r.output),
    error = CASE WHEN v.clear_error = 1 THEN NULL ELSE COALESCE(v.error, r.error) END,
    state = COALESCE(v.state, r.state),
    run_at = COALESCE(v.run_at, r.run_at),
    attempt = r.attempt - v.refund,
    attempt_given_back = r.attempt_given_back + v.refund,
    lease_losses = r.lease_losses + v.losses,
    final_error = CASE WHEN v.clear_final_error = 1 THEN NULL
                       ELSE COALESCE(v.final_error, r.final_error) END,
    lease_owner = NULL,
    lease_expires_at = NULL,
    waiting_on = NULL,
    finished_at = v.finished_at,
    updated_at = :now
FROM unnest(CAST(:ids AS text[]), CAST(:leases AS text[]), CAST(:statuses AS text[]),
            CAST(:outputs AS text[]), CAST(:errors AS text[]), CAST(:states AS text[]),
            CAST(:run_ats AS float8[]), CAST(:refunds AS int[]),
            CAST(:finished AS float8[]), CAST(:envs AS text[]), CAST(:owners AS text[]),
            CAST(:clear_errors AS int[]), CAST(:losses AS int[]),
            CAST(:final_errors AS text[]), CAST(:clear_final_errors AS int[]),
            CAST(:finishings AS int[]))
     AS v(id, lease_id, status, output, error, state, run_at, refund, finished_at, env, owner,
          clear_error, losses, final_error, clear_final_error, finishing)
WHERE r.id = v.id AND r.lease_id = v.lease_id AND r.status = 'RUNNING'
  AND (v.env IS NULL OR r.env = v.env) AND (v.owner IS NULL OR r.lease_owner = v.owner)
  AND (v.finishing IS NULL
       OR (CASE WHEN r.final_error IS NULL THEN 0 ELSE 1 END) = v.finishing)
RETURNING r.id, r.parent_run_id

-- name: lock_run
SELECT id, env, status, waiting_on FROM runs WHERE id = :run_id {for_update}

-- name: select_steps_by_keys
SELECT * FROM steps WHERE run_id = :run_id AND key IN {keys}

-- name: resolve_wait
UPDATE steps SET
    status = :status,
    output = COALESCE(:output, output),
    error = COALESCE(:error, error),
    finished_at = COALESCE(:finished_at, finished_at),
    wake_at = CASE WHEN :clear_wake_at = 1 THEN NULL ELSE wake_at END
WHERE run_id = :run_id AND key = :key AND status = 'RUNNING'
  AND (CAST(:expect_wake_at AS DOUBLE PRECISION) IS NULL OR wake_at = :expect_wake_at)

-- name: wake_waiting
UPDATE runs SET status = 'QUEUED', run_at = :now, waiting_on = NULL, updated_at = :now
WHERE id = :run_id AND status = 'WAITING'

-- name: select_due_steps
SELECT * FROM steps WHERE status = 'RUNNING' AND wake_at <= :now ORDER BY wake_at LIMIT :limit

-- name: select_child_wait_candidates
-- The safety net under child_waits (engine/timers.finish_child_waits, at a low
-- rate). Candidates only: the engine decides from the children themselves.
SELECT s.run_id, s.key FROM steps AS s
WHERE s.status = 'RUNNING' AND s.kind = 'child'
  AND NOT EXISTS (
    SELECT 1 FROM runs AS c
    WHERE c.parent_run_id = s.run_id AND c.parent_step_key = s.key
      AND c.status IN ('QUEUED', 'RUNNING', 'WAITING'))
LIMIT :limit

-- name: select_child_runs
SELECT * FROM runs WHERE parent_run_id = :run_id AND parent_step_key = :key
ORDER BY child_index

-- name: insert_child_wait
-- A child-wait step counts its unfinished children (migration 0008).
INSERT INTO child_waits (parent_run_id, step_key, pending) VALUES (:run_id, :key, :pending)

-- name: select_child_parents
-- Which of these runs (just made final, or queued again) are children, of which wait.
SELECT parent_run_id, parent_step_key FROM runs
WHERE id IN {ids} AND parent_run_id IS NOT NULL

-- name: count_down_child_waits@postgres
-- The waits of the children among :ids (just made final), counted down in
-- one statement; their rows are locked in (parent, key) order first.
WITH done AS (
    SELECT parent_run_id, parent_step_key AS step_key, COUNT(*) AS n FROM runs
    WHERE id IN {ids} AND parent_run_id IS NOT NULL
    GROUP BY parent_run_id, parent_step_key
), locked AS (
    SELECT w.parent_run_id, w.step_key, done.n FROM child_waits AS w
    JOIN done ON done.parent_run_id = w.parent_run_id AND done.step_key = w.step_key
    ORDER BY w.parent_run_id, w.step_key
    FOR UPDATE OF w
)
UPDATE child_waits AS w SET pending = w.pending - locked.n
FROM locked
WHERE w.parent_run_id = locked.parent_run_id AND w.step_key = locked.step_key
RETURNING w.parent_run_id, w.step_key, w.pending

-- name: count_down_child_waits@sqlite
UPDATE child_waits SET pending = pending - (
    SELECT COUNT(*) FROM runs
    WHERE id IN {ids} AND runs.parent_run_id = child_waits.parent_run_id
      AND runs.parent_step_key = child_waits.step_key)
WHERE (parent_run_id, step_key) IN (
    SELECT parent_run_id, parent_step_key FROM runs
    WHERE id IN {ids} AND parent_run_id IS NOT NULL)
RETURNING parent_run_id, step_key, pending

-- name: count_child_wait
-- Counts a wait's children down (:n > 0, children made final) or up (:n < 0,
-- final children queued again); no row: the wait has ended, nothing to count.
UPDATE child_waits SET pending = pending - :n
WHERE parent_run_id = :run_id AND step_key = :key
RETURNING pending

-- name: lock_child_wait
SELECT pending FROM child_waits WHERE parent_run_id = :run_id AND step_key = :key {for_update}

-- name: set_child_wait
UPDATE child_waits SET pending = :pending WHERE parent_run_id = :run_id AND step_key = :key

-- name: delete_child_wait
DELETE FROM child_waits WHERE parent_run_id = :run_id AND step_key = :key

-- name: count_unfinished_children
SELECT COUNT(*) AS n FROM runs
WHERE parent_run_id = :run_id AND parent_step_key = :key
  AND status IN ('QUEUED', 'RUNNING', 'WAITING')

-- name: select_token_step
SELECT steps.*, runs.status AS run_status
FROM steps JOIN runs ON runs.id = steps.run_id
WHERE steps.token_id = :token_id AND runs.env = :env

-- name: select_unfinished_page
-- The invariant scan pages through unfinished runs that may hold a lease or
-- wait, in id order.
SELECT * FROM runs
WHERE status IN ('RUNNING', 'WAITING') AND id > :after AND updated_at < :updated_before
  AND (CAST(:env AS TEXT) IS NULL OR env = :env)
ORDER BY id
LIMIT :limit

-- name: repair_waiting
UPDATE runs SET status = 'QUEUED', run_at = :now, waiting_on = NULL, updated_at = :now
WHERE id = :run_id AND status = 'WAITING'

-- name: repair_running
UPDATE runs SET lease_expires_at = :now, updated_at = :now
WHERE id = :run_id AND status = 'RUNNING' AND lease_expires_at IS NULL

-- name: insert_token
-- Wait tokens created outside any run (store/_tokens.py). Lock order: a
-- token row is locked after its run's row, never before one.
INSERT INTO tokens (id, env, secret, status, data, tags, idempotency_key, created_at,
                    expires_at, completed_at, run_id, step_key)
VALUES (:id, :env, :secret, 'WAITING', NULL, :tags, :idempotency_key, :created_at,
        :expires_at, NULL, NULL, NULL)
ON CONFLICT DO NOTHING

-- name: select_token
SELECT * FROM tokens WHERE id = :id AND env = :env

-- name: select_token_any_env
-- The HTTP completion URL names no environment: ids are unique everywhere.
SELECT * FROM tokens WHERE id = :id

-- name: select_token_by_key
SELECT * FROM tokens WHERE env = :env AND idempotency_key = :idempotency_key

-- name: lock_token
SELECT * FROM tokens WHERE id = :id AND env = :env {for_update}

-- name: link_token
-- The first run to wait on a token is recorded on it.
UPDATE tokens SET run_id = :run_id, step_key = :step_key
WHERE id = :id AND run_id IS NULL

-- name: complete_token
-- Completes a token still pending (not past its timeout) whose waiting run is
-- still the one the caller locked (or, with :run_id NULL, that has none).
UPDATE tokens SET status = 'COMPLETED', data = :data, completed_at = :now
WHERE id = :id AND env = :env AND status = 'WAITING'
  AND (expires_at IS NULL OR expires_at > :now)
  AND ((CAST(:run_id AS TEXT) IS NULL AND run_id IS NULL) OR run_id = :run_id)

-- name: list_tokens
SELECT * FROM tokens
WHERE env = :env {filters}
ORDER BY created_at DESC, id DESC
LIMIT :limit

-- name: token_filter_run
AND run_id = :run_id

-- name: token_filter_statuses
AND ({statuses})

-- name: token_status_waiting
(status = 'WAITING' AND (expires_at IS NULL OR expires_at > :now))

-- name: token_status_completed
status = 'COMPLETED'

-- name: token_status_timed_out
(status = 'WAITING' AND expires_at <= :now)

-- name: token_filter_tag@sqlite
AND EXISTS (SELECT 1 FROM json_each(tokens.tags) WHERE value = {param})

-- name: token_filter_tag@postgres
AND CAST(tokens.tags AS jsonb) ? {param}

-- name: token_filter_cursor
AND (created_at < :c_at OR (created_at = :c_at AND id < :c_id))
