// The process tree of an incident, drawn as nested lists whose connecting
// lines come from CSS; the processes that made the incident's events are
// highlighted.

import { h } from './dom.js';
import { t, fmtTime } from './i18n.js';
import { commandLine } from './ui.js';

function byStart(a, b) {
  const sa = a.started || '';
  const sb = b.started || '';
  if (sa !== sb) return sa < sb ? -1 : 1;
  return (Number(a.pid) || 0) - (Number(b.pid) || 0);
}

function nodeView(node) {
  const argv = commandLine(node.argv);
  return h('div', {
    class: ['proc', node.in_incident ? 'proc-hit' : null],
    testid: 'tree-node',
    dataset: { pid: node.pid, exe: node.exe, inIncident: String(Boolean(node.in_incident)) },
  },
  h('div', { class: 'proc-line' },
    h('span', { class: 'proc-pid', title: t('tree.pid') }, String(node.pid)),
    h('span', { class: 'proc-exe' }, node.exe || '?'),
    node.in_incident ? h('span', { class: 'proc-flag' }, t('tree.inIncident')) : null),
  argv ? h('code', { class: 'proc-argv', title: argv }, argv) : null,
  h('div', { class: 'proc-meta' },
    node.user ? h('span', null, t('tree.user'), ' ', h('strong', null, node.user)) : null,
    node.started ? h('span', null, t('tree.started'), ' ', fmtTime(node.started)) : null));
}

/** `nodes`: ProcessNode[]; returns the tree, roots first. */
export function processTree(nodes) {
  if (!nodes || nodes.length === 0) {
    return h('p', { class: 'muted', testid: 'tree-empty' }, t('tree.empty'));
  }
  const byPid = new Map();
  for (const n of nodes) byPid.set(Number(n.pid), n);
  const children = new Map();
  const roots = [];
  for (const n of nodes) {
    const ppid = Number(n.ppid) || 0;
    if (ppid === 0 || ppid === Number(n.pid) || !byPid.has(ppid)) {
      roots.push(n);
    } else {
      if (!children.has(ppid)) children.set(ppid, []);
      children.get(ppid).push(n);
    }
  }
  const seen = new Set();
  const branch = (list) => h('ul', null, list.sort(byStart).map((n) => {
    const pid = Number(n.pid);
    if (seen.has(pid)) return null;
    seen.add(pid);
    const kids = children.get(pid) || [];
    return h('li', null, nodeView(n), kids.length ? branch(kids) : null);
  }));
  return h('div', { class: 'tree', testid: 'process-tree', 'aria-label': t('tree.title') }, branch(roots));
}
