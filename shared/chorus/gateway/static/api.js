// The gateway's API from the browser: the caller's key, JSON requests, and Server-Sent Events
// read with fetch (EventSource cannot send an Authorization header).
//
// The key is asked for once and kept in sessionStorage: it lives as long as the tab, is sent
// only in the Authorization header of same-origin requests, and never goes into a URL.

const KEY_NAME = 'chorus.apiKey';

export class ApiError extends Error {
  constructor(status, code, reason) {
    super(reason || `HTTP ${status}`);
    this.status = status;
    this.code = code || `http_${status}`;
  }

  get needsKey() {
    return this.status === 401 || this.status === 403;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_NAME) || '';
}

export function setApiKey(key) {
  sessionStorage.setItem(KEY_NAME, key.trim());
}

export function forgetApiKey() {
  sessionStorage.removeItem(KEY_NAME);
}

function headers(extra) {
  const all = { ...extra };
  const key = apiKey();
  if (key) all.Authorization = `Bearer ${key}`;
  return all;
}

async function failure(response) {
  let code = '';
  let reason = '';
  try {
    const body = await response.json();
    code = body.error?.code || '';
    reason = body.error?.reason || '';
  } catch {
    reason = `${response.status} ${response.statusText}`;
  }
  return new ApiError(response.status, code, reason);
}

const OPTIONS = { cache: 'no-store', credentials: 'omit', redirect: 'error' };

export async function getJSON(path, { signal } = {}) {
  const response = await fetch(path, {
    ...OPTIONS, signal, headers: headers({ Accept: 'application/json' }),
  });
  if (!response.ok) throw await failure(response);
  return response.json();
}

export async function postJSON(path, body, { signal } = {}) {
  const response = await fetch(path, {
    ...OPTIONS,
    method: 'POST',
    signal,
    headers: headers({ Accept: 'application/json', 'Content-Type': 'application/json' }),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) throw await failure(response);
  return response.json();
}

export function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

// The events of a text/event-stream body: {event, data, id}, as the HTML spec parses them.
async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let event = 'message';
  let data = [];
  let id = null;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      for (;;) {
        const end = buffer.search(/\r\n|\r|\n/);
        if (end < 0 || (buffer[end] === '\r' && end === buffer.length - 1)) break;
        const line = buffer.slice(0, end);
        buffer = buffer.slice(end + (buffer.startsWith('\r\n', end) ? 2 : 1));
        if (line === '') {
          if (data.length) yield { event, data: data.join('\n'), id };
          event = 'message';
          data = [];
          continue;
        }
        if (line.startsWith(':')) continue; // a comment: the server's keep-alive
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? '' : line.slice(colon + 1);
        if (text.startsWith(' ')) text = text.slice(1);
        if (field === 'event') event = text;
        else if (field === 'data') data.push(text);
        else if (field === 'id') id = text;
      }
    }
  } finally {
    reader.releaseLock();
  }
}

// Follow a Server-Sent Events route until `signal` aborts or `onEvent` returns false, coming
// back after a dropped connection (with Last-Event-ID, so a resumable stream has no gap).
// An answer that no retry can change (400, 401, 403, 404) is thrown.
export async function follow(path, onEvent, { signal, onState = () => {} } = {}) {
  let lastId = null;
  let delay = 500;
  while (!signal?.aborted) {
    try {
      const wanted = { Accept: 'text/event-stream' };
      if (lastId !== null) wanted['Last-Event-ID'] = lastId;
      const response = await fetch(path, { ...OPTIONS, signal, headers: headers(wanted) });
      if (!response.ok) throw await failure(response);
      onState('live');
      delay = 500;
      for await (const event of events(response.body)) {
        if (event.id !== null) lastId = event.id;
        if (onEvent(event) === false) return;
      }
    } catch (error) {
      if (signal?.aborted) return;
      if (error instanceof ApiError && [400, 401, 403, 404].includes(error.status)) throw error;
    }
    onState('reconnecting');
    await sleep(delay, signal);
    delay = Math.min(delay * 2, 10000);
  }
}
