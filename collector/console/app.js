// The SOC console: the shell (header, navigation, sign-in) and the hash
// router. Pages live in their own modules and talk only to the JSON API.

import { h, fill, field, select } from './dom.js';
import { get, request, session, isSoc, ApiError } from './client.js';
import { t, lang, setLang, LANGUAGES, timeZone, setTimeZone, timeZones } from './i18n.js';
import { showError, clearBanner, loading, pageHeader, inlineError } from './ui.js';
import * as overview from './overview.js';
import * as incidents from './incidents.js';
import * as events from './events.js';
import * as fleet from './fleet.js';
import * as policy from './policy.js';
import * as audit from './audit.js';

const NAV = [
  ['overview', 'nav.overview'],
  ['incidents', 'nav.incidents'],
  ['events', 'nav.events'],
  ['fleet', 'nav.fleet'],
  ['policy', 'nav.policy'],
  ['audit', 'nav.audit'],
];

const main = () => document.getElementById('main');
const header = () => document.getElementById('app-header');

/** `#/incidents/inc-1?status=open` → {parts: ['incidents', 'inc-1'], query}. */
function parseHash() {
  const raw = location.hash.replace(/^#\/?/, '');
  const [path, search] = raw.split('?');
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  return { parts, query: new URLSearchParams(search || '') };
}

export function navigate(hash) {
  if (location.hash === hash) {
    route();
  } else {
    location.hash = hash;
  }
}

function orgKey() {
  return `zt.org.${session.me ? session.me.user : ''}`;
}

function restoreOrg() {
  session.org = '';
  if (!isSoc()) return;
  try {
    const saved = sessionStorage.getItem(orgKey()) || '';
    if (saved && (session.me.orgs || []).includes(saved)) session.org = saved;
  } catch {
    session.org = '';
  }
}

function chooseOrg(value) {
  session.org = value;
  try {
    sessionStorage.setItem(orgKey(), value);
  } catch {
    // Kept for this page only.
  }
  route();
}

function languageSelect() {
  return select(LANGUAGES, lang(), {
    testid: 'lang-select',
    'aria-label': t('header.language'),
    onchange: (e) => {
      setLang(e.target.value);
      renderHeader();
      route();
    },
  });
}

function zoneSelect() {
  return select(timeZones().map((z) => [z, z]), timeZone(), {
    testid: 'tz-select',
    'aria-label': t('header.timezone'),
    class: 'tz-select',
    onchange: (e) => {
      setTimeZone(e.target.value);
      route();
    },
  });
}

function renderHeader() {
  const el = header();
  document.documentElement.lang = lang();
  const me = session.me;
  const current = parseHash().parts[0] || 'overview';
  const brand = h('a', { class: 'brand', href: '#/overview' },
    h('img', { src: '/console/favicon.svg', alt: '', width: 26, height: 26 }),
    h('span', null, t('app.name')));
  const tools = h('div', { class: 'header-tools' });
  if (me) {
    if (isSoc()) {
      const orgs = [['', t('header.allOrgs')], ...(me.orgs || []).map((o) => [o, o])];
      tools.appendChild(h('label', { class: 'tool' }, h('span', { class: 'tool-label' }, t('header.organisation')),
        select(orgs, session.org, { testid: 'org-select', onchange: (e) => chooseOrg(e.target.value) })));
    }
  }
  tools.appendChild(h('label', { class: 'tool' }, h('span', { class: 'tool-label' }, t('header.language')), languageSelect()));
  tools.appendChild(h('label', { class: 'tool' }, h('span', { class: 'tool-label' }, t('header.timezone')), zoneSelect()));
  if (me) {
    tools.appendChild(h('div', { class: 'me', testid: 'me' },
      h('span', { class: 'me-user', testid: 'me-user' }, me.user),
      h('span', { class: 'me-detail' },
        h('span', { testid: 'me-role' }, t(`role.${me.role}`) === `role.${me.role}` ? me.role : t(`role.${me.role}`)),
        ' · ',
        h('span', { testid: 'me-org' }, me.org_id))));
    tools.appendChild(h('button', { type: 'button', class: 'btn btn-quiet', testid: 'signout', onclick: signOut }, t('header.signOut')));
  }
  const nav = me
    ? h('nav', { class: 'main-nav', 'aria-label': t('nav.label') },
      h('ul', null, NAV.map(([page, key]) => h('li', null,
        h('a', {
          href: `#/${page}`,
          testid: `nav-${page}`,
          'aria-current': page === current ? 'page' : undefined,
        }, t(key))))))
    : null;
  fill(el, h('div', { class: 'header-row' }, brand, tools), nav);
  el.hidden = false;
}

async function signOut() {
  try {
    await request('DELETE', '/console/api/session');
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) {
      showError(e);
      return;
    }
  }
  session.me = null;
  session.org = '';
  clearBanner();
  renderHeader();
  navigate('#/signin');
}

function signInPage(notice) {
  const user = h('input', { type: 'text', name: 'user', autocomplete: 'username', required: true, testid: 'signin-user' });
  const password = h('input', { type: 'password', name: 'password', autocomplete: 'current-password', required: true, testid: 'signin-password' });
  const error = h('p', { class: 'form-error', role: 'alert', testid: 'signin-error', hidden: true });
  const submit = h('button', { type: 'submit', class: 'btn btn-primary', testid: 'signin-submit' }, t('signin.submit'));
  const form = h('form', {
    class: 'signin-form',
    testid: 'signin-form',
    onsubmit: async (e) => {
      e.preventDefault();
      error.hidden = true;
      submit.disabled = true;
      try {
        session.me = await request('POST', '/console/api/session', {
          body: { user: user.value.trim(), password: password.value },
        });
        restoreOrg();
        clearBanner();
        renderHeader();
        const wanted = sessionStorage.getItem('zt.after') || '#/overview';
        sessionStorage.removeItem('zt.after');
        navigate(wanted.startsWith('#/signin') ? '#/overview' : wanted);
      } catch (err) {
        password.value = '';
        error.textContent = err.code === 'locked' || err.status === 429
          ? t('signin.locked')
          : err.status === 401 ? t('signin.wrong') : `${t('signin.failed')} ${err.message}`;
        error.dataset.code = err.code || '';
        error.hidden = false;
        password.focus();
      } finally {
        submit.disabled = false;
      }
    },
  },
  h('h1', null, t('signin.title')),
  h('p', { class: 'muted' }, t('signin.intro')),
  notice ? h('p', { class: 'form-notice', role: 'status' }, notice) : null,
  field(t('signin.user'), user),
  field(t('signin.password'), password),
  error,
  submit,
  h('p', { class: 'muted small' }, t('signin.certificate')));
  fill(main(), h('div', { class: 'signin', testid: 'page-signin' }, form));
  document.title = `${t('signin.title')} — ${t('app.name')}`;
  user.focus();
}

const PAGES = {
  overview: (ctx) => overview.render(ctx),
  incidents: (ctx) => (ctx.parts[1] ? incidents.renderDetail(ctx, ctx.parts[1]) : incidents.renderList(ctx)),
  events: (ctx) => events.render(ctx),
  fleet: (ctx) => fleet.render(ctx),
  policy: (ctx) => policy.render(ctx),
  audit: (ctx) => audit.render(ctx),
};

let routeSeq = 0;

async function route() {
  routeSeq += 1;
  const seq = routeSeq;
  const { parts, query } = parseHash();
  if (!session.me) {
    if (parts[0] && parts[0] !== 'signin') sessionStorage.setItem('zt.after', location.hash);
    renderHeader();
    signInPage();
    return;
  }
  const page = PAGES[parts[0]] ? parts[0] : 'overview';
  if (parts[0] === 'signin' || !PAGES[parts[0]]) {
    if (location.hash !== '#/overview') {
      history.replaceState(null, '', '#/overview');
    }
  }
  renderHeader();
  clearBanner();
  const container = h('div', { class: `page page-${page}`, testid: `page-${page}` }, loading());
  fill(main(), container);
  document.title = `${t(`nav.${page}`)} — ${t('app.name')}`;
  const ctx = {
    parts: page === parts[0] ? parts : [page],
    query,
    container,
    navigate,
    current: () => seq === routeSeq,
  };
  try {
    await PAGES[page](ctx);
  } catch (e) {
    if (ctx.current()) {
      fill(container, pageHeader(t(`nav.${page}`)), inlineError(e));
      showError(e);
    }
  }
  if (ctx.current()) container.dataset.ready = 'true';
}

async function start() {
  setLang(lang());
  session.chooseOrg = chooseOrg;
  session.onUnauthenticated = () => {
    if (!session.me) return;
    session.me = null;
    sessionStorage.setItem('zt.after', location.hash);
    renderHeader();
    signInPage(t('signin.expired'));
  };
  fill(main(), loading());
  try {
    session.me = await get('/console/api/me');
    restoreOrg();
  } catch (e) {
    session.me = null;
    if (!(e instanceof ApiError && e.status === 401)) showError(e);
  }
  window.addEventListener('hashchange', route);
  await route();
}

start();
