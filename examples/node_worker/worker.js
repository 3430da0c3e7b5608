'use strict';
/**
 * Example Ratchet worker in Node.js. Serves:
 *
 *   node-three-steps  payload {"dir": "/path", "hold": seconds, "n": number}
 *                     steps "one", "two", "three" each append this process's
 *                     pid to <dir>/<step>; "two" sleeps `hold` seconds the
 *                     first time it runs (when <dir>/two was empty), so a test
 *                     can kill or stop the worker there.
 *                     Output {"sum": n + 3, "pid": <pid that completed>}.
 *   node-flaky-step   payload {"dir": "/path", "failures": k}
 *                     one step "call" that fails k times before it succeeds,
 *                     retried inside the run attempt. Output "ok after <k+1>".
 *
 * Environment: RATCHET_COORDINATOR (default 127.0.0.1:7420), RATCHET_API_KEY,
 * WORKER_SLOTS (default 4). SIGTERM or SIGINT drains (up to 5 s) and exits 0;
 * a refused session (bad key, wrong role, bad hello) exits 1.
 *
 * Run: npm ci && node worker.js
 */

const fs = require('node:fs/promises');
const path = require('node:path');
const ratchet = require('./ratchet');

const DRAIN_TIMEOUT_MS = 5000;

/** Append this process's pid to dir/name; resolve with the lines it had before. */
async function mark(dir, name) {
  const file = path.join(dir, name);
  let before = 0;
  try {
    before = (await fs.readFile(file, 'utf8')).split('\n').filter(Boolean).length;
  } catch (err) {
    if (err.code !== 'ENOENT') throw err;
  }
  await fs.appendFile(file, `${process.pid}\n`);
  return before;
}

function main() {
  const slots = Number(process.env.WORKER_SLOTS || '4');
  if (!Number.isInteger(slots) || slots < 0 || slots > 10000) {
    process.stderr.write(`ratchet-node: WORKER_SLOTS must be an integer from 0 to 10000\n`);
    process.exit(1);
  }
  const worker = new ratchet.Worker({
    coordinator: process.env.RATCHET_COORDINATOR || '127.0.0.1:7420',
    apiKey: process.env.RATCHET_API_KEY || undefined,
    slots,
    onFatal(err) {
      process.stderr.write(`ratchet-node: ${err.message}\n`);
      process.exit(1);
    },
  });

  worker.task({
    id: 'node-three-steps',
    version: '1',
    retry: { maxAttempts: 5, minDelayMs: 50 },
    payloadSchema: {
      $schema: 'https://json-schema.org/draft/2020-12/schema',
      type: 'object',
      properties: {
        dir: { type: 'string', minLength: 1 },
        hold: { type: 'number', minimum: 0 },
        n: { type: 'number' },
      },
      required: ['dir'],
      additionalProperties: false,
    },
    outputSchema: {
      $schema: 'https://json-schema.org/draft/2020-12/schema',
      type: 'object',
      properties: { sum: { type: 'number' }, pid: { type: 'integer' } },
      required: ['sum', 'pid'],
    },
  }, async (ctx, { dir, hold = 0, n = 0 }) => {
    const one = await ctx.step('one', async () => {
      await mark(dir, 'one');
      return n + 1;
    });
    const two = await ctx.step('two', async () => {
      if ((await mark(dir, 'two')) === 0 && hold > 0) await ctx.sleep(hold * 1000);
      return one + 1;
    });
    const three = await ctx.step('three', async () => {
      await mark(dir, 'three');
      return two + 1;
    });
    return { sum: three, pid: process.pid };
  });

  worker.task({
    id: 'node-flaky-step',
    version: '1',
    retry: { maxAttempts: 1 },
    payloadSchema: {
      $schema: 'https://json-schema.org/draft/2020-12/schema',
      type: 'object',
      properties: { dir: { type: 'string' }, failures: { type: 'integer', minimum: 0 } },
      required: ['dir'],
    },
  }, async (ctx, { dir, failures = 2 }) => ctx.step('call', async () => {
    const n = (await mark(dir, 'flaky')) + 1;
    if (n <= failures) {
      const err = new Error(`transient failure ${n}`);
      err.name = 'ConnectionError';
      throw err;
    }
    return `ok after ${n}`;
  }, { retry: { maxAttempts: 5, minDelayMs: 50, maxDelayMs: 200 } }));

  let stopping = false;
  const stop = (signal) => {
    if (stopping) return;
    stopping = true;
    ratchet.log(`${signal}: draining for up to ${DRAIN_TIMEOUT_MS} ms`);
    worker.drain(DRAIN_TIMEOUT_MS).then(() => {
      ratchet.log('stopped');
      process.exit(0);
    });
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));

  worker.start();
}

main();
