// What the page scripts share: their environment, and Debian's Chromium through the
// playwright-core the test harness installed in PLAYWRIGHT_DIR.

import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';

export const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const dir = env('PLAYWRIGHT_DIR');
const require = createRequire(path.join(dir, 'package.json'));
export const { chromium } = require('playwright-core');

export function chromiumPath() {
  try {
    const b = JSON.parse(fs.readFileSync(path.join(dir, 'browser.json'), 'utf8'));
    if (b.executable && fs.existsSync(b.executable)) return b.executable;
  } catch {
    // No browser.json: look where a system Chromium usually is.
  }
  const found = ['/usr/bin/chromium', '/usr/bin/chromium-browser', '/usr/bin/google-chrome', '/usr/bin/google-chrome-stable']
    .find((c) => fs.existsSync(c));
  if (!found) throw new Error('no Chromium found');
  return found;
}
