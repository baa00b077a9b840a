// Small DOM helpers. Every text goes through textContent (never innerHTML):
// what agents report (command lines, paths, host names) is untrusted.

const SVG_NS = 'http://www.w3.org/2000/svg';

function apply(el, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') {
      el.setAttribute('class', Array.isArray(value) ? value.filter(Boolean).join(' ') : value);
    } else if (key === 'text') {
      el.textContent = String(value);
    } else if (key === 'testid') {
      el.dataset.testid = value;
    } else if (key === 'dataset') {
      for (const [k, v] of Object.entries(value)) {
        if (v !== undefined && v !== null) el.dataset[k] = String(v);
      }
    } else if (key.startsWith('on') && typeof value === 'function') {
      el.addEventListener(key.slice(2), value);
    } else if (value === true) {
      el.setAttribute(key, '');
    } else {
      el.setAttribute(key, String(value));
    }
  }
}

function append(el, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) {
      append(el, child);
    } else if (child instanceof Node) {
      el.appendChild(child);
    } else {
      el.appendChild(document.createTextNode(String(child)));
    }
  }
}

/** An HTML element: h('a', {href: '#/x', class: 'y'}, 'text', child, [more]). */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  apply(el, attrs);
  append(el, children);
  return el;
}

/** An SVG element, same calling convention as h(). */
export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  apply(el, attrs);
  append(el, children);
  return el;
}

/** Replaces the children of `el`. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** A table with a caption (for screen readers), column headers and rows. */
export function table({ caption, columns, rows, testid, empty, className }) {
  const head = h('thead', null,
    h('tr', null, columns.map((c) => h('th', { scope: 'col', class: c.class }, c.label))));
  const body = h('tbody');
  if (rows.length === 0 && empty) {
    body.appendChild(h('tr', { class: 'empty-row' },
      h('td', { colspan: columns.length, testid: testid ? `${testid}-empty` : undefined }, empty)));
  }
  for (const row of rows) body.appendChild(row);
  return h('div', { class: 'table-wrap' },
    h('table', { class: ['data', className], testid },
      caption ? h('caption', { class: 'visually-hidden' }, caption) : null, head, body));
}

/** A labelled form field: label + control, the label tied by id. */
let fieldSeq = 0;
export function field(label, control, hint) {
  fieldSeq += 1;
  const id = control.id || `f${fieldSeq}`;
  control.id = id;
  return h('div', { class: 'field' },
    h('label', { for: id }, label), control,
    hint ? h('span', { class: 'hint' }, hint) : null);
}

/** A <select> with [value, label] options. */
export function select(options, value, attrs) {
  const el = h('select', attrs);
  for (const [v, label] of options) {
    const opt = h('option', { value: v }, label);
    if (v === value) opt.selected = true;
    el.appendChild(opt);
  }
  return el;
}
