// The audit log: newest entries first (sign-ins, refusals, triage,
// revocations, policy pushes).

import { h, fill, field, select, table } from './dom.js';
import { get, orgParams } from './client.js';
import { t, tn, fmtTime } from './i18n.js';
import { pageHeader, card, principal } from './ui.js';

const SIZES = ['50', '100', '200', '500'];

export async function render(ctx) {
  const { container, query } = ctx;
  const size = SIZES.includes(query.get('page_size')) ? query.get('page_size') : '100';
  const reply = await get('/v1/audit', orgParams({ page_size: size }));
  const entries = reply.entries || [];
  const sizeSelect = select(SIZES.map((n) => [n, n]), size, {
    testid: 'audit-size',
    onchange: (e) => ctx.navigate(`#/audit?page_size=${e.target.value}`),
  });
  const rows = entries.map((e) => h('tr', {
    testid: 'audit-row',
    class: e.result && e.result !== 'ok' ? 'row-refused' : null,
    dataset: { action: e.action, actor: e.actor, result: e.result, target: e.target },
  },
  h('td', { class: 'time' }, fmtTime(e.time)),
  h('td', null, principal(e.actor)),
  h('td', null, e.actor_role),
  h('td', { class: 'mono small' }, e.action),
  h('td', { class: 'small' }, e.target.startsWith('spiffe://') ? principal(e.target) : h('span', { class: 'mono' }, e.target)),
  h('td', null, e.org_id),
  h('td', null, h('span', { class: ['badge', e.result === 'ok' ? 'result-ok' : 'result-refused'] }, t(`result.${e.result}`) === `result.${e.result}` ? e.result : t(`result.${e.result}`))),
  h('td', { class: 'small detail' }, e.detail),
  h('td', { class: 'mono small' }, e.source)));
  fill(container,
    pageHeader(t('nav.audit'),
      h('div', { class: 'header-actions' },
        field(t('audit.size'), sizeSelect),
        h('button', { type: 'button', class: 'btn', testid: 'audit-refresh', onclick: () => ctx.navigate(`#/audit?page_size=${size}`) }, t('action.refresh')))),
    card(tn('audit.shown', entries.length), table({
      caption: t('nav.audit'),
      testid: 'audit-table',
      empty: t('audit.none'),
      columns: [t('audit.time'), t('audit.actor'), t('audit.role'), t('audit.action'), t('audit.target'), t('col.org'), t('audit.result'), t('audit.detail'), t('audit.source')].map((label) => ({ label })),
      rows,
    })));
}
