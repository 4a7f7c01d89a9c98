// Tail: the traffic on the subjects, decoded like `chorus tail`, filtered on the gateway.
import { follow } from './api.js';
import { fill, h, json } from './dom.js';

const KINDS = ['event', 'run_progress', 'status', 'stream_chunk', 'dead_letter', 'run_cancel', 'heartbeat'];
const DEFAULT_KINDS = KINDS.filter((k) => k !== 'heartbeat');
const KEEP = 500; // lines kept on the page

function localClock(iso) {
  const d = new Date(iso);
  const pad = (n, w = 2) => String(n).padStart(w, '0');
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function line(item) {
  return h('li', { class: `line ${item.type}`, dataset: { subject: item.subject } },
    h('details', {},
      h('summary', {},
        h('time', { datetime: item.time, title: item.time }, localClock(item.time)),
        h('span', { class: 'subject mono' }, item.subject),
        h('span', { class: `type ${item.type}` }, item.type),
        item.run ? h('a', { class: 'run mono', href: `/runs/${encodeURIComponent(item.run)}` }, `run=${item.run.slice(0, 12)}`) : null,
        item.agent ? h('span', { class: 'agent mono' }, `agent=${item.agent}`) : null,
        h('span', { class: 'what' }, item.summary),
        item.tools ? h('span', { class: 'tools-line' }, item.tools) : null),
      h('pre', { class: 'text small' }, json(item.data))));
}

export async function render(view, params, ctx) {
  const query = new URLSearchParams(location.search);
  const input = (name, placeholder) => h('input', {
    name, placeholder, value: query.get(name) || '', 'aria-label': name, spellcheck: 'false',
  });
  const subject = input('subject', 'subject pattern, e.g. chorus.event.>');
  const run = input('run', 'run id');
  const agent = input('agent', 'agent or instance');
  const chosen = new Set(query.get('kind') ? query.get('kind').split(',') : DEFAULT_KINDS);
  const boxes = KINDS.map((kind) => h('label', { class: 'kind' },
    h('input', { type: 'checkbox', value: kind, checked: chosen.has(kind) }), kind));
  const lines = h('ol', { class: 'tail', id: 'tail' });
  const status = h('span', { class: 'muted', id: 'tail-status' });
  let paused = false;
  const pause = h('button', { type: 'button', class: 'quiet', onclick: () => {
    paused = !paused;
    pause.textContent = paused ? 'Resume' : 'Pause';
  } }, 'Pause');
  const clear = h('button', { type: 'button', class: 'quiet', onclick: () => lines.replaceChildren() }, 'Clear');
  let stream = null;

  function start() {
    stream?.abort();
    stream = new AbortController();
    ctx.signal.addEventListener('abort', () => stream.abort(), { once: true });
    const kinds = boxes.map((b) => b.querySelector('input')).filter((b) => b.checked).map((b) => b.value);
    const wanted = new URLSearchParams();
    if (subject.value.trim()) wanted.set('subject', subject.value.trim());
    if (run.value.trim()) wanted.set('run', run.value.trim());
    if (agent.value.trim()) wanted.set('agent', agent.value.trim());
    wanted.set('kind', kinds.join(','));
    history.replaceState(null, '', `/tail?${wanted}`);
    if (!kinds.length) {
      status.textContent = 'Choose at least one kind of subject.';
      return;
    }
    status.textContent = 'connecting…';
    follow(`/api/tail/stream?${wanted}`, (event) => {
      const data = JSON.parse(event.data);
      if (event.event === 'open') {
        status.textContent = `following ${data.following.join(', ') || 'nothing (no subject passes these filters)'}`;
      } else if (event.event === 'dropped') {
        lines.prepend(h('li', { class: 'line dropped' }, `${data.dropped} messages dropped (the page was too slow)`));
      } else if (event.event === 'message' && !paused) {
        lines.prepend(line(data));
        while (lines.childElementCount > KEEP) lines.lastElementChild.remove();
      }
      return true;
    }, { signal: stream.signal, onState: ctx.setLive }).catch((error) => {
      status.textContent = error.message;
      ctx.fail(error);
    });
  }

  const form = h('form', { class: 'filters', id: 'tail-filters', onsubmit: (event) => {
    event.preventDefault();
    start();
  } },
  subject, run, agent, h('span', { class: 'kinds' }, boxes),
  h('button', { type: 'submit' }, 'Follow'), pause, clear);
  fill(view, h('div', { class: 'heading' }, h('h1', {}, 'Tail'), status), form,
    h('p', { class: 'muted hint' }, 'Newest first. Click a line for the whole message. Request subjects (tasks, help) are not followed, as for the observer principal.'),
    lines);
  start();
}
