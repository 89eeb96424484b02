// Kleis admin page: sign-in, sections (hash routing), auto-refresh while visible.
import { api, session, whenUnauthorized } from './api.js';
import { $, announce, duration } from './ui.js';
import * as dashboard from './dashboard.js';
import * as accounts from './accounts.js';
import * as keys from './keys.js';

const VIEWS = { dashboard, accounts, keys };
const REFRESH_MS = 30000;
let current = null;
let timer = null;
let lockTimer = null;

function showLogin(message = '') {
  clearInterval(timer);
  $('#app').hidden = true;
  $('#login').hidden = false;
  $('#login-error').textContent = message;
  $('#login-token').value = '';
  $('#login-token').focus();
}

async function showApp() {
  $('#login').hidden = true;
  $('#app').hidden = false;
  await route();
  startTimer();
}

async function route() {
  const name = VIEWS[location.hash.slice(1)] ? location.hash.slice(1) : 'dashboard';
  for (const section of document.querySelectorAll('[data-view]')) section.hidden = section.dataset.view !== name;
  for (const link of document.querySelectorAll('[data-tab]')) {
    if (link.dataset.tab === name) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  const changed = current !== name;
  current = name;
  document.title = `${name[0].toUpperCase()}${name.slice(1)} · Kleis admin`;
  await VIEWS[name].show();
  if (changed) $(`#h-${name}`).focus?.();
}

function startTimer() {
  clearInterval(timer);
  timer = setInterval(() => {
    if (document.visibilityState === 'visible' && current && !document.querySelector('dialog[open]')) {
      VIEWS[current].refresh?.();
    }
  }, REFRESH_MS);
}

async function signIn(event) {
  event.preventDefault();
  const input = $('#login-token');
  const button = $('#login-form button[type=submit]');
  const token = input.value.trim();
  const error = $('#login-error');
  if (!token) {
    error.textContent = 'Enter the admin token.';
    input.focus();
    return;
  }
  button.disabled = true;
  error.textContent = '';
  session.set(token);
  try {
    await api('GET', 'accounts/providers', undefined, { quietAuth: true });
    announce('Signed in');
    await showApp();
  } catch (e) {
    session.clear();
    error.textContent = e.status === 401 ? 'That admin token is not right. Check [admin] token in config.toml.' : e.message;
    if (e.status === 429 && e.retryAfter) lockout(e.retryAfter);
    input.select();
  } finally {
    button.disabled = false;
  }
}

function lockout(seconds) {
  clearInterval(lockTimer);
  const until = Date.now() + seconds * 1000;
  const error = $('#login-error');
  const tick = () => {
    const left = (until - Date.now()) / 1000;
    if (left <= 0) {
      clearInterval(lockTimer);
      error.textContent = 'You can try again now.';
      return;
    }
    error.textContent = `Too many wrong admin tokens from this address. Try again in ${duration(left)}.`;
  };
  tick();
  lockTimer = setInterval(tick, 1000);
}

function signOut() {
  session.clear();
  current = null;
  announce('Signed out');
  showLogin('You are signed out.');
}

function init() {
  $('#login-form').addEventListener('submit', signIn);
  $('#logout').addEventListener('click', signOut);
  $('#detail-close').addEventListener('click', () => $('#detail').close());
  window.addEventListener('hashchange', () => { if (session.get()) route(); });
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible' && current && session.get()) VIEWS[current].refresh?.();
  });
  whenUnauthorized(() => { session.clear(); showLogin('Your admin token is no longer accepted. Sign in again.'); });
  for (const view of Object.values(VIEWS)) view.init();
  if (session.get()) showApp();
  else showLogin();
}

init();
