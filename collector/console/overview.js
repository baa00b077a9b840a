// Overview: the zero-incident KPI, open incidents, the 30-day trend, the
// fleet's state and the policy rollout.

import { h, fill } from './dom.js';
import { get, orgParams, isSoc, orgsInView, session } from './client.js';
import { t, tn, fmtNumber, fmtTime, fmtDay } from './i18n.js';
import { card, loading, inlineError, pageHeader, SEVERITIES, stateBadge } from './ui.js';
import { trendChart } from './chart.js';

function kpiCard(kpi) {
  const onTarget = Boolean(kpi.on_target);
  const bySeverity = kpi.by_severity || {};
  const days = Number(kpi.days_since_last);
  // FY2026 runs from 2026-04-01 to 2027-03-31 (April to March), whatever
  // the viewer's time zone.
  const fy = /(\d{4})/.exec(kpi.fiscal_year || '');
  const start = fy ? fmtDay(`${fy[1]}-04-01`, true) : fmtTime(kpi.fiscal_year_start, 'date');
  const end = fy ? fmtDay(`${Number(fy[1]) + 1}-03-31`, true) : fmtTime(kpi.fiscal_year_end, 'date');
  return h('section', {
    class: ['card', 'kpi', onTarget ? 'kpi-ok' : 'kpi-bad'],
    testid: 'kpi-card',
    dataset: { onTarget: String(onTarget) },
    'aria-label': t('kpi.title'),
  },
  h('div', { class: 'kpi-head' },
    h('h2', { class: 'card-title' }, t('kpi.title')),
    h('span', { class: 'kpi-year' }, t('kpi.year', { fy: kpi.fiscal_year || '', start, end }))),
  h('div', { class: 'kpi-main' },
    h('div', { class: 'kpi-figure' },
      h('span', { class: 'kpi-number', testid: 'kpi-incidents' }, fmtNumber(kpi.incidents)),
      h('span', { class: 'kpi-target' }, t('kpi.target', { n: fmtNumber(kpi.target || 0) }))),
    h('div', { class: 'kpi-verdict' },
      h('span', { class: ['pill', onTarget ? 'pill-ok' : 'pill-bad'], testid: 'kpi-verdict' },
        onTarget ? t('kpi.onTarget') : t('kpi.offTarget')),
      h('p', { class: 'kpi-days', testid: 'kpi-days' },
        days < 0 ? t('kpi.never') : tn('kpi.daysSince', days)),
      kpi.last_incident ? h('p', { class: 'muted small' }, t('kpi.last', { time: fmtTime(kpi.last_incident) })) : null)),
  h('ul', { class: 'sev-counts', testid: 'kpi-by-severity' },
    SEVERITIES.map((sev) => h('li', { class: `sev-count sev-border-${sev}`, dataset: { severity: sev } },
      h('span', { class: 'sev-count-n' }, fmtNumber(bySeverity[sev] || 0)),
      h('span', { class: 'sev-count-label' }, t(`severity.${sev}`))))),
  h('p', { class: 'muted small' }, t('kpi.orgs', { orgs: (kpi.org_ids || []).join(', ') || (isSoc() ? t('header.allOrgs') : '—') })));
}

function openCard(kpi) {
  const open = kpi.open_by_severity || {};
  const max = Math.max(1, ...SEVERITIES.map((sev) => Number(open[sev]) || 0));
  return card(t('open.title'), [
    h('p', { class: 'big-number' },
      h('span', { testid: 'kpi-open' }, fmtNumber(kpi.open)),
      h('span', { class: 'big-number-unit' }, t('open.unit'))),
    h('ul', { class: 'hbars', testid: 'open-by-severity' },
      SEVERITIES.map((sev) => {
        const n = Number(open[sev]) || 0;
        const bar = h('span', { class: `hbar-fill sev-bg-${sev}` });
        bar.style.width = `${(n / max) * 100}%`;
        return h('li', { dataset: { severity: sev } },
          h('a', { href: `#/incidents?severity=${sev}`, class: 'hbar-label' }, t(`severity.${sev}`)),
          h('span', { class: 'hbar-track' }, bar),
          h('span', { class: 'hbar-n' }, fmtNumber(n)));
      })),
    h('p', null, h('a', { href: '#/incidents?status=open', testid: 'open-link' }, t('open.link'))),
  ], { testid: 'open-card' });
}

function fleetBody(agents) {
  const count = { online: 0, offline: 0, revoked: 0 };
  for (const a of agents) count[a.state] = (count[a.state] || 0) + 1;
  const total = agents.length;
  const stack = h('div', { class: 'stackbar', role: 'img', 'aria-label': t('fleet.summaryAria', { online: count.online, total }) });
  for (const state of ['online', 'offline', 'revoked']) {
    if (!count[state]) continue;
    const part = h('span', { class: `stackbar-part state-bg-${state}` });
    part.style.width = `${(count[state] / Math.max(total, 1)) * 100}%`;
    stack.appendChild(part);
  }
  return [
    h('ul', { class: 'stat-row' },
      ['online', 'offline', 'revoked'].map((state) => h('li', { class: `stat stat-${state}` },
        h('span', { class: 'stat-n', testid: `fleet-${state}` }, fmtNumber(count[state])),
        h('span', { class: 'stat-label' }, t(`state.${state}`))))),
    stack,
    h('p', null, h('a', { href: '#/fleet' }, tn('fleet.agentsLink', total))),
  ];
}

/** Agents whose applied serial is the organisation's newest. */
export function acked(status) {
  const serial = Number(status.serial) || 0;
  const agents = status.agents || [];
  return {
    serial,
    total: agents.length,
    acked: serial ? agents.filter((a) => Number(a.applied_serial) >= serial).length : 0,
  };
}

function policySummary(status) {
  const { serial, total, acked: n } = acked(status);
  const rollout = status.rollout || {};
  if (!serial) {
    return h('p', { class: 'muted', testid: 'policy-none' }, t('policy.none'));
  }
  const bar = h('span', { class: 'progress-fill' });
  bar.style.width = `${total ? (n / total) * 100 : 0}%`;
  return h('div', { class: 'policy-summary' },
    h('p', null, h('span', { class: 'label' }, t('policy.serial')), ' ', h('strong', { testid: 'policy-serial' }, String(serial)),
      rollout.state ? [' ', stateBadge(rollout.state)] : null),
    h('div', { class: 'progress', role: 'img', 'aria-label': t('policy.ackedAria', { n, total }) }, bar),
    h('p', { class: 'small', testid: 'policy-acked' }, t('policy.acked', { n: fmtNumber(n), total: fmtNumber(total) })));
}

async function policyCard() {
  const orgs = orgsInView();
  if (isSoc() && !session.org && orgs.length > 1) {
    // Every organisation: one line each.
    const rows = await Promise.all(orgs.map(async (org) => {
      try {
        const status = await get('/v1/policy/status', { org_id: org });
        const { serial, total, acked: n } = acked(status);
        return h('tr', { testid: 'policy-org-row', dataset: { org } }, h('th', { scope: 'row' }, org), h('td', null, serial ? String(serial) : '—'),
          h('td', null, status.rollout && status.rollout.state ? stateBadge(status.rollout.state) : '—'),
          h('td', { class: 'num' }, `${n} / ${total}`));
      } catch (e) {
        return h('tr', { testid: 'policy-org-row', dataset: { org } }, h('th', { scope: 'row' }, org), h('td', { colspan: 3, class: 'inline-error' }, e.message));
      }
    }));
    return h('div', { class: 'table-wrap' }, h('table', { class: 'data compact' },
      h('thead', null, h('tr', null, [t('col.org'), t('policy.serial'), t('policy.state'), t('policy.ackedShort')].map((c) => h('th', { scope: 'col' }, c)))),
      h('tbody', null, rows)));
  }
  return policySummary(await get('/v1/policy/status', orgParams()));
}

/** A card whose body loads on its own; a failure stays inside it. */
function lazyCard(title, testid, load, className) {
  const body = h('div', { class: 'card-body' }, loading());
  const el = card(title, body, { testid, class: className });
  const done = load().then((content) => fill(body, content), (e) => fill(body, inlineError(e)));
  return { el, done };
}

export async function render(ctx) {
  const { container } = ctx;
  const grid = h('div', { class: 'overview-grid' });
  fill(container, pageHeader(t('nav.overview')), grid);

  const kpiSlot = h('div', { class: 'kpi-slot' }, h('section', { class: 'card' }, loading()));
  const openSlot = h('div', { class: 'open-slot' }, h('section', { class: 'card' }, loading()));
  grid.append(kpiSlot, openSlot);
  const kpiDone = get('/v1/kpi', orgParams()).then(
    (kpi) => {
      fill(kpiSlot, kpiCard(kpi));
      fill(openSlot, openCard(kpi));
    },
    (e) => {
      fill(kpiSlot, card(t('kpi.title'), inlineError(e), { testid: 'kpi-card' }));
      fill(openSlot);
    },
  );
  const trend = lazyCard(t('trend.title'), 'trend-card', async () => {
    const reply = await get('/v1/trend', orgParams({ days: 30 }));
    return [trendChart(reply.days || []),
      reply.utc_offset ? h('p', { class: 'muted small' }, t('trend.clock', { offset: reply.utc_offset })) : null];
  }, 'wide');
  const fleet = lazyCard(t('fleet.summaryTitle'), 'fleet-card', async () => {
    const reply = await get('/v1/fleet', orgParams());
    return fleetBody(reply.agents || []);
  });
  const policy = lazyCard(t('policy.rolloutTitle'), 'policy-card', policyCard, 'span2');
  grid.append(trend.el, fleet.el, policy.el);
  await Promise.all([kpiDone, trend.done, fleet.done, policy.done]);
}
