// API keys: create (shown once, with client snippets), list with usage, revoke, delete, detail.
import { get, post, del } from './api.js';
import {
  $, h, fill, num, pct, when, ago, providerName, announce, action, confirmDialog, copyButton, codeBlock, openDetail,
  singleFlight,
} from './ui.js';
import { usageDetail } from './detail.js';

let accounts = [];

export function init() {
  $('#keys-refresh').addEventListener('click', () => refresh(true));
  $('#keys-window').addEventListener('change', () => refresh(true));
  $('#keys-show-revoked').addEventListener('change', () => refresh());
  $('#key-form').addEventListener('submit', createKey);
}

export const show = () => refresh();

export const refresh = singleFlight(async (announceIt = false) => {
  try {
    const windowMs = $('#keys-window').value;
    const [list, usage, accountList] = await Promise.all([get('keys'), get(`keys/usage?windowMs=${windowMs}`), get('accounts')]);
    $('#keys-error').textContent = '';
    accounts = accountList.accounts;
    renderScopes(accountList.providers.map((p) => p.provider));
    renderKeys(list.keys, new Map(usage.keys.map((u) => [u.apiKeyId, u])));
    if (announceIt) announce(`${list.keys.length} keys loaded`);
  } catch (e) {
    $('#keys-error').textContent = `Could not load the keys. ${e.message}`;
  }
});

function accountName(a) { return a.label || a.accountId || a.id.slice(0, 8); }

function renderScopes(providers) {
  const box = $('#key-providers');
  const ticked = new Set([...box.querySelectorAll('input:checked')].map((i) => i.value));
  fill(box, h('legend', {}, 'Providers it may use (none ticked: all)'), providers.map((p) => h('label', { class: 'check' },
    h('input', { type: 'checkbox', name: 'provider', value: p, checked: ticked.has(p) }), ` ${providerName(p)}`)));
  const pins = $('#key-accounts');
  const chosen = new Map([...pins.querySelectorAll('select')].map((s) => [s.name, s.value]));
  fill(pins, h('legend', {}, 'Limit to accounts (optional)'),
    h('p', { class: 'small muted' }, 'Once one is chosen, the key uses only the chosen accounts:'
      + ' providers with “Any account” are then refused. Choose one for each provider it should reach.'), providers.map((p) => {
    const mine = accounts.filter((a) => a.provider === p);
    if (!mine.length) return null;
    const id = `pin-${p}`;
    const select = h('select', { id, name: p },
      h('option', { value: '' }, 'Any account'), mine.map((a) => h('option', { value: a.id }, accountName(a))));
    select.value = chosen.get(p) || '';
    return h('div', { class: 'pin' }, h('label', { for: id }, `${providerName(p)} account`), select);
  }));
}

async function createKey(event) {
  event.preventDefault();
  const error = $('#key-error');
  const button = $('#key-form button[type=submit]');
  error.textContent = '';
  const label = $('#key-label').value.trim();
  if (!label) {
    error.textContent = 'Give the key a label, such as the laptop it is for.';
    $('#key-label').focus();
    return;
  }
  const providerScopes = [...$('#key-providers').querySelectorAll('input:checked')].map((i) => i.value);
  const modelScopes = $('#key-models').value.split(/[\s,]+/).map((m) => m.trim()).filter(Boolean);
  const accountScopes = [...$('#key-accounts').querySelectorAll('select')]
    .filter((s) => s.value && (!providerScopes.length || providerScopes.includes(s.name))).map((s) => s.value);
  const days = Number($('#key-expiry').value);
  const body = {
    label,
    providerScopes: providerScopes.length ? providerScopes : null,
    modelScopes: modelScopes.length ? modelScopes : null,
    accountScopes: accountScopes.length ? accountScopes : null,
    expiresAt: days ? Date.now() + days * 86400000 : null,
  };
  button.disabled = true;
  try {
    const { key } = await post('keys', body);
    reveal(key);
    $('#key-form').reset();
    await refresh();
  } catch (e) {
    error.textContent = `The key was not created. ${e.message}`;
  } finally {
    button.disabled = false;
  }
}

function snippets(view) {
  const key = view.key;
  const base = view.scopedModelsUrl.replace(/\/api\/[^/]+$/, '');
  const scoped = view.providerScopes;
  const allowed = (p) => !scoped || scoped.includes(p);
  const list = [['OpenCode', view.opencode.snippet]];
  if (allowed('claude')) {
    list.push(['Claude Code', `export ANTHROPIC_BASE_URL="${base}/anthropic"\nexport ANTHROPIC_AUTH_TOKEN="${key}"\nclaude`]);
  }
  if (allowed('codex')) {
    list.push(['Codex CLI', `# ~/.codex/config.toml\nmodel_provider = "kleis"\n\n[model_providers.kleis]\nname = "Kleis"\n`
      + `base_url = "${base}/openai/v1"\nenv_key = "KLEIS_API_KEY"\nwire_api = "responses"\n\n`
      + `# then, in the shell:\nexport KLEIS_API_KEY="${key}"\ncodex`]);
  }
  const sdk = [];
  if (allowed('codex')) sdk.push(`codex = OpenAI(base_url="${base}/openai/v1", api_key="${key}")`);
  if (allowed('copilot')) sdk.push(`copilot = OpenAI(base_url="${base}/copilot/v1", api_key="${key}")`);
  if (allowed('claude')) sdk.push(`claude = Anthropic(base_url="${base}/anthropic", api_key="${key}")`);
  if (sdk.length) list.push(['Python SDKs', `from openai import OpenAI\nfrom anthropic import Anthropic\n\n${sdk.join('\n')}`]);
  return list;
}

function reveal(view) {
  const box = $('#key-reveal');
  const done = h('button', { type: 'button', class: 'primary' }, 'I have copied it');
  done.addEventListener('click', () => { fill(box); box.hidden = true; $('#key-label').focus(); });
  fill(box,
    h('h3', { id: 'key-reveal-title' }, `Key “${view.label}” created`),
    h('p', { class: 'warn' }, 'Copy it now: Kleis keeps only its hash and will never show it again.'),
    h('div', { class: 'code' }, h('code', { id: 'new-key', class: 'secret' }, view.key), copyButton(view.key, 'API key')),
    h('p', { class: 'small' }, 'Models URL for this key (works in place of /api.json): ',
      h('code', { class: 'wrap' }, view.scopedModelsUrl), ' ', copyButton(view.scopedModelsUrl, 'models URL')),
    snippets(view).map(([name, text]) => h('details', { open: name === 'OpenCode' }, h('summary', {}, name),
      codeBlock(text, `${name} snippet`))),
    done);
  box.hidden = false;
  box.setAttribute('tabindex', '-1');
  box.focus();
  announce(`Key ${view.label} created. Copy it now; it is shown only once.`);
}

function scopeText(k) {
  const parts = [];
  parts.push(k.providerScopes ? k.providerScopes.map(providerName).join(', ') : 'all providers');
  if (k.modelScopes) parts.push(`models ${k.modelScopes.join(', ')}`);
  if (k.accountScopes) {
    parts.push(`only ${k.accountScopes.map((id) => { const a = accounts.find((x) => x.id === id); return a ? accountName(a) : id.slice(0, 8); }).join(', ')}`);
  }
  return parts.join(' · ');
}

function renderKeys(keys, usage) {
  const showRevoked = $('#keys-show-revoked').checked;
  const visible = keys.filter((k) => showRevoked || k.status !== 'revoked');
  $('#h-keylist').textContent = `Keys (${visible.length} of ${keys.length})`;
  if (!visible.length) {
    fill($('#key-list'), h('p', { class: 'muted card' }, keys.length ? 'Only revoked keys; tick “Show revoked” to see them.' : 'No keys yet. Create one above.'));
    return;
  }
  const now = Date.now();
  fill($('#key-list'), h('div', { class: 'cards' }, visible.map((k) => {
    const name = k.label || k.keyPrefix;
    const error = h('p', { class: 'error', role: 'alert' });
    const button = (text, fn, extra = {}) => {
      const b = h('button', { type: 'button', class: 'small', 'aria-label': `${text}: key ${name}`, ...extra }, text);
      b.addEventListener('click', action(b, error, fn));
      return b;
    };
    const u = usage.get(k.id);
    const badge = { active: 'ok', expired: 'warn', revoked: 'off' }[k.status] || 'off';
    return h('article', { class: 'card key', 'aria-label': `Key ${name}`, dataset: { keyId: k.id } },
      h('div', { class: 'bar' }, h('h3', {}, name), h('span', { class: `badge ${badge}` }, k.status)),
      h('dl', { class: 'facts' },
        h('dt', {}, 'Key'), h('dd', {}, h('code', {}, `${k.keyPrefix}…`)),
        h('dt', {}, 'May use'), h('dd', {}, scopeText(k)),
        h('dt', {}, 'Expires'), h('dd', {}, k.expiresAt ? `${when(k.expiresAt)} (${ago(k.expiresAt, now)})` : 'never'),
        h('dt', {}, 'Created'), h('dd', {}, when(k.createdAt)),
        k.revokedAt ? [h('dt', {}, 'Revoked'), h('dd', {}, when(k.revokedAt))] : null,
        h('dt', {}, 'Last used'), h('dd', {}, u && u.lastRequestAt ? ago(u.lastRequestAt, now) : 'not in this window'),
        h('dt', {}, 'Usage'), h('dd', { class: 'key-usage' }, u
          ? `${num(u.requestCount)} requests, ${pct(u.successRate)} success, ${num(u.inputTokens + u.outputTokens)} tokens`
          : 'no requests in this window')),
      h('div', { class: 'actions' },
        k.status === 'active' ? copyButton(`${k.scopedModelsUrl}`, `models URL of ${name}`) : null,
        button('Usage', async () => {
          openDetail(`Usage of key ${name}`, usageDetail(await get(`keys/${k.id}/usage?windowMs=${$('#keys-window').value}`), 'byAccount'));
        }),
        k.status !== 'revoked' ? button('Revoke', async () => {
          if (!(await confirmDialog(`Revoke the key “${name}”?`, `Clients using ${k.keyPrefix}… get 401 from now on. This cannot be undone.`, 'Revoke'))) return;
          await post(`keys/${k.id}/revoke`);
          announce(`Revoked key ${name}`);
          await refresh();
        }, { class: 'small danger' }) : button('Delete', async () => {
          if (!(await confirmDialog(`Delete the revoked key “${name}”?`, 'It disappears from this list; its usage stays in the totals.'))) return;
          await del(`keys/${k.id}`);
          announce(`Deleted key ${name}`);
          await refresh();
        }, { class: 'small danger' })),
      error);
  })));
}
