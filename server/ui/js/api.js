// The page's one door to the server: JSON calls and SSE streams with the same auth as any client.
// The API key and the admin token live in this module's memory only (never storage, never the URL).

const creds = { key: "", token: "" };

export function setCredentials(key, token) {
  creds.key = key.trim();
  creds.token = token.trim();
}

export class ApiError extends Error {
  constructor(status, body) {
    const msg = body && body.error && body.error.message ? body.error.message : `HTTP ${status}`;
    super(msg);
    this.status = status;
    this.body = body;
  }
  get denied() { return this.status === 401 || this.status === 403; }
}

function headers(admin) {
  const h = { "Content-Type": "application/json" };
  const secret = admin ? creds.token : creds.key;
  if (secret) h.Authorization = `Bearer ${secret}`;
  return h;
}

export async function call(method, path, body, { admin = false } = {}) {
  const init = { method, headers: headers(admin) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const r = await fetch(path, init);
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = text; }
  if (!r.ok) throw new ApiError(r.status, data);
  return data;
}

export const v1 = (method, path, body) => call(method, path, body);
export const admin = (method, path, body) => call(method, path, body, { admin: true });

export async function metricsText() {
  // /metrics may be public, or want an API key, or the admin token (server.metrics_access).
  for (const useAdmin of [false, true]) {
    const r = await fetch("/metrics", { headers: headers(useAdmin) });
    if (r.ok) return r.text();
    if (!(r.status === 401 || r.status === 403) || useAdmin) throw new ApiError(r.status, null);
  }
  return "";
}

// POST a streaming completion; yields every `data:` object of the SSE stream until [DONE].
export async function* stream(path, body, signal) {
  const r = await fetch(path, { method: "POST", headers: headers(false), signal,
                                body: JSON.stringify({ ...body, stream: true }) });
  if (!r.ok) {
    let data = null;
    try { data = await r.json(); } catch { /* not JSON */ }
    throw new ApiError(r.status, data);
  }
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    for (let m = buf.match(/\r?\n\r?\n/); m; m = buf.match(/\r?\n\r?\n/)) {
      const event = buf.slice(0, m.index);
      buf = buf.slice(m.index + m[0].length);
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const obj = JSON.parse(data);
      if (obj.error) throw new ApiError(500, obj);
      yield obj;
    }
  }
}

// Admin views ask once whether the token works before they offer anything that changes state.
export async function adminAllowed() {
  try {
    await admin("GET", "/admin/adapters");
    return true;
  } catch (e) {
    if (e instanceof ApiError && e.denied) return false;
    throw e;
  }
}

export function describe(e) {
  return e instanceof ApiError ? `${e.status}: ${e.message}` : String(e && e.message ? e.message : e);
}
