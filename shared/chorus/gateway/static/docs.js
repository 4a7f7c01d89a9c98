// API docs: the gateway's OpenAPI document (/openapi.json) rendered for a person.
import { getJSON } from './api.js';
import { fill, h } from './dom.js';

const METHODS = ['get', 'post', 'put', 'patch', 'delete'];

// Prose from the document, with `code` spans shown as code (as text: never parsed as HTML).
function prose(text) {
  return (text || '').split('`').map((part, i) => (i % 2 ? h('code', {}, part) : part));
}

function refName(ref) {
  return ref.split('/').pop();
}

// A schema in a few words: `RunRecord`, `list of AgentRecord`, `"ok" | "degraded"`.
function typeOf(schema) {
  if (!schema) return '';
  if (schema.$ref) return h('a', { href: `#schema-${refName(schema.$ref)}`, class: 'mono' }, refName(schema.$ref));
  const alternatives = schema.anyOf || schema.oneOf;
  if (alternatives) return joined(alternatives.map(typeOf), ' | ');
  if (schema.enum) return joined(schema.enum.map((v) => h('code', {}, JSON.stringify(v))), ' | ');
  if (schema.const !== undefined) return h('code', {}, JSON.stringify(schema.const));
  if (schema.type === 'array') return ['list of ', typeOf(schema.items || {})];
  if (schema.type === 'object' && schema.additionalProperties && typeof schema.additionalProperties === 'object') {
    return ['map of ', typeOf(schema.additionalProperties)];
  }
  if (Array.isArray(schema.type)) return schema.type.join(' | ');
  return schema.type || 'any';
}

function joined(items, separator) {
  return items.flatMap((item, i) => (i ? [separator, item] : [item]));
}

function constraints(schema) {
  const parts = [];
  if (schema.default !== undefined) parts.push(`default ${JSON.stringify(schema.default)}`);
  for (const key of ['minimum', 'exclusiveMinimum', 'maximum', 'maxLength', 'pattern']) {
    if (schema[key] !== undefined) parts.push(`${key} ${schema[key]}`);
  }
  return parts.join(', ');
}

function parameters(operation) {
  if (!operation.parameters?.length) return null;
  return h('table', { class: 'compact' },
    h('thead', {}, h('tr', {}, ['Parameter', 'In', 'Type', 'Description'].map((t) => h('th', {}, t)))),
    h('tbody', {}, operation.parameters.map((p) => h('tr', {},
      h('td', { class: 'mono' }, p.name, p.required ? h('span', { class: 'required' }, ' *') : null),
      h('td', {}, p.in),
      h('td', {}, typeOf(p.schema), ' ', h('span', { class: 'muted' }, constraints(p.schema || {}))),
      h('td', {}, prose(p.description))))));
}

function content(body) {
  return Object.entries(body?.content || {}).map(([media, { schema }]) =>
    h('span', { class: 'media' }, h('span', { class: 'muted' }, `${media}: `), typeOf(schema)));
}

function operationBlock(path, method, operation) {
  const id = `op-${method}-${path.replace(/[^A-Za-z0-9]+/g, '-')}`;
  const open = (operation.security || []).some((s) => !Object.keys(s).length);
  return h('article', { class: 'operation', id, dataset: { path, method } },
    h('h3', {}, h('span', { class: `method ${method}` }, method.toUpperCase()), ' ',
      h('span', { class: 'mono path' }, path), ' ', h('span', { class: 'op-summary' }, prose(operation.summary)),
      open ? h('span', { class: 'badge open' }, 'no key needed') : null),
    operation.description ? h('p', {}, prose(operation.description)) : null,
    parameters(operation),
    operation.requestBody ? h('p', {}, h('strong', {}, 'Body: '), content(operation.requestBody)) : null,
    h('table', { class: 'compact responses' },
      h('thead', {}, h('tr', {}, ['Status', 'Meaning', 'Body'].map((t) => h('th', {}, t)))),
      h('tbody', {}, Object.entries(operation.responses || {}).map(([status, response]) => h('tr', {},
        h('td', { class: `mono status s${status[0]}` }, status),
        h('td', {}, prose(response.description)),
        h('td', {}, content(response)))))));
}

function schemaBlock(name, schema) {
  const required = new Set(schema.required || []);
  const properties = Object.entries(schema.properties || {});
  return h('article', { class: 'schema', id: `schema-${name}` },
    h('h3', { class: 'mono' }, name),
    schema.description ? h('p', {}, prose(schema.description)) : null,
    properties.length ? h('table', { class: 'compact' },
      h('thead', {}, h('tr', {}, ['Field', 'Type', ''].map((t) => h('th', {}, t)))),
      h('tbody', {}, properties.map(([field, s]) => h('tr', {},
        h('td', { class: 'mono' }, field, required.has(field) ? h('span', { class: 'required' }, ' *') : null),
        h('td', {}, typeOf(s)),
        h('td', { class: 'muted' }, [s.description, constraints(s)].filter(Boolean).join('; '))))))
      : h('p', {}, typeOf(schema)));
}

export async function render(view, params, ctx) {
  const doc = await getJSON('/openapi.json', { signal: ctx.signal });
  const operations = [];
  for (const [path, item] of Object.entries(doc.paths || {})) {
    for (const method of METHODS) if (item[method]) operations.push([path, method, item[method]]);
  }
  const schemas = Object.entries(doc.components?.schemas || {}).sort(([a], [b]) => a.localeCompare(b));
  const schemes = Object.entries(doc.components?.securitySchemes || {});
  fill(view,
    h('div', { class: 'heading' }, h('h1', {}, doc.info?.title || 'API'),
      h('span', { class: 'muted' }, `version ${doc.info?.version || '?'} · OpenAPI ${doc.openapi}`),
      h('a', { href: '/openapi.json', class: 'spacer-left', download: 'openapi.json' }, 'openapi.json')),
    doc.info?.description ? h('p', {}, prose(doc.info.description)) : null,
    schemes.length ? h('p', {}, h('strong', {}, 'Authentication: '),
      schemes.map(([name, s]) => [`${name} (${s.type}${s.scheme ? ` ${s.scheme}` : ''}): `, prose(s.description)])) : null,
    h('nav', { class: 'toc' }, h('h2', {}, 'Routes'),
      h('ul', {}, operations.map(([path, method, op]) => h('li', {},
        h('a', { href: `#op-${method}-${path.replace(/[^A-Za-z0-9]+/g, '-')}` },
          h('span', { class: `method ${method}` }, method.toUpperCase()), ' ', h('span', { class: 'mono' }, path)),
        ' ', h('span', { class: 'muted' }, op.summary || ''))))),
    h('section', { id: 'operations' }, operations.map(([path, method, op]) => operationBlock(path, method, op))),
    h('section', { id: 'schemas' }, h('h2', {}, 'Schemas'), schemas.map(([name, s]) => schemaBlock(name, s))));
  if (location.hash) document.getElementById(location.hash.slice(1))?.scrollIntoView();
}
