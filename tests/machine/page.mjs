// Drives the machine's status page in headless Chromium for tests/machine/page.rs, which starts
// the machine, submits a long simulation job and reads this script's last line of output.
//
// Environment: PAGE_URL (the page), CONTROL_TOKEN, MACHINE_ID, JOB_ID (the running job),
// SCREENSHOT (where the machine view's PNG goes; the view while the job runs and the fleet
// view go next to it, as -running.png and -fleet.png),
// PLAYWRIGHT_DIR (where `machine install` put playwright-core, with its browser.json).
//
// It fails (exit 1, with the reason) on any console error or uncaught page error, and checks
// in order: the stream goes live; the running job's progress moves; with the control token
// entered, a restart of `echo` raises its restart count; the log tail shows the service's
// output; the job appears in the recent jobs once done; the fleet tab lists this machine.
// The last line printed is a JSON summary.


import { env, chromium, chromiumPath } from './browser.mjs';

const errors = [];
const summary = {};
const step = (what) => process.stdout.write(`page: ${what}\n`);

const browser = await chromium.launch({
  executablePath: chromiumPath(),
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--no-first-run'],
});
let failed = null;
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  page.on('console', (m) => {
    if (m.type() === 'error') errors.push(`console: ${m.text()} (${m.location().url || 'page'})`);
  });
  page.on('pageerror', (e) => errors.push(`page error: ${e.message}`));
  page.setDefaultTimeout(20000);

  await page.goto(env('PAGE_URL'));
  await page.waitForFunction(() => document.getElementById('conn').textContent === 'live');
  await page.waitForSelector(`#machine-id:text-is("${env('MACHINE_ID')}")`);
  await page.waitForSelector('#gpus [data-gpu="0"] canvas');
  step('live');

  const jobId = env('JOB_ID');
  const progress = page.locator(`tr[data-worker] .progress`).first();
  await page.waitForSelector(`tr[data-worker] :text("${jobId}")`);
  const first = Number(await progress.getAttribute('data-progress'));
  await page.waitForFunction(
    (p) => Number(document.querySelector('tr[data-worker] .progress')?.dataset.progress) > p,
    first,
  );
  const second = Number(await progress.getAttribute('data-progress'));
  summary.progress = [first, second];
  step(`progress ${first} -> ${second}`);
  await page.screenshot({ path: env('SCREENSHOT').replace(/\.png$/, '-running.png'), fullPage: true });

  // Read-only until a token is entered.
  const restart = page.locator('tr[data-service="echo"] button');
  if (!(await restart.isDisabled())) throw new Error('the restart button is enabled without a token');
  await page.fill('#token', env('CONTROL_TOKEN'));
  await page.press('#token', 'Enter');
  await page.waitForSelector('tr[data-service="echo"] button:not([disabled])');
  const restarts = () => page.locator('tr[data-service="echo"] td[data-restarts]').getAttribute('data-restarts').then(Number);
  const before = await restarts();
  await page.locator('tr[data-service="echo"] button').click();
  await page.waitForFunction(
    (n) => Number(document.querySelector('tr[data-service="echo"] td[data-restarts]')?.dataset.restarts) > n,
    before,
  );
  summary.restarts = [before, await restarts()];
  step(`restarts ${summary.restarts[0]} -> ${summary.restarts[1]}`);

  // The log tail, opened by clicking the service's row.
  await page.locator('tr[data-service="echo"] td').first().click();
  await page.waitForFunction(() => /hello from echo/.test(document.querySelector('pre.log[data-service="echo"]')?.textContent || ''));
  step('log tail');

  // The job, once done, is among the recent jobs.
  await page.waitForSelector(`tr[data-job="${jobId}"] :text-is("completed")`, { timeout: 60000 });
  summary.recent_job = await page.locator(`tr[data-job="${jobId}"]`).innerText();
  step('recent job');

  await page.screenshot({ path: env('SCREENSHOT'), fullPage: true });

  await page.click('#tab-fleet');
  await page.waitForSelector(`#fleet tr[data-machine="${env('MACHINE_ID')}"]`);
  summary.fleet = await page.locator(`#fleet tr[data-machine="${env('MACHINE_ID')}"]`).innerText();
  summary.fleet_link = await page.locator(`#fleet tr[data-machine="${env('MACHINE_ID')}"] a`).getAttribute('href');
  step('fleet');
  await page.screenshot({ path: env('SCREENSHOT').replace(/\.png$/, '-fleet.png'), fullPage: true });
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
