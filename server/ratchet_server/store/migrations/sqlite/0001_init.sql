-- Ratchet schema, version 1. Times are POSIX seconds, and JSON documents are text
-- kept byte-for-byte as the client sent them.
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    env         TEXT NOT NULL,
    role        TEXT NOT NULL,
    name        TEXT NOT NULL DEFAULT '',
    key_hash    TEXT NOT NULL UNIQUE,
    created_at  DOUBLE PRECISION NOT NULL,
    revoked_at  DOUBLE PRECISION
);

CREATE TABLE tasks (
    env             TEXT NOT NULL,
    id              TEXT NOT NULL,
    version         TEXT NOT NULL,
    queue           TEXT NOT NULL,
    retry           TEXT NOT NULL,
    payload_schema  TEXT,
    output_schema   TEXT,
    max_duration    DOUBLE PRECISION,
    updated_at      DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (env, id)
);

CREATE TABLE runs (
    id                      TEXT PRIMARY KEY,
    env                     TEXT NOT NULL,
    task_id                 TEXT NOT NULL,
    status                  TEXT NOT NULL,
    attempt                 INTEGER NOT NULL DEFAULT 0,
    payload                 TEXT NOT NULL,
    output                  TEXT,
    error                   TEXT,
    queue                   TEXT NOT NULL,
    priority                INTEGER NOT NULL DEFAULT 0,
    retry                   TEXT NOT NULL,
    run_at                  DOUBLE PRECISION NOT NULL,
    idempotency_key         TEXT,
    idempotency_expires_at  DOUBLE PRECISION,
    concurrency_key         TEXT,
    tags                    TEXT NOT NULL DEFAULT '[]',
    metadata                TEXT NOT NULL DEFAULT '{}',
    parent_run_id           TEXT,
    ttl                     DOUBLE PRECISION,
    max_duration            DOUBLE PRECISION,
    state                   TEXT,
    lease_id                TEXT,
    lease_owner             TEXT,
    lease_expires_at        DOUBLE PRECISION,
    created_at              DOUBLE PRECISION NOT NULL,
    started_at              DOUBLE PRECISION,
    finished_at             DOUBLE PRECISION,
    updated_at              DOUBLE PRECISION NOT NULL
);

-- The hot query: ready runs of the tasks a worker serves.
CREATE INDEX runs_ready ON runs (env, task_id, priority DESC, run_at, id) WHERE status = 'QUEUED';
CREATE INDEX runs_lease_expiry ON runs (lease_expires_at) WHERE status = 'RUNNING';
CREATE INDEX runs_lease_owner ON runs (lease_owner) WHERE status = 'RUNNING';
CREATE INDEX runs_lease_id ON runs (lease_id);
CREATE INDEX runs_listing ON runs (env, created_at DESC, id DESC);
CREATE UNIQUE INDEX runs_idempotency ON runs (env, task_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE TABLE steps (
    run_id       TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    key          TEXT NOT NULL,
    kind         TEXT NOT NULL,
    status       TEXT NOT NULL,
    attempts     INTEGER NOT NULL,
    retry_base   INTEGER NOT NULL DEFAULT 0,
    output       TEXT,
    error        TEXT,
    created_at   DOUBLE PRECISION NOT NULL,
    started_at   DOUBLE PRECISION,
    finished_at  DOUBLE PRECISION,
    PRIMARY KEY (run_id, key)
);

-- Append-only history, written in the same transaction as each transition.
CREATE TABLE run_events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id    TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    at        DOUBLE PRECISION NOT NULL,
    type      TEXT NOT NULL,
    attempt   INTEGER NOT NULL DEFAULT 0,
    lease_id  TEXT,
    step_key  TEXT,
    data      TEXT
);
CREATE INDEX run_events_run ON run_events (run_id, id);
