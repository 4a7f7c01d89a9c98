// The console's entry: picks the view from the path, asks for an API key when the gateway
// wants one, and shows the state of the live connections.
import { ApiError, apiKey, forgetApiKey, setApiKey } from './api.js';
import { fill, h } from './dom.js';

const VIEWS = {
  runs: () => import('./runs.js'),
  run: () => import('./run.js'),
  agents: () => import('./agents.js'),
  tail: () => import('./tail.js'),
  docs: () => import('./docs.js'),
};

function route(path) {
  const run = path.match(/^\/runs\/([A-Za-z0-9_-]+)\/?$/);
  if (run) return { name: 'run', params: { runId: run[1] } };
  const name = { '/': 'runs', '/agents': 'agents', '/tail': 'tail', '/docs': 'docs' }[path];
  return { name: name || 'runs', params: {} };
}

const view = document.getElementById('view');
const live = document.getElementById('live');
const forget = document.getElementById('forget-key');
let current = null;

function setLive(state) {
  live.textContent = { live: '● live', reconnecting: '○ reconnecting…' }[state] || '';
  live.className = `live ${state || ''}`;
}

function keyPanel(error) {
  const input = h('input', {
    id: 'key-input', type: 'password', autocomplete: 'off', spellcheck: 'false',
    placeholder: 'chorus_…', required: true, 'aria-label': 'API key',
  });
  const form = h('form', { id: 'key-form', class: 'key-form', onsubmit: (event) => {
    event.preventDefault();
    setApiKey(input.value);
    show();
  } },
  h('h1', {}, error.status === 403 ? 'This key may not do that' : 'An API key, please'),
  h('p', { class: 'reason' }, error.message),
  h('p', {}, 'The console uses the gateway’s API keys: ', h('code', {}, 'read'),
    ' to look, ', h('code', {}, 'execute'), ' to cancel runs. With ', h('code', {}, 'chorus up'),
    ' the key is in ', h('code', {}, '.chorus/gateway.key'), '; an operator makes others with ',
    h('code', {}, 'chorus gateway key add NAME --scope read --keys FILE'), '.'),
  h('p', { class: 'muted' }, 'The key stays in this tab (sessionStorage) and goes only to this ',
    'gateway, in the Authorization header.'),
  h('div', { class: 'row' }, input, h('button', { type: 'submit' }, 'Use key')));
  fill(view, form);
  input.focus();
}

function problem(error) {
  let banner = view.querySelector('.problem');
  if (!banner) {
    banner = h('div', { class: 'problem', role: 'alert' });
    view.prepend(banner);
  }
  banner.textContent = error.message || String(error);
}

// Errors of a view's background work: a key problem replaces the view, others are said.
function fail(error) {
  if (current?.signal.aborted || error?.name === 'AbortError') return;
  if (error instanceof ApiError && error.needsKey) {
    current?.abort();
    keyPanel(error);
    return;
  }
  problem(error);
}

async function show() {
  current?.abort();
  const controller = new AbortController();
  current = controller;
  setLive('');
  forget.hidden = !apiKey();
  const { name, params } = route(location.pathname);
  for (const link of document.querySelectorAll('#nav a')) {
    link.classList.toggle('active', link.dataset.view === (name === 'run' ? 'runs' : name));
  }
  fill(view, h('p', { class: 'muted' }, 'Loading…'));
  const ctx = { signal: controller.signal, fail, setLive };
  try {
    const module = await VIEWS[name]();
    await module.render(view, params, ctx);
  } catch (error) {
    fail(error);
  }
}

forget.addEventListener('click', () => {
  forgetApiKey();
  show();
});
addEventListener('popstate', show);
show();
