// Dashboard: totals against the previous window, charts, breakdown tables.
import { get } from './api.js';
import {
  $, h, fill, num, compact, pct, ms, when, ago, table, providerName, announce, windowText, singleFlight,
} from './ui.js';
import { stacked } from './chart.js';

const WINDOW_KEY = 'kleis.window';

export function init() {
  const select = $('#window');
  const saved = sessionStorage.getItem(WINDOW_KEY);
  if (saved && select.querySelector(`option[value="${saved}"]`)) select.value = saved;
  select.addEventListener('change', () => {
    sessionStorage.setItem(WINDOW_KEY, select.value);
    refresh(true);
  });
  $('#dash-refresh').addEventListener('click', () => refresh(true));
}

export const show = () => refresh();

const windowName = () => windowText($('#window').value);

export const tokensOf = (t) => t.inputTokens + t.outputTokens + t.cacheReadTokens + t.cacheWriteTokens;
const other = (b) => Math.max(0, b.requestCount - b.successCount - b.rateLimitCount - b.upstreamErrorCount
  - b.proxyErrorCount - b.cancelledCount);

function delta(current, previous, { points = false, lowerIsBetter = false } = {}) {
  const before = `the previous ${windowName()}`;
  if (current === null || previous === null || current === undefined || previous === undefined) {
    return h('span', { class: 'delta' }, `nothing to compare in ${before}`);
  }
  const change = points ? current - previous : previous ? ((current - previous) / previous) * 100 : null;
  if (change === null) return h('span', { class: 'delta' }, current ? `none in ${before}` : `none in ${before} either`);
  if (Math.round(change) === 0) return h('span', { class: 'delta' }, `same as ${before}`);
  const up = change > 0;
  const good = lowerIsBetter ? !up : up;
  const text = `${up ? '▲' : '▼'} ${Math.abs(Math.round(change))}${points ? ' points' : '%'} vs ${before}`;
  return h('span', { class: `delta ${good ? 'good' : 'bad'}` }, text);
}

function kpi(id, label, value, change, ...notes) {
  return h('div', { class: 'card kpi', id: `kpi-${id}` },
    h('h2', { class: 'label' }, label),
    h('p', { class: 'value' }, value),
    h('p', { class: 'small' }, change),
    notes.map((n) => h('p', { class: 'small muted' }, n)));
}

export const refresh = singleFlight(async (announceIt = false) => {
  const error = $('#dash-error');
  try {
    const windowMs = $('#window').value;
    const [report, keyList, accountList] = await Promise.all([
      get(`usage/dashboard?windowMs=${windowMs}`), get('keys'), get('accounts'),
    ]);
    error.textContent = '';
    render(report, keyList.keys, accountList.accounts);
    $('#dash-updated').textContent = `Updated ${new Date(report.now).toLocaleTimeString()}; refreshes every 30 s while this tab is visible.`;
    if (announceIt) announce(`Dashboard updated: ${num(report.totals.requestCount)} requests in the last ${windowName()}`);
  } catch (e) {
    error.textContent = `Could not load the dashboard. ${e.message}`;
  }
});

function render(report, keys, accounts) {
  const t = report.totals;
  const p = report.previousTotals;
  const errors = t.requestCount - t.successCount - t.cancelledCount;
  fill($('#kpis'),
    kpi('requests', 'Requests', num(t.requestCount), delta(t.requestCount, p.requestCount),
      `${num(t.successCount)} succeeded, ${num(errors)} failed, ${num(t.cancelledCount)} cancelled`),
    kpi('success', 'Success rate', pct(t.successRate), delta(t.successRate, p.successRate, { points: true }),
      `${num(t.proxyErrorCount)} errors by Kleis, ${num(t.upstreamErrorCount)} by providers, ${num(t.rateLimitCount)} rate limited`),
    kpi('tokens', 'Tokens', compact(tokensOf(t)), delta(tokensOf(t), tokensOf(p)),
      `${compact(t.inputTokens)} input · ${compact(t.outputTokens)} output`,
      `${compact(t.cacheReadTokens)} cache read · ${compact(t.cacheWriteTokens)} cache write`),
    kpi('latency', 'Time to first byte', ms(t.requestCount ? t.avgLatencyMs : null), delta(t.avgLatencyMs || null, p.avgLatencyMs || null, { lowerIsBetter: true }),
      `p95 ${ms(t.p95LatencyMs)} · whole answer ${ms(t.requestCount ? t.avgDurationMs : null)} avg`,
      `Last request ${t.lastRequestAt ? ago(t.lastRequestAt) : 'none'}`));

  stacked($('#chart-requests'), {
    title: 'Requests over time', unit: 'requests', buckets: report.buckets, bucketMs: report.bucketSizeMs,
    series: [
      { label: 'Succeeded', cls: 's-ok', get: (b) => b.successCount },
      { label: 'Rate limited', cls: 's-429', get: (b) => b.rateLimitCount },
      { label: 'Provider errors', cls: 's-up', get: (b) => b.upstreamErrorCount },
      { label: 'Kleis errors', cls: 's-proxy', get: (b) => b.proxyErrorCount },
      { label: 'Cancelled', cls: 's-cancel', get: (b) => b.cancelledCount },
      { label: 'Other', cls: 's-other', get: other },
    ],
  });
  stacked($('#chart-tokens'), {
    title: 'Tokens over time', unit: 'tokens', buckets: report.buckets, bucketMs: report.bucketSizeMs,
    series: [
      { label: 'Input', cls: 't-in', get: (b) => b.inputTokens },
      { label: 'Output', cls: 't-out', get: (b) => b.outputTokens },
      { label: 'Cache read', cls: 't-cr', get: (b) => b.cacheReadTokens },
      { label: 'Cache write', cls: 't-cw', get: (b) => b.cacheWriteTokens },
    ],
  });

  const keyName = new Map(keys.map((k) => [k.id, `${k.label || 'unnamed'} (${k.keyPrefix}…)`]));
  const accountName = new Map(accounts.map((a) => [a.id, `${a.label || a.accountId || a.id.slice(0, 8)} · ${providerName(a.provider)}`]));
  fill($('#dash-tables'),
    table('By provider', [{ label: 'Provider', get: (r) => providerName(r.provider) }, ...usageColumns()], report.byProvider),
    table('By model', [
      { label: 'Model', get: (r) => r.model || '(none)' },
      { label: 'Provider', get: (r) => `${providerName(r.provider)} · ${r.endpoint}` },
      ...usageColumns()], report.byModel),
    table('By key', [{ label: 'Key', get: (r) => keyName.get(r.apiKeyId) || `deleted key ${r.apiKeyId.slice(0, 8)}` }, ...usageColumns()], report.byKey),
    table('By account', [{ label: 'Account', get: (r) => accountName.get(r.providerAccountId) || `removed account ${String(r.providerAccountId).slice(0, 8)}` }, ...usageColumns()], report.byAccount));
}

export function usageColumns() {
  return [
    { label: 'Requests', num: true, get: (r) => num(r.requestCount) },
    { label: 'Success', num: true, get: (r) => pct(r.successRate) },
    { label: 'Errors', num: true, get: (r) => num(r.requestCount - r.successCount - r.cancelledCount - r.rateLimitCount) },
    { label: '429', num: true, get: (r) => num(r.rateLimitCount) },
    { label: 'Avg TTFB', num: true, get: (r) => ms(r.avgLatencyMs) },
    { label: 'p95 TTFB', num: true, get: (r) => ms(r.p95LatencyMs) },
    { label: 'Input', num: true, get: (r) => compact(r.inputTokens) },
    { label: 'Output', num: true, get: (r) => compact(r.outputTokens) },
    { label: 'Cache read', num: true, get: (r) => compact(r.cacheReadTokens) },
    { label: 'Cache write', num: true, get: (r) => compact(r.cacheWriteTokens) },
    { label: 'Last request', get: (r) => (r.lastRequestAt ? when(r.lastRequestAt) : '–') },
  ];
}
