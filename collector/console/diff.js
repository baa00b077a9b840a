// A line diff (longest common subsequence) of two texts, for the policy
// page: which lines a serial removed and added. Policies are a few
// thousand lines at most; beyond MAX_LINES × MAX_LINES the diff gives up
// and says so rather than stall the page.

const MAX_CELLS = 16_000_000;

/**
 * The lines of `before` and `after` as [op, text] pairs, op one of
 * ' ' (both), '-' (only before), '+' (only after); null when too large.
 */
export function lineDiff(before, after) {
  const a = before ? before.split('\n') : [];
  const b = after ? after.split('\n') : [];
  // Common head and tail first: most pushes change a few lines.
  let head = 0;
  while (head < a.length && head < b.length && a[head] === b[head]) head += 1;
  let tail = 0;
  while (tail < a.length - head && tail < b.length - head
    && a[a.length - 1 - tail] === b[b.length - 1 - tail]) tail += 1;
  const x = a.slice(head, a.length - tail);
  const y = b.slice(head, b.length - tail);
  if ((x.length + 1) * (y.length + 1) > MAX_CELLS) return null;
  // lcs[i][j]: the longest common subsequence of x[i..] and y[j..].
  const width = y.length + 1;
  const lcs = new Uint32Array((x.length + 1) * width);
  for (let i = x.length - 1; i >= 0; i -= 1) {
    for (let j = y.length - 1; j >= 0; j -= 1) {
      lcs[i * width + j] = x[i] === y[j]
        ? lcs[(i + 1) * width + j + 1] + 1
        : Math.max(lcs[(i + 1) * width + j], lcs[i * width + j + 1]);
    }
  }
  const out = a.slice(0, head).map((line) => [' ', line]);
  let i = 0;
  let j = 0;
  while (i < x.length || j < y.length) {
    if (i < x.length && j < y.length && x[i] === y[j]) {
      out.push([' ', x[i]]);
      i += 1;
      j += 1;
    } else if (j < y.length && (i === x.length || lcs[i * width + j + 1] > lcs[(i + 1) * width + j])) {
      out.push(['+', y[j]]);
      j += 1;
    } else {
      out.push(['-', x[i]]);
      i += 1;
    }
  }
  for (const line of a.slice(a.length - tail)) out.push([' ', line]);
  return out;
}

/**
 * The diff with long unchanged runs folded: `context` lines are kept
 * around each change; a fold is ['…', count].
 */
export function folded(diff, context = 3) {
  const keep = diff.map(() => false);
  diff.forEach(([op], k) => {
    if (op === ' ') return;
    for (let d = Math.max(0, k - context); d <= Math.min(diff.length - 1, k + context); d += 1) keep[d] = true;
  });
  const out = [];
  let skipped = 0;
  diff.forEach((line, k) => {
    if (keep[k]) {
      if (skipped) out.push(['…', skipped]);
      skipped = 0;
      out.push(line);
    } else {
      skipped += 1;
    }
  });
  if (skipped) out.push(['…', skipped]);
  return out;
}
