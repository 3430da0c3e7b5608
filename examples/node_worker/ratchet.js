'use strict';
/**
 * A small Ratchet worker for Node.js, written from docs/protocol.md and
 * protos/ratchet/v1/*.proto alone (not from the Python SDK), to show that the
 * worker protocol is language-neutral.
 *
 * The protos are loaded at run time with @grpc/proto-loader (keepCase: field
 * names are the proto's snake_case names; longs as Numbers; enums as their
 * names; bytes as Buffers), so there is no build step.
 *
 * Errors:
 *
 *   RatchetError                  base of every error this module throws
 *   ├── FatalError                the worker cannot go on (bad key, bad hello, ...)
 *   ├── NonRetryableError         thrown by task code: fail the run at once
 *   ├── StepFailedError           a step used up its attempts; carries the cause
 *   └── RunStoppedError           the run attempt was stopped (lease lost,
 *                                 canceled, draining); task code should let it
 *                                 propagate
 *
 * Section numbers (§n) and checklist items (#n) refer to docs/protocol.md.
 */

const os = require('node:os');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');
const PROTOCOL_VERSION = 1;
const SDK_NAME = 'ratchet-node';
const SDK_VERSION = require('./package.json').version;
const MAX_MESSAGE = 16 * 1024 * 1024; // #24
const MAX_OUTPUT = 1024 * 1024; // #14
const SLOTS_LIMIT = 10000;

// Ack codes (gRPC status numbers, §13). STOPPED is local: it resolves the
// pending writes of a lease this worker dropped (lost or canceled).
const OK = 0;
const INVALID_ARGUMENT = 3;
const RESOURCE_EXHAUSTED = 8;
const FAILED_PRECONDITION = 9;
const INTERNAL = 13;
const STOPPED = -1;

// Stream statuses that reconnecting cannot fix (§3, #4).
const FATAL_STATUSES = new Set([
  grpc.status.UNAUTHENTICATED,
  grpc.status.PERMISSION_DENIED,
  grpc.status.INVALID_ARGUMENT,
  grpc.status.FAILED_PRECONDITION,
  grpc.status.UNIMPLEMENTED,
]);
const STATUS_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([k, v]) => [v, k]));

const COMPLETE_RETRIES = 5; // resends of a `complete` answered INTERNAL (§7)
const BACKOFF_MIN_MS = 100;
const BACKOFF_MAX_MS = 5000;
const CHANNEL_BACKOFF_MAX_MS = 1000; // TCP connection attempts only

class RatchetError extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = new.target.name;
  }
}

class FatalError extends RatchetError {}

class NonRetryableError extends RatchetError {
  constructor(message, options) {
    super(message, options);
    this.nonRetryable = true;
  }
}

class StepFailedError extends RatchetError {
  constructor(stepKey, attempt, cause) {
    super(`step ${stepKey} failed on attempt ${attempt}: ${cause && cause.message}`, { cause });
    this.stepKey = stepKey;
    this.attempt = attempt;
    this.nonRetryable = Boolean(cause && cause.nonRetryable);
  }
}

class RunStoppedError extends RatchetError {}

function log(message) {
  process.stderr.write(`${new Date().toISOString()} ratchet-node[${process.pid}] ${message}\n`);
}

function loadWorkerService() {
  const definition = protoLoader.loadSync('ratchet/v1/worker.proto', {
    includeDirs: [PROTOS],
    keepCase: true,
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).ratchet.v1.WorkerService;
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal && signal.aborted) {
      reject(new RunStoppedError(String(signal.reason)));
      return;
    }
    const onAbort = () => {
      clearTimeout(timer);
      reject(new RunStoppedError(String(signal.reason)));
    };
    const timer = setTimeout(() => {
      if (signal) signal.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    if (signal) signal.addEventListener('abort', onAbort, { once: true });
  });
}

function timestamp(date) {
  const ms = date.getTime();
  return { seconds: Math.floor(ms / 1000), nanos: (ms % 1000) * 1e6 };
}

function duration(ms) {
  return { seconds: Math.floor(ms / 1000), nanos: Math.round((ms % 1000) * 1e6) };
}

function durationMs(d) {
  return d ? Number(d.seconds) * 1000 + Math.floor(d.nanos / 1e6) : 0;
}

/** Strict UTF-8 JSON (§16); `undefined` becomes null. Refuses oversized outputs. */
function encodeJson(value, limit = MAX_OUTPUT) {
  const text = JSON.stringify(value === undefined ? null : value);
  const bytes = Buffer.from(text === undefined ? 'null' : text, 'utf8');
  if (bytes.length > limit) {
    throw new NonRetryableError(`output is ${bytes.length} bytes, over the ${limit} byte limit`);
  }
  return bytes;
}

/** Empty bytes mean "no document" (null) everywhere a worker reads JSON (§16). */
function decodeJson(bytes) {
  return bytes && bytes.length ? JSON.parse(bytes.toString('utf8')) : null;
}

function errorInfo(err, stepKey = '', attempt = 0) {
  const cause = err instanceof StepFailedError && err.cause ? err.cause : err;
  const isError = cause instanceof Error;
  return {
    type: isError ? cause.name || 'Error' : 'Error',
    message: isError ? String(cause.message) : String(cause),
    stack: isError && cause.stack ? String(cause.stack) : '',
    non_retryable: Boolean(cause && cause.nonRetryable),
    step_key: err instanceof StepFailedError ? err.stepKey : stepKey,
    attempt: err instanceof StepFailedError ? err.attempt : attempt,
  };
}

function backoffMs(policy, n) {
  return Math.min(policy.maxDelayMs, policy.minDelayMs * policy.factor ** (n - 1));
}

/** One run attempt: a lease and the task execution that uses it. */
class Execution {
  constructor(worker, grant) {
    this.worker = worker;
    this.grant = grant;
    this.leaseId = grant.lease_id;
    this.runId = grant.run_id;
    this.controller = new AbortController();
    this.stopped = null; // 'lost' | 'canceled' | 'draining'
    this.completing = false;
    this.done = Promise.resolve();
    this._tail = Promise.resolve();
  }

  /**
   * Send one write for this lease. Writes are chained so that at most one is
   * unacknowledged at a time (#12): the coordinator does not order them.
   */
  write(body) {
    const next = this._tail.then(() => {
      if (this.stopped === 'lost' || this.stopped === 'canceled') {
        return { code: STOPPED, message: `run ${this.stopped}` };
      }
      return this.worker._request(this, body);
    });
    this._tail = next.catch(() => {});
    return next;
  }
}

/** What task code sees: the run, its steps, and a way to stop early. */
class Context {
  constructor(execution) {
    this._execution = execution;
    this._stepCounts = new Map();
    this._steps = new Map(execution.grant.snapshot.steps.map((s) => [s.key, s]));
    this.runId = execution.runId;
    this.attempt = execution.grant.attempt;
    this.signal = execution.controller.signal;
    const state = execution.grant.snapshot.state;
    this.state = state && state.length ? JSON.parse(state.toString('utf8')) : {}; // #9
  }

  /** Sleep that ends early (RunStoppedError) when the run attempt is stopped. */
  sleep(ms) {
    return sleep(ms, this.signal);
  }

  /**
   * Run `fn` as the durable step `name`, or return its stored output when an
   * earlier attempt completed it (#9). Resolves only after the COMPLETED
   * checkpoint is acknowledged (#11). `fn` gets {signal, key, attempt,
   * idempotencyKey}. `options.retry` = {maxAttempts (default 1), minDelayMs,
   * factor, maxDelayMs} retries the step inside this run attempt (§15).
   * Throws StepFailedError when the step runs out of attempts and
   * RunStoppedError when the run attempt was stopped.
   */
  async step(name, fn, options = {}) {
    if (typeof name !== 'string' || name === '' || name.includes('#')) {
      throw new TypeError(`step name must be a non-empty string without '#': ${name}`); // #10
    }
    this._checkRunning();
    const n = (this._stepCounts.get(name) || 0) + 1;
    this._stepCounts.set(name, n);
    const key = n === 1 ? name : `${name}#${n}`;
    const recorded = this._steps.get(key);
    if (recorded && recorded.status === 'STEP_STATUS_COMPLETED') {
      return decodeJson(recorded.output);
    }
    const retry = options.retry || {};
    const policy = {
      maxAttempts: retry.maxAttempts || 1,
      minDelayMs: retry.minDelayMs ?? 1000,
      factor: retry.factor || 2,
      maxDelayMs: retry.maxDelayMs ?? 60000,
    };
    // §15: attempts count over the whole run; a RUNNING step continues its
    // budget, a FAILED (or unrecorded) one starts a fresh one.
    let attempt = recorded ? recorded.attempts + 1 : 1;
    const retryBase = !recorded ? 0
      : recorded.status === 'STEP_STATUS_RUNNING' ? recorded.retry_base : recorded.attempts;
    for (;;) {
      const startedAt = new Date();
      let output;
      let failure;
      try {
        const value = await fn({
          signal: this.signal,
          key,
          attempt,
          idempotencyKey: `${this.runId}:${key}`, // #25
        });
        output = encodeJson(value);
      } catch (err) {
        failure = err;
      }
      this._checkRunning();
      const base = {
        lease_id: this._execution.leaseId,
        run_id: this.runId,
        step_key: key,
        kind: 'STEP_KIND_RUN',
        attempt,
        started_at: timestamp(startedAt),
        retry_base: retryBase,
      };
      if (failure === undefined) {
        await this._checkpoint(key, {
          ...base, event: 'STEP_EVENT_COMPLETED', output, finished_at: timestamp(new Date()),
        });
        return decodeJson(output);
      }
      const error = errorInfo(failure, key, attempt);
      if (!error.non_retryable && attempt - retryBase < policy.maxAttempts) {
        const delay = backoffMs(policy, attempt - retryBase);
        await this._checkpoint(key, {
          ...base, event: 'STEP_EVENT_RETRYING', error,
          retry_at: timestamp(new Date(Date.now() + delay)),
        }); // #13: recorded before the next attempt
        await this.sleep(delay);
        attempt += 1;
        continue;
      }
      await this._checkpoint(key, {
        ...base, event: 'STEP_EVENT_FAILED', error, finished_at: timestamp(new Date()),
      });
      throw new StepFailedError(key, attempt, failure);
    }
  }

  async _checkpoint(key, checkpoint) {
    const ack = await this._execution.write({ checkpoint });
    this._checkRunning();
    if (ack.code === OK) return;
    if (ack.code === FAILED_PRECONDITION) {
      this._execution.worker._abandon(this._execution, // #17
        `checkpoint of step ${key} answered FAILED_PRECONDITION (9): ${ack.message}`);
      throw new RunStoppedError(`lease lost: ${ack.message}`);
    }
    // 3 and 8 cannot succeed on a resend; 13 might, but the run's retry
    // policy is a simpler place to try again (§6).
    const err = new RatchetError(
      `checkpoint of step ${key} refused (${STATUS_NAMES[ack.code] || ack.code}): ${ack.message}`);
    err.nonRetryable = ack.code !== INTERNAL;
    throw err;
  }

  _checkRunning() {
    if (this._execution.stopped) throw new RunStoppedError(`run ${this._execution.stopped}`);
  }
}

/**
 * A worker process's connection to a coordinator: one Session stream,
 * reconnected with backoff, serving the registered tasks.
 */
class Worker {
  /**
   * @param {object} options
   * @param {string} options.coordinator host:port
   * @param {string} [options.apiKey] sent as `authorization: Bearer <key>` (#1)
   * @param {number} [options.slots]
   * @param {(err: FatalError) => void} options.onFatal called once when the worker must stop
   */
  constructor({ coordinator, apiKey, slots = 4, onFatal }) {
    if (!Number.isInteger(slots) || slots < 0 || slots > SLOTS_LIMIT) {
      throw new RangeError(`slots must be an integer from 0 to ${SLOTS_LIMIT}: ${slots}`);
    }
    this.address = coordinator;
    this._apiKey = apiKey;
    this._slots = slots;
    this._onFatal = onFatal;
    this._tasks = new Map();
    this._executions = new Map(); // lease id -> Execution, every lease this worker holds
    this._pending = new Map(); // request id -> {execution, request, resolve}, in send order
    this._nextRequestId = 0;
    this._call = null;
    this._welcomed = false;
    this._heartbeat = null;
    this._failures = 0;
    this._reconnectTimer = null;
    this._draining = false;
    this._closing = false;
    const WorkerService = loadWorkerService();
    this._client = new WorkerService(coordinator, grpc.credentials.createInsecure(), {
      'grpc.max_receive_message_length': MAX_MESSAGE,
      'grpc.max_send_message_length': MAX_MESSAGE,
      'grpc.keepalive_time_ms': 10000,
      'grpc.keepalive_timeout_ms': 5000,
      'grpc.keepalive_permit_without_calls': 1,
      // grpc-js keeps its own connection backoff (1 s growing to 120 s) under
      // ours, and a Session call fails fast while it waits. Keep it short so
      // that our session backoff (§11) decides when we are back, not minutes.
      'grpc.initial_reconnect_backoff_ms': BACKOFF_MIN_MS,
      'grpc.max_reconnect_backoff_ms': CHANNEL_BACKOFF_MAX_MS,
    });
  }

  /**
   * Register a task. `definition` = {id, version, payloadSchema, outputSchema,
   * retry: {maxAttempts, minDelayMs, maxDelayMs, factor, jitter}}; `fn(ctx,
   * payload)` returns the run's output (JSON-encodable).
   */
  task(definition, fn) {
    if (!/^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/.test(definition.id || '')) {
      throw new TypeError(`invalid task id: ${definition.id}`);
    }
    if (this._tasks.has(definition.id)) throw new TypeError(`task ${definition.id} twice`);
    this._tasks.set(definition.id, { definition, fn });
  }

  start() {
    this._connect();
  }

  // -- the stream ---------------------------------------------------------

  _connect() {
    this._reconnectTimer = null;
    const metadata = new grpc.Metadata();
    if (this._apiKey) metadata.set('authorization', `Bearer ${this._apiKey}`);
    const call = this._client.Session(metadata);
    this._call = call;
    this._welcomed = false;
    call.on('data', (message) => this._onMessage(call, message));
    call.on('error', () => {}); // every end, error or not, is handled on 'status'
    call.on('status', (status) => this._onStatus(call, status));
    const hello = {
      worker_id: `${os.hostname()}:${process.pid}`,
      sdk_name: SDK_NAME,
      sdk_version: SDK_VERSION,
      protocol_version: PROTOCOL_VERSION,
      tasks: [...this._tasks.values()].map(({ definition }) => taskDefinition(definition)),
      slots: this._draining ? 0 : this._slots,
      active_lease_ids: [...this._executions.keys()], // #20
    };
    call.write({ request_id: 0, hello }); // #2, #7
  }

  _onStatus(call, status) {
    if (call !== this._call) return;
    this._call = null;
    this._welcomed = false;
    clearInterval(this._heartbeat);
    this._heartbeat = null;
    if (this._closing) return;
    const name = STATUS_NAMES[status.code] || String(status.code);
    if (FATAL_STATUSES.has(status.code)) { // #4
      this._fatal(`coordinator ${this.address} refused the session: ${name}: ${status.details}`);
      return;
    }
    // #4: capped, jittered exponential backoff, reset by every Welcome.
    const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** this._failures)
      * (0.8 + 0.4 * Math.random());
    this._failures += 1;
    log(`session stream ended (${name}: ${status.details}); reconnecting in ${Math.round(delay)} ms`);
    this._reconnectTimer = setTimeout(() => this._connect(), delay);
  }

  _fatal(message) {
    this._closing = true;
    clearTimeout(this._reconnectTimer);
    clearInterval(this._heartbeat);
    if (this._call) this._call.cancel();
    this._onFatal(new FatalError(message));
  }

  _onMessage(call, message) {
    if (call !== this._call) return;
    switch (message.kind) {
      case 'welcome':
        this._onWelcome(message.welcome);
        break;
      case 'lease':
        this._onLease(message.lease);
        break;
      case 'cancel':
        this._onCancel(message.cancel);
        break;
      case 'ack':
        this._onAck(message.request_id, message.ack);
        break;
      default: // #26: kinds this worker does not know are ignored
        break;
    }
  }

  _onWelcome(welcome) {
    if (this._welcomed) return;
    if (welcome.protocol_version !== PROTOCOL_VERSION) { // #3
      this._fatal(`coordinator speaks protocol ${welcome.protocol_version}, `
        + `this worker only ${PROTOCOL_VERSION}`);
      return;
    }
    this._welcomed = true;
    this._failures = 0;
    const interval = durationMs(welcome.heartbeat_interval) || 5000;
    // #5: on its own timer, never behind a task (task code here is async).
    // Only the listed leases are renewed (§5): list every lease still held.
    this._heartbeat = setInterval(() => this._send({
      request_id: 0, heartbeat: { active_lease_ids: [...this._executions.keys()] },
    }), interval);
    const adopted = new Set(welcome.adopted_lease_ids);
    const held = [...this._executions.values()];
    log(`connected to ${this.address} (session ${welcome.session_id}, coordinator `
      + `${welcome.server_version}, heartbeat ${interval} ms, lease ttl `
      + `${durationMs(welcome.lease_ttl)} ms, adopted ${adopted.size} of ${held.length} leases)`);
    for (const execution of held) { // #20, #21
      if (!adopted.has(execution.leaseId)) this._abandon(execution, 'not adopted after reconnect');
    }
    // #20: resend every unacknowledged request of an adopted lease, in order
    // (Map iteration is insertion order, which is request id order).
    if (this._pending.size) log(`resending ${this._pending.size} unacknowledged requests`);
    for (const { request } of this._pending.values()) this._send(request);
  }

  _onLease(grant) {
    if (this._executions.has(grant.lease_id)) return;
    const execution = new Execution(this, grant);
    this._executions.set(grant.lease_id, execution);
    if (this._draining) { // #22
      execution.stopped = 'draining';
      execution.done = this._release(execution);
      return;
    }
    const task = this._tasks.get(grant.task_id);
    const done = grant.snapshot.steps.filter((s) => s.status === 'STEP_STATUS_COMPLETED').length;
    log(`leased run ${grant.run_id} (task ${grant.task_id}, attempt ${grant.attempt}, `
      + `lease ${grant.lease_id}, ${done} steps completed)`);
    execution.done = this._execute(execution, task).catch((err) => {
      log(`internal error executing run ${grant.run_id}: ${err && err.stack}`);
    });
  }

  _onCancel(cancel) {
    const execution = this._executions.get(cancel.lease_id);
    if (!execution || execution.runId !== cancel.run_id) return; // #19
    this._drop(execution, 'canceled');
    log(`run ${cancel.run_id} canceled by the coordinator (${cancel.reason}); `
      + `lease ${cancel.lease_id} dropped`);
  }

  _onAck(requestId, ack) {
    const pending = this._pending.get(requestId); // #6: by id, not by order
    if (!pending) return;
    this._pending.delete(requestId);
    pending.resolve(ack);
  }

  _send(request) {
    if (this._call && this._welcomed) this._call.write(request);
  }

  /** Send a write and resolve with its Ack; queued until a session is open. */
  _request(execution, body) {
    this._nextRequestId += 1;
    const request = { request_id: this._nextRequestId, ...body }; // #6: never 0, never reused
    return new Promise((resolve) => {
      this._pending.set(request.request_id, { execution, request, resolve });
      this._send(request);
    });
  }

  // -- run attempts -------------------------------------------------------

  async _execute(execution, task) {
    let outcome;
    try {
      if (!task) throw new NonRetryableError(`task ${execution.grant.task_id} is not served here`);
      const ctx = new Context(execution);
      const value = await task.fn(ctx, decodeJson(execution.grant.snapshot.payload));
      if (execution.stopped) return;
      outcome = { succeeded: { output: encodeJson(value) } };
    } catch (err) {
      if (execution.stopped) return;
      outcome = { failed: { error: errorInfo(err, '', execution.grant.attempt) } };
    }
    execution.completing = true;
    await this._complete(execution, outcome);
  }

  /** Send `complete` and make sure the lease ends, whatever the answer (#15, #16). */
  async _complete(execution, outcome) {
    let internalErrors = 0;
    let refusedOnce = false;
    for (;;) {
      const ack = await execution.write({
        complete: { lease_id: execution.leaseId, run_id: execution.runId, ...outcome },
      });
      if (ack.code === STOPPED) return;
      if (ack.code === OK) {
        this._executions.delete(execution.leaseId);
        const how = outcome.succeeded ? 'completed' : `failed (${outcome.failed.error.message})`;
        log(`run ${execution.runId} ${how}`);
        return;
      }
      if (ack.code === FAILED_PRECONDITION) {
        this._abandon(execution, `complete answered FAILED_PRECONDITION (9): ${ack.message}`);
        return;
      }
      if (ack.code === INTERNAL && internalErrors < COMPLETE_RETRIES) {
        internalErrors += 1;
        await sleep(BACKOFF_MIN_MS * 2 ** internalErrors);
        continue;
      }
      log(`complete of run ${execution.runId} refused (code ${ack.code}): ${ack.message}`);
      if (refusedOnce) {
        await this._release(execution);
        return;
      }
      refusedOnce = true;
      outcome = {
        failed: {
          error: {
            type: 'ratchet.CompleteRefused',
            message: `the coordinator refused the outcome (${STATUS_NAMES[ack.code] || ack.code}): `
              + ack.message,
            non_retryable: ack.code !== INTERNAL,
            attempt: execution.grant.attempt,
          },
        },
      };
    }
  }

  async _release(execution) {
    const ack = await execution.write({
      release: { lease_id: execution.leaseId, run_id: execution.runId },
    });
    if (ack.code === STOPPED) return;
    this._executions.delete(execution.leaseId);
    log(`released lease ${execution.leaseId} of run ${execution.runId} (code ${ack.code})`);
  }

  /** The lease is no longer ours (#17, #21): stop, send nothing more, keep serving. */
  _abandon(execution, reason) {
    if (this._executions.get(execution.leaseId) !== execution) return;
    this._drop(execution, 'lost');
    log(`lease lost: run ${execution.runId}, lease ${execution.leaseId}: ${reason}`);
  }

  _drop(execution, why) {
    execution.stopped = why;
    this._executions.delete(execution.leaseId);
    execution.controller.abort(why);
    for (const [id, pending] of this._pending) {
      if (pending.execution === execution) {
        this._pending.delete(id);
        pending.resolve({ code: STOPPED, message: `run ${why}` });
      }
    }
  }

  // -- shutdown -----------------------------------------------------------

  /**
   * Drain (#22): take no new runs, give running ones `timeoutMs` to finish,
   * release the rest, then close the stream.
   */
  async drain(timeoutMs = 5000) {
    if (this._draining) return;
    this._draining = true;
    log(`draining: ${this._executions.size} runs in progress`);
    this._send({ request_id: 0, slots: { slots: 0 } }); // or slots: 0 in the next hello
    const settled = (executions, ms) => Promise.race([
      Promise.allSettled(executions.map((e) => e.done)), sleep(ms),
    ]);
    await settled([...this._executions.values()], timeoutMs);
    const remaining = [...this._executions.values()].filter((e) => !e.completing && !e.stopped);
    for (const execution of remaining) {
      execution.stopped = 'draining';
      execution.controller.abort('draining');
    }
    // Let a write already in flight be acknowledged before releasing (#12).
    await settled(remaining, 2000);
    await Promise.race([Promise.allSettled(remaining.map((e) => this._release(e))), sleep(5000)]);
    this.close();
  }

  close() {
    this._closing = true;
    clearTimeout(this._reconnectTimer);
    clearInterval(this._heartbeat);
    if (this._call) this._call.end();
    this._client.close();
  }
}

function taskDefinition(d) {
  const retry = d.retry || {};
  return {
    id: d.id,
    version: d.version || '',
    queue: d.queue || '',
    retry: {
      max_attempts: retry.maxAttempts || 0,
      factor: retry.factor || 0,
      min_delay: retry.minDelayMs === undefined ? null : duration(retry.minDelayMs),
      max_delay: retry.maxDelayMs === undefined ? null : duration(retry.maxDelayMs),
      jitter: Boolean(retry.jitter),
    },
    payload_schema: d.payloadSchema ? Buffer.from(JSON.stringify(d.payloadSchema)) : Buffer.alloc(0),
    output_schema: d.outputSchema ? Buffer.from(JSON.stringify(d.outputSchema)) : Buffer.alloc(0),
  };
}

module.exports = {
  Worker,
  Context,
  RatchetError,
  FatalError,
  NonRetryableError,
  StepFailedError,
  RunStoppedError,
  log,
};
