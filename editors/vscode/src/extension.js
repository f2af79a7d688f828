'use strict';
// spark for VS Code: ask sparkd for an edit from the editor and watch it stream in.
// The extension keeps no logic the daemon has: it speaks docs/protocol.md over the socket,
// shows the streaming patch, and brings landed edits into open documents.

const vscode = require('vscode');
const fs = require('fs');
const path = require('path');
const { execFile } = require('child_process');
const { Client, RpcError } = require('./client');
const { merge3, minimalReplace } = require('./merge');
const preview = require('./preview');

const GIT_SCHEME = 'spark-git';
// The daemon's size limit for a file shown to the model (docs/protocol.md, "Unsaved editor buffers").
const MAX_BUFFER_BYTES = 256 * 1024;

let client;
let status;
let log;
let removedDeco;
let addedDeco;
// The ask in flight from this window (a newer one steers the older away in the daemon too).
let current = null;
// Each open document's text as last read from disk: the base when an edit lands on disk while
// the user has unsaved changes.
const onDisk = new Map();
// Events for a repository held back while our own ask there is in flight: its own
// `edit_applied` is handled by the ask's result.
const held = [];
// Edits this window asked for (their results landed them).
const ownEdits = new Set();

function config() {
  return vscode.workspace.getConfiguration('spark');
}

function say(text) {
  log.appendLine(text);
  vscode.window.setStatusBarMessage(text, 8000);
}

function errorText(err) {
  let text = `spark: ${String(err.message || err).split('\n')[0]}`;
  if (err instanceof RpcError && err.data && err.data.hint) text += ` (hint: ${err.data.hint})`;
  return text;
}

function fail(err) {
  const text = errorText(err);
  log.appendLine(text);
  vscode.window.showErrorMessage(text);
}

function setStatus(state, detail) {
  const icons = { ready: '$(zap)', connecting: '$(sync~spin)', streaming: '$(sync~spin)', error: '$(warning)', idle: '$(circle-slash)' };
  status.text = `${icons[state] || ''} spark${detail ? `: ${detail}` : ''}`;
  status.tooltip = {
    ready: 'spark: connected to sparkd',
    connecting: 'spark: connecting to sparkd',
    streaming: 'spark: the model is writing',
    error: 'spark: not connected to sparkd (reconnecting)',
    idle: 'spark: sparkd is not running; it starts with the first command',
  }[state];
  status.accessibilityInformation = { label: status.tooltip + (detail ? ` (${detail})` : '') };
  status.backgroundColor = state === 'error' ? new vscode.ThemeColor('statusBarItem.errorBackground') : undefined;
}

function repoRoot(file) {
  let dir = path.dirname(file);
  for (;;) {
    if (fs.existsSync(path.join(dir, '.git'))) return dir;
    const up = path.dirname(dir);
    if (up === dir) return null;
    dir = up;
  }
}

/** The directory requests run in: the active file's, else the first workspace folder. */
function cwd() {
  const ed = vscode.window.activeTextEditor;
  if (ed && ed.document.uri.scheme === 'file') return path.dirname(ed.document.uri.fsPath);
  const f = vscode.workspace.workspaceFolders;
  if (f && f.length) return f[0].uri.fsPath;
  throw new Error('open a file or a folder inside a git repository first');
}

function fileDocs() {
  return vscode.workspace.textDocuments.filter((d) => d.uri.scheme === 'file' && !d.isClosed);
}

function docFor(abs) {
  return fileDocs().find((d) => d.uri.fsPath === abs);
}

/** A document just opened or saved holds its file's text. */
function remember(doc) {
  if (doc.uri.scheme === 'file' && !doc.isDirty) onDisk.set(doc.uri.fsPath, doc.getText());
}

/** A document changed and not dirty: reloaded from its file, or typed back to it. The change
 * event of a first keystroke can come before VS Code says the document is dirty, so only a text
 * the file holds is taken as the file's. */
function rememberChange(e) {
  const doc = e.document;
  if (doc.uri.scheme !== 'file' || doc.isDirty) return;
  let disk;
  try {
    disk = fs.readFileSync(doc.uri.fsPath, 'utf8');
  } catch {
    return;
  }
  if (disk === doc.getText()) onDisk.set(doc.uri.fsPath, disk);
}

function summary(files) {
  const plus = files.reduce((n, f) => n + (f.added || 0), 0);
  const minus = files.reduce((n, f) => n + (f.removed || 0), 0);
  return `${files.length} file${files.length === 1 ? '' : 's'} +${plus} -${minus}`;
}

function replaceAll(edit, doc, text) {
  const [s, e, insert] = minimalReplace(doc.getText(), text);
  edit.replace(doc.uri, new vscode.Range(doc.positionAt(s), doc.positionAt(e)), insert);
}

/**
 * Bring a file the daemon wrote into its open document. A document without unsaved changes is
 * reloaded by VS Code itself (one undo step, no dialog). One with unsaved changes gets the new
 * disk text merged 3-way with them, as one edit; the user's text is never written. First VS
 * Code is made to know the file's new version (`adoptDisk`), so saving the document later
 * writes the merged text without a "the content of the file is newer" conflict. The edit
 * carries the document version it was computed on, so a keystroke that lands first makes VS
 * Code refuse it and the merge is done again on the newer text: no keystroke is ever lost.
 * Returns false when the changes overlap: the document is left as it is.
 */
async function landOnDisk(abs, base) {
  let disk;
  try {
    disk = fs.readFileSync(abs, 'utf8');
  } catch {
    return true; // removed: VS Code shows the deleted file as such
  }
  // The file as VS Code last read it; once adopted, VS Code knows `disk`.
  let known = onDisk.get(abs);
  if (base === undefined) base = known;
  for (let attempt = 0; attempt < 20; attempt++) {
    const doc = docFor(abs);
    if (!doc) return true;
    const mine = doc.getText();
    if (mine === disk || !doc.isDirty) return true;
    const merged = merge3(base ?? mine, disk, mine);
    if (!merged.ok) return false;
    if (known !== disk) {
      known = disk;
      await adoptDisk(doc, disk);
      continue; // merge again on the text the document holds now
    }
    if (merged.text === mine) return true;
    const edit = new vscode.WorkspaceEdit();
    replaceAll(edit, doc, merged.text);
    if (await vscode.workspace.applyEdit(edit)) return true;
    await nextChange(doc);
  }
  return false;
}

/**
 * Make VS Code know the file's new version under a document with unsaved changes, keeping them
 * and its undo history. VS Code reads a file again only for a document without unsaved changes
 * and otherwise refuses a later save as a conflict; the API has no other way to tell it. So the
 * document is reverted (it reads the file: its version on disk is now known, and the reload is
 * one undo step) and that step is undone at once (the unsaved text is back, the version known
 * stays). The merge applied next is then the newest undo step: Ctrl+Z takes back exactly it.
 */
async function adoptDisk(doc, disk) {
  const before = doc.getText();
  const previous = vscode.window.activeTextEditor;
  // Revert and undo act on the active editor.
  if (previous?.document !== doc) await vscode.window.showTextDocument(doc, { preview: false });
  try {
    await vscode.commands.executeCommand('workbench.action.files.revert');
    if (doc.isDirty || doc.getText() !== disk) {
      log.appendLine(`spark: ${doc.uri.fsPath} was not read again; saving it may ask to overwrite`);
      return;
    }
    onDisk.set(doc.uri.fsPath, disk);
    await vscode.commands.executeCommand('undo');
    if (doc.getText() === disk) {
      // The undo did not reach the document (the focus was in another text field): put the
      // unsaved text back as an edit rather than leaving it only in the undo history.
      log.appendLine(`spark: ${doc.uri.fsPath}: restoring the unsaved text after reading the file`);
      const edit = new vscode.WorkspaceEdit();
      replaceAll(edit, doc, before);
      await vscode.workspace.applyEdit(edit);
    }
  } finally {
    if (previous && previous.document !== doc && !previous.document.isClosed) {
      await vscode.window.showTextDocument(previous.document, previous.viewColumn);
    }
  }
}

/** Until the document changes (the keystroke that made VS Code refuse an edit reaches the
 * extension host), or a second passes. */
function nextChange(doc) {
  return new Promise((resolve) => {
    const timer = setTimeout(done, 1000);
    const sub = vscode.workspace.onDidChangeTextDocument((e) => {
      if (e.document === doc) done();
    });
    function done() {
      clearTimeout(timer);
      sub.dispose();
      resolve();
    }
  });
}

async function onEvent(ev) {
  if (ev.type === 'edit_applied' || ev.type === 'edit_reverted') {
    // While our own ask runs, its own edit_applied may come first: its result decides.
    if (current) {
      held.push(ev);
      return;
    }
    await serial(() => landEvent(ev));
  } else if (ev.type === 'stopping') {
    say('spark: sparkd is stopping; will reconnect');
  }
}

async function landEvent(ev) {
  // An own edit's event that came after its result: the result brought it in already.
  if (ev.type === 'edit_applied' && ownEdits.has(ev.edit)) return;
  for (const rel of ev.files || []) {
    const abs = path.join(ev.repo, rel);
    if (!(await landOnDisk(abs))) {
      vscode.window.showWarningMessage(
        `spark: ${rel} changed on disk (edit ${ev.edit}) where you have unsaved changes; your text is kept`,
      );
    }
  }
}

// Landing edits in documents runs one at a time: each reads a document, may reload it and
// applies an edit, which another landing must not interleave with.
let landing = Promise.resolve();
function serial(fn) {
  const next = landing.then(fn);
  landing = next.catch(() => {});
  return next;
}

// ---- the streaming preview

function renderPreview(ask) {
  ask.renderPending = false;
  if (current !== ask) return;
  const files = preview.parse(ask.patch);
  for (const ed of vscode.window.visibleTextEditors) {
    const f = files.find((x) => path.join(ask.root, x.path) === ed.document.uri.fsPath);
    if (!f) continue;
    const lines = ed.document.getText().split('\n');
    const where = preview.locate(f, lines);
    ed.setDecorations(
      removedDeco,
      where.removed.map((l) => new vscode.Range(l, 0, l, lines[l].length)),
    );
    // The lines added at one place, in order, as one text after (or, at the top, before) the
    // line they follow: VS Code has no virtual lines, and several decorations at one spot
    // render in no reliable order.
    const groups = new Map();
    for (const a of where.added) {
      const key = `${a.line}:${a.above}`;
      if (!groups.has(key)) groups.set(key, { line: a.line, above: a.above, texts: [] });
      groups.get(key).texts.push(`+ ${a.text.trim()}`);
    }
    ed.setDecorations(
      addedDeco,
      [...groups.values()].map((g) => {
        const col = g.above ? 0 : lines[g.line].length;
        const contentText = g.above ? `${g.texts.join('  ')}\u2003` : `\u2003${g.texts.join('  ')}`;
        return {
          range: new vscode.Range(g.line, col, g.line, col),
          renderOptions: g.above ? { before: { contentText } } : { after: { contentText } },
        };
      }),
    );
    ask.previewed.add(ed);
  }
}

function clearPreview(ask) {
  for (const ed of ask.previewed) {
    ed.setDecorations(removedDeco, []);
    ed.setDecorations(addedDeco, []);
  }
  ask.previewed.clear();
}

function onProgress(ask, p) {
  if (p.type === 'patch' || p.type === 'text') {
    ask.deltas++;
    if (p.type === 'patch') {
      ask.patch += p.delta || '';
      if (!ask.renderPending) {
        // Many deltas arrive per frame at 1,000 tokens/s: render once per frame.
        ask.renderPending = true;
        setTimeout(() => renderPreview(ask), 16);
      }
    }
  } else if (p.type === 'tokens') {
    ask.rate = p.tokens_per_s;
  } else if (p.type === 'repair') {
    // The corrected patch streams from its start: the preview starts over.
    ask.patch = '';
    clearPreview(ask);
  }
  const secs = (Date.now() - ask.started) / 1000;
  const rate = ask.rate ?? (secs > 0 ? ask.deltas / secs : 0);
  setStatus('streaming', `${Math.round(rate)} tok/s`);
}

// ---- commands

async function ask() {
  const ed = vscode.window.activeTextEditor;
  if (!ed || ed.document.uri.scheme !== 'file') {
    vscode.window.showErrorMessage('spark: open a file in a git repository first (hint: the file, or the selection in it, is what the model looks at)');
    return;
  }
  const doc = ed.document;
  const file = doc.uri.fsPath;
  const root = repoRoot(file);
  if (!root) {
    vscode.window.showErrorMessage(`spark: ${file} is not inside a git repository (hint: spark edits files in git worktrees)`);
    return;
  }
  const prompt = await vscode.window.showInputBox({
    title: 'Spark: Ask',
    prompt: ed.selection.isEmpty ? 'What should change in this file?' : 'What should change in the selection?',
    ignoreFocusOut: true,
  });
  if (!prompt) return;
  const focus = { path: path.basename(file) };
  if (!ed.selection.isEmpty) {
    const s = ed.selection;
    let end = s.end.line;
    if (s.end.character === 0 && end > s.start.line) end--;
    focus.start_line = s.start.line + 1;
    focus.end_line = end + 1;
  }
  // What each open document of the repository held when asked: the base of every merge.
  const sent = new Map();
  const buffers = [];
  for (const d of fileDocs()) {
    const p = d.uri.fsPath;
    if (!p.startsWith(root + path.sep)) continue;
    sent.set(p, d.getText());
    // Unsaved text goes to the model instead of the file's bytes, and comes back as text.
    // Over the daemon's limit it would fail the whole ask: such a file goes from disk, and an
    // edit to it is merged into the document when it lands.
    if (d.isDirty && Buffer.byteLength(d.getText()) <= MAX_BUFFER_BYTES) buffers.push({ path: p, text: d.getText() });
  }
  const params = { cwd: path.dirname(file), prompt, focus: [focus] };
  if (buffers.length) params.buffers = buffers;
  if (current) clearPreview(current);
  const mine = { root, patch: '', deltas: 0, started: Date.now(), previewed: new Set(), renderPending: false };
  current = mine;
  setStatus('streaming', 'asking…');
  let result;
  try {
    result = await client.request('ask', params, (p) => onProgress(mine, p));
  } catch (e) {
    finishAsk(mine);
    if (e instanceof RpcError && e.data.kind === 'cancelled') say('spark: cancelled; nothing was applied');
    else fail(e);
    await serial(() => releaseHeld(null));
    return;
  }
  finishAsk(mine);
  await serial(() => landResult(mine, result, sent));
}

function finishAsk(mine) {
  clearPreview(mine);
  if (current === mine) current = null;
  setStatus(client.isReady() ? 'ready' : 'error');
}

async function releaseHeld(ownEdit) {
  while (held.length && !current) {
    const ev = held.shift();
    if (ev.edit !== ownEdit) await landEvent(ev);
  }
}

async function landResult(mine, result, sent) {
  const ms = Date.now() - mine.started;
  if (result.edit) ownEdits.add(result.edit);
  const bufferEdits = result.buffer_edits || [];
  // Unsaved documents: one WorkspaceEdit, merged with what was typed since the ask. It carries
  // the versions it was computed on; a keystroke that lands first makes VS Code refuse it, and
  // the merge runs again on the newer text.
  let refused = [];
  for (let attempt = 0; attempt < 20; attempt++) {
    const edit = new vscode.WorkspaceEdit();
    refused = [];
    for (const be of bufferEdits) {
      const abs = path.resolve(mine.root, be.path);
      const doc = docFor(abs);
      if (!doc) continue;
      const merged = merge3(sent.get(abs) ?? doc.getText(), be.text, doc.getText());
      if (merged.ok) replaceAll(edit, doc, merged.text);
      else refused.push(be.path);
    }
    if (edit.size === 0 || (await vscode.workspace.applyEdit(edit))) break;
    await nextChange(docFor(path.resolve(mine.root, bufferEdits[0].path)) ?? vscode.window.activeTextEditor?.document);
  }
  // Files written on disk.
  const inBuffers = new Set(bufferEdits.map((b) => b.path));
  const refusedOnDisk = [];
  for (const f of result.files || []) {
    if (inBuffers.has(f.path)) continue;
    const abs = path.join(mine.root, f.path);
    if (!(await landOnDisk(abs, sent.get(abs)))) refusedOnDisk.push(f.path);
  }
  if (refusedOnDisk.length && result.edit) {
    // The user's text wins: take the edit back on disk too, so the document and the file agree.
    try {
      await client.request('edit/undo', { cwd: mine.root, id: result.edit });
    } catch (e) {
      fail(e);
    }
  }
  refused = refused.concat(refusedOnDisk);
  await releaseHeld(result.edit);
  if (refused.length) {
    vscode.window.showWarningMessage(
      `spark: the edit overlaps what you typed in ${refused.join(', ')}; nothing was applied there, your text is untouched`,
    );
  } else if (result.edit || bufferEdits.length) {
    say(`spark: edit ${result.edit || '(unsaved buffers)'} · ${summary(result.files || [])} · ${ms} ms`);
  } else {
    const answer = (result.answer || '').replace(/\s+/g, ' ').trim();
    vscode.window.showInformationMessage(answer ? `spark: ${answer}` : 'spark: no change');
  }
}

async function cancel() {
  const r = await client.request('cancel', { cwd: cwd() });
  if (!r.cancelled) say('spark: nothing to cancel');
}

async function editRequest(method, verb) {
  const r = await client.request(method, { cwd: cwd() });
  say(`spark: ${verb} edit ${r.edit} · ${summary(r.files || [])}`);
}

async function showLog() {
  const dir = cwd();
  const r = await client.request('edit/log', { cwd: dir, limit: 50 });
  if (!r.edits.length) {
    vscode.window.showInformationMessage(`spark: no edits in ${r.repo}`);
    return;
  }
  const pick = await vscode.window.showQuickPick(
    r.edits.map((e) => ({
      label: `${e.id}  ${e.message || '(no message)'}`,
      description: `${e.state} · ${e.source} · ${new Date(e.at).toLocaleTimeString()}`,
      detail: e.files.join(', '),
      entry: e,
    })),
    { title: 'Spark: Show Log', placeHolder: 'an edit to see as a diff' },
  );
  if (!pick) return;
  for (const file of pick.entry.files) {
    const side = (rev) => vscode.Uri.from({ scheme: GIT_SCHEME, path: `/${file}`, query: JSON.stringify({ repo: r.repo, rev }) });
    await vscode.commands.executeCommand(
      'vscode.diff',
      side(`${pick.entry.id}^1`),
      side(pick.entry.id),
      `${file} (spark ${pick.entry.id}: ${pick.entry.message})`,
      { preview: false },
    );
  }
}

// The two sides of a record: its base B (first parent) and W (docs/protocol.md "Edit records
// in git"); a file the edit added or deleted is empty on the other side.
const gitContent = {
  provideTextDocumentContent(uri) {
    const { repo, rev } = JSON.parse(uri.query);
    return new Promise((resolve) => {
      execFile('git', ['-C', repo, 'show', `${rev}:${uri.path.slice(1)}`], { maxBuffer: 64 << 20 }, (err, out) =>
        resolve(err ? '' : out),
      );
    });
  },
};

async function showStatus() {
  const s = await client.request('status', {});
  const live = (s.sessions || []).filter((x) => x.connected).length;
  vscode.window.showInformationMessage(
    `spark: sparkd ${s.version} (pid ${s.pid}), up ${Math.floor(s.uptime_ms / 1000)}s, ` +
      `${s.repos.length} repo${s.repos.length === 1 ? '' : 's'}, ${live} live session${live === 1 ? '' : 's'}`,
  );
}

function command(fn) {
  return async (...args) => {
    try {
      await fn(...args);
    } catch (e) {
      fail(e);
    }
  };
}

function activate(context) {
  log = vscode.window.createOutputChannel('Spark');
  status = vscode.window.createStatusBarItem('spark.status', vscode.StatusBarAlignment.Left, 100);
  status.name = 'Spark';
  status.command = 'spark.status';
  setStatus('connecting');
  status.show();
  removedDeco = vscode.window.createTextEditorDecorationType({
    isWholeLine: true,
    backgroundColor: new vscode.ThemeColor('diffEditor.removedLineBackground'),
    textDecoration: 'line-through',
  });
  const added = { color: new vscode.ThemeColor('gitDecoration.addedResourceForeground'), fontStyle: 'italic' };
  addedDeco = vscode.window.createTextEditorDecorationType({ after: added, before: added });
  const version = context.extension.packageJSON.version;
  client = new Client(() => {
    const c = config();
    return {
      socket: c.get('socketPath') || undefined,
      sparkctl: c.get('sparkctlPath') || 'sparkctl',
      autostart: c.get('autoStart', true),
      clientVersion: version,
    };
  });
  client.on('state', (s) => {
    if (current && s === 'ready') return;
    setStatus(s === 'lost' ? 'error' : s);
    if (s === 'lost') log.appendLine('spark: lost the connection to sparkd; reconnecting');
  });
  client.on('reconnected', () => say('spark: reconnected to sparkd'));
  client.on('event', (ev) => onEvent(ev).catch((e) => log.appendLine(`spark: ${e.message}`)));

  for (const d of vscode.workspace.textDocuments) remember(d);
  context.subscriptions.push(
    vscode.workspace.onDidOpenTextDocument(remember),
    vscode.workspace.onDidSaveTextDocument(remember),
    vscode.workspace.onDidChangeTextDocument(rememberChange),
    vscode.workspace.onDidCloseTextDocument((d) => onDisk.delete(d.uri.fsPath)),
    vscode.workspace.registerTextDocumentContentProvider(GIT_SCHEME, gitContent),
    vscode.commands.registerCommand('spark.ask', command(ask)),
    vscode.commands.registerCommand('spark.cancel', command(cancel)),
    vscode.commands.registerCommand('spark.undo', command(() => editRequest('edit/undo', 'undid'))),
    vscode.commands.registerCommand('spark.stash', command(() => editRequest('edit/stash', 'stashed'))),
    vscode.commands.registerCommand('spark.showLog', command(showLog)),
    vscode.commands.registerCommand('spark.status', command(showStatus)),
    status,
    log,
    removedDeco,
    addedDeco,
    { dispose: () => client.dispose() },
  );
  // Join a running daemon for its events (edits from the terminal reach open editors); one is
  // started only by a command, and a later one is found by the reconnect loop.
  client.ensure(false).catch(() => {
    setStatus('idle');
    client.scheduleReconnect();
  });
}

function deactivate() {
  if (client) client.dispose();
}

module.exports = { activate, deactivate };
