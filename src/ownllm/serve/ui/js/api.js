// The server's public HTTP API, as any client calls it: the same key (Bearer), OpenAI's error envelope turned into
// a readable message. The key lives in sessionStorage: this tab only, gone when it closes.

const KEY = "ownllm.apiKey";

export class ApiError extends Error {
  constructor(status, message, param) {
    super(message);
    this.status = status;
    this.param = param;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

// Called when the server answers 401: main.js asks for a key and resolves with true once one is given.
let askForKey = async () => false;
export function onKeyNeeded(handler) {
  askForKey = handler;
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}`, ...extra } : extra;
}

async function readError(response, what) {
  let message = `${response.status} ${response.statusText}`;
  let param = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      param = body.error.param;
    }
  } catch {
    // not JSON (a proxy's page): the status line says enough
  }
  const where = param ? ` (${param})` : "";
  return new ApiError(response.status, `${what}: ${message}${where}`, param);
}

// fetch with the key; a 401 asks for a key once and tries again.
async function send(method, path, init, retried = false) {
  let response;
  try {
    response = await fetch(path, { method, ...init, headers: headers(init.headers) });
  } catch (err) {
    throw new ApiError(0, `${method} ${path}: the server cannot be reached (${err.message})`);
  }
  if (!response.ok) {
    // the body can be read once: the same error goes to the key dialog and, if no key is given, to the page
    const error = await readError(response, `${method} ${path}`);
    if (response.status === 401 && !retried && (await askForKey(error))) return send(method, path, init, true);
    throw error;
  }
  return response;
}

export async function getJSON(path) {
  return (await send("GET", path, {})).json();
}

export async function postJSON(path, body) {
  const response = await send("POST", path, {
    body: JSON.stringify(body ?? {}),
    headers: { "Content-Type": "application/json" },
  });
  return response.json();
}

export async function postForm(path, form) {
  return (await send("POST", path, { body: form })).json();
}

// A streamed (server-sent events) POST: onEvent gets each parsed `data:` payload; an error event inside the stream
// (the server failed after it started) is thrown as an ApiError.
export async function postStream(path, body, onEvent, signal) {
  const response = await send("POST", path, {
    body: JSON.stringify(body),
    headers: { "Content-Type": "application/json" },
    signal,
  });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffered.indexOf("\n\n")) >= 0) {
      const event = buffered.slice(0, end);
      buffered = buffered.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const payload = JSON.parse(data);
        if (payload.error) throw new ApiError(500, `${path}: ${payload.error.message}`, payload.error.param);
        onEvent(payload);
      }
    }
  }
}

// Show an error where the user is looking: the page's alert line (and nowhere else silently).
export function showError(element, err) {
  element.textContent = err instanceof Error ? err.message : String(err);
}

export function clearError(element) {
  element.textContent = "";
}
