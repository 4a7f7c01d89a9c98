// Runs: the most recent runs, kept up to date from run progress on the tail stream.
import { follow, getJSON } from './api.js';
import { badge, duration, every, fill, h, throttle, timeCell, tokens } from './dom.js';

const LIMIT = 200;
const STATUSES = ['pending', 'running', 'completed', 'failed', 'cancelled'];
const SINCE = [
  ['', 'any time'], ['900', 'last 15 minutes'], ['3600', 'last hour'],
  ['86400', 'last 24 hours'], ['604800', 'last 7 days'],
];
const SAFETY_REFRESH_MS = 10000; // runs still pending publish no progress

function select(name, options, value, onchange) {
  return h('select', { name, 'aria-label': name, onchange },
    options.map(([v, label]) => h('option', { value: v, selected: v === value }, label)));
}

export function runDuration(run) {
  const start = run.started_at;
  if (!start) return '';
  const end = run.ended_at || (run.status === 'running' ? Date.now() / 1000 : 0);
  return end ? duration((end - start) * 1000) : '';
}

export async function render(view, params, ctx) {
  const query = new URLSearchParams(location.search);
  const filters = {
    status: query.get('status') || '',
    workflow: query.get('workflow') || '',
    since: query.get('since') || '',
  };
  let runs = [];
  const body = h('tbody');
  const count = h('span', { class: 'muted' });
  const workflowSelect = h('select', { name: 'workflow', 'aria-label': 'workflow' });

  function changed(name) {
    return (event) => {
      filters[name] = event.target.value;
      const next = new URLSearchParams(Object.entries(filters).filter(([, v]) => v));
      history.replaceState(null, '', next.size ? `/?${next}` : '/');
      draw();
    };
  }
  workflowSelect.addEventListener('change', changed('workflow'));

  function fillWorkflows() {
    const names = [...new Set(runs.map((r) => r.workflow_name).filter(Boolean))].sort();
    if (filters.workflow && !names.includes(filters.workflow)) names.push(filters.workflow);
    fill(workflowSelect,
      h('option', { value: '' }, 'every workflow'),
      names.map((n) => h('option', { value: n, selected: n === filters.workflow }, n)),
    );
  }

  function wanted(run) {
    if (filters.status && run.status !== filters.status) return false;
    if (filters.workflow && run.workflow_name !== filters.workflow) return false;
    if (filters.since && (run.started_at || run.created_at) < Date.now() / 1000 - Number(filters.since)) {
      return false;
    }
    return true;
  }

  function row(run) {
    const link = `/runs/${encodeURIComponent(run.run_id)}`;
    const steps = run.steps_expected || run.steps_total;
    return h('tr', { dataset: { runId: run.run_id, status: run.status } },
      h('td', {}, h('a', { href: link, class: 'mono' }, run.run_id)),
      h('td', {}, run.workflow_name || h('span', { class: 'muted' }, run.kind)),
      h('td', {}, badge(run.status)),
      h('td', {}, timeCell(run.started_at || run.created_at)),
      h('td', { class: 'num duration' }, runDuration(run)),
      h('td', { class: 'num' }, steps ? `${run.steps_done}/${steps}` : ''),
      h('td', { class: 'num' }, tokens(run.usage) || ''));
  }

  function draw() {
    fillWorkflows();
    const shown = runs.filter(wanted);
    fill(body, ...shown.map(row));
    if (!shown.length) {
      body.append(h('tr', {}, h('td', { colspan: 7, class: 'muted empty' },
        runs.length ? 'No run passes these filters.' : 'No runs yet. Start one with `chorus run` or POST /api/execute.')));
    }
    count.textContent = `${shown.length} of ${runs.length} most recent`;
  }

  async function refresh() {
    const answer = await getJSON(`/api/runs?limit=${LIMIT}`, { signal: ctx.signal });
    runs = answer.runs;
    draw();
  }

  await refresh();
  fill(view,
    h('div', { class: 'heading' }, h('h1', {}, 'Runs'), count),
    h('div', { class: 'filters' },
      h('label', {}, 'Status ', select('status', [['', 'any status'], ...STATUSES.map((s) => [s, s])],
        filters.status, changed('status'))),
      h('label', {}, 'Workflow ', workflowSelect),
      h('label', {}, 'Started ', select('since', SINCE, filters.since, changed('since')))),
    h('table', { class: 'runs', id: 'runs' },
      h('thead', {}, h('tr', {}, ['Run', 'Workflow', 'Status', 'Started', 'Duration', 'Steps', 'Tokens']
        .map((t) => h('th', {}, t)))),
      body));
  draw();

  // Each refresh reads every run head (GET /api/runs): at most one a second.
  const soon = throttle(() => refresh().catch(ctx.fail), 1000);
  every(SAFETY_REFRESH_MS, soon, ctx.signal);
  every(1000, () => {
    for (const cell of body.querySelectorAll('tr[data-status="running"] .duration')) {
      const run = runs.find((r) => r.run_id === cell.parentElement.dataset.runId);
      if (run) cell.textContent = runDuration(run);
    }
  }, ctx.signal);
  follow('/api/tail/stream?kind=run_progress', (event) => {
    if (event.event === 'message' || event.event === 'open') soon();
  }, { signal: ctx.signal, onState: ctx.setLive }).catch(ctx.fail);
}
