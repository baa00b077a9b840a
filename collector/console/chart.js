// The 30-day trend: stacked bars by severity, drawn as inline SVG.

import { s, h } from './dom.js';
import { t, fmtDay, fmtNumber } from './i18n.js';
import { SEVERITIES } from './ui.js';

const WIDTH = 1100;
const HEIGHT = 230;
const PAD = { top: 12, right: 12, bottom: 34, left: 36 };

/** A "nice" axis maximum and step for counts up to `max`. */
function axis(max) {
  if (max <= 4) return { top: Math.max(max, 1), step: 1 };
  const rough = max / 4;
  const pow = 10 ** Math.floor(Math.log10(rough));
  const step = [1, 2, 5, 10].map((m) => m * pow).find((v) => v >= rough);
  return { top: Math.ceil(max / step) * step, step };
}

/** `days`: [{date, low, medium, high, critical}], oldest first. */
export function trendChart(days) {
  const innerW = WIDTH - PAD.left - PAD.right;
  const innerH = HEIGHT - PAD.top - PAD.bottom;
  const totals = days.map((d) => SEVERITIES.reduce((sum, sev) => sum + (Number(d[sev]) || 0), 0));
  const { top, step } = axis(Math.max(0, ...totals));
  const y = (v) => PAD.top + innerH - (v / top) * innerH;
  const slot = innerW / Math.max(days.length, 1);
  const barW = Math.max(2, Math.min(18, slot * 0.7));
  const total = totals.reduce((a, b) => a + b, 0);

  const svg = s('svg', {
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    class: 'trend-chart',
    role: 'img',
    testid: 'trend-chart',
    'aria-label': t('trend.aria', { days: days.length, total: fmtNumber(total) }),
    dataset: { total },
  });
  const grid = s('g', { class: 'grid' });
  for (let v = 0; v <= top; v += step) {
    grid.appendChild(s('line', { x1: PAD.left, x2: WIDTH - PAD.right, y1: y(v), y2: y(v), class: v === 0 ? 'axis-line' : 'grid-line' }));
    grid.appendChild(s('text', { x: PAD.left - 6, y: y(v) + 4, class: 'axis-label', 'text-anchor': 'end' }, fmtNumber(v)));
  }
  svg.appendChild(grid);

  const bars = s('g', { class: 'bars' });
  days.forEach((day, i) => {
    const x = PAD.left + i * slot + (slot - barW) / 2;
    const group = s('g', { class: 'day', dataset: { date: day.date, total: totals[i] } });
    const lines = [fmtDay(day.date, true)];
    let base = 0;
    // Critical at the bottom: the worst is always easy to compare.
    for (const sev of SEVERITIES) {
      const n = Number(day[sev]) || 0;
      if (n > 0) {
        group.appendChild(s('rect', {
          x, width: barW, y: y(base + n), height: Math.max(1, y(base) - y(base + n)),
          class: `bar sev-fill-${sev}`, rx: 1.5,
        }));
        lines.push(`${t(`severity.${sev}`)}: ${fmtNumber(n)}`);
      }
      base += n;
    }
    if (totals[i] === 0) lines.push(t('trend.none'));
    // An invisible full-height target carries the tooltip for every day.
    group.appendChild(s('rect', { x: PAD.left + i * slot, width: slot, y: PAD.top, height: innerH, class: 'hit' },
      s('title', null, lines.join('\n'))));
    bars.appendChild(group);
    const every = days.length > 20 ? 5 : days.length > 10 ? 2 : 1;
    if ((days.length - 1 - i) % every === 0) {
      bars.appendChild(s('text', { x: x + barW / 2, y: HEIGHT - PAD.bottom + 16, class: 'axis-label', 'text-anchor': 'middle' }, fmtDay(day.date)));
    }
  });
  svg.appendChild(bars);

  const legend = h('ul', { class: 'legend' },
    SEVERITIES.map((sev) => h('li', null, h('span', { class: `swatch sev-bg-${sev}` }), t(`severity.${sev}`))));
  return h('figure', { class: 'chart' }, svg, h('figcaption', null, legend));
}
