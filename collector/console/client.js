// The collector's JSON API, with the session cookie. Every change (POST,
// DELETE) carries the session's CSRF token; errors come back as
// {code, message} and are thrown as ApiError.

import { t } from './i18n.js';

/** The signed-in user (`Me`) and, for the SOC, the organisation chosen. */
export const session = {
  me: null,
  org: '',
  onUnauthenticated: null,
};

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message || code || `HTTP ${status}`);
    this.status = status;
    this.code = code || '';
  }
}

function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params || {})) {
    const values = Array.isArray(value) ? value : [value];
    for (const v of values) {
      if (v !== undefined && v !== null && v !== '') search.append(name, String(v));
    }
  }
  const text = search.toString();
  return text ? `?${text}` : '';
}

/**
 * One call. `params` become the query string (empty values left out,
 * arrays repeated); `body` is sent as JSON.
 */
export async function request(method, path, { params, body } = {}) {
  const headers = { accept: 'application/json' };
  const init = { method, headers, credentials: 'same-origin', cache: 'no-store' };
  if (method !== 'GET' && method !== 'HEAD') {
    headers['content-type'] = 'application/json';
    if (session.me && session.me.csrf) headers['X-ZT-CSRF'] = session.me.csrf;
    if (body !== undefined) init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(`${path}${query(params)}`, init);
  } catch (e) {
    throw new ApiError(0, 'network', t('error.network', { detail: e.message }));
  }
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    const code = (data && data.code) || '';
    const message = (data && data.message) || text.trim().slice(0, 300) || response.statusText;
    const error = new ApiError(response.status, code, message);
    if (response.status === 401 && !path.startsWith('/console/api/') && session.onUnauthenticated) {
      session.onUnauthenticated(error);
    }
    throw error;
  }
  return data;
}

export const get = (path, params) => request('GET', path, { params });
export const post = (path, body) => request('POST', path, { body: body ?? {} });

/** The organisation parameter of a read: the SOC's choice, if any. */
export function orgParams(extra) {
  return { org_id: session.org || undefined, ...extra };
}

export function isSoc() {
  return Boolean(session.me && session.me.role === 'soc');
}

/** Organisations the views cover: the one chosen, or every readable one. */
export function orgsInView() {
  if (session.org) return [session.org];
  return (session.me && session.me.orgs && session.me.orgs.length) ? session.me.orgs : [session.me?.org_id].filter(Boolean);
}
