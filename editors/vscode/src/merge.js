'use strict';
// Line-based 3-way merge (diff3), for bringing an edit into a document the user kept typing
// in: base = the text the edit was made against, ours = the edit's result, theirs = the
// document now. Disjoint changes merge; overlapping ones are a conflict and nothing is merged.

// Above this many cells the middle of a diff counts as one changed block: still correct (it
// can only turn a clean merge into a refused one), and it keeps a huge file from stalling the
// extension host.
const MAX_CELLS = 4_000_000;

function splitLines(text) {
  return text.match(/[^\n]*\n|[^\n]+$/g) || [];
}

/** For each line of `a`, the index of the line of `b` it matches in an LCS, or -1. */
function matchLines(a, b) {
  const m = new Array(a.length).fill(-1);
  let pre = 0;
  while (pre < a.length && pre < b.length && a[pre] === b[pre]) {
    m[pre] = pre;
    pre++;
  }
  let suf = 0;
  while (suf < a.length - pre && suf < b.length - pre && a[a.length - 1 - suf] === b[b.length - 1 - suf]) {
    m[a.length - 1 - suf] = b.length - 1 - suf;
    suf++;
  }
  const n = a.length - pre - suf;
  const k = b.length - pre - suf;
  if (n === 0 || k === 0 || n * k > MAX_CELLS) return m;
  // Classic LCS table over the middle, filled from the end.
  const w = k + 1;
  const t = new Uint32Array((n + 1) * w);
  for (let i = n - 1; i >= 0; i--) {
    for (let j = k - 1; j >= 0; j--) {
      t[i * w + j] = a[pre + i] === b[pre + j] ? t[(i + 1) * w + j + 1] + 1 : Math.max(t[(i + 1) * w + j], t[i * w + j + 1]);
    }
  }
  let i = 0;
  let j = 0;
  while (i < n && j < k) {
    if (a[pre + i] === b[pre + j]) {
      m[pre + i] = pre + j;
      i++;
      j++;
    } else if (t[(i + 1) * w + j] >= t[i * w + j + 1]) {
      i++;
    } else {
      j++;
    }
  }
  return m;
}

function same(x, y) {
  return x.length === y.length && x.every((l, n) => l === y[n]);
}

/** { ok: true, text } with both sides' changes, or { ok: false } when they overlap. */
function merge3(baseText, oursText, theirsText) {
  if (theirsText === baseText) return { ok: true, text: oursText };
  if (oursText === baseText || oursText === theirsText) return { ok: true, text: theirsText };
  const base = splitLines(baseText);
  const ours = splitLines(oursText);
  const theirs = splitLines(theirsText);
  const mo = matchLines(base, ours);
  const mt = matchLines(base, theirs);
  const out = [];
  let i = 0;
  let j = 0;
  let k = 0;
  while (i < base.length || j < ours.length || k < theirs.length) {
    if (i < base.length && mo[i] === j && mt[i] === k) {
      out.push(base[i]);
      i++;
      j++;
      k++;
      continue;
    }
    // The next base line both sides kept ends this unstable chunk.
    let e = i;
    while (e < base.length && (mo[e] < j || mt[e] < k)) e++;
    const [ej, ek] = e < base.length ? [mo[e], mt[e]] : [ours.length, theirs.length];
    const b = base.slice(i, e);
    const o = ours.slice(j, ej);
    const t = theirs.slice(k, ek);
    if (same(o, b)) out.push(...t);
    else if (same(t, b) || same(o, t)) out.push(...o);
    else return { ok: false };
    i = e;
    j = ej;
    k = ek;
  }
  return { ok: true, text: out.join('') };
}

/** The smallest single replacement turning `from` into `to`: [start, end, insert] offsets. */
function minimalReplace(from, to) {
  let s = 0;
  while (s < from.length && s < to.length && from[s] === to[s]) s++;
  let e = 0;
  while (e < from.length - s && e < to.length - s && from[from.length - 1 - e] === to[to.length - 1 - e]) e++;
  return [s, from.length - e, to.slice(s, to.length - e)];
}

module.exports = { merge3, minimalReplace, splitLines };
