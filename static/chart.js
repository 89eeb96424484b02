// Stacked bar charts in inline SVG, with hover and keyboard read-outs.
import { h, fill, compact, num } from './ui.js';

const HEIGHT = 180;
const PAD = { top: 10, right: 8, bottom: 22, left: 44 };

function niceMax(value) {
  if (value <= 0) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

function timeLabel(t, bucketMs) {
  const date = new Date(t);
  if (bucketMs >= 3600000) return date.toLocaleString(undefined, { month: 'short', day: 'numeric', hour: '2-digit' });
  return date.toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit' });
}

/**
 * stacked(figure, {title, series: [{key, label, cls, get(bucket)}], buckets, bucketMs, unit})
 * Draws into `figure` (a <figure>) and redraws when it is resized.
 */
export function stacked(figure, spec) {
  figure.__spec = spec;
  if (!figure.__observer) {
    let lastWidth = 0;
    figure.__observer = new ResizeObserver(() => {
      const width = figure.clientWidth;
      if (Math.abs(width - lastWidth) > 4) { lastWidth = width; draw(figure); }
    });
    figure.__observer.observe(figure);
  }
  draw(figure);
}

function draw(figure) {
  const { title, series, buckets, bucketMs, unit } = figure.__spec;
  const width = Math.max(280, (figure.clientWidth || 600) - 24);
  const totals = buckets.map((b) => series.reduce((sum, s) => sum + s.get(b), 0));
  const sum = totals.reduce((a, b) => a + b, 0);
  const max = niceMax(Math.max(0, ...totals));
  const innerW = width - PAD.left - PAD.right;
  const innerH = HEIGHT - PAD.top - PAD.bottom;
  const slot = innerW / Math.max(1, buckets.length);
  const barW = Math.max(1, slot * 0.8);
  const y = (v) => PAD.top + innerH - (v / max) * innerH;

  const readout = h('p', { class: 'readout small' });
  const legend = h('ul', { class: 'legend' }, series.map((s) => h('li', {}, h('span', { class: `swatch ${s.cls}`, 'aria-hidden': 'true' }), s.label)));
  const bars = h('g', {});
  const grid = h('g', { class: 'grid' });
  for (const frac of [0, 0.5, 1]) {
    const value = max * frac;
    grid.append(h('line', { x1: PAD.left, x2: width - PAD.right, y1: y(value), y2: y(value) }));
    grid.append(h('text', { x: PAD.left - 6, y: y(value) + 4, 'text-anchor': 'end' }, compact(value)));
  }
  const marker = h('rect', { class: 'marker', x: 0, y: PAD.top, width: slot, height: innerH, visibility: 'hidden' });
  buckets.forEach((bucket, i) => {
    let base = 0;
    const x = PAD.left + i * slot + (slot - barW) / 2;
    for (const s of series) {
      const value = s.get(bucket);
      if (value > 0) {
        bars.append(h('rect', { class: s.cls, x, width: barW, y: y(base + value), height: Math.max(0.5, y(base) - y(base + value)) }));
      }
      base += value;
    }
  });
  const axis = h('g', { class: 'axis' });
  if (buckets.length) {
    const picks = [...new Set([0, Math.floor((buckets.length - 1) / 2), buckets.length - 1])];
    for (const i of picks) {
      const anchor = i === 0 ? 'start' : i === buckets.length - 1 ? 'end' : 'middle';
      const x = i === 0 ? PAD.left : i === buckets.length - 1 ? width - PAD.right : PAD.left + (i + 0.5) * slot;
      axis.append(h('text', { x, y: HEIGHT - 6, 'text-anchor': anchor }, timeLabel(buckets[i].bucketStart, bucketMs)));
    }
  }
  const label = `${title}: ${num(sum)} ${unit} in ${buckets.length} intervals, at most ${num(Math.max(0, ...totals))} in one. `
    + 'Use the left and right arrow keys to read each interval.';
  const svg = h('svg', { width, height: HEIGHT, viewBox: `0 0 ${width} ${HEIGHT}`, role: 'img', 'aria-label': label, tabindex: '0', class: 'plot' },
    grid, marker, bars, axis);

  let selected = -1;
  const select = (i) => {
    if (!buckets.length) return;
    selected = Math.max(0, Math.min(buckets.length - 1, i));
    const bucket = buckets[selected];
    marker.setAttribute('x', PAD.left + selected * slot);
    marker.setAttribute('visibility', 'visible');
    const parts = series.map((s) => `${s.label} ${num(s.get(bucket))}`);
    readout.textContent = `${timeLabel(bucket.bucketStart, bucketMs)}: ${num(totals[selected])} ${unit} (${parts.join(', ')})`;
  };
  const clear = () => {
    selected = -1;
    marker.setAttribute('visibility', 'hidden');
    readout.textContent = `${num(sum)} ${unit} in this window. Point at a bar for its values.`;
  };
  svg.addEventListener('pointermove', (event) => {
    const box = svg.getBoundingClientRect();
    const x = ((event.clientX - box.left) / box.width) * width - PAD.left;
    if (x < 0 || x > innerW) return;
    select(Math.floor(x / slot));
  });
  svg.addEventListener('pointerleave', clear);
  svg.addEventListener('blur', clear);
  svg.addEventListener('keydown', (event) => {
    if (event.key === 'ArrowRight') select(selected < 0 ? buckets.length - 1 : selected + 1);
    else if (event.key === 'ArrowLeft') select(selected < 0 ? buckets.length - 1 : selected - 1);
    else if (event.key === 'Home') select(0);
    else if (event.key === 'End') select(buckets.length - 1);
    else return;
    event.preventDefault();
  });
  clear();
  fill(figure, h('figcaption', {}, title), legend, svg, readout);
}
