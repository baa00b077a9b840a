// Fleet: every agent's health, and revoking a device (admins and the SOC;
// the collector refuses analysts, and the refusal is shown).

import { h, fill, field, table } from './dom.js';
import { get, post, orgParams } from './client.js';
import { t, tn, fmtTime, fmtNumber, toDate } from './i18n.js';
import { pageHeader, card, stateBadge, showError, showNotice } from './ui.js';

const SOON_DAYS = 14;

function expiry(value) {
  const date = toDate(value);
  if (!date) return h('span', null, '—');
  const days = Math.floor((date.getTime() - Date.now()) / 86400000);
  const cls = days < 0 ? 'expired' : days < SOON_DAYS ? 'expiring' : null;
  return h('span', { class: cls, title: days < 0 ? t('fleet.expired') : tn('fleet.daysLeft', days) },
    fmtTime(value, 'date'), cls ? h('span', { class: 'small' }, ` (${days < 0 ? t('fleet.expired') : tn('fleet.daysLeft', days)})`) : null);
}

function revokeDialog(agent, done) {
  const reason = h('input', { type: 'text', testid: 'revoke-reason', required: true, maxlength: 200 });
  const dialog = h('dialog', { class: 'dialog', testid: 'revoke-dialog', 'aria-labelledby': 'revoke-title' });
  const confirm = h('button', { type: 'submit', class: 'btn btn-danger', testid: 'revoke-confirm' }, t('fleet.revokeConfirm'));
  const cancel = h('button', { type: 'button', class: 'btn', testid: 'revoke-cancel', onclick: () => dialog.close() }, t('action.cancel'));
  const form = h('form', {
    method: 'dialog',
    onsubmit: async (e) => {
      e.preventDefault();
      confirm.disabled = true;
      try {
        const reply = await post(`/v1/devices/${encodeURIComponent(agent.org_id)}/${encodeURIComponent(agent.device_id)}/revoke`, { reason: reason.value.trim() });
        dialog.close();
        await done();
        showNotice(t('fleet.revoked', { device: agent.device_id, streams: fmtNumber((reply && reply.streams_closed) || 0) }));
      } catch (err) {
        dialog.close();
        showError(err);
      }
    },
  },
  h('h2', { id: 'revoke-title' }, t('fleet.revokeTitle', { device: agent.device_id })),
  h('p', null, t('fleet.revokeExplain', { host: agent.hostname || agent.device_id, org: agent.org_id })),
  field(t('fleet.reason'), reason),
  h('div', { class: 'actions' }, cancel, confirm));
  dialog.appendChild(form);
  dialog.addEventListener('close', () => dialog.remove());
  document.body.appendChild(dialog);
  dialog.showModal();
  reason.value = t('fleet.defaultReason');
  reason.select();
}

export async function render(ctx) {
  const { container } = ctx;
  const reply = await get('/v1/fleet', orgParams());
  const agents = reply.agents || [];
  const count = { online: 0, offline: 0, revoked: 0 };
  for (const a of agents) count[a.state] = (count[a.state] || 0) + 1;
  const rows = agents.map((a) => {
    const drops = (Number(a.kernel_drops) || 0) + (Number(a.queue_dropped) || 0);
    const sensors = a.active_sensors || [];
    return h('tr', { testid: 'agent-row', dataset: { device: a.device_id, org: a.org_id, state: a.state } },
      h('td', null, a.org_id),
      h('td', { class: 'mono' }, a.device_id),
      h('td', null, a.hostname),
      h('td', null, stateBadge(a.state)),
      h('td', { class: 'mono small' }, a.agent_version),
      h('td', { class: 'time' }, fmtTime(a.last_heartbeat)),
      h('td', { class: 'num' }, a.policy_serial ? String(a.policy_serial) : '—'),
      h('td', { title: sensors.join(', ') }, h('span', { class: 'num' }, fmtNumber(sensors.length)),
        sensors.length ? h('div', { class: 'muted small' }, sensors.join(', ')) : null),
      h('td', { class: 'time' }, expiry(a.certificate_not_after)),
      h('td', { class: ['num', Number(a.spool_events) > 0 ? 'warn' : null] }, fmtNumber(a.spool_events)),
      h('td', { class: ['num', drops > 0 ? 'warn' : null], title: t('fleet.dropsTitle', { kernel: a.kernel_drops || 0, queue: a.queue_dropped || 0, sampled: a.bulk_sampled || 0 }) }, fmtNumber(drops)),
      h('td', null, a.state === 'revoked' ? h('span', { class: 'muted small' }, t('state.revoked'))
        : h('button', { type: 'button', class: 'btn btn-small btn-danger-outline', testid: 'revoke-button', onclick: () => revokeDialog(a, () => render(ctx).catch(showError)) }, t('fleet.revoke'))));
  });
  fill(container,
    pageHeader(t('nav.fleet')),
    h('ul', { class: 'stat-row inline', testid: 'fleet-counts' },
      ['online', 'offline', 'revoked'].map((state) => h('li', { class: `stat stat-${state}` },
        h('span', { class: 'stat-n', testid: `fleet-${state}` }, fmtNumber(count[state])),
        h('span', { class: 'stat-label' }, t(`state.${state}`))))),
    card(tn('fleet.agentsTitle', agents.length), table({
      caption: t('nav.fleet'),
      testid: 'fleet-table',
      empty: t('fleet.none'),
      columns: [
        t('col.org'), t('fleet.device'), t('fleet.host'), t('fleet.state'), t('fleet.version'), t('fleet.heartbeat'),
        t('fleet.policy'), t('fleet.sensors'), t('fleet.certExpiry'), t('fleet.spool'), t('fleet.drops'), t('fleet.actions'),
      ].map((label) => ({ label })),
      rows,
    })));
}
