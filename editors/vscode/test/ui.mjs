// Drives a VS Code workbench (code-server) in Chromium for the spark extension's UI tests
// (tests/tests/suite/vscode.rs). A remote control: one JSON command per stdin line, one JSON
// answer per stdout line ({"ok": true, "v": …} or {"ok": false, "error": "…"}); the test
// decides what to do and what to assert. Every request leaving loopback is blocked.
//
// usage: node ui.mjs <workbench url> <chromium>
import { createInterface } from 'node:readline';
import { pathToFileURL } from 'node:url';
import { join } from 'node:path';

const [url, executablePath] = process.argv.slice(2);
const TIMEOUT = 20000;
// playwright-core from where .ci/run installed it (SPARK_TEST_PLAYWRIGHT), else from node_modules.
const pw = process.env.SPARK_TEST_PLAYWRIGHT
  ? pathToFileURL(join(process.env.SPARK_TEST_PLAYWRIGHT, 'index.mjs')).href
  : 'playwright-core';
const { chromium } = await import(pw);

function loopback(u) {
  try {
    const { protocol, hostname } = new URL(u);
    if (protocol === 'data:' || protocol === 'blob:') return true;
    return hostname === '127.0.0.1' || hostname === 'localhost' || hostname === '[::1]';
  } catch {
    return false;
  }
}

const blocked = [];
const browser = await chromium.launch({
  executablePath,
  args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run'],
});
const context = await browser.newContext({ viewport: { width: 1200, height: 700 } });
await context.route('**/*', (route) => {
  const u = route.request().url();
  if (loopback(u)) return route.continue();
  blocked.push(u);
  return route.abort();
});
const page = await context.newPage();
page.setDefaultTimeout(TIMEOUT);

const EDITOR = '.editor-group-container.active .monaco-editor:not(.monaco-diff-editor .monaco-editor)';

async function focusEditor() {
  await page.locator(`${EDITOR} .view-lines`).first().click({ position: { x: 5, y: 5 } });
}

/** The active editor's lines as rendered (all of a small file fit on screen). */
async function editorLines() {
  return page.evaluate((sel) => {
    const ed = document.querySelector(sel);
    if (!ed) return null;
    const rows = [...ed.querySelectorAll('.view-lines .view-line')].map((el) => ({
      top: parseFloat(el.style.top),
      // Decorations' `after` text is CSS generated content, not in textContent.
      text: el.textContent.replace(/\u00a0/g, ' '),
    }));
    rows.sort((a, b) => a.top - b.top);
    return rows.map((r) => r.text);
  }, EDITOR);
}

/** Decorations rendered in the active editor: per line, struck-through (removed) lines and the
 * text injected after it (added lines). */
async function decorations() {
  return page.evaluate((sel) => {
    const ed = document.querySelector(sel);
    const rows = [...ed.querySelectorAll('.view-lines .view-line')].sort(
      (a, b) => parseFloat(a.style.top) - parseFloat(b.style.top),
    );
    const out = [];
    rows.forEach((row, n) => {
      let struck = false;
      const injected = [];
      for (const s of row.querySelectorAll(':scope > span > span')) {
        if (getComputedStyle(s).textDecorationLine.includes('line-through')) struck = true;
        for (const pseudo of ['::before', '::after']) {
          const c = getComputedStyle(s, pseudo).content;
          if (c && c !== 'none' && c !== 'normal') injected.push(c);
        }
      }
      if (struck || injected.length) out.push({ line: n + 1, struck, injected });
    });
    return out;
  }, EDITOR);
}

const ops = {
  async open() {
    await page.goto(url);
    await page.locator('.monaco-workbench').waitFor();
    return true;
  },
  async openFile({ name }) {
    await page.keyboard.press('Control+P');
    await page.locator('.quick-input-widget input').waitFor();
    await page.keyboard.type(name);
    await page.locator('.quick-input-list .monaco-list-row').first().waitFor();
    await page.keyboard.press('Enter');
    await page.locator(`${EDITOR} .view-lines`).first().waitFor();
    return true;
  },
  async command({ title }) {
    await page.keyboard.press('F1');
    await page.locator('.quick-input-widget input').waitFor();
    await page.keyboard.type(title);
    await page.locator('.quick-input-list .monaco-list-row', { hasText: title }).first().waitFor();
    await page.keyboard.press('Enter');
    return true;
  },
  // Answer an input box, once the one titled `title` shows (the palette that opened it uses the
  // same widget).
  async input({ title, text }) {
    await page.locator('.quick-input-widget .quick-input-title', { hasText: title }).waitFor({ state: 'visible' });
    await page.keyboard.type(text);
    await page.keyboard.press('Enter');
    return true;
  },
  async pick({ hasText }) {
    const row = page.locator('.quick-input-list .monaco-list-row', { hasText }).first();
    await row.click();
    return true;
  },
  async select({ from, to }) {
    await focusEditor();
    await page.keyboard.press('Control+Home');
    for (let i = 1; i < from; i++) await page.keyboard.press('ArrowDown');
    for (let i = from; i <= to; i++) await page.keyboard.press('Shift+ArrowDown');
    return true;
  },
  async cursor({ line, end }) {
    await focusEditor();
    await page.keyboard.press('Control+Home');
    for (let i = 1; i < line; i++) await page.keyboard.press('ArrowDown');
    await page.keyboard.press(end ? 'End' : 'Home');
    return true;
  },
  async type({ text }) {
    await page.keyboard.type(text);
    return true;
  },
  async key({ key }) {
    await page.keyboard.press(key);
    return true;
  },
  async lines() {
    return editorLines();
  },
  async decorations() {
    return decorations();
  },
  async dirty() {
    return page.locator('.tabs-container .tab.active.dirty').count().then((n) => n > 0);
  },
  async statusText() {
    return page.evaluate(() =>
      [...document.querySelectorAll('.statusbar-item')]
        .map((e) => `${e.textContent.trim()} | ${e.querySelector('[aria-label]')?.getAttribute('aria-label') ?? ''}`)
        .filter((t) => /spark/i.test(t)),
    );
  },
  // Everything the user could be asked or told: modal dialogs and notification toasts.
  async prompts() {
    return page.evaluate(() => ({
      dialogs: [...document.querySelectorAll('.monaco-dialog-box')].map((e) => e.textContent),
      notifications: [...document.querySelectorAll('.notification-list-item-message')].map((e) => e.textContent),
      // The bell says "Notifications" when there are none, new or hidden.
      bell: document.querySelector('#status\\.notifications [aria-label]')?.getAttribute('aria-label') ?? null,
    }));
  },
  async diffEditors() {
    return page.evaluate(() => {
      const d = document.querySelector('.editor-group-container.active .monaco-diff-editor');
      if (!d) return null;
      const side = (cls) =>
        [...d.querySelectorAll(`.editor.${cls} .view-line`)]
          .sort((a, b) => parseFloat(a.style.top) - parseFloat(b.style.top))
          .map((l) => l.textContent.replace(/\u00a0/g, ' '));
      return { original: side('original'), modified: side('modified') };
    });
  },
  async screenshot({ path }) {
    await page.screenshot({ path });
    return true;
  },
  async blocked() {
    return blocked;
  },
  async html({ selector }) {
    return page.evaluate((s) => document.querySelector(s)?.outerHTML ?? null, selector);
  },
};

const rl = createInterface({ input: process.stdin });
for await (const line of rl) {
  if (!line.trim()) continue;
  let answer;
  try {
    const cmd = JSON.parse(line);
    const f = ops[cmd.op];
    if (!f) throw new Error(`unknown op ${cmd.op}`);
    answer = { ok: true, v: await f(cmd) };
  } catch (e) {
    answer = { ok: false, error: String(e && e.stack ? e.stack : e) };
  }
  process.stdout.write(JSON.stringify(answer) + '\n');
}
await browser.close();
