// Building the page: elements from data (always as text, never as HTML: everything shown
// comes off the wire), and how times, durations and tokens read.

export function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith('on') && typeof value === 'function') {
      element.addEventListener(name.slice(2), value);
    } else if (name === 'class') {
      element.className = value;
    } else if (name === 'dataset') {
      Object.assign(element.dataset, value);
    } else if (value === true) {
      element.setAttribute(name, '');
    } else {
      element.setAttribute(name, String(value));
    }
  }
  append(element, children);
  return element;
}

// Replace what `element` holds with `children` (nested lists flattened, empty ones left out).
export function fill(element, ...children) {
  element.replaceChildren();
  append(element, children);
  return element;
}

function append(element, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(element, child);
    else if (child instanceof Node) element.append(child);
    else element.append(document.createTextNode(String(child)));
  }
}

const pad = (n, width = 2) => String(n).padStart(width, '0');

// Epoch seconds (as the API sends them) as ISO 8601 UTC.
export function isoUTC(epoch) {
  return epoch ? new Date(epoch * 1000).toISOString() : '';
}

// Epoch seconds as this browser's local time: `2026-05-01 14:03:07`.
export function localTime(epoch, { ms = false } = {}) {
  if (!epoch) return '';
  const d = new Date(epoch * 1000);
  const date = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
  const time = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  return `${date} ${time}${ms ? `.${pad(d.getMilliseconds(), 3)}` : ''}`;
}

// A time element: local time shown, ISO 8601 UTC on hover and in `datetime`.
export function timeCell(epoch, options) {
  if (!epoch) return h('span', { class: 'muted' }, '—');
  return h('time', { datetime: isoUTC(epoch), title: isoUTC(epoch) }, localTime(epoch, options));
}

export function duration(ms) {
  if (ms === null || ms === undefined || ms < 0) return '';
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.round(s % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

export function ago(epoch) {
  if (!epoch) return 'never';
  const s = Math.max(0, Date.now() / 1000 - epoch);
  if (s < 1) return 'just now';
  if (s < 60) return `${Math.floor(s)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  return `${Math.floor(s / 3600)} h ago`;
}

export function tokens(usage) {
  if (!usage) return 0;
  return usage.total_tokens || (usage.input_tokens || 0) + (usage.output_tokens || 0);
}

export function badge(status) {
  return h('span', { class: `badge ${status || 'unknown'}` }, status || 'unknown');
}

// `fn` at most once every `ms` (the last call is never lost).
export function throttle(fn, ms) {
  let timer = null;
  let again = false;
  return () => {
    if (timer) { again = true; return; }
    fn();
    timer = setTimeout(function done() {
      timer = null;
      if (again) { again = false; fn(); timer = setTimeout(done, ms); }
    }, ms);
  };
}

// Run `fn` every `ms` until `signal` aborts.
export function every(ms, fn, signal) {
  const timer = setInterval(fn, ms);
  signal.addEventListener('abort', () => clearInterval(timer), { once: true });
}

export function json(value) {
  if (typeof value === 'string') return value;
  return JSON.stringify(value, null, 2);
}

// A block of text from the wire (an input, an output, JSON), or a dash when empty.
export function textBlock(value, cls = '') {
  const text = value === null || value === undefined ? '' : json(value);
  if (!text) return h('span', { class: 'muted' }, '—');
  return h('pre', { class: `text ${cls}` }, text);
}
