// One run: its head, the steps as a timeline (each with input, output and tool calls), the
// event chain, the plan, and the answer as it streams; a cancel button while it runs.
import { ApiError, follow, getJSON, postJSON } from './api.js';
import { badge, duration, every, fill, h, json, textBlock, throttle, timeCell, tokens } from './dom.js';
import { runDuration } from './runs.js';

const FINISHED = new Set(['completed', 'failed', 'cancelled']);

function field(label, value) {
  return [h('dt', {}, label), h('dd', {}, value === '' || value === undefined ? '—' : value)];
}

function toolCalls(calls) {
  if (!calls?.length) return null;
  return h('div', { class: 'tools' }, h('h4', {}, `Tool calls (${calls.length})`),
    h('table', { class: 'compact' },
      h('thead', {}, h('tr', {}, ['Turn', 'Tool', 'Arguments', 'Output', 'Duration', 'Instance']
        .map((t) => h('th', {}, t)))),
      h('tbody', {}, calls.map((call) => h('tr', { class: call.error ? 'failed' : '' },
        h('td', { class: 'num' }, call.turn),
        h('td', { class: 'mono' }, call.name),
        h('td', {}, textBlock(call.arguments, 'small')),
        h('td', {}, call.error ? h('pre', { class: 'text small error' }, call.error) : textBlock(call.output, 'small')),
        h('td', { class: 'num' }, duration(call.duration_ms)),
        h('td', { class: 'mono' }, call.instance || 'local'))))));
}

// Where each step sits on the run's time axis, as fractions of the run's span.
function span(run) {
  const starts = run.steps.map((s) => s.started_at).filter(Boolean);
  const start = run.started_at || Math.min(...starts);
  const ends = run.steps.map((s) => s.ended_at || (s.started_at ? Date.now() / 1000 : 0));
  const end = Math.max(run.ended_at || 0, ...ends, start + 0.001);
  return { start, length: end - start };
}

function timeline(run) {
  if (!run.steps.length) return h('p', { class: 'muted' }, 'No step has started yet.');
  const axis = span(run);
  return h('ol', { class: 'timeline', id: 'steps' }, run.steps.map((step) => {
    const bar = h('div', { class: `bar ${step.status}` });
    if (step.started_at && Number.isFinite(axis.start)) {
      const end = step.ended_at || Date.now() / 1000;
      bar.style.marginLeft = `${((step.started_at - axis.start) / axis.length) * 100}%`;
      bar.style.width = `${Math.max(0.5, ((end - step.started_at) / axis.length) * 100)}%`;
    }
    const took = step.duration_ms || (step.started_at && step.ended_at ? (step.ended_at - step.started_at) * 1000 : 0);
    return h('li', { class: 'step', dataset: { step: step.name, status: step.status } },
      h('details', { open: !FINISHED.has(step.status) || step.status === 'failed' },
        h('summary', {},
          h('span', { class: 'step-name' }, step.name), badge(step.status),
          h('span', { class: 'who mono' }, step.instance || step.agent || step.capability || ''),
          h('span', { class: 'track' }, bar),
          h('span', { class: 'num muted' }, took ? duration(took) : '')),
        h('dl', { class: 'facts' },
          field('Agent', step.agent || step.capability),
          field('Instance', step.instance),
          field('Attempts', step.attempts),
          field('Started', timeCell(step.started_at, { ms: true })),
          field('Ended', timeCell(step.ended_at, { ms: true })),
          field('Tokens', tokens(step.usage) || '')),
        step.error ? h('div', {}, h('h4', {}, `Error${step.code ? ` (${step.code})` : ''}`),
          h('pre', { class: 'text error' }, step.error)) : null,
        h('div', { class: 'io' },
          h('div', {}, h('h4', {}, 'Input'), textBlock(step.input)),
          h('div', {}, h('h4', {}, 'Output'), textBlock(step.output || step.data))),
        toolCalls(step.tool_calls)));
  }));
}

function eventChain(run) {
  if (!run.events?.length) return null;
  return h('section', {}, h('h2', {}, `Event chain (${run.events.length})`),
    h('ol', { class: 'events' }, run.events.map((event) => h('li', {},
      timeCell(event.time, { ms: true }), ' ', h('span', { class: 'mono topic' }, event.topic),
      event.source ? h('span', { class: 'muted' }, ` from ${event.source}`) : null,
      textBlock(event.data, 'small')))));
}

function plan(run) {
  if (!run.plan?.subtasks?.length) return null;
  return h('section', {}, h('h2', {}, 'Plan'),
    h('ol', { class: 'plan' }, run.plan.subtasks.map((t) => h('li', {},
      h('span', { class: 'mono' }, t.id), ' ', t.description, ' ',
      h('span', { class: 'muted' }, `needs ${t.capabilities.join(', ') || '—'}`,
        t.depends_on.length ? `; after ${t.depends_on.join(', ')}` : '')))));
}

// The live answer: each task's text as its chunks arrive on /api/runs/{id}/stream.
function liveAnswer(runId, ctx) {
  const panel = h('div', { class: 'live-output', id: 'live-output' },
    h('p', { class: 'muted' }, 'Waiting for output…'));
  const tasks = new Map();
  function task(chunk) {
    let entry = tasks.get(chunk.task_id);
    if (!entry) {
      if (!tasks.size) panel.replaceChildren();
      const text = h('pre', { class: 'text streaming' });
      const notes = h('div', { class: 'notes' });
      entry = { text, notes, attempt: chunk.attempt };
      tasks.set(chunk.task_id, entry);
      panel.append(h('div', { class: 'task', dataset: { task: chunk.task_id } },
        h('h4', {}, chunk.task_id, chunk.agent ? h('span', { class: 'muted' }, ` · ${chunk.agent}`) : null),
        notes, text));
    }
    return entry;
  }
  follow(`/api/runs/${encodeURIComponent(runId)}/stream`, (event) => {
    if (event.event === 'end') return false;
    let chunk;
    try { chunk = JSON.parse(event.data); } catch { return true; }
    const entry = task(chunk);
    if (chunk.attempt > entry.attempt) {
      entry.attempt = chunk.attempt;
      entry.text.textContent = '';
    }
    if (chunk.kind === 'delta') entry.text.textContent += chunk.text;
    else if (chunk.kind === 'final') entry.text.textContent = chunk.text;
    else if (chunk.kind === 'tool_started' || chunk.kind === 'tool_finished') {
      entry.notes.append(h('div', { class: 'note mono' },
        `${chunk.kind === 'tool_started' ? '→' : '✓'} ${chunk.tool} ${chunk.text.slice(0, 200)}`));
    } else if (chunk.kind === 'superseded') {
      entry.notes.append(h('div', { class: 'note muted' }, `attempt ${chunk.attempt} superseded: ${chunk.text}`));
    }
    return true;
  }, { signal: ctx.signal }).catch(ctx.fail);
  return panel;
}

export async function render(view, params, ctx) {
  const { runId } = params;
  const url = `/api/runs/${encodeURIComponent(runId)}`;
  let run = await getJSON(url, { signal: ctx.signal });
  const head = h('div');
  const steps = h('section', {}, h('h2', {}, 'Steps'));
  const extra = h('div');
  const message = h('span', { class: 'muted', id: 'cancel-message' });
  const cancel = h('button', { id: 'cancel', class: 'danger', type: 'button', onclick: async () => {
    cancel.disabled = true;
    try {
      const answer = await postJSON(`${url}/cancel`, undefined, { signal: ctx.signal });
      message.textContent = `cancel asked: the run is ${answer.status}`;
      soon();
    } catch (error) {
      // Said beside the button: a read-only key may look but not cancel (403), and a run
      // that has just finished cannot be cancelled (409).
      if (error instanceof ApiError) message.textContent = error.message;
      else ctx.fail(error);
      soon();
    }
  } }, 'Cancel run');

  function draw() {
    cancel.disabled = FINISHED.has(run.status);
    fill(head,
      h('div', { class: 'heading' },
        h('h1', {}, h('a', { href: '/' }, 'Runs'), ' / ', h('span', { class: 'mono' }, run.run_id)),
        badge(run.status), h('span', { class: 'spacer' }), message, cancel),
      h('dl', { class: 'facts wide' },
        field('Workflow', `${run.workflow?.name || ''} (${run.kind})`),
        field('Created', timeCell(run.created_at)),
        field('Started', timeCell(run.started_at)),
        field('Ended', timeCell(run.ended_at)),
        field('Duration', runDuration(run)),
        field('Steps', `${run.steps_done}/${run.steps_total}`),
        field('Tokens', `${tokens(run.usage)} (in ${run.usage?.input_tokens || 0}, out ${run.usage?.output_tokens || 0})`)),
      run.error ? h('div', {}, h('h2', {}, 'Error'), h('pre', { class: 'text error' }, run.error)) : null,
      h('div', { class: 'io' },
        h('section', {}, h('h2', {}, 'Input'), textBlock(run.input || (run.data == null ? '' : json(run.data)))),
        h('section', {}, h('h2', {}, 'Output'), h('div', { id: 'run-output' },
          textBlock(run.output || (run.output_data == null ? '' : run.output_data))))));
    // Keep the open/closed state of the steps the reader chose.
    const open = new Map([...steps.querySelectorAll('li.step')].map((li) =>
      [li.dataset.step, li.querySelector('details').open]));
    const fresh = timeline(run);
    for (const li of fresh.querySelectorAll?.('li.step') || []) {
      if (open.has(li.dataset.step)) li.querySelector('details').open = open.get(li.dataset.step);
    }
    fill(steps, h('h2', {}, `Steps (${run.steps.length})`), fresh);
    fill(extra, ...[plan(run), eventChain(run)].filter(Boolean));
  }

  async function refresh() {
    run = await getJSON(url, { signal: ctx.signal });
    draw();
  }
  const soon = throttle(() => refresh().catch(ctx.fail), 250);

  draw();
  fill(view, head,
    h('section', {}, h('h2', {}, 'Live output'), liveAnswer(runId, ctx)),
    steps, extra);
  every(1000, () => { if (run.status === 'running') draw(); }, ctx.signal);
  follow(`/api/tail/stream?kind=run_progress&run=${encodeURIComponent(runId)}`, (event) => {
    if (event.event === 'message' || event.event === 'open') soon();
  }, { signal: ctx.signal, onState: ctx.setLive }).catch(ctx.fail);
}
