// Accounts: providers, connect flows (code and device), imports, and each account's controls.
import { get, post, patch, del, api } from './api.js';
import {
  $, h, fill, num, pct, when, ago, providerName, announce, action, confirmDialog, copyButton, openDetail, duration,
  windowText, singleFlight,
} from './ui.js';
import { usageDetail } from './detail.js';

const FLOWS = {
  'codex-browser': { provider: 'codex', label: 'OpenAI Codex (ChatGPT plan): browser sign-in', options: {} },
  'codex-device': { provider: 'codex', label: 'OpenAI Codex (ChatGPT plan): device code', options: { mode: 'headless' } },
  'claude-max': { provider: 'claude', label: 'Anthropic Claude Pro/Max', options: { mode: 'max' } },
  'claude-console': { provider: 'claude', label: 'Anthropic Console (API billing)', options: { mode: 'console' } },
  copilot: { provider: 'copilot', label: 'GitHub Copilot: device code', options: {} },
};
const IMPORT_HINTS = {
  codex: 'Codex CLI: ~/.codex/auth.json, or OpenCode’s auth.json.',
  claude: 'Claude Code: ~/.claude/.credentials.json, or OpenCode’s auth.json.',
  copilot: 'GitHub CLI: ~/.config/gh/hosts.yml, or OpenCode’s auth.json.',
};
const COOLDOWN_WHY = {
  window: 'a usage limit of the plan ran out', transient: 'the provider asked to slow down (rate limit)',
  error: 'repeated errors from the provider',
};

let providers = [];
let flow = null; // {state, provider, timer}

export function init() {
  $('#acc-refresh').addEventListener('click', () => refresh(true));
  $('#connect-kind').addEventListener('change', () => {
    $('#connect-enterprise').hidden = FLOWS[$('#connect-kind').value]?.provider !== 'copilot';
  });
  $('#connect-form').addEventListener('submit', startLogin);
  $('#import-provider').addEventListener('change', () => {
    $('#import-hint').textContent = IMPORT_HINTS[$('#import-provider').value] || '';
  });
  $('#import-file').addEventListener('change', async () => {
    const file = $('#import-file').files[0];
    if (file) $('#import-text').value = await file.text();
  });
  $('#import-form').addEventListener('submit', importFile);
}

export const show = () => refresh();

export const refresh = singleFlight(async (announceIt = false) => {
  try {
    const windowMs = sessionStorage.getItem('kleis.window') || '86400000';
    const [list, usage] = await Promise.all([get('accounts'), get(`accounts/usage?windowMs=${windowMs}`)]);
    $('#acc-error').textContent = '';
    providers = list.providers;
    renderChoices();
    renderProviders(list.providers);
    renderAccounts(list.accounts, new Map(usage.accounts.map((u) => [u.providerAccountId, u])), Number(windowMs));
    if (announceIt) announce(`${list.accounts.length} accounts loaded`);
  } catch (e) {
    $('#acc-error').textContent = `Could not load the accounts. ${e.message}`;
  }
});

function renderChoices() {
  const names = providers.map((p) => p.provider);
  const kind = $('#connect-kind');
  if (kind.options.length === 0) {
    for (const [value, f] of Object.entries(FLOWS)) if (names.includes(f.provider)) kind.append(h('option', { value }, f.label));
    kind.dispatchEvent(new Event('change'));
  }
  const importer = $('#import-provider');
  if (importer.options.length === 0) {
    for (const name of names) importer.append(h('option', { value: name }, providerName(name)));
    importer.dispatchEvent(new Event('change'));
  }
}

function renderProviders(list) {
  fill($('#providers'), list.map((p) => {
    const error = h('p', { class: 'error', role: 'alert' });
    const button = h('button', { type: 'button', class: 'small', 'aria-label': `${p.enabled ? 'Disable' : 'Enable'} ${providerName(p.provider)}` },
      p.enabled ? 'Disable' : 'Enable');
    button.addEventListener('click', action(button, error, async () => {
      if (p.enabled && !(await confirmDialog(`Disable ${providerName(p.provider)}?`,
        `Every ${providerName(p.provider)} account stops serving requests until you enable the provider again.`, 'Disable'))) return;
      await patch(`accounts/providers/${p.provider}`, { enabled: !p.enabled });
      announce(`${providerName(p.provider)} ${p.enabled ? 'disabled' : 'enabled'}`);
      await refresh();
    }));
    const state = p.accountCount === 0 ? 'no accounts' : p.enabled ? 'enabled' : 'disabled';
    return h('div', { class: 'card provider' },
      h('h2', {}, providerName(p.provider)),
      h('p', {}, h('span', { class: `badge ${p.enabled ? 'ok' : 'off'}` }, state), ' ',
        `${p.enabledAccountCount} of ${p.accountCount} account${p.accountCount === 1 ? '' : 's'} enabled`),
      p.accountCount ? button : null, error);
  }));
}

function statusLine(a) {
  if (a.status === 'disabled') return h('p', {}, h('span', { class: 'badge off' }, 'disabled'), ' Not used for requests.');
  if (a.status === 'needs_reauth') {
    return h('p', {}, h('span', { class: 'badge bad' }, 'needs a new login'), ' ',
      a.lastError ? `Why: ${a.lastError}` : 'The provider refused its refresh token. Connect it again below.');
  }
  if (a.status === 'cooling_down') {
    const why = COOLDOWN_WHY[a.cooldownKind] || a.cooldownKind || 'an upstream refusal';
    return h('p', {}, h('span', { class: 'badge warn' }, 'cooling down'),
      ` until ${when(a.cooldownUntil)} (${ago(a.cooldownUntil)}): ${why}.`,
      a.lastError ? h('span', { class: 'small muted' }, ` Last error: ${a.lastError}`) : null);
  }
  return h('p', {}, h('span', { class: 'badge ok' }, 'ok'), ' Serving requests.');
}

function accountName(a) { return a.label || a.accountId || a.id.slice(0, 8); }

function renderAccounts(accounts, usage, windowMs) {
  const root = $('#account-list');
  if (!accounts.length) {
    fill(root, h('div', { class: 'card' }, h('h2', {}, 'No accounts yet'),
      h('p', { class: 'muted' }, 'Connect one with “Connect an account” or import an official client’s login file above.')));
    return;
  }
  const groups = providers.map((p) => p.provider).filter((p) => accounts.some((a) => a.provider === p));
  fill(root, groups.map((p) => h('section', { class: 'group', 'aria-label': `${providerName(p)} accounts` },
    h('h2', {}, `${providerName(p)} accounts`),
    h('div', { class: 'cards' }, accounts.filter((a) => a.provider === p).map((a) => accountCard(a, usage.get(a.id), windowMs))))));
}

function accountCard(a, usage, windowMs) {
  const name = accountName(a);
  const error = h('p', { class: 'error', role: 'alert' });
  const button = (text, fn, extra = {}) => {
    const b = h('button', { type: 'button', class: 'small', 'aria-label': `${text}: ${name}`, ...extra }, text);
    b.addEventListener('click', action(b, error, fn));
    return b;
  };
  const now = Date.now();
  const quota = h('div', { class: 'quota' });
  const models = a.models || {};
  const modelIds = models.ids || [];
  const edit = h('form', { class: 'inline' },
    h('label', { for: `label-${a.id}` }, 'Label'),
    h('input', { id: `label-${a.id}`, type: 'text', value: a.label || '' }),
    h('label', { for: `prio-${a.id}` }, 'Priority (lower is tried first)'),
    h('input', { id: `prio-${a.id}`, type: 'number', step: '1', value: a.priority }),
    h('button', { type: 'submit', class: 'small' }, 'Save'));
  edit.addEventListener('submit', action(edit.querySelector('button'), error, async () => {
    const priority = Number(edit.querySelector(`#prio-${CSS.escape(a.id)}`).value);
    if (!Number.isInteger(priority)) throw new Error('Priority must be a whole number.');
    await patch(`accounts/${a.id}`, { label: edit.querySelector(`#label-${CSS.escape(a.id)}`).value.trim(), priority });
    announce(`Saved ${name}`);
    await refresh();
  }));

  return h('article', { class: 'card account', 'aria-label': `${providerName(a.provider)} account ${name}` },
    h('div', { class: 'bar' },
      h('h3', {}, name),
      h('div', {}, a.isPrimary ? h('span', { class: 'badge ok' }, 'primary') : null, ' ',
        h('span', { class: 'muted small' }, `priority ${a.priority}`))),
    statusLine(a),
    h('dl', { class: 'facts' },
      h('dt', {}, 'Token expires'), h('dd', {}, a.expiresAt ? `${ago(a.expiresAt, now)} (${when(a.expiresAt)})` : 'unknown'),
      h('dt', {}, 'Last refresh'), h('dd', {}, a.lastRefreshAt ? `${ago(a.lastRefreshAt, now)}${a.lastRefreshStatus ? `: ${a.lastRefreshStatus}` : ''}` : 'not yet'),
      a.lastError && a.status !== 'needs_reauth' ? [h('dt', {}, 'Last error'), h('dd', {}, a.lastError)] : null,
      h('dt', {}, 'Provider id'), h('dd', {}, a.accountId || '–'),
      h('dt', {}, 'Usage'), h('dd', {}, usage
        ? `${num(usage.requestCount)} requests, ${pct(usage.successRate)} success, last ${ago(usage.lastRequestAt, now)}`
        : `no requests in the last ${windowText(windowMs)}`),
      h('dt', {}, 'Models'), h('dd', {}, models.source === 'provider'
        ? `${modelIds.length} listed by the provider${models.fetchedAt ? ` ${ago(models.fetchedAt, now)}` : ''}`
        : 'from the catalogue (the provider has not listed its models yet)',
      models.error ? h('span', { class: 'error' }, ` Last attempt failed: ${models.error}`) : null)),
    modelIds.length ? h('details', {}, h('summary', {}, `Models it offers (${modelIds.length})`),
      h('ul', { class: 'chips' }, modelIds.map((m) => h('li', {}, m)))) : null,
    quota,
    h('div', { class: 'actions' },
      a.isPrimary ? null : button('Make primary', async () => { await post(`accounts/${a.id}/primary`); announce(`${name} is now primary`); await refresh(); }),
      button(a.enabled ? 'Disable' : 'Enable', async () => {
        await patch(`accounts/${a.id}`, { enabled: !a.enabled });
        announce(`${name} ${a.enabled ? 'disabled' : 'enabled'}`);
        await refresh();
      }),
      button('Refresh now', async () => { await post(`accounts/${a.id}/refresh`); announce(`Refreshed the token of ${name}`); await refresh(); }),
      a.cooldownUntil ? button('Clear cooldown', async () => { await del(`accounts/${a.id}/cooldown`); announce(`Cleared the cooldown of ${name}`); await refresh(); }) : null,
      button('Quota', async () => renderQuota(quota, (await get(`accounts/${a.id}/quota`)).quota, a.provider)),
      button('Usage', async () => {
        const windowMs = sessionStorage.getItem('kleis.window') || '86400000';
        openDetail(`Usage of ${name}`, usageDetail(await get(`accounts/${a.id}/usage?windowMs=${windowMs}`), 'apiKeys'));
      }),
      button('Delete', async () => {
        if (!(await confirmDialog(`Delete the account “${name}”?`,
          `Kleis forgets the ${providerName(a.provider)} account “${name}” and its tokens. Keys pinned to it stop working for ${providerName(a.provider)}. Its usage history stays.`))) return;
        await del(`accounts/${a.id}`);
        announce(`Deleted ${name}`);
        await refresh();
      }, { class: 'small danger' })),
    h('details', {}, h('summary', {}, 'Edit label and priority'), edit),
    error);
}

function bar(label, used, reset) {
  const value = Math.max(0, Math.min(100, Number(used) || 0));
  const level = value >= 90 ? 'bad' : value >= 70 ? 'warn' : 'ok';
  const meter = h('meter', { min: 0, max: 100, low: 70, high: 90, optimum: 0, value, 'aria-label': `${label}: ${value}% used` });
  return h('div', { class: 'qrow' }, h('span', {}, label), meter,
    h('span', { class: `small ${level}` }, `${Math.round(value)}% used${reset ? `, resets ${reset}` : ''}`));
}

function windowLabel(seconds, fallback) {
  if (!seconds) return fallback;
  if (seconds % 86400 === 0) return seconds === 604800 ? 'Weekly' : `${seconds / 86400}-day window`;
  return `${Math.round(seconds / 3600)} h window`;
}

export function renderQuota(el, quota, provider) {
  if (!quota) {
    fill(el, h('p', { class: 'muted small' }, `${providerName(provider)} does not report a quota through Kleis.`));
    return;
  }
  if (quota.error) {
    fill(el, h('p', { class: 'error' }, `The quota could not be read: ${quota.error}`));
    return;
  }
  const d = quota.data || {};
  const rows = [];
  const resetOf = (w) => (w.resetAt ? ago(w.resetAt * 1000) : w.resetAfterSeconds ? `in ${duration(w.resetAfterSeconds)}` : '');
  if (provider === 'codex') {
    if (d.primaryWindow) rows.push(bar(windowLabel(d.primaryWindow.windowSeconds, '5 h window'), d.primaryWindow.usedPercent, resetOf(d.primaryWindow)));
    if (d.secondaryWindow) rows.push(bar(windowLabel(d.secondaryWindow.windowSeconds, 'Weekly'), d.secondaryWindow.usedPercent, resetOf(d.secondaryWindow)));
  } else {
    const claude = (label, w) => w && rows.push(bar(label, w.utilization, w.resets_at ? ago(Date.parse(w.resets_at)) : ''));
    claude('5 h window', d.five_hour);
    claude('Weekly', d.seven_day);
    for (const [name, w] of Object.entries(d.model_windows || {})) claude(`Weekly, ${name.replace(/^seven_day_/, '')}`, w);
  }
  const chips = [];
  if (d.planType) chips.push(`plan ${d.planType}`);
  if (d.limitReached) chips.push('limit reached');
  if (d.credits && d.credits.balance !== undefined && d.credits.balance !== null) chips.push(`credits ${d.credits.balance}`);
  if (d.extra_usage && d.extra_usage.is_enabled) chips.push(`extra usage on${d.extra_usage.utilization !== undefined ? ` · ${d.extra_usage.utilization}% used` : ''}`);
  fill(el, h('h4', {}, `Quota (read ${ago(quota.fetchedAt)})`), rows.length ? rows : h('p', { class: 'muted small' }, 'No windows reported.'),
    chips.length ? h('p', { class: 'small muted' }, chips.join(' · ')) : null);
}

// ── connect flows ──
function stopFlow() {
  if (flow?.timer) clearTimeout(flow.timer);
  flow = null;
}

async function startLogin(event) {
  event.preventDefault();
  const choice = FLOWS[$('#connect-kind').value];
  const panel = $('#connect-flow');
  const button = event.submitter || $('#connect-form button[type=submit]');
  stopFlow();
  const options = { ...choice.options };
  const domain = $('#connect-domain').value.trim();
  if (choice.provider === 'copilot' && domain) options.enterprise_domain = domain;
  button.disabled = true;
  fill(panel, h('p', { class: 'muted' }, 'Starting the login…'));
  try {
    const login = await post(`accounts/${choice.provider}/oauth/start`, { options });
    if (login.method === 'device') deviceFlow(panel, login);
    else codeFlow(panel, login);
  } catch (e) {
    fill(panel, h('p', { class: 'error', role: 'alert' }, `The login could not start. ${e.message}`));
  } finally {
    button.disabled = false;
  }
}

function finished(panel, account) {
  stopFlow();
  const text = `Connected ${providerName(account.provider)} account ${accountName(account)}.`;
  fill(panel, h('p', { class: 'ok', role: 'status' }, text));
  announce(text);
  refresh();
}

function codeFlow(panel, login) {
  const error = h('p', { class: 'error', role: 'alert' });
  const input = h('input', { id: 'connect-code', type: 'text', spellcheck: 'false', autocomplete: 'off', required: true });
  const form = h('form', {},
    h('label', { for: 'connect-code' }, '2. Paste the code it shows, or the whole address of the page you end up on'),
    input, error, h('button', { type: 'submit', class: 'primary' }, 'Finish login'));
  form.addEventListener('submit', action(form.querySelector('button'), error, async () => {
    const code = input.value.trim();
    if (!code) throw new Error('Paste the code first.');
    const done = await post(`accounts/${login.provider}/oauth/complete`, { state: login.state, code });
    finished(panel, done.account);
  }));
  fill(panel,
    h('ol', {},
      h('li', {}, h('a', { href: login.authorizationUrl, target: '_blank', rel: 'noopener noreferrer', id: 'connect-url' },
        `1. Open the ${providerName(login.provider)} sign-in page`), ' ', copyButton(login.authorizationUrl, 'sign-in address'),
      login.instructions ? h('p', { class: 'small muted' }, login.instructions) : null)),
    form);
  input.focus();
}

function deviceFlow(panel, login) {
  const status = h('p', { class: 'status', role: 'status', id: 'connect-status' }, 'Waiting for you to approve…');
  const cancel = h('button', { type: 'button', class: 'small' }, 'Cancel');
  cancel.addEventListener('click', () => { stopFlow(); fill(panel, h('p', { class: 'muted' }, 'Login cancelled.')); });
  fill(panel,
    h('ol', {},
      h('li', {}, h('a', { href: login.authorizationUrl, target: '_blank', rel: 'noopener noreferrer', id: 'connect-url' },
        `Open ${login.authorizationUrl}`)),
      h('li', {}, 'Enter this code there: ', h('code', { class: 'usercode', id: 'connect-usercode' }, login.userCode || ''), ' ',
        copyButton(login.userCode || '', 'user code'))),
    login.instructions ? h('p', { class: 'small muted' }, login.instructions) : null,
    status, cancel);
  flow = { state: login.state, provider: login.provider, timer: null };
  const mine = flow;
  const every = Math.min(5000, Math.max(1000, (login.interval || 2) * 1000));
  const poll = async () => {
    if (flow !== mine) return;
    try {
      const { status: http, data } = await api('GET', `accounts/${login.provider}/oauth/${encodeURIComponent(login.state)}`);
      if (flow !== mine) return;
      if (http === 200 && data.status === 'complete') return finished(panel, data.account);
      if (http === 200 && data.status === 'failed') {
        stopFlow();
        fill(panel, h('p', { class: 'error', role: 'alert' }, `The login failed. ${data.message || ''} Start it again.`));
        return;
      }
      const left = login.expiresAt ? Math.max(0, (login.expiresAt - Date.now()) / 1000) : 0;
      status.textContent = `Waiting for you to approve… checked at ${new Date().toLocaleTimeString()}${left ? `; the code expires in ${duration(left)}` : ''}.`;
    } catch (e) {
      if (flow !== mine) return;
      if (e.status === 404 || e.code === 'login_expired') {
        stopFlow();
        fill(panel, h('p', { class: 'error', role: 'alert' }, 'The code expired before it was approved. Start the login again.'));
        return;
      }
      status.textContent = `Could not check the login: ${e.message} Retrying…`;
    }
    mine.timer = setTimeout(poll, every);
  };
  mine.timer = setTimeout(poll, every);
}

// ── imports ──
async function importFile(event) {
  event.preventDefault();
  const provider = $('#import-provider').value;
  const text = $('#import-text').value.trim();
  const error = $('#import-error');
  const result = $('#import-result');
  const button = $('#import-form button[type=submit]');
  error.textContent = '';
  result.textContent = '';
  if (!text) {
    error.textContent = 'Choose a file or paste its contents first.';
    $('#import-file').focus();
    return;
  }
  let authFile = text;
  try { authFile = JSON.parse(text); } catch { /* YAML (hosts.yml) or plain text goes as it is */ }
  const label = $('#import-label').value.trim();
  button.disabled = true;
  try {
    const body = { authFile };
    if (label) body.label = label;
    const done = await post(`accounts/${provider}/import`, body);
    const names = done.accounts.map(accountName).join(', ');
    result.textContent = `Imported ${done.accounts.length} ${providerName(provider)} account${done.accounts.length === 1 ? '' : 's'}: ${names}.`
      + (done.warnings.length ? ` Note: ${done.warnings.join(' ')}` : '');
    announce(result.textContent);
    $('#import-text').value = '';
    $('#import-file').value = '';
    await refresh();
  } catch (e) {
    error.textContent = `The import failed. ${e.message}`;
  } finally {
    button.disabled = false;
  }
}
