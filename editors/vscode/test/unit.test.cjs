'use strict';
// `npm test`: the pieces of the extension that need no editor (the UI test covers the rest).
const test = require('node:test');
const assert = require('node:assert');
const { merge3, minimalReplace } = require('../src/merge');
const preview = require('../src/preview');
const { socketPath } = require('../src/client');

const BASE = 'a\nb\nc\nd\ne\nf\ng\n';

test('disjoint changes merge', () => {
  assert.deepStrictEqual(merge3(BASE, 'a\nB\nc\nd\ne\nf\ng\n', 'a\nb\nc\nd\ne\nF\ng\n'), {
    ok: true,
    text: 'a\nB\nc\nd\ne\nF\ng\n',
  });
  assert.deepStrictEqual(merge3(BASE, 'a\nb\nc\nd\ne\nf\ng\nh\n', 'z\na\nb\nc\nd\ne\nf\ng\n'), {
    ok: true,
    text: 'z\na\nb\nc\nd\ne\nf\ng\nh\n',
  });
});

test('overlapping changes refuse the merge', () => {
  assert.deepStrictEqual(merge3(BASE, 'a\nB\nc\nd\ne\nf\ng\n', 'a\nX\nc\nd\ne\nf\ng\n'), { ok: false });
  // Adjacent lines changed on both sides overlap, as for git.
  assert.deepStrictEqual(merge3(BASE, 'a\nB\nc\nd\ne\nf\ng\n', 'a\nb\nC\nd\ne\nf\ng\n'), { ok: false });
});

test('the same change on both sides, or on one, is taken once', () => {
  assert.deepStrictEqual(merge3(BASE, 'a\nB\nc\nd\ne\nf\ng\n', 'a\nB\nc\nd\ne\nf\ng\n'), { ok: true, text: 'a\nB\nc\nd\ne\nf\ng\n' });
  assert.deepStrictEqual(merge3(BASE, BASE, 'x\n'), { ok: true, text: 'x\n' });
  assert.deepStrictEqual(merge3('one', 'one two', 'one'), { ok: true, text: 'one two' });
});

test('minimal replacement', () => {
  assert.deepStrictEqual(minimalReplace('fn a() {\n    1\n}\n', 'fn a() {\n    11\n}\n'), [14, 14, '1']);
  assert.deepStrictEqual(minimalReplace('abc', 'abc'), [3, 3, '']);
});

const LIB = 'fn one() {\n    1\n}\n\nfn two() {\n    2\n}\n';
const PATCH = '*** Begin Patch\n*** Update File: src/lib.rs\n@@ fn two() {\n-    2\n+    200\n+    // doubled\n*** End Patch\n';

test('the preview places a streaming chunk', () => {
  const files = preview.parse(PATCH);
  assert.strictEqual(files.length, 1);
  assert.strictEqual(files[0].path, 'src/lib.rs');
  assert.deepStrictEqual(preview.locate(files[0], LIB.split('\n')), {
    removed: [5],
    added: [
      { line: 5, text: '    200', above: false },
      { line: 5, text: '    // doubled', above: false },
    ],
  });
  // Mid-line: only complete lines count.
  const partial = preview.parse(PATCH.slice(0, PATCH.indexOf('+    200') + 4));
  assert.deepStrictEqual(preview.locate(partial[0], LIB.split('\n')), { removed: [5], added: [] });
  // Context that is not in the document shows nothing.
  const other = preview.parse('*** Begin Patch\n*** Update File: x\n-nothing like this\n+y\n');
  assert.deepStrictEqual(preview.locate(other[0], LIB.split('\n')), { removed: [], added: [] });
});

test('the socket is found as sparkctl finds it', () => {
  assert.strictEqual(socketPath({ SPARK_SOCKET: '/s/d.sock', SPARK_HOME: '/h' }, 7), '/s/d.sock');
  assert.strictEqual(socketPath({ SPARK_HOME: '/h', XDG_RUNTIME_DIR: '/run/user/7' }, 7), '/h/run/sparkd.sock');
  assert.strictEqual(socketPath({ SPARK_HOME: '', XDG_RUNTIME_DIR: '/run/user/7' }, 7), '/run/user/7/spark/sparkd.sock');
  assert.strictEqual(socketPath({}, 7), '/tmp/spark-7/sparkd.sock');
  assert.throws(() => socketPath({ SPARK_HOME: 'rel' }, 7), /SPARK_HOME must be an absolute path, got rel/);
});
