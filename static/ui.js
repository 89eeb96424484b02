// Small DOM helpers: element building (never innerHTML), formatting, announcements, dialogs.

export const $ = (sel, root = document) => root.querySelector(sel);

/** h("button", {class: "x", onclick: fn, "aria-label": "…"}, "text", child…) */
export function h(tag, attrs = {}, ...children) {
  const svg = ['svg', 'g', 'rect', 'line', 'path', 'text', 'title', 'polyline'].includes(tag);
  const el = svg ? document.createElementNS('http://www.w3.org/2000/svg', tag) : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith('on')) el.addEventListener(name.slice(2), value);
    else if (name === 'dataset') Object.assign(el.dataset, value);
    else if (name === 'text') el.textContent = value;
    else el.setAttribute(name, value === true ? '' : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export function announce(text) {
  const live = $('#announcer');
  live.textContent = '';
  // A fresh text node each time so screen readers announce repeats too.
  requestAnimationFrame(() => { live.textContent = text; });
}

export function showError(el, error) {
  el.textContent = error ? (error.message || String(error)) : '';
}

// ── formatting ──
const nf = new Intl.NumberFormat();
export const num = (n) => (n === null || n === undefined ? '–' : nf.format(n));

export function compact(n) {
  if (n === null || n === undefined) return '–';
  const abs = Math.abs(n);
  if (abs >= 1e9) return `${(n / 1e9).toFixed(abs >= 1e10 ? 0 : 1)}B`;
  if (abs >= 1e6) return `${(n / 1e6).toFixed(abs >= 1e7 ? 0 : 1)}M`;
  if (abs >= 1e4) return `${(n / 1e3).toFixed(abs >= 1e5 ? 0 : 1)}k`;
  return nf.format(n);
}

export const pct = (n) => (n === null || n === undefined ? '–' : `${n}%`);
export const ms = (n) => (n === null || n === undefined ? '–' : n >= 10000 ? `${(n / 1000).toFixed(1)} s` : `${num(n)} ms`);

export function when(t) {
  if (!t) return '–';
  return new Date(t).toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'short' });
}

export function ago(t, now = Date.now()) {
  if (!t) return 'never';
  const s = Math.round((t - now) / 1000);
  const abs = Math.abs(s);
  const rtf = new Intl.RelativeTimeFormat(undefined, { numeric: 'auto' });
  if (abs < 60) return rtf.format(s, 'second');
  if (abs < 3600) return rtf.format(Math.round(s / 60), 'minute');
  if (abs < 86400) return rtf.format(Math.round(s / 3600), 'hour');
  return rtf.format(Math.round(s / 86400), 'day');
}

export function duration(seconds) {
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 60) return `${seconds} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${seconds % 60} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
}

/** "hour", "6 hours", "24 hours", "7 days", "30 days" */
export function windowText(windowMs) {
  const hours = Number(windowMs) / 3600000;
  if (hours === 1) return 'hour';
  return hours < 48 ? `${hours} hours` : `${hours / 24} days`;
}

export const PROVIDER_NAMES = { codex: 'OpenAI Codex', claude: 'Anthropic Claude', copilot: 'GitHub Copilot' };
export const providerName = (p) => PROVIDER_NAMES[p] || p;

// ── a table from rows and column specs [{label, get, num?}] ──
export function table(caption, columns, rows, empty = 'Nothing in this window yet.') {
  if (!rows.length) return h('div', { class: 'card' }, h('h3', {}, caption), h('p', { class: 'muted' }, empty));
  // Focusable, so a keyboard can scroll a table wider than the screen.
  return h('div', { class: 'card table-wrap', tabindex: '0', role: 'region', 'aria-label': caption },
    h('table', {},
      h('caption', {}, caption),
      h('thead', {}, h('tr', {}, columns.map((c) => h('th', { scope: 'col', class: c.num ? 'n' : null }, c.label)))),
      h('tbody', {}, rows.map((r) => h('tr', {}, columns.map((c, i) => {
        const value = c.get(r);
        return i === 0 ? h('th', { scope: 'row' }, value) : h('td', { class: c.num ? 'n' : null }, value);
      }))))));
}

// ── copy to clipboard, with a fallback for plain-HTTP origins ──
export async function copy(text, label = 'Copied') {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    const area = h('textarea', { 'aria-hidden': 'true', class: 'offscreen' });
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand('copy');
    area.remove();
  }
  announce(`${label} to the clipboard`);
}

export function copyButton(text, what) {
  return h('button', { type: 'button', class: 'small', 'aria-label': `Copy ${what}`,
    onclick: (e) => { copy(text, `${what} copied`); e.currentTarget.textContent = 'Copied'; } }, 'Copy');
}

export function codeBlock(text, what) {
  return h('div', { class: 'code' }, h('pre', { tabindex: '0', 'aria-label': what }, h('code', {}, text)), copyButton(text, what));
}

// ── confirmation dialog: resolves true when confirmed ──
export function confirmDialog(title, text, ok = 'Delete') {
  const dialog = $('#confirm');
  $('#confirm-title').textContent = title;
  $('#confirm-text').textContent = text;
  $('#confirm-ok').textContent = ok;
  dialog.returnValue = '';
  dialog.showModal();
  $('#confirm-ok').focus();
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'), { once: true });
  });
}

export function openDetail(title, ...content) {
  const dialog = $('#detail');
  $('#detail-title').textContent = title;
  fill($('#detail-body'), ...content);
  dialog.showModal();
  $('#detail-close').focus();
}

/** Runs an async action from a button: disables it, shows errors next to it. */
export function action(button, errorEl, fn) {
  return async (event) => {
    event?.preventDefault?.();
    button.disabled = true;
    if (errorEl) errorEl.textContent = '';
    try {
      await fn();
    } catch (error) {
      if (errorEl) errorEl.textContent = error.message;
      announce(error.message);
    } finally {
      if (button.isConnected) button.disabled = false;
    }
  };
}

// A refresh that never overlaps itself: a call while one runs is remembered and runs once
// after it (e.g. a new window chosen while the old one loads).
export function singleFlight(run) {
  let loading = false;
  let again = null;
  const go = async (...args) => {
    if (loading) {
      again = args;
      return;
    }
    loading = true;
    try {
      await run(...args);
    } finally {
      loading = false;
      if (again) {
        const next = again;
        again = null;
        go(...next);
      }
    }
  };
  return go;
}
