// Agents: the registry (GET /api/health), grouped by agent name, redrawn as heartbeats and
// status changes arrive on the tail stream.
import { follow, getJSON } from './api.js';
import { ago, badge, duration, every, fill, h, throttle } from './dom.js';

function group(agents) {
  const names = new Map();
  for (const agent of agents) {
    if (!names.has(agent.name)) names.set(agent.name, []);
    names.get(agent.name).push(agent);
  }
  return [...names.entries()].sort(([a], [b]) => a.localeCompare(b));
}

function percent(rate, processed) {
  return processed ? `${(rate * 100).toFixed(rate < 1 ? 1 : 0)}%` : '—';
}

function card(name, instances) {
  const capabilities = [...new Set(instances.flatMap((i) => i.capabilities))].sort();
  const healthy = instances.filter((i) => i.health === 'healthy').length;
  instances.sort((a, b) => a.instance.localeCompare(b.instance));
  return h('section', { class: 'agent', dataset: { agent: name } },
    h('div', { class: 'heading' }, h('h2', {}, name),
      h('span', { class: 'muted' }, `${healthy} of ${instances.length} healthy`),
      h('span', { class: 'caps' }, capabilities.map((c) => h('span', { class: 'cap' }, c)))),
    h('table', { class: 'instances' },
      h('thead', {}, h('tr', {}, ['Instance', 'Health', 'State', 'Load', 'Processed', 'Success',
        'Latency', 'Last seen', 'Breaker'].map((t) => h('th', {}, t)))),
      h('tbody', {}, instances.map((i) => h('tr', { dataset: { instance: i.instance, health: i.health } },
        h('td', { class: 'mono' }, i.instance),
        h('td', {}, badge(i.health)),
        h('td', {}, i.state),
        h('td', { class: 'num' }, h('span', { class: 'load' }, `${i.in_flight}/${i.max_concurrency}`)),
        h('td', { class: 'num' }, `${i.processed}${i.failed ? ` (${i.failed} failed)` : ''}`),
        h('td', { class: 'num' }, percent(i.success_rate, i.processed)),
        h('td', { class: 'num' }, i.processed ? duration(i.mean_latency_ms) : '—'),
        h('td', { class: 'seen', dataset: { seen: i.last_seen } }, ago(i.last_seen)),
        h('td', {}, badge(i.breaker || 'closed')))))));
}

export async function render(view, params, ctx) {
  const summary = h('div', { class: 'summary' });
  const list = h('div', { id: 'agents' });

  function draw(report) {
    fill(summary,
      h('span', {}, 'System ', badge(report.status)),
      h('span', {}, 'NATS ', badge(report.nats)),
      h('span', {}, 'Coordinator ', badge(report.coordinator)),
      h('span', {}, `${report.healthy_agents} healthy instance${report.healthy_agents === 1 ? '' : 's'}`));
    const groups = group(report.agents);
    fill(list, ...(groups.length ? groups.map(([name, instances]) => card(name, instances))
      : [h('p', { class: 'muted empty' }, 'No agent in the registry. Start one with `chorus agent run SPEC`.')]));
  }

  async function refresh() {
    // 503 (NATS away) still carries a report.
    let report;
    try {
      report = await getJSON('/api/health', { signal: ctx.signal });
    } catch (error) {
      if (error.status !== 503) throw error;
      report = { status: 'unavailable', nats: 'reconnecting', coordinator: 'unknown', healthy_agents: 0, agents: [] };
    }
    draw(report);
  }

  await refresh();
  fill(view, h('div', { class: 'heading' }, h('h1', {}, 'Agents')), summary, list);
  const soon = throttle(() => refresh().catch(ctx.fail), 500);
  every(1000, () => {
    for (const cell of list.querySelectorAll('td.seen')) cell.textContent = ago(Number(cell.dataset.seen));
  }, ctx.signal);
  every(5000, soon, ctx.signal); // the coordinator's verdict on an instance that went quiet
  follow('/api/tail/stream?kind=heartbeat,status', (event) => {
    if (event.event === 'message' || event.event === 'open') soon();
  }, { signal: ctx.signal, onState: ctx.setLive }).catch(ctx.fail);
}
