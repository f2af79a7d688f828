'use strict';
// The streaming preview: while the model writes its apply_patch, its chunks are located in the
// open document and shown as decorations (removed lines struck through, added lines as text
// after the line they follow). The document text is never touched here.

function trim(s) {
  return s.replace(/^\s+|\s+$/g, '');
}

/** Find the lines `want` in `lines` at or after `from`: exact first, then ignoring surrounding
 * whitespace, like the daemon's matcher's first passes. */
function find(lines, want, from) {
  if (want.length === 0) return from;
  for (const eq of [(a, b) => a === b, (a, b) => trim(a) === trim(b)]) {
    for (let i = from; i + want.length <= lines.length; i++) {
      if (want.every((w, n) => eq(lines[i + n], w))) return i;
    }
  }
  return -1;
}

/** Parse the (possibly incomplete) apply_patch text into updated files with chunks. Only
 * complete lines count. */
function parse(text) {
  const files = [];
  let file = null;
  let chunk = null;
  const lines = text.split('\n');
  lines.pop(); // after the last newline: incomplete, or empty
  for (let l of lines) {
    l = l.replace(/\r$/, '');
    const upd = /^\*\*\* Update File: (.+)$/.exec(l);
    if (upd) {
      file = { path: upd[1], chunks: [] };
      chunk = null;
      files.push(file);
    } else if (l.startsWith('*** ')) {
      if (!l.startsWith('*** Move to: ') && !l.startsWith('*** End of File')) file = null;
      chunk = null;
    } else if (file) {
      if (l.startsWith('@@')) {
        chunk = { anchor: trim(l.slice(2)), ops: [] };
        file.chunks.push(chunk);
      } else {
        if (!chunk) {
          chunk = { anchor: '', ops: [] };
          file.chunks.push(chunk);
        }
        const tag = l === '' ? ' ' : l[0];
        if (tag === ' ' || tag === '-' || tag === '+') chunk.ops.push([tag, l.slice(1)]);
      }
    }
  }
  return files;
}

/** Where a file's chunks go in `lines` (0-based): { removed: [line], added: [{line, text,
 * above}] } with `added` shown after `line` (or above line 0). */
function locate(file, lines) {
  const removed = [];
  const added = [];
  let cursor = 0;
  for (const c of file.chunks) {
    if (c.anchor !== '') {
      const at = find(lines, [c.anchor], cursor);
      if (at >= 0) cursor = at + 1;
    }
    const old = c.ops.filter((op) => op[0] !== '+').map((op) => op[1]);
    const at = find(lines, old, cursor);
    if (at < 0) continue;
    let line = at; // the next document line the chunk walks over
    for (const [tag, text] of c.ops) {
      if (tag === '+') {
        added.push(line > 0 ? { line: line - 1, text, above: false } : { line: 0, text, above: true });
      } else {
        if (tag === '-') removed.push(line);
        line++;
      }
    }
    cursor = line;
  }
  return { removed, added };
}

module.exports = { parse, locate, find };
