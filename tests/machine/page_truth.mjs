// Checks that the status page never tells the operator something false, in headless Chromium
// at 420 px, for tests/machine/page.rs (which starts the machine with a read and a control
// token and submits a job that fails retryably, and reads this script's last line of output).
//
// Environment: PAGE_URL (the page), CONTROL_TOKEN, READ_TOKEN, JOB_ID (the failing job),
// REDIS_PORT (the machine's Redis, given a password halfway), SCREENSHOT (where the PNGs go),
// PLAYWRIGHT_DIR (where `machine install` put playwright-core, with its browser.json).
//
// In order: nothing overflows the 420 px viewport; a service's "up" cell counts on between
// status events; with the read token the restart button is disabled and a restart is refused
// with 403 naming the control token; a failed attempt that will be retried is not a red
// "failed"; once Redis refuses the credentials the badge says "not ready" (as /ready does) and
// a banner names the authentication error; once the machine stopped a banner says so and
// nothing counts on. It fails (exit 1, with the reason) on any uncaught page error. The last
// line printed is a JSON summary.

import net from 'node:net';

import { env, chromium, chromiumPath } from './browser.mjs';

// Commands to Redis in their inline form, on one connection; resolves with the first line of
// the answer.
function redisCommand(port, ...lines) {
  return new Promise((resolve, reject) => {
    const s = net.connect(Number(port), '127.0.0.1', () => s.write(lines.map((l) => l + '\r\n').join('')));
    s.once('data', (d) => { resolve(d.toString().split('\r\n')[0]); s.end(); });
    s.once('error', reject);
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const errors = [];
const summary = {};
const step = (what) => process.stdout.write(`page: ${what}\n`);
const pageUrl = env('PAGE_URL');
const shot = (suffix) => env('SCREENSHOT').replace(/\.png$/, `-${suffix}.png`);

const browser = await chromium.launch({
  executablePath: chromiumPath(),
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--no-first-run'],
});
let failed = null;
try {
  const context = await browser.newContext({ viewport: { width: 420, height: 900 } });
  const page = await context.newPage();
  // Console errors are not counted: a refused restart and a lost stream log failed requests,
  // which is what this script provokes.
  page.on('pageerror', (e) => errors.push(`page error: ${e.message}`));
  page.setDefaultTimeout(20000);

  await page.goto(pageUrl);
  await page.waitForFunction(() => document.getElementById('conn').textContent === 'live');
  await page.waitForSelector('tr[data-service="echo"] td[data-up-since]');
  const jobId = env('JOB_ID');
  await page.waitForSelector(`tr[data-job="${jobId}"]`, { timeout: 30000 });

  // Nothing wider than the viewport: wide tables scroll inside their section.
  const widths = await page.evaluate(() => ({
    page: document.documentElement.scrollWidth, body: document.body.scrollWidth, viewport: window.innerWidth }));
  summary.widths = widths;
  await page.screenshot({ path: shot('narrow'), fullPage: true });
  if (widths.page > widths.viewport || widths.body > widths.viewport) {
    throw new Error(`the page overflows ${widths.viewport} px: ${JSON.stringify(widths)}`);
  }
  step(`fits ${widths.viewport} px`);

  // The "up" cell of a running service counts on by itself: the same cell (not one re-drawn by
  // a status event) shows a later time a few seconds on.
  const counted = await page.evaluate(async () => {
    const seen = new Map();
    for (let i = 0; i < 40; i++) {
      const td = document.querySelector('tr[data-service="echo"] td[data-up-since]');
      if (td) {
        if (!seen.has(td)) seen.set(td, td.textContent);
        else if (seen.get(td) !== td.textContent) return [seen.get(td), td.textContent];
      }
      await new Promise((r) => setTimeout(r, 250));
    }
    return null;
  });
  if (!counted) throw new Error('the services\' "up" column does not count between status events');
  summary.up = counted;
  step(`up ${counted[0]} -> ${counted[1]}`);

  // The read token reads: the page is live with it, but it cannot restart, and the server says
  // which token can.
  await page.fill('#token', env('READ_TOKEN'));
  await page.press('#token', 'Enter');
  await page.waitForSelector('#access:text-is("read-only token")');
  await page.waitForFunction(() => document.getElementById('conn').textContent === 'live');
  await page.waitForSelector('tr[data-service="echo"] button');
  if (!(await page.locator('tr[data-service="echo"] button').isDisabled())) {
    throw new Error('the restart button is enabled with the read token');
  }
  summary.read_refusal = await page.evaluate(async (token) => {
    const r = await fetch('/services/echo/restart', { method: 'POST', headers: { Authorization: 'Bearer ' + token } });
    return { status: r.status, body: await r.json() };
  }, env('READ_TOKEN'));
  step(`read token: restart disabled, server says ${summary.read_refusal.status}`);

  // An attempt that failed and went back to the queue is not shown as a failed job.
  const attempt = page.locator(`tr[data-job="${jobId}"]`).first();
  summary.retrying = {
    outcome: await attempt.getAttribute('data-outcome'),
    text: await attempt.innerText(),
    badge_class: await attempt.locator('.badge').getAttribute('class'),
  };
  step(`retried attempt: ${summary.retrying.outcome}`);

  // The badge while ready: as /ready says.
  await page.waitForSelector('#phase:text-is("ready")');
  // Redis now asks for a password the machine does not have: /ready turns 503 while the phase
  // stays ready; the page must not say "ready", and says why prominently.
  // (The machine's open connections stay authenticated: they are closed, and its new ones
  // are refused.)
  summary.requirepass = await redisCommand(env('REDIS_PORT'), 'CONFIG SET requirepass page-truth-password',
    'CLIENT KILL TYPE normal', 'CLIENT KILL TYPE pubsub');
  await page.waitForSelector('#banner-redis-auth', { timeout: 30000 });
  await page.waitForFunction(() => document.getElementById('phase').textContent !== 'ready', null, { timeout: 30000 });
  summary.auth = {
    badge: await page.locator('#phase').innerText(),
    banner: await page.locator('#banner-redis-auth').innerText(),
    ready: await page.evaluate(async () => (await fetch('/ready')).status),
  };
  await page.screenshot({ path: shot('auth'), fullPage: true });
  step(`redis auth: badge ${summary.auth.badge}, /ready ${summary.auth.ready}`);

  // The machine stops: the page says so at once and nothing counts on.
  summary.stop = await page.evaluate(async (token) => {
    const r = await fetch('/control/stop', { method: 'POST', headers: { Authorization: 'Bearer ' + token } });
    return r.status;
  }, env('CONTROL_TOKEN'));
  await page.waitForSelector('#banner-gone', { timeout: 60000 });
  const before = await page.evaluate(() => [document.getElementById('meta').textContent,
    document.querySelector('tr[data-service="echo"] td[data-up-since]')?.textContent ?? null]);
  await sleep(2500);
  const after = await page.evaluate(() => [document.getElementById('meta').textContent,
    document.querySelector('tr[data-service="echo"] td[data-up-since]')?.textContent ?? null]);
  summary.stopped = {
    badge: await page.locator('#phase').innerText(),
    banner: await page.locator('#banner-gone').innerText(),
    before,
    after,
    restart_disabled: await page.locator('tr[data-service="echo"] button').isDisabled(),
  };
  await page.screenshot({ path: shot('stopped'), fullPage: true });
  step(`stopped: ${summary.stopped.badge}`);
} catch (e) {
  failed = e.message;
} finally {
  await browser.close();
}
summary.errors = errors;
summary.ok = failed === null && errors.length === 0;
if (failed) summary.failed = failed;
process.stdout.write(JSON.stringify(summary) + '\n');
process.exit(summary.ok ? 0 : 1);
