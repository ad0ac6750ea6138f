// The VM cluster console: one live event stream (/api/stream) renders every view;
// actions are POSTs with the session's CSRF token, each behind a confirmation dialog.
// All text from the cluster goes into the page as text nodes, never as HTML.
'use strict';

let session = null;
let overview = null;
const progress = new Map(); // migration id -> latest MigrationProgress

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('data-')) e.setAttribute(k, v);
    else if (k === 'onclick') e.addEventListener('click', v);
    else e[k] = v;
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const badge = (s) => el('span', { class: 'badge st-' + s }, s || '—');
// Times are RFC 3339 strings (google.protobuf.Timestamp), durations "1.500s"
// (google.protobuf.Duration); an absent one is null.
const ago = (time) => {
  const ms = time ? Date.parse(time) : NaN;
  if (Number.isNaN(ms)) return '—';
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 120) return s + ' s ago';
  if (s < 7200) return Math.round(s / 60) + ' min ago';
  return Math.round(s / 3600) + ' h ago';
};
const seconds = (d) => (d ? parseFloat(d) : 0);
const mib = (b) => (b / 1048576).toFixed(1) + ' MiB';
const nodeName = (id) => {
  const n = overview && overview.nodes.find((x) => x.node_id === id);
  return n ? n.name : (id ? 'node ' + id : '—');
};

async function api(method, path, body) {
  const opts = { method, headers: {} };
  if (method !== 'GET') {
    opts.headers['content-type'] = 'application/json';
    opts.headers['x-csrf-token'] = session ? session.csrf : '';
    opts.body = JSON.stringify(body || {});
  }
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({ error: 'HTTP ' + r.status }));
  if (!r.ok) throw new Error(data.error || 'HTTP ' + r.status);
  return data;
}

function showProblem(text) {
  const p = document.getElementById('problem');
  p.textContent = text || '';
  p.hidden = !text;
}

// ---- confirmation dialog -------------------------------------------------------

function confirmAction({ title, body, run, preview }) {
  const d = document.getElementById('confirm');
  document.getElementById('confirm-title').textContent = title;
  const b = document.getElementById('confirm-body');
  b.replaceChildren(...(Array.isArray(body) ? body : [body]));
  const pre = document.getElementById('confirm-preview');
  pre.hidden = true;
  pre.textContent = '';
  const pb = document.getElementById('confirm-preview-button');
  pb.hidden = !preview;
  pb.onclick = async () => {
    pre.hidden = false;
    pre.textContent = 'asking…';
    try { pre.textContent = await preview(); } catch (e) { pre.textContent = 'refused: ' + e.message; }
  };
  d.onclose = async () => {
    if (d.returnValue !== 'ok') return;
    try {
      await run();
      showProblem('');
    } catch (e) {
      showProblem(title + ' refused: ' + e.message);
    }
  };
  d.returnValue = '';
  d.showModal();
}

function actionButton(label, opts, cls) {
  return el('button', { type: 'button', class: cls || '', 'data-action': opts.action,
    onclick: () => confirmAction(opts) }, label);
}

// ---- views -------------------------------------------------------------------------

function renderStatus(o) {
  const s = o.status;
  document.getElementById('cluster-name').textContent = s.cluster_name || 'VM cluster';
  const running = o.vms.filter((v) => v.runtime === 'running').length;
  const live = o.migrations.filter((m) => m.state === 'running').length;
  const card = (v, label, id) => el('div', { class: 'card', id }, el('b', {}, v), el('span', {}, label));
  document.getElementById('cluster-status').replaceChildren(
    card(o.nodes.length, 'nodes', 'card-nodes'),
    card(o.nodes.filter((n) => n.state === 'up').length, 'up'),
    card(running + ' / ' + o.vms.length, 'VMs running'),
    card(live, 'migrations running'),
    card(nodeName(s.leader_id), 'Raft leader (term ' + s.term + ')'),
    card(nodeName(s.this_node_id), 'this console\'s node (' + s.raft_state + ')'),
  );
}

function renderNodes(o) {
  const rows = o.nodes.map((n) => {
    const d = n.demand;
    const cpus = n.facts ? n.facts.logical_cpus : 0;
    const mem = n.facts ? mib(n.facts.memory_bytes) : '';
    const vms = o.vms.filter((v) => v.owner_id === n.node_id).length;
    return el('tr', { 'data-node': n.node_id },
      el('td', {}, el('b', {}, n.name), el('div', { class: 'muted' }, '#' + n.node_id + ' ' + n.mgmt_addr)),
      el('td', {}, badge(n.state)),
      el('td', {}, n.raft_role, n.node_id === o.status.leader_id ? ' (leader)' : ''),
      el('td', {}, d ? (d.cpu_demand_millicores / 1000).toFixed(2) + ' of ' + cpus + ' CPUs' : '—'),
      el('td', {}, d ? d.memory_touched_mib + ' MiB of ' + mem : '—'),
      el('td', {}, vms),
      el('td', {}, ago(n.state_since)),
      el('td', { class: 'admin' },
        actionButton('Drain', {
          action: 'drain', title: 'Drain ' + n.name + '?',
          body: 'Pauses the node and moves its VMs away (live where possible).',
          preview: async () => planText(await api('POST', `/api/nodes/${n.node_id}/drain`, { dry_run: true })),
          run: () => api('POST', `/api/nodes/${n.node_id}/drain`, {}),
        }),
        actionButton('Abort drain', {
          action: 'abort-drain', title: 'Abort the drain of ' + n.name + '?',
          body: 'Queued moves are dropped; migrations in flight finish or roll back.',
          run: () => api('POST', `/api/nodes/${n.node_id}/abort-drain`, {}),
        }),
        actionButton('Resume', {
          action: 'resume', title: 'Return ' + n.name + ' to service?',
          body: 'The node takes VMs again (no failback from here).',
          run: () => api('POST', `/api/nodes/${n.node_id}/resume`, { failback: false }),
        }),
      ));
  });
  document.querySelector('#nodes-table tbody').replaceChildren(...rows);
}

function planText(r) {
  const moves = r.plan || [];
  if (!moves.length) return 'nothing to move';
  return moves.map((m) => `${m.vm}: ${nodeName(m.from_node_id)} → ${nodeName(m.to_node_id)} (${m.kind}, wave ${m.wave})`).join('\n');
}

function migrateDialog(v) {
  const select = el('select', { id: 'migrate-target' },
    el('option', { value: '0' }, 'scheduler picks'),
    overview.nodes.filter((n) => n.node_id !== v.owner_id).map((n) => el('option', { value: String(n.node_id) }, n.name)));
  const target = () => Number(select.value);
  return {
    action: 'migrate', title: 'Live-migrate ' + v.spec.name + '?',
    body: [el('label', {}, 'Target node: ', select)],
    preview: async () => {
      const p = (await api('POST', `/api/vms/${encodeURIComponent(v.spec.name)}/migrate`, { to_node_id: target(), dry_run: true })).plan;
      return p.go
        ? `would move to ${nodeName(p.to_node_id)}, about ${seconds(p.predicted_duration).toFixed(1)} s`
        : 'refused: ' + p.reasons.join('; ');
    },
    run: () => api('POST', `/api/vms/${encodeURIComponent(v.spec.name)}/migrate`, { to_node_id: target() }),
  };
}

function renderVms(o) {
  const rows = o.vms.map((v) => {
    const name = v.spec.name;
    const path = `/api/vms/${encodeURIComponent(name)}`;
    return el('tr', { 'data-vm': name },
      el('td', {}, el('b', {}, name)),
      el('td', {}, badge(v.runtime), ' ', el('span', { class: 'muted' }, 'wants ' + v.desired),
        v.migrating_to ? el('div', {}, 'migrating to ' + nodeName(v.migrating_to)) : null),
      el('td', {}, v.owner_id ? v.owner_name || nodeName(v.owner_id) : '—'),
      el('td', {}, v.spec.vcpus + ' vCPU, ' + v.spec.memory_mib + ' MiB'),
      el('td', {}, v.spec.disks.length ? v.spec.disks.map((d) => el('div', {}, d.name + (d.read_only ? ' (ro)' : ''))) : '—'),
      el('td', {}, v.spec.nics.length ? v.spec.nics.map((n, i) => el('div', {}, `${n.network} ${n.mac} ${v.nic_taps[i] || ''}`)) : '—'),
      el('td', { class: 'muted' }, v.reason),
      el('td', { class: 'admin' },
        actionButton('Start', { action: 'start', title: 'Start ' + name + '?', body: 'The cluster places and starts it.', run: () => api('POST', path + '/start') }),
        actionButton('Stop', { action: 'stop', title: 'Stop ' + name + '?', body: 'The guest is stopped on its owner node.', run: () => api('POST', path + '/stop') }, 'danger'),
        actionButton('Migrate…', migrateDialog(v)),
      ));
  });
  document.querySelector('#vms-table tbody').replaceChildren(...rows);
}

function progressCell(m) {
  const p = progress.get(m.id);
  let value = p ? p.fraction_done : 0;
  if (m.state === 'succeeded') value = 1;
  const text = m.state === 'running'
    ? (p ? `${Math.round(value * 100)} % · round ${p.round} · ${mib(p.bytes_sent)} sent · ${mib(p.rate_bytes_per_s)}/s` : 'starting')
    : m.state + (m.reason ? ': ' + m.reason : '') + (m.stats ? ` · blackout ${(seconds(m.stats.blackout) * 1000).toFixed(1)} ms` : '');
  return el('td', {},
    el('progress', { id: 'progress-' + m.id, max: 1, value }),
    ' ', el('span', { id: 'progress-text-' + m.id, class: 'muted' }, text));
}

function renderMigrations(o) {
  const rows = o.migrations.map((m) => el('tr', { 'data-migration': m.id },
    el('td', {}, m.id),
    el('td', {}, m.vm),
    el('td', {}, nodeName(m.source_node_id) + ' → ' + nodeName(m.target_node_id)),
    el('td', {}, m.kind),
    el('td', {}, badge(m.state)),
    progressCell(m),
    el('td', { class: 'admin' }, m.state === 'running' || m.state === 'queued'
      ? actionButton('Cancel', { action: 'cancel', title: 'Cancel migration ' + m.id + ' of ' + m.vm + '?',
        body: 'The VM keeps running on ' + nodeName(m.source_node_id) + '.',
        run: () => api('POST', `/api/migrations/${m.id}/cancel`) }, 'danger')
      : null)));
  document.querySelector('#migrations-table tbody').replaceChildren(...rows);
}

function onProgress(p) {
  progress.set(p.id, p);
  const bar = document.getElementById('progress-' + p.id);
  if (!bar) return;
  bar.value = p.finished && p.finished.state === 'succeeded' ? 1 : p.fraction_done;
  const t = document.getElementById('progress-text-' + p.id);
  if (t) t.textContent = `${Math.round(bar.value * 100)} % · ${p.phase} · round ${p.round} · ${mib(p.bytes_sent)} sent · ${mib(p.rate_bytes_per_s)}/s`;
}

function renderJobs(o) {
  const jobs = o.jobs.map((j) => el('div', { class: 'job', 'data-job': j.id },
    el('div', {}, el('b', {}, `#${j.id} ${j.kind}`), ' ', j.node_id ? 'of ' + nodeName(j.node_id) + ' ' : '', badge(j.status),
      ' ', el('span', { class: 'muted' }, 'started ' + ago(j.created_at) + (j.reason ? ' · ' + j.reason : '')),
      j.kind === 'drain' && j.status === 'running'
        ? el('span', { class: 'admin' }, ' ', actionButton('Abort', { action: 'abort-drain', title: 'Abort drain job ' + j.id + '?',
          body: 'Queued moves are dropped.', run: () => api('POST', `/api/nodes/${j.node_id}/abort-drain`) }, 'danger'))
        : null,
      j.kind === 'drain' && j.status !== 'running'
        ? el('span', { class: 'admin' }, ' ', actionButton('Resume node', { action: 'resume', title: 'Return ' + nodeName(j.node_id) + ' to service?',
          body: 'With failback, its drained VMs move back.', run: () => api('POST', `/api/nodes/${j.node_id}/resume`, { failback: true }) }))
        : null),
    el('ol', { class: 'timeline' }, j.moves.map((m) => el('li', { class: 'st-' + m.status },
      el('b', {}, m.vm), ` ${nodeName(m.from_node_id)} → ${nodeName(m.to_node_id)} · ${m.kind} · wave ${m.wave} · `, badge(m.status),
      m.reason ? el('span', { class: 'muted' }, ' ' + m.reason) : null)))));
  document.getElementById('jobs-list').replaceChildren(...(jobs.length ? jobs : [el('p', { class: 'muted' }, 'no jobs yet')]));
}

function renderLocks(o) {
  const rows = o.locks.map((l) => el('tr', { 'data-disk': l.disk },
    el('td', {}, l.disk), el('td', {}, l.mode), el('td', {}, l.holders.map(nodeName).join(', ')), el('td', {}, l.token)));
  document.querySelector('#locks-table tbody').replaceChildren(...(rows.length ? rows : [el('tr', {}, el('td', { colSpan: 4, class: 'muted' }, 'no disk is locked'))]));
}

function renderEvents(o) {
  document.getElementById('events-list').replaceChildren(...o.events.map((e) => el('li', { value: e.seq },
    (e.at ? new Date(e.at).toLocaleTimeString() : '—'), ' ', el('b', {}, e.kind), ' ', e.node_id ? nodeName(e.node_id) + ': ' : '', e.message)));
}

function render(o) {
  overview = o;
  renderStatus(o);
  renderNodes(o);
  renderVms(o);
  renderMigrations(o);
  renderJobs(o);
  renderLocks(o);
  renderEvents(o);
}

// ---- tabs, stream, start ----------------------------------------------------------

function showTab() {
  const tab = (location.hash || '#overview').slice(1);
  for (const s of document.querySelectorAll('section.tab')) s.hidden = s.id !== tab;
  for (const a of document.querySelectorAll('#tabs a')) a.classList.toggle('active', a.dataset.tab === tab);
}

function connect() {
  const live = document.getElementById('live');
  const es = new EventSource('/api/stream');
  es.onopen = () => { live.textContent = 'live'; live.className = 'badge st-live'; };
  es.addEventListener('overview', (e) => { render(JSON.parse(e.data)); showProblem(''); });
  es.addEventListener('progress', (e) => onProgress(JSON.parse(e.data)));
  es.addEventListener('problem', (e) => showProblem(JSON.parse(e.data).error));
  es.onerror = () => { live.textContent = 'reconnecting'; live.className = 'badge st-connecting'; };
}

async function start() {
  window.addEventListener('hashchange', showTab);
  showTab();
  try {
    session = await api('GET', '/api/session');
  } catch (e) {
    showProblem(e.message);
    return;
  }
  document.body.classList.add(session.role);
  document.getElementById('user').textContent = `${session.user} (${session.role}) on ${session.node_name}`;
  document.getElementById('logout').onclick = async () => {
    await api('POST', '/api/logout').catch(() => {});
    location.reload();
  };
  connect();
}

start();
