// Language and time zone: the chosen language's dictionary (i18n-en.js,
// i18n-ja.js) and Intl for dates and numbers, in the chosen time zone.

import en from './i18n-en.js';
import ja from './i18n-ja.js';

const DICTIONARIES = { en, ja };
export const LANGUAGES = [['ja', '日本語'], ['en', 'English']];
const LOCALES = { en: 'en-GB', ja: 'ja-JP' };

function storedOr(key, fallback) {
  try {
    return localStorage.getItem(key) || fallback;
  } catch {
    return fallback;
  }
}

function store(key, value) {
  try {
    localStorage.setItem(key, value);
  } catch {
    // Storage may be disabled; the choice then lasts for this page only.
  }
}

function browserLanguage() {
  const wanted = (navigator.languages && navigator.languages[0]) || navigator.language || 'en';
  return wanted.toLowerCase().startsWith('ja') ? 'ja' : 'en';
}

export function browserTimeZone() {
  return Intl.DateTimeFormat().resolvedOptions().timeZone || 'UTC';
}

function validZone(zone) {
  try {
    new Intl.DateTimeFormat('en', { timeZone: zone });
    return true;
  } catch {
    return false;
  }
}

let current = storedOr('zt.lang', browserLanguage());
if (!DICTIONARIES[current]) current = 'en';
let zone = storedOr('zt.tz', browserTimeZone());
if (!validZone(zone)) zone = browserTimeZone();

export function lang() {
  return current;
}

export function locale() {
  return LOCALES[current];
}

export function setLang(value) {
  if (!DICTIONARIES[value]) return;
  current = value;
  store('zt.lang', value);
  document.documentElement.lang = value;
}

export function timeZone() {
  return zone;
}

export function setTimeZone(value) {
  if (!validZone(value)) return;
  zone = value;
  store('zt.tz', value);
}

/** Every time zone the browser knows, the browser's own first. */
export function timeZones() {
  let all = [];
  try {
    all = Intl.supportedValuesOf('timeZone');
  } catch {
    all = ['UTC', 'Asia/Tokyo'];
  }
  const first = [browserTimeZone(), 'Asia/Tokyo', 'UTC'];
  return [...new Set([...first, zone, ...all])];
}

/** The text of `key` in the current language, `{name}` replaced from params. */
export function t(key, params) {
  let text = DICTIONARIES[current][key];
  if (text === undefined) text = en[key];
  if (text === undefined) return key;
  if (params) {
    text = text.replace(/\{(\w+)\}/g, (m, name) => (name in params ? String(params[name]) : m));
  }
  return text;
}

/** Plural-aware text: `key.one` or `key.other` (Japanese has one form). */
export function tn(key, count, params) {
  const rule = new Intl.PluralRules(locale()).select(count);
  const form = DICTIONARIES[current][`${key}.${rule}`] !== undefined ? rule : 'other';
  return t(`${key}.${form}`, { n: fmtNumber(count), ...params });
}

/** RFC 3339 (nanoseconds allowed) or Unix seconds → Date, or null. */
export function toDate(value) {
  if (value === undefined || value === null || value === '' || value === 0) return null;
  if (typeof value === 'number') return new Date(value * 1000);
  // Date.parse wants at most milliseconds.
  const trimmed = String(value).replace(/(\.\d{3})\d+/, '$1');
  const ms = Date.parse(trimmed);
  return Number.isNaN(ms) ? null : new Date(ms);
}

const formats = new Map();
function formatter(kind) {
  const key = `${current}|${zone}|${kind}`;
  let f = formats.get(key);
  if (!f) {
    const options = {
      time: { year: 'numeric', month: '2-digit', day: '2-digit', hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23' },
      short: { month: '2-digit', day: '2-digit', hour: '2-digit', minute: '2-digit', hourCycle: 'h23' },
      date: { year: 'numeric', month: '2-digit', day: '2-digit' },
    }[kind];
    f = new Intl.DateTimeFormat(locale(), { ...options, timeZone: zone });
    formats.set(key, f);
  }
  return f;
}

/** A time in the chosen zone and language; '—' when unknown. */
export function fmtTime(value, kind = 'time') {
  const date = toDate(value);
  return date ? formatter(kind).format(date) : '—';
}

/** A calendar day given as YYYY-MM-DD (no zone of its own). */
export function fmtDay(day, withYear = false) {
  const date = new Date(`${day}T00:00:00Z`);
  if (Number.isNaN(date.getTime())) return day;
  return new Intl.DateTimeFormat(locale(), {
    timeZone: 'UTC', month: withYear ? 'long' : 'numeric', day: 'numeric', year: withYear ? 'numeric' : undefined,
  }).format(date);
}

export function fmtNumber(n) {
  return new Intl.NumberFormat(locale()).format(Number(n) || 0);
}

/** The zone's offset from UTC at `date`, in minutes. */
function offsetMinutes(date, zoneName) {
  const parts = new Intl.DateTimeFormat('en-US', {
    timeZone: zoneName, hourCycle: 'h23', year: 'numeric', month: '2-digit', day: '2-digit',
    hour: '2-digit', minute: '2-digit', second: '2-digit',
  }).formatToParts(date);
  const get = (type) => Number(parts.find((p) => p.type === type).value);
  const asUtc = Date.UTC(get('year'), get('month') - 1, get('day'), get('hour'), get('minute'), get('second'));
  return Math.round((asUtc - date.getTime()) / 60000);
}

/** A datetime-local value (wall time in the chosen zone) → RFC 3339 UTC. */
export function wallTimeToUtc(value) {
  if (!value) return '';
  const m = /^(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2})(?::(\d{2}))?$/.exec(value);
  if (!m) return '';
  const wall = Date.UTC(+m[1], +m[2] - 1, +m[3], +m[4], +m[5], +(m[6] || 0));
  // Two passes find the offset in force at that wall time (DST edges).
  let utc = wall - offsetMinutes(new Date(wall), zone) * 60000;
  utc = wall - offsetMinutes(new Date(utc), zone) * 60000;
  return new Date(utc).toISOString().replace('.000Z', 'Z');
}

/** RFC 3339 → a datetime-local value in the chosen zone. */
export function utcToWallTime(value) {
  const date = toDate(value);
  if (!date) return '';
  const wall = new Date(date.getTime() + offsetMinutes(date, zone) * 60000);
  return wall.toISOString().slice(0, 16);
}
