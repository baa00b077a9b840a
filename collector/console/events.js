// Event search: host, kinds, time window, text, pid, user; newest first.

import { h, fill, field, table } from './dom.js';
import { get, orgParams } from './client.js';
import { t, tn, fmtTime, wallTimeToUtc, utcToWallTime, timeZone } from './i18n.js';
import { pageHeader, card, loading, Pager, eventDetail } from './ui.js';

const KINDS = ['process', 'network', 'file', 'dns', 'decision'];
const TEXT_FIELDS = ['host', 'text', 'pid', 'user'];

export async function render(ctx) {
  const { container, query } = ctx;
  const inputs = {
    host: h('input', { type: 'search', name: 'host', testid: 'events-host', autocomplete: 'off' }),
    text: h('input', { type: 'search', name: 'text', testid: 'events-text', autocomplete: 'off' }),
    pid: h('input', { type: 'number', name: 'pid', min: 0, step: 1, testid: 'events-pid', inputmode: 'numeric' }),
    user: h('input', { type: 'search', name: 'user', testid: 'events-user', autocomplete: 'off' }),
    since: h('input', { type: 'datetime-local', name: 'since', testid: 'events-since' }),
    until: h('input', { type: 'datetime-local', name: 'until', testid: 'events-until' }),
  };
  for (const name of TEXT_FIELDS) inputs[name].value = query.get(name) || '';
  inputs.since.value = utcToWallTime(query.get('since'));
  inputs.until.value = utcToWallTime(query.get('until'));
  const chosen = query.getAll('kinds');
  const boxes = KINDS.map((kind) => h('input', { type: 'checkbox', name: 'kinds', value: kind, testid: `events-kind-${kind}`, checked: chosen.includes(kind) }));
  const kinds = h('fieldset', { class: 'kinds' },
    h('legend', null, t('events.kinds')),
    KINDS.map((kind, i) => h('label', { class: 'check' }, boxes[i], t(`kind.${kind}`))));

  const form = h('form', {
    class: 'filters',
    testid: 'events-form',
    onsubmit: (e) => {
      e.preventDefault();
      const q = new URLSearchParams();
      for (const name of TEXT_FIELDS) {
        if (inputs[name].value.trim()) q.set(name, inputs[name].value.trim());
      }
      for (const box of boxes) if (box.checked) q.append('kinds', box.value);
      const since = wallTimeToUtc(inputs.since.value);
      const until = wallTimeToUtc(inputs.until.value);
      if (since) q.set('since', since);
      if (until) q.set('until', until);
      ctx.navigate(`#/events?${q.toString()}`);
    },
  },
  field(t('events.host'), inputs.host),
  field(t('events.text'), inputs.text, t('events.textHint')),
  field(t('events.pid'), inputs.pid),
  field(t('events.user'), inputs.user),
  field(t('events.since'), inputs.since, t('events.zoneHint', { zone: timeZone() })),
  field(t('events.until'), inputs.until),
  kinds,
  h('div', { class: 'filter-actions' },
    h('button', { type: 'submit', class: 'btn btn-primary', testid: 'events-search' }, t('action.search')),
    h('a', { href: '#/events', class: 'btn btn-quiet' }, t('action.clear'))));

  const results = h('div', { class: 'results' }, loading());
  const summary = h('p', { class: 'muted small', testid: 'events-count', role: 'status' });
  const pager = new Pager(async (token) => {
    const params = orgParams({
      page_size: 50,
      page_token: token,
      host: query.get('host'),
      text: query.get('text'),
      pid: query.get('pid'),
      user: query.get('user'),
      since: query.get('since'),
      until: query.get('until'),
      kinds: query.getAll('kinds'),
    });
    const reply = await get('/v1/events', params);
    const list = reply.events || [];
    fill(results, eventsTable(list));
    summary.textContent = tn('events.shown', list.length);
    return reply.next_page_token;
  }, 'events-pager');
  fill(container, pageHeader(t('nav.events')),
    card(t('events.formTitle'), form, { class: 'filter-card' }),
    h('p', { class: 'muted small' }, query.get('since') ? '' : t('events.defaultWindow')),
    results, h('div', { class: 'list-footer' }, summary, pager.el));
  await pager.first();
}

function eventsTable(list) {
  return table({
    caption: t('nav.events'),
    testid: 'events-table',
    empty: t('events.none'),
    columns: [t('event.time'), t('event.host'), t('event.kind'), t('event.action'), t('event.pid'), t('event.user'), t('event.exe'), t('event.detail')].map((label) => ({ label })),
    rows: list.map((e) => h('tr', { testid: 'event-row', dataset: { kind: e.kind, org: e.org_id, pid: e.pid } },
      h('td', { class: 'time' }, fmtTime(e.time)),
      h('td', null, e.host),
      h('td', null, h('span', { class: ['kind', `kind-${e.kind}`] }, t(`kind.${e.kind}`) === `kind.${e.kind}` ? e.kind : t(`kind.${e.kind}`))),
      h('td', null, e.action),
      h('td', { class: 'num' }, String(e.pid)),
      h('td', null, e.user),
      h('td', { class: 'mono small' }, e.exe),
      h('td', { class: 'mono small detail' }, eventDetail(e)))),
  });
}
