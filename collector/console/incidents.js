// Incidents: the filterable list, and one incident's page (header,
// process tree, timeline, network and decisions, history, triage).

import { h, fill, field, select, table } from './dom.js';
import { get, post, orgParams } from './client.js';
import { t, tn, fmtTime, fmtNumber } from './i18n.js';
import {
  SEVERITIES, STATUSES, severityBadge, statusBadge, pageHeader, card, loading, facts,
  showError, showNotice, clearBanner, Pager, eventDetail, principal,
} from './ui.js';
import { processTree } from './tree.js';

const FILTERS = ['status', 'severity', 'host', 'rule_id'];

export async function renderList(ctx) {
  const { container, query } = ctx;
  const status = select([['', t('filter.any')], ...STATUSES.map((s) => [s, t(`status.${s}`)])], query.get('status') || '', { name: 'status', testid: 'filter-status' });
  const severity = select([['', t('filter.any')], ...SEVERITIES.map((s) => [s, t(`severity.${s}`)])], query.get('severity') || '', { name: 'severity', testid: 'filter-severity' });
  const host = h('input', { type: 'search', name: 'host', value: query.get('host') || '', testid: 'filter-host', autocomplete: 'off' });
  const rule = h('input', { type: 'search', name: 'rule_id', value: query.get('rule_id') || '', testid: 'filter-rule', autocomplete: 'off' });
  const form = h('form', {
    class: 'filters',
    testid: 'incident-filters',
    onsubmit: (e) => {
      e.preventDefault();
      const q = new URLSearchParams();
      for (const [name, el] of [['status', status], ['severity', severity], ['host', host], ['rule_id', rule]]) {
        if (el.value.trim()) q.set(name, el.value.trim());
      }
      const text = q.toString();
      ctx.navigate(`#/incidents${text ? `?${text}` : ''}`);
    },
  },
  field(t('incident.status'), status),
  field(t('incident.severity'), severity),
  field(t('incident.host'), host),
  field(t('incident.rule'), rule),
  h('div', { class: 'filter-actions' },
    h('button', { type: 'submit', class: 'btn btn-primary', testid: 'filter-apply' }, t('action.apply')),
    h('a', { href: '#/incidents', class: 'btn btn-quiet', testid: 'filter-clear' }, t('action.clear'))));

  const results = h('div', { class: 'results' }, loading());
  const summary = h('p', { class: 'muted small', testid: 'incident-count', role: 'status' });
  const pager = new Pager(async (token) => {
    const params = orgParams({ page_size: 25, page_token: token });
    for (const name of FILTERS) params[name] = query.get(name) || undefined;
    const reply = await get('/v1/incidents', params);
    const list = reply.incidents || [];
    fill(results, incidentTable(list, ctx));
    summary.textContent = tn('incident.shown', list.length);
    return reply.next_page_token;
  }, 'incidents-pager');
  fill(container, pageHeader(t('nav.incidents')), card(t('filter.title'), form, { class: 'filter-card' }), results, h('div', { class: 'list-footer' }, summary, pager.el));
  await pager.first();
}

function incidentTable(list, ctx) {
  const rows = list.map((inc) => {
    const link = h('a', { href: `#/incidents/${encodeURIComponent(inc.id)}`, testid: 'incident-link' }, inc.title || inc.id);
    return h('tr', {
      testid: 'incident-row',
      class: ['clickable', `row-${inc.status}`],
      dataset: { id: inc.id, org: inc.org_id, status: inc.status, severity: inc.severity },
      onclick: (e) => {
        if (e.target.closest('a')) return;
        ctx.navigate(`#/incidents/${encodeURIComponent(inc.id)}`);
      },
    },
    h('td', null, severityBadge(inc.severity)),
    h('td', { class: 'title-cell' }, link, h('div', { class: 'muted small mono' }, inc.id)),
    h('td', null, statusBadge(inc.status)),
    h('td', null, inc.host),
    h('td', { testid: 'incident-org' }, inc.org_id),
    h('td', { class: 'mono small' }, inc.rule_id),
    h('td', { class: 'num' }, fmtNumber(inc.count)),
    h('td', { class: 'time' }, fmtTime(inc.first_seen)),
    h('td', { class: 'time' }, fmtTime(inc.last_seen)));
  });
  return table({
    caption: t('nav.incidents'),
    testid: 'incident-table',
    empty: t('incident.none'),
    columns: [
      { label: t('incident.severity') }, { label: t('incident.title') }, { label: t('incident.status') },
      { label: t('incident.host') }, { label: t('col.org') }, { label: t('incident.rule') },
      { label: t('incident.count'), class: 'num' }, { label: t('incident.firstSeen') }, { label: t('incident.lastSeen') },
    ],
    rows,
  });
}

function severityFacts(inc) {
  return h('span', { class: 'sev-facts' }, severityBadge(inc.severity),
    inc.rule_severity && inc.rule_severity !== inc.severity
      ? h('span', { class: 'muted small' }, t('incident.ruleSeverity', { sev: t(`severity.${inc.rule_severity}`) })) : null,
    inc.escalation ? h('span', { class: 'escalation', testid: 'incident-escalation' }, t('incident.escalated', { why: inc.escalation })) : null);
}

function byAt(by, at) {
  return h('span', null, principal(by), h('span', { class: 'muted' }, ` — ${fmtTime(at)}`));
}

function header(inc) {
  const mitre = (inc.mitre || []).length
    ? h('span', { class: 'chips' }, inc.mitre.map((m) => h('span', { class: 'chip mono' }, m))) : '';
  return h('div', { class: 'incident-header' },
    h('div', { class: 'incident-title-row' },
      severityBadge(inc.severity),
      h('h1', { testid: 'incident-title' }, inc.title || inc.id),
      statusBadge(inc.status)),
    facts([
      [t('incident.id'), h('span', { class: 'mono' }, inc.id), 'incident-id'],
      [t('incident.rule'), h('span', { class: 'mono' }, inc.rule_id), 'incident-rule'],
      [t('incident.severity'), severityFacts(inc)],
      [t('incident.status'), statusBadge(inc.status), 'incident-status'],
      [t('incident.host'), inc.device_id && inc.device_id !== inc.host ? `${inc.host} (${inc.device_id})` : inc.host, 'incident-host'],
      (inc.spread_hosts || []).length ? [t('incident.spread'), inc.spread_hosts.join(', ')] : null,
      [t('col.org'), inc.org_id, 'incident-org'],
      [t('incident.firstSeen'), fmtTime(inc.first_seen)],
      [t('incident.lastSeen'), fmtTime(inc.last_seen)],
      [t('incident.count'), fmtNumber(inc.count), 'incident-count'],
      [t('incident.mitre'), mitre, 'incident-mitre'],
      inc.process_tree_root ? [t('incident.treeRoot'), h('span', { class: 'mono' }, inc.process_tree_root)] : null,
      inc.acknowledged_by ? [t('incident.acknowledged'), byAt(inc.acknowledged_by, inc.acknowledged_at)] : null,
      inc.resolved_by ? [t('incident.resolved'), byAt(inc.resolved_by, inc.resolved_at), 'incident-resolved'] : null,
      inc.note ? [t('incident.note'), h('span', { class: 'pre-line' }, inc.note), 'incident-note'] : null,
    ], 'incident-facts'),
    inc.description ? h('p', { class: 'description' }, inc.description) : null);
}

function triage(inc, reload) {
  const note = h('textarea', { rows: 3, maxlength: 2000, testid: 'note-input', placeholder: t('triage.placeholder') });
  const error = h('p', { class: 'form-error', role: 'alert', testid: 'note-error', hidden: true });
  const resolved = inc.status === 'resolved';
  const act = async (action) => {
    error.hidden = true;
    const text = note.value.trim();
    if (action === 'resolve' && !text) {
      error.textContent = t('triage.noteRequired');
      error.hidden = false;
      note.focus();
      return;
    }
    ack.disabled = true;
    resolve.disabled = true;
    try {
      await post(`/v1/incidents/${encodeURIComponent(inc.id)}/${action}`, { note: text });
      await reload();
      showNotice(t(action === 'resolve' ? 'triage.resolvedNotice' : 'triage.acknowledgedNotice', { id: inc.id }));
    } catch (e) {
      showError(e);
      ack.disabled = inc.status !== 'open';
      resolve.disabled = resolved;
    }
  };
  const ack = h('button', { type: 'button', class: 'btn', testid: 'ack-button', disabled: inc.status !== 'open', onclick: () => act('acknowledge') }, t('triage.acknowledge'));
  const resolve = h('button', { type: 'button', class: 'btn btn-primary', testid: 'resolve-button', disabled: resolved, onclick: () => act('resolve') }, t('triage.resolve'));
  if (resolved) {
    return card(t('triage.title'), h('p', { class: 'muted', testid: 'triage-done' }, t('triage.done')), { testid: 'triage', class: 'triage' });
  }
  return card(t('triage.title'), h('div', { class: 'triage-body' },
    field(t('triage.note'), note, t('triage.hint')), error,
    h('div', { class: 'actions' }, ack, resolve)), { testid: 'triage', class: 'triage' });
}

function kindBadge(kind) {
  return h('span', { class: ['kind', `kind-${kind}`] }, t(`kind.${kind}`) === `kind.${kind}` ? kind : t(`kind.${kind}`));
}

function timeline(events) {
  if (!events.length) return h('p', { class: 'muted' }, t('incident.noEvents'));
  return h('ol', { class: 'timeline', testid: 'timeline' }, events.map((e) => h('li', { class: 'timeline-item', testid: 'timeline-event', dataset: { kind: e.kind, pid: e.pid } },
    h('span', { class: 'timeline-dot', 'aria-hidden': 'true' }),
    h('div', { class: 'timeline-head' },
      h('time', { class: 'time', datetime: e.time }, fmtTime(e.time)),
      kindBadge(e.kind),
      h('strong', null, e.action),
      h('span', { class: 'muted' }, `${t('event.pid')} ${e.pid}`),
      e.user ? h('span', { class: 'muted' }, e.user) : null,
      h('span', { class: 'mono small' }, e.exe)),
    eventDetail(e) ? h('code', { class: 'timeline-detail' }, eventDetail(e)) : null,
    (e.ancestry || []).length ? h('div', { class: 'muted small mono' }, `${t('event.ancestry')} ${e.ancestry.join(' ← ')}`) : null)));
}

function networkTable(events) {
  return table({
    caption: t('incident.network'),
    testid: 'network-table',
    empty: t('incident.noNetwork'),
    columns: [t('event.time'), t('event.kind'), t('event.action'), t('event.pid'), t('event.exe'), t('event.remote'), t('event.dnsOrRule')].map((label) => ({ label })),
    rows: events.map((e) => h('tr', { dataset: { kind: e.kind } },
      h('td', { class: 'time' }, fmtTime(e.time)),
      h('td', null, kindBadge(e.kind)),
      h('td', { class: e.kind === 'decision' && /deny|denied/.test(e.action) ? 'deny' : undefined }, e.action),
      h('td', { class: 'num' }, String(e.pid)),
      h('td', { class: 'mono small' }, e.exe),
      h('td', { class: 'mono' }, e.remote),
      h('td', null, e.kind === 'dns' ? e.query_name : [e.rule_id, e.reason].filter(Boolean).join(' · ') || e.query_name))),
  });
}

function historyTable(history) {
  return table({
    caption: t('incident.history'),
    testid: 'history-table',
    empty: t('incident.noHistory'),
    columns: [t('history.at'), t('history.status'), t('history.by'), t('history.note')].map((label) => ({ label })),
    rows: history.map((c) => h('tr', { testid: 'history-row', dataset: { status: c.status } },
      h('td', { class: 'time' }, fmtTime(c.at)),
      h('td', null, statusBadge(c.status)),
      h('td', null, c.by ? principal(c.by) : t('history.collector')),
      h('td', { class: 'pre-line' }, c.note))),
  });
}

export async function renderDetail(ctx, id) {
  const { container } = ctx;
  const load = async () => {
    const detail = await get(`/v1/incidents/${encodeURIComponent(id)}`);
    const inc = detail.incident || {};
    document.title = `${inc.title || id} — ${t('app.name')}`;
    fill(container,
      h('p', { class: 'breadcrumb' }, h('a', { href: '#/incidents', testid: 'back-to-list' }, `← ${t('nav.incidents')}`)),
      h('div', { class: 'incident-top', testid: 'incident-detail', dataset: { id: inc.id, status: inc.status } },
        header(inc), triage(inc, load)),
      card(t('tree.title'), processTree(detail.process_tree || []), { testid: 'tree-card' }),
      card(t('incident.timeline'), timeline(detail.events || []), { testid: 'timeline-card' }),
      card(t('incident.network'), networkTable(detail.network_timeline || []), { testid: 'network-card' }),
      card(t('incident.history'), historyTable(detail.history || []), { testid: 'history-card' }));
    container.dataset.ready = 'true';
  };
  clearBanner();
  await load();
}

