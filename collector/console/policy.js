// Policy: the serial in force, the latest rollout and its progress, each
// agent's applied serial, the layers (baseline and organisation), and the
// serials issued with the diff between any two.

import { h, fill, table, field, select } from './dom.js';
import { lineDiff, folded } from './diff.js';
import { get, orgParams, isSoc, session, orgsInView } from './client.js';
import { t, fmtTime, fmtNumber } from './i18n.js';
import { pageHeader, card, stateBadge, facts, inlineError } from './ui.js';
import { acked } from './overview.js';

function rolloutView(status) {
  const { serial, total, acked: n } = acked(status);
  const r = status.rollout || {};
  if (!serial && !r.state) {
    return h('p', { class: 'muted', testid: 'policy-none' }, t('policy.none'));
  }
  const bar = h('span', { class: 'progress-fill' });
  bar.style.width = `${total ? (n / total) * 100 : 0}%`;
  const canary = (r.canary_devices || []).length
    ? `${r.canary_group || '—'}: ${r.canary_devices.join(', ')}` : (r.canary_group || '');
  return h('div', { class: 'rollout' },
    h('div', { class: 'rollout-head' },
      h('span', { class: 'big-number' }, h('span', { class: 'label' }, t('policy.serial')), ' ', h('span', { testid: 'policy-serial' }, String(serial))),
      r.state ? h('span', { testid: 'rollout-state' }, stateBadge(r.state)) : null),
    h('div', { class: 'progress large', role: 'img', 'aria-label': t('policy.ackedAria', { n, total }) }, bar),
    h('p', { testid: 'policy-acked' }, t('policy.acked', { n: fmtNumber(n), total: fmtNumber(total) })),
    facts([
      [t('policy.layer'), r.layer ? t(`layer.${r.layer}`) : ''],
      [t('policy.previous'), r.previous_serial ? String(r.previous_serial) : ''],
      [t('policy.pushedBy'), r.pushed_by],
      [t('policy.started'), r.started_unix ? fmtTime(Number(r.started_unix)) : ''],
      [t('policy.finished'), r.finished_unix ? fmtTime(Number(r.finished_unix)) : ''],
      r.staged || canary ? [t('policy.canary'), canary] : null,
      r.canary_seconds ? [t('policy.canaryWindow'), t('policy.seconds', { n: r.canary_seconds })] : null,
      r.staged ? [t('policy.denyRate'), `${Number(r.deny_rate_before || 0).toFixed(2)} → ${Number(r.deny_rate_during || 0).toFixed(2)}`] : null,
      r.staged ? [t('policy.errorRate'), `${Number(r.error_rate_before || 0).toFixed(2)} → ${Number(r.error_rate_during || 0).toFixed(2)}`] : null,
      r.reason ? [t('policy.reason'), r.reason] : null,
      r.rollback_serial ? [t('policy.rollbackSerial'), String(r.rollback_serial)] : null,
      r.restores ? [t('policy.restores'), String(r.restores)] : null,
    ], 'rollout-facts'));
}

function agentsTable(status) {
  const serial = Number(status.serial) || 0;
  return table({
    caption: t('policy.agents'),
    testid: 'policy-agents',
    empty: t('fleet.none'),
    columns: [t('fleet.device'), t('policy.applied'), t('policy.refused'), t('policy.error'), t('policy.reported'), t('policy.channel')].map((label) => ({ label })),
    rows: (status.agents || []).map((a) => h('tr', { dataset: { device: a.device_id } },
      h('td', { class: 'mono' }, a.device_id),
      h('td', { class: ['num', !serial ? null : Number(a.applied_serial) >= serial ? 'ok' : 'warn'] }, a.applied_serial ? String(a.applied_serial) : '—'),
      h('td', { class: 'num' }, a.refused_serial ? String(a.refused_serial) : '—'),
      h('td', { class: 'small' }, a.error),
      h('td', { class: 'time' }, fmtTime(Number(a.reported_unix) || '')),
      h('td', null, h('span', { class: ['badge', a.connected ? 'state-online' : 'state-offline'] }, t(a.connected ? 'policy.connected' : 'policy.disconnected'))))),
  });
}

function layer(title, text, testid) {
  return h('section', { class: 'layer' }, h('h3', null, title),
    text ? h('pre', { class: 'yaml', testid }, text) : h('p', { class: 'muted', testid: `${testid}-none` }, t('policy.noLayer')));
}

/** One layer's change between two serials, folded around the changes. */
function layerDiff(title, before, after, testid) {
  const diff = lineDiff(before || '', after || '');
  if (diff === null) return h('section', { class: 'layer' }, h('h3', null, title), h('p', { class: 'muted' }, t('policy.diffTooLarge')));
  const added = diff.filter(([op]) => op === '+').length;
  const removed = diff.filter(([op]) => op === '-').length;
  const lines = folded(diff).map(([op, text]) => (op === '…'
    ? h('span', { class: 'diff-line diff-fold' }, t('policy.unchangedLines', { n: text }))
    : h('span', { class: ['diff-line', op === '+' ? 'diff-add' : op === '-' ? 'diff-del' : null] }, `${op} ${text}`)));
  return h('section', { class: 'layer', testid },
    h('h3', null, title),
    h('p', { class: 'muted small diff-summary' }, added || removed ? t('policy.diffCounts', { added, removed }) : t('policy.noChange')),
    added || removed ? h('pre', { class: 'yaml diff' }, lines) : null);
}

/** The serials issued to the organisation and the diff between two. */
async function historyCard(org) {
  const history = await get('/v1/policy/history', org ? { org_id: org } : undefined);
  const serials = history.serials || [];
  if (serials.length === 0) return h('p', { class: 'muted', testid: 'policy-history-none' }, t('policy.none'));
  const rows = serials.map((b) => h('tr', { dataset: { serial: b.serial } },
    h('td', { class: 'num' }, String(b.serial)),
    h('td', { class: 'time' }, fmtTime(Number(b.issued_unix))),
    h('td', { class: 'small mono' }, b.issued_by),
    h('td', { class: 'small' }, [b.restores ? t('policy.restoresShort', { serial: b.restores }) : null, b.canary ? t('policy.canaryShort', { group: b.canary }) : null].filter(Boolean).join(' · '))));
  const options = serials.map((b) => [String(b.serial), String(b.serial)]);
  const from = select(options, String((serials[1] || serials[0]).serial), { testid: 'diff-from' });
  const to = select(options, String(serials[0].serial), { testid: 'diff-to' });
  const out = h('div', { testid: 'policy-diff' });
  const bySerial = new Map(serials.map((b) => [String(b.serial), b]));
  const show = () => {
    const a = bySerial.get(from.value);
    const b = bySerial.get(to.value);
    fill(out,
      h('p', { class: 'muted small' }, t('policy.diffBetween', { from: a.serial, to: b.serial })),
      layerDiff(t('layer.baseline'), a.baseline, b.baseline, 'diff-baseline'),
      layerDiff(t('layer.organisation'), a.organisation, b.organisation, 'diff-organisation'));
  };
  from.addEventListener('change', show);
  to.addEventListener('change', show);
  show();
  return h('div', null,
    table({
      caption: t('policy.history'),
      testid: 'policy-history',
      columns: [t('policy.serial'), t('policy.issued'), t('policy.pushedBy'), ''].map((label) => ({ label })),
      rows,
    }),
    h('h3', null, t('policy.diff')),
    h('div', { class: 'diff-controls' }, field(t('policy.diffFrom'), from), field(t('policy.diffTo'), to)),
    out);
}

async function allOrgs(ctx) {
  const rows = await Promise.all(orgsInView().map(async (org) => {
    const choose = h('button', { type: 'button', class: 'btn btn-small', onclick: () => session.chooseOrg(org) }, t('policy.show'));
    try {
      const status = await get('/v1/policy/status', { org_id: org });
      const { serial, total, acked: n } = acked(status);
      return h('tr', { testid: 'policy-org-row', dataset: { org } }, h('th', { scope: 'row' }, org),
        h('td', { class: 'num' }, serial ? String(serial) : '—'),
        h('td', null, status.rollout && status.rollout.state ? stateBadge(status.rollout.state) : '—'),
        h('td', { class: 'num' }, `${fmtNumber(n)} / ${fmtNumber(total)}`), h('td', null, choose));
    } catch (e) {
      return h('tr', null, h('th', { scope: 'row' }, org), h('td', { colspan: 3, class: 'inline-error' }, e.message), h('td', null, choose));
    }
  }));
  fill(ctx.container, pageHeader(t('nav.policy')),
    h('p', { class: 'muted' }, t('policy.allOrgs')),
    card(t('policy.rolloutTitle'), h('div', { class: 'table-wrap' }, h('table', { class: 'data', testid: 'policy-orgs' },
      h('thead', null, h('tr', null, [t('col.org'), t('policy.serial'), t('policy.state'), t('policy.ackedShort'), ''].map((c) => h('th', { scope: 'col' }, c)))),
      h('tbody', null, rows)))));
}

export async function render(ctx) {
  if (isSoc() && !session.org && orgsInView().length > 1) {
    await allOrgs(ctx);
    return;
  }
  const [status, layers] = await Promise.allSettled([get('/v1/policy/status', orgParams()), get('/v1/policy', orgParams())]);
  const org = (status.value && status.value.org_id) || session.org || (session.me && session.me.org_id);
  let history;
  try {
    history = await historyCard(session.org || '');
  } catch (e) {
    history = inlineError(e);
  }
  fill(ctx.container,
    pageHeader(t('nav.policy'), h('span', { class: 'muted' }, org)),
    h('div', { class: 'two-col' },
      card(t('policy.rolloutTitle'), status.status === 'fulfilled' ? rolloutView(status.value) : inlineError(status.reason), { testid: 'rollout-card' }),
      card(t('policy.agents'), status.status === 'fulfilled' ? agentsTable(status.value) : inlineError(status.reason), { testid: 'policy-agents-card' })),
    card(t('policy.layers'), layers.status === 'fulfilled'
      ? h('div', { class: 'layers' },
        h('p', { class: 'muted small' }, t('policy.layersSerial', { serial: layers.value.serial || '—' })),
        layer(t('layer.baseline'), layers.value.baseline, 'layer-baseline'),
        layer(t('layer.organisation'), layers.value.organisation, 'layer-organisation'))
      : inlineError(layers.reason), { testid: 'layers-card' }),
    card(t('policy.history'), history, { testid: 'history-card' }));
}
