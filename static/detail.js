// Usage detail of one key or account (GET /admin/keys/<id>/usage, /admin/accounts/<id>/usage).
import { h, num, pct, ms, compact, table, providerName } from './ui.js';
import { usageColumns, tokensOf } from './dashboard.js';
import { stacked } from './chart.js';

export function usageDetail(report, ownersField) {
  const t = report.totals;
  const chart = h('figure', { class: 'card chart' });
  const minutes = report.buckets || [];
  const owners = report[ownersField] || [];
  const ownerLabel = ownersField === 'apiKeys' ? 'Key' : 'Account';
  const ownerId = ownersField === 'apiKeys' ? 'apiKeyId' : 'providerAccountId';
  const out = h('div', { class: 'detail' },
    h('dl', { class: 'facts' },
      h('dt', {}, 'Requests'), h('dd', { id: 'detail-requests' }, num(t.requestCount)),
      h('dt', {}, 'Success rate'), h('dd', {}, pct(t.successRate)),
      h('dt', {}, 'Tokens'), h('dd', {}, `${compact(tokensOf(t))} (${compact(t.inputTokens)} in, ${compact(t.outputTokens)} out, ${compact(t.cacheReadTokens)} cache read, ${compact(t.cacheWriteTokens)} cache write)`),
      h('dt', {}, 'Time to first byte'), h('dd', {}, `${ms(t.avgLatencyMs)} avg, p95 ${ms(t.p95LatencyMs)}`),
      h('dt', {}, 'Token counting calls'), h('dd', {}, num(t.countTokensCount))),
    minutes.length ? chart : h('p', { class: 'muted' }, 'No requests in the last hour.'),
    table('By endpoint', [{ label: 'Endpoint', get: (r) => `${providerName(r.provider)} · ${r.endpoint}` }, ...usageColumns()], report.endpoints || []),
    table('By model', [{ label: 'Model', get: (r) => r.model || '(none)' }, ...usageColumns()], report.models || []),
    table(`By ${ownerLabel.toLowerCase()}`, [{ label: ownerLabel, get: (r) => String(r[ownerId]).slice(0, 8) }, ...usageColumns()], owners));
  if (minutes.length) {
    requestAnimationFrame(() => stacked(chart, {
      title: 'Requests per minute, last hour with traffic', unit: 'requests', buckets: minutes, bucketMs: 60000,
      series: [
        { label: 'Succeeded', cls: 's-ok', get: (b) => b.successCount },
        { label: 'Failed', cls: 's-up', get: (b) => b.requestCount - b.successCount },
      ],
    }));
  }
  return out;
}
