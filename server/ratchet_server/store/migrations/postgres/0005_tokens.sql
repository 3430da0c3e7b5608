-- Wait tokens created outside any run (RunService.CreateToken, issue 10).
-- Tokens created inside a run stay what they were: token steps. A run waits
-- on a token of this table through a token step with the same id. The first
-- run to wait on it is recorded here (run_id, step_key).
CREATE TABLE tokens (
    id               TEXT PRIMARY KEY,
    env              TEXT NOT NULL,
    -- The unguessable part of the completion URL (apart from the id, which
    -- listings show).
    secret           TEXT NOT NULL,
    -- WAITING or COMPLETED (a WAITING token past expires_at reads TIMED_OUT).
    status           TEXT NOT NULL,
    data             TEXT,
    tags             TEXT NOT NULL,
    idempotency_key  TEXT,
    created_at       DOUBLE PRECISION NOT NULL,
    expires_at       DOUBLE PRECISION,
    completed_at     DOUBLE PRECISION,
    run_id           TEXT,
    step_key         TEXT
);
CREATE UNIQUE INDEX tokens_idempotency ON tokens (env, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX tokens_env_created ON tokens (env, created_at, id);
CREATE INDEX tokens_run ON tokens (run_id) WHERE run_id IS NOT NULL;
