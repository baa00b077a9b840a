// Shared pieces of the pages: the banner, badges, cards, the pager.

import { h, fill } from './dom.js';
import { t } from './i18n.js';

export const SEVERITIES = ['critical', 'high', 'medium', 'low'];
export const STATUSES = ['open', 'acknowledged', 'resolved'];

const banner = () => document.getElementById('banner');

/** Shows an error: the server's message, with what kind of refusal it is. */
export function showError(error) {
  const el = banner();
  const status = error && error.status !== undefined ? error.status : '';
  const code = (error && error.code) || '';
  const known = code && t(`error.code.${code}`) !== `error.code.${code}`;
  const title = known ? t(`error.code.${code}`) : t('error.generic');
  fill(el,
    h('div', { class: 'banner-body' },
      h('strong', { class: 'banner-title' }, title),
      h('span', { class: 'banner-message', testid: 'banner-message' }, (error && error.message) || String(error)),
      status || code ? h('span', { class: 'banner-code' }, [status ? `HTTP ${status}` : '', code].filter(Boolean).join(' · ')) : null),
    h('button', { type: 'button', class: 'banner-close', 'aria-label': t('action.dismiss'), onclick: clearBanner }, '×'));
  el.className = 'banner banner-error';
  el.dataset.kind = 'error';
  el.dataset.status = String(status);
  el.dataset.code = code;
  el.hidden = false;
}

/** Shows a confirmation (a change went through). */
export function showNotice(message) {
  const el = banner();
  fill(el,
    h('div', { class: 'banner-body' }, h('span', { class: 'banner-message', testid: 'banner-message' }, message)),
    h('button', { type: 'button', class: 'banner-close', 'aria-label': t('action.dismiss'), onclick: clearBanner }, '×'));
  el.className = 'banner banner-ok';
  el.dataset.kind = 'ok';
  el.dataset.status = '';
  el.dataset.code = '';
  el.hidden = false;
}

export function clearBanner() {
  const el = banner();
  el.hidden = true;
  el.replaceChildren();
  el.dataset.kind = '';
}

export function severityBadge(severity) {
  const known = SEVERITIES.includes(severity);
  return h('span', { class: ['badge', `sev-${known ? severity : 'unknown'}`], dataset: { severity } },
    known ? t(`severity.${severity}`) : (severity || '—'));
}

export function statusBadge(status) {
  return h('span', { class: ['badge', `status-${status}`], testid: 'status-badge', dataset: { status } },
    STATUSES.includes(status) ? t(`status.${status}`) : (status || '—'));
}

export function stateBadge(state) {
  return h('span', { class: ['badge', `state-${state}`], dataset: { state } },
    t(`state.${state}`) === `state.${state}` ? state : t(`state.${state}`));
}

export function pageHeader(title, ...extra) {
  return h('div', { class: 'page-header' }, h('h1', { testid: 'page-title' }, title), ...extra);
}

export function card(title, body, attrs = {}) {
  return h('section', { class: ['card', attrs.class], testid: attrs.testid, 'aria-label': title },
    h('h2', { class: 'card-title' }, title), body);
}

export function loading() {
  return h('p', { class: 'loading', role: 'status' }, t('common.loading'));
}

/** An error shown inside a card (the rest of the page still works). */
export function inlineError(error) {
  return h('p', { class: 'inline-error', role: 'alert', testid: 'inline-error' },
    (error && error.message) || String(error));
}

/** Definition list from [label, value] pairs (values may be nodes). */
export function facts(pairs, testid) {
  return h('dl', { class: 'facts', testid },
    pairs.filter(Boolean).map(([label, value, id]) => [
      h('dt', null, label),
      h('dd', { testid: id }, value === '' || value === undefined || value === null ? '—' : value),
    ]));
}

/**
 * Pages of a list: previous tokens kept on a stack, the next page's token
 * from the reply. `load(token)` must return the reply's next_page_token.
 */
export class Pager {
  constructor(load, testid) {
    this.load = load;
    this.stack = [];
    this.token = '';
    this.next = '';
    this.prevButton = h('button', { type: 'button', class: 'btn', testid: `${testid}-prev`, onclick: () => this.previous() }, t('pager.previous'));
    this.nextButton = h('button', { type: 'button', class: 'btn', testid: `${testid}-next`, onclick: () => this.forward() }, t('pager.next'));
    this.label = h('span', { class: 'pager-label' });
    this.el = h('nav', { class: 'pager', 'aria-label': t('pager.label') }, this.prevButton, this.label, this.nextButton);
    this.update();
  }

  update() {
    this.prevButton.disabled = this.stack.length === 0;
    this.nextButton.disabled = !this.next;
    this.label.textContent = t('pager.page', { n: this.stack.length + 1 });
  }

  async first() {
    this.stack = [];
    this.token = '';
    await this.run();
  }

  async run() {
    this.prevButton.disabled = true;
    this.nextButton.disabled = true;
    try {
      this.next = (await this.load(this.token)) || '';
    } finally {
      this.update();
    }
  }

  async forward() {
    if (!this.next) return;
    this.stack.push(this.token);
    this.token = this.next;
    await this.run();
  }

  async previous() {
    if (this.stack.length === 0) return;
    this.token = this.stack.pop();
    await this.run();
  }
}

/**
 * A user or device by name: `spiffe://<td>/org/<org>/user/<name>` shows as
 * "name · org" (the whole id on hover); anything else as it is.
 */
export function principal(id) {
  const m = /^spiffe:\/\/[^/]+\/org\/([^/]+)\/(user|device)\/(.+)$/.exec(id || '');
  if (!m) return id || '';
  return h('span', { class: 'principal', title: id },
    m[2] === 'device' ? `${t('principal.device')} ` : '', m[3], h('span', { class: 'principal-org' }, ` · ${m[1]}`));
}

/** `argv` as one line, each argument quoted when it needs to be. */
export function commandLine(argv) {
  if (!Array.isArray(argv) || argv.length === 0) return '';
  return argv.map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${String(a).replace(/'/g, "'\\''")}'`)).join(' ');
}

/** What an event is about, in a line: command line, path, or remote end. */
export function eventDetail(e) {
  switch (e.kind) {
    case 'process':
      return commandLine(e.argv);
    case 'file':
      return e.target_path ? `${e.path} → ${e.target_path}` : e.path;
    case 'dns':
      return [e.query_name, e.remote].filter(Boolean).join(' · ');
    case 'decision':
      return [e.remote, e.rule_id && `${t('event.rule')} ${e.rule_id}`, e.reason].filter(Boolean).join(' · ');
    default:
      return [e.remote, e.query_name].filter(Boolean).join(' · ');
  }
}
