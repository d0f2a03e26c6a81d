// The render service of `machine`: renders p5 sketches, HTML markup and web pages to PNG with
// one persistent Chromium driven by playwright-core.
//
// HTTP on 127.0.0.1:--port:
//   GET  /health  200 {"ok":true,...} once the browser is up, 503 {"ok":false,"error":...} before
//   POST /render  {"kind":"p5"|"html"|"url", "code"|"html"|"url", "width", "height", "wait_ms",
//                  "device_scale"} -> image/png; errors are JSON {"error","message"} with 4xx/5xx.
//
// Each job gets a fresh browser context (no state leaks between jobs); at most --concurrency
// jobs render at once, the rest queue. If Chromium dies it is relaunched for the next job. p5 is
// served from the local node_modules, never from a CDN. The machine's installer writes this file
// into <workspace>/playwright together with browser.json (the Chromium to use); --chromium
// overrides it.

import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);

const LIMITS = { maxSide: 4096, maxWaitMs: 30000, maxBody: 5 * 1024 * 1024, minScale: 0.1, maxScale: 4 };
const ORIGIN = 'http://render.local';

function log(msg) {
  process.stdout.write(`${new Date().toISOString()} render: ${msg}\n`);
}

function die(msg) {
  process.stderr.write(`render: ${msg}\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const opts = { host: '127.0.0.1', port: 9400, gpu: false, chromium: null, concurrency: 2, timeoutMs: 60000 };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => (i + 1 < argv.length ? argv[++i] : die(`${a} needs a value`));
    switch (a) {
      case '--port': opts.port = Number(value()); break;
      case '--host': opts.host = value(); break;
      case '--gpu': opts.gpu = true; break;
      case '--chromium': opts.chromium = value(); break;
      case '--concurrency': opts.concurrency = Number(value()); break;
      case '--timeout-ms': opts.timeoutMs = Number(value()); break;
      default: die(`unknown argument ${a}`);
    }
  }
  if (!Number.isInteger(opts.port) || opts.port < 1 || opts.port > 65535) die('--port must be 1-65535');
  if (!Number.isInteger(opts.concurrency) || opts.concurrency < 1) die('--concurrency must be at least 1');
  if (!(opts.timeoutMs > 0)) die('--timeout-ms must be positive');
  return opts;
}

function findChromium(configured) {
  if (configured) return configured;
  try {
    const b = JSON.parse(fs.readFileSync(path.join(here, 'browser.json'), 'utf8'));
    if (b.executable) return b.executable;
  } catch {
    // No browser.json: look where a system Chromium usually is.
  }
  const candidates = ['/usr/bin/chromium', '/usr/bin/chromium-browser', '/usr/bin/google-chrome', '/usr/bin/google-chrome-stable'];
  const found = candidates.find((c) => fs.existsSync(c));
  if (!found) die(`no Chromium found (looked at ${candidates.join(', ')}); pass --chromium`);
  return found;
}

const opts = parseArgs(process.argv.slice(2));
const executablePath = findChromium(opts.chromium);
const p5Source = fs.readFileSync(require.resolve('p5/lib/p5.min.js'));
const version = JSON.parse(fs.readFileSync(require.resolve('playwright-core/package.json'), 'utf8')).version;

// Playwright itself adds --headless, --no-sandbox and an empty temporary --user-data-dir; these
// keep Chromium from phoning home or updating itself inside a worker.
const browserArgs = [
  '--no-sandbox',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
  ...(opts.gpu ? ['--ignore-gpu-blocklist', '--enable-gpu-rasterization'] : ['--disable-gpu']),
];

let browser = null;
let launching = null;
let lastError = null;
let stopping = false;

function getBrowser() {
  if (browser && browser.isConnected()) return Promise.resolve(browser);
  if (!launching) {
    launching = chromium
      .launch({ executablePath, headless: true, args: browserArgs, timeout: opts.timeoutMs })
      .then((b) => {
        browser = b;
        lastError = null;
        log(`browser ${b.version()} up (${executablePath}${opts.gpu ? ', GPU' : ''})`);
        b.on('disconnected', () => {
          if (browser === b) browser = null;
          if (!stopping) log('browser disconnected; relaunching for the next job');
        });
        return b;
      })
      .catch((e) => {
        lastError = String(e && e.message ? e.message : e);
        log(`browser launch failed: ${lastError}`);
        throw e;
      })
      .finally(() => {
        launching = null;
      });
  }
  return launching;
}

// A counting semaphore: a finishing job hands its slot to the next waiter.
let active = 0;
// Renders not settled yet, including those whose client went away (their slot is free, the
// page may still run): the machine waits for none before its next job.
let rendering = 0;
const waiters = [];
function acquire() {
  if (active < opts.concurrency) {
    active++;
    return Promise.resolve();
  }
  return new Promise((resolve) => waiters.push(resolve));
}
function release() {
  const next = waiters.shift();
  if (next) next();
  else active--;
}

// Playwright decorates its messages with terminal colours; JSON errors should be plain text.
const plain = (m) => String(m).replace(/\x1b\[[0-9;]*m/g, '');

class HttpError extends Error {
  constructor(status, error, message) {
    super(plain(message));
    this.status = status;
    this.error = error;
  }
}

function num(job, key, dflt, lo, hi, integer) {
  const v = job[key] === undefined || job[key] === null ? dflt : job[key];
  if (typeof v !== 'number' || !Number.isFinite(v) || (integer && !Number.isInteger(v)) || v < lo || v > hi) {
    throw new HttpError(400, 'bad_request', `${key} must be ${integer ? 'an integer' : 'a number'} from ${lo} to ${hi}`);
  }
  return v;
}

function validate(job) {
  if (!job || typeof job !== 'object' || Array.isArray(job)) throw new HttpError(400, 'bad_request', 'the body must be a JSON object');
  const kind = job.kind;
  const field = { p5: 'code', html: 'html', url: 'url' }[kind];
  if (!field) throw new HttpError(400, 'bad_request', 'kind must be "p5", "html" or "url"');
  const source = job[field];
  if (typeof source !== 'string' || source.length === 0) throw new HttpError(400, 'bad_request', `${kind} jobs need a non-empty "${field}" string`);
  if (kind === 'url') {
    let u;
    try {
      u = new URL(source);
    } catch {
      throw new HttpError(400, 'bad_request', `"${source}" is not a URL`);
    }
    if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new HttpError(400, 'bad_request', 'only http and https URLs are rendered');
  }
  return {
    kind,
    source,
    width: num(job, 'width', 512, 1, LIMITS.maxSide, true),
    height: num(job, 'height', 512, 1, LIMITS.maxSide, true),
    waitMs: num(job, 'wait_ms', 0, 0, LIMITS.maxWaitMs, true),
    scale: num(job, 'device_scale', 1, LIMITS.minScale, LIMITS.maxScale, false),
  };
}

const P5_PAGE = `<!doctype html><html><head><meta charset="utf-8">
<style>html,body{margin:0;padding:0;overflow:hidden;background:#fff}canvas{display:block}</style>
<script src="${ORIGIN}/p5.min.js"></script><script src="${ORIGIN}/sketch.js"></script>
</head><body></body></html>`;

// Rejects once the client has hung up.
function clientGone(aborted) {
  return new Promise((_, reject) => {
    const gone = () => reject(new HttpError(499, 'client_closed', 'the client went away'));
    if (aborted.aborted) gone();
    else aborted.addEventListener('abort', gone, { once: true });
  });
}

async function render(job, aborted) {
  const b = await getBrowser().catch((e) => {
    throw new HttpError(503, 'browser_unavailable', `failed to launch the browser: ${e.message}`);
  });
  const context = await b.newContext({
    viewport: { width: job.width, height: job.height },
    deviceScaleFactor: job.scale,
  });
  // A client that hung up (a cancelled job) gets its page closed at once, which ends whatever
  // the page was waiting for and frees the slot.
  const onAbort = () => context.close().catch(() => {});
  if (aborted.aborted) onAbort();
  aborted.addEventListener('abort', onAbort);
  try {
    const page = await context.newPage();
    page.setDefaultTimeout(opts.timeoutMs);
    let pageError = null;
    let onError;
    const failed = new Promise((_, reject) => {
      onError = reject;
    });
    failed.catch(() => {});
    page.on('pageerror', (e) => {
      if (!pageError) {
        pageError = e;
        onError(new HttpError(422, 'page_error', `the ${job.kind === 'p5' ? 'sketch' : 'page'} threw: ${e.message}`));
      }
    });
    if (job.kind === 'p5') {
      await page.route(`${ORIGIN}/**`, (route) => {
        const p = new URL(route.request().url()).pathname;
        if (p === '/p5.min.js') return route.fulfill({ status: 200, contentType: 'text/javascript', body: p5Source });
        if (p === '/sketch.js') return route.fulfill({ status: 200, contentType: 'text/javascript', body: job.source });
        if (p === '/') return route.fulfill({ status: 200, contentType: 'text/html', body: P5_PAGE });
        return route.fulfill({ status: 404, body: '' });
      });
      await Promise.race([page.goto(`${ORIGIN}/`, { waitUntil: 'load' }), failed]);
      // Global-mode p5 starts on load; the picture is there once setup ran and, with a draw
      // function, the first frame was drawn. An instance-mode sketch (`new p5(...)`) is given
      // two animation frames after its canvas appears.
      await Promise.race([
        page.waitForFunction(
          () => {
            const inst = window.p5 && window.p5.instance;
            if (inst) return inst._setupDone && (typeof window.draw !== 'function' || inst.frameCount >= 1);
            if (!document.querySelector('canvas')) return false;
            window.__renderFrames = (window.__renderFrames || 0) + 1;
            return window.__renderFrames > 2;
          },
          null,
          { polling: 'raf' },
        ),
        failed,
      ]);
    } else if (job.kind === 'html') {
      await Promise.race([page.setContent(job.source, { waitUntil: 'load' }), failed]);
    } else {
      const resp = await page.goto(job.source, { waitUntil: 'load' }).catch((e) => {
        if (e.name === 'TimeoutError') throw e;
        throw new HttpError(502, 'navigation_failed', `failed to load ${job.source}: ${e.message}`);
      });
      if (resp && resp.status() >= 400) throw new HttpError(502, 'navigation_failed', `${job.source} answered ${resp.status()}`);
    }
    if (job.waitMs > 0) await page.waitForTimeout(job.waitMs);
    if (pageError && job.kind !== 'url') await failed;
    return await page.screenshot({ type: 'png' });
  } finally {
    aborted.removeEventListener('abort', onAbort);
    await context.close().catch(() => {});
  }
}

// A job that meets a browser dying under it (crashed, killed, or not yet noticed as gone) is
// retried once on a fresh browser; failures of the page itself are not.
async function renderOnce(job, aborted) {
  try {
    return await render(job, aborted);
  } catch (e) {
    if (e instanceof HttpError || aborted.aborted || (e && e.name === 'TimeoutError')) throw e;
    const dead = !browser || !browser.isConnected() || /closed|crash|disconnect/i.test(String(e && e.message));
    if (!dead) throw e;
    log(`the browser failed under a job (${plain(e && e.message)}); relaunching and retrying once`);
    const old = browser;
    browser = null;
    if (old) await old.close().catch(() => {});
    return await render(job, aborted);
  }
}

function send(res, status, body, type = 'application/json') {
  const data = type === 'application/json' ? JSON.stringify(body) : body;
  res.writeHead(status, { 'content-type': type, 'content-length': Buffer.byteLength(data) });
  res.end(data);
}

function sendError(res, e) {
  if (e instanceof HttpError) return send(res, e.status, { error: e.error, message: e.message });
  if (e && e.name === 'TimeoutError') return send(res, 504, { error: 'timeout', message: plain(e.message) });
  return send(res, 500, { error: 'internal', message: plain(e && e.message ? e.message : e) });
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (c) => {
      size += c.length;
      if (size > LIMITS.maxBody) {
        reject(new HttpError(413, 'too_large', `the body is over ${LIMITS.maxBody} bytes`));
        req.destroy();
      } else chunks.push(c);
    });
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, 'http://localhost');
  try {
    if (url.pathname === '/health') {
      if (req.method !== 'GET') throw new HttpError(405, 'method_not_allowed', 'use GET');
      if (browser && browser.isConnected()) {
        return send(res, 200, { ok: true, browser: browser.version(), playwright: version, gpu: opts.gpu, active, queued: waiters.length, rendering, concurrency: opts.concurrency });
      }
      getBrowser().catch(() => {});
      return send(res, 503, { ok: false, error: lastError || 'the browser is starting' });
    }
    if (url.pathname === '/render') {
      if (req.method !== 'POST') throw new HttpError(405, 'method_not_allowed', 'use POST');
      let job;
      try {
        job = JSON.parse(await readBody(req));
      } catch (e) {
        if (e instanceof HttpError) throw e;
        throw new HttpError(400, 'bad_request', `the body is not JSON: ${e.message}`);
      }
      job = validate(job);
      const hangup = new AbortController();
      res.on('close', () => {
        if (!res.writableFinished) hangup.abort();
      });
      await acquire();
      const started = Date.now();
      try {
        if (hangup.signal.aborted) throw new HttpError(499, 'client_closed', 'the client went away');
        // Closing the context on a hang-up does not end every Playwright call it interrupts (a
        // `setContent` or a `waitForTimeout` can run on to its own end), so the slot is freed as
        // soon as the client is gone rather than when the abandoned render settles.
        rendering++;
        const render = renderOnce(job, hangup.signal);
        render.catch(() => {}).finally(() => rendering--);
        const png = await Promise.race([render, clientGone(hangup.signal)]);
        log(`${job.kind} ${job.width}x${job.height}@${job.scale} rendered in ${Date.now() - started} ms`);
        return send(res, 200, png, 'image/png');
      } finally {
        release();
      }
    }
    throw new HttpError(404, 'not_found', `no route ${url.pathname}`);
  } catch (e) {
    if (res.destroyed) return log(`${url.pathname}: the client went away; job abandoned`);
    if (!(e instanceof HttpError) || e.status >= 500) log(`error: ${e && e.message}`);
    if (!res.headersSent) sendError(res, e);
  }
});

async function stop(signal) {
  if (stopping) return;
  stopping = true;
  log(`${signal}: stopping`);
  server.close();
  if (browser) await browser.close().catch(() => {});
  process.exit(0);
}
process.on('SIGTERM', () => stop('SIGTERM'));
process.on('SIGINT', () => stop('SIGINT'));

server.listen(opts.port, opts.host, () => {
  log(`listening on http://${opts.host}:${opts.port} (playwright-core ${version}, at most ${opts.concurrency} jobs at once)`);
  getBrowser().catch(() => {});
});
