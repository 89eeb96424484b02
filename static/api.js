// The admin JSON API: the token from sessionStorage (never the URL), errors in plain words.

const KEY = 'kleis.adminToken';

export const session = {
  get: () => sessionStorage.getItem(KEY),
  set: (token) => sessionStorage.setItem(KEY, token),
  clear: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, code, message, retryAfter = 0) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

let onUnauthorized = () => {};
export function whenUnauthorized(fn) { onUnauthorized = fn; }

function sentence(text) {
  text = String(text || '').trim();
  if (!text) return '';
  text = text[0].toUpperCase() + text.slice(1);
  return /[.!?]$/.test(text) ? text : `${text}.`;
}

function explain(status, body, retryAfter) {
  const code = body && body.error;
  const detail = sentence(body && body.message);
  if (status === 401) return 'The admin token was not accepted. Check it and sign in again.';
  if (status === 429 && code === 'too_many_attempts') {
    return `Too many wrong admin tokens from this address. Try again in ${retryAfter || 'a few'} s.`;
  }
  if (status === 503 && code === 'admin_token_not_configured') {
    return 'This server has no admin token configured. Set [admin] token in config.toml and restart.';
  }
  if (status === 404) return detail || 'That item no longer exists. Refresh the page.';
  if (status >= 500) return `The server failed (HTTP ${status}). ${detail}`.trim();
  return detail || `The request was refused (HTTP ${status}).`;
}

/** api("GET", "accounts") → {status, data}; paths are relative to /admin/. */
export async function api(method, path, body, { quietAuth = false } = {}) {
  const headers = { authorization: `Bearer ${session.get() || ''}` };
  if (body !== undefined) headers['content-type'] = 'application/json';
  let response;
  try {
    response = await fetch(path, {
      method, headers, cache: 'no-store', credentials: 'omit',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ApiError(0, 'network', 'Kleis did not answer. Check that the server is running and reachable.');
  }
  let data = null;
  try { data = await response.json(); } catch { data = null; }
  if (!response.ok) {
    const retryAfter = Number(response.headers.get('retry-after')) || 0;
    const error = new ApiError(response.status, data && data.error, explain(response.status, data, retryAfter), retryAfter);
    if (response.status === 401 && !quietAuth) onUnauthorized(error);
    throw error;
  }
  return { status: response.status, data };
}

export const get = async (path) => (await api('GET', path)).data;
export const post = async (path, body = {}) => (await api('POST', path, body)).data;
export const patch = async (path, body) => (await api('PATCH', path, body)).data;
export const del = async (path) => (await api('DELETE', path)).data;
