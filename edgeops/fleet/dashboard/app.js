// edgeops fleet dashboard: vanilla JS, no framework. Polls the JSON API every 2 s and redraws.
// Rule: every string from the API reaches the page through textContent or setAttribute, never innerHTML.
'use strict';

(function () {
  const POLL_MS = 2000;
  const COLORS = {
    succeeded: '#2e9e5b', in_progress: '#3b82f6', failed: '#dc2626', queued: '#9ca3af',
    p50: '#3b82f6', p95: '#f59e0b', p99: '#dc2626', psi: '#7c3aed', warn: '#f59e0b', alert: '#dc2626',
    online: '#2e9e5b', offline: '#9ca3af',
  };
  const VERSION_COLORS = ['#3b82f6', '#2e9e5b', '#f59e0b', '#7c3aed', '#0891b2', '#db2777', '#65a30d', '#9ca3af'];
  const FAILURES = ['failed', 'timed_out', 'rolled_back'];
  const PSI_WARN = 0.1;
  const PSI_ALERT = 0.25;

  // ---- DOM helpers -------------------------------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined) node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  function byId(id) { return document.getElementById(id); }
  function setText(id, value) { const n = byId(id); if (n) n.textContent = value; }
  function fill(id, nodes) { const n = byId(id); if (n) n.replaceChildren(...nodes); }
  function emptyRow(cols, text) { return el('tr', { class: 'empty' }, el('td', { colspan: cols }, text)); }
  function link(path, id, text, testid) {
    return el('a', { href: path + encodeURIComponent(id), 'data-testid': testid }, text === undefined ? id : text);
  }

  // ---- formatting ----------------------------------------------------------------------------------------------
  function dash(v) { return v === null || v === undefined || v === '' ? '–' : v; }
  function fmtTime(s) { return s === null || s === undefined ? '–' : new Date(s * 1000).toLocaleString(); }
  function fmtClock(s) { return new Date(s * 1000).toLocaleTimeString(); }
  function fmtNum(v, digits) {
    if (v === null || v === undefined || Number.isNaN(Number(v))) return '–';
    return Number(v).toFixed(digits);
  }
  function fmtBytes(n) {
    if (n === null || n === undefined) return '–';
    const units = ['B', 'KiB', 'MiB', 'GiB'];
    let v = Number(n); let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return (i === 0 ? String(v) : v.toFixed(1)) + ' ' + units[i];
  }
  function fmtPct(f) { return f === null || f === undefined ? '–' : (Math.round(f * 1000) / 10) + '%'; }
  function fmtValue(v) {
    if (v === null || v === undefined) return '–';
    if (Array.isArray(v)) return v.every((x) => typeof x !== 'object' || x === null) ? v.join(', ') : JSON.stringify(v);
    if (typeof v === 'object') return JSON.stringify(v);
    if (typeof v === 'number' && !Number.isInteger(v)) return String(Math.round(v * 1e6) / 1e6);
    return String(v);
  }
  function flatten(obj, prefix, out) {
    for (const [key, value] of Object.entries(obj || {})) {
      const name = prefix ? prefix + '.' + key : key;
      if (value !== null && typeof value === 'object' && !Array.isArray(value)) flatten(value, name, out);
      else out.push([name, fmtValue(value)]);
    }
    return out;
  }
  function kvRows(pairs, testid) {
    return pairs.map(([k, v]) => el('tr', { 'data-testid': testid, 'data-key': k }, el('th', { scope: 'row' }, k), el('td', {}, v)));
  }
  function facts(id, pairs) {
    const nodes = [];
    for (const [label, value, key] of pairs) {
      nodes.push(el('dt', {}, label), el('dd', { 'data-testid': 'fact-' + key }, dash(value)));
    }
    fill(id, nodes);
  }

  // ---- API and polling -----------------------------------------------------------------------------------------
  async function getJSON(url) {
    const res = await fetch(url, { cache: 'no-store', headers: { Accept: 'application/json' } });
    if (!res.ok) {
      let message = res.status + ' ' + res.statusText;
      try { const body = await res.json(); if (body && body.error) message = body.error; } catch (e) { /* not JSON */ }
      const err = new Error(message); err.status = res.status; throw err;
    }
    return res.json();
  }
  function poll(step) {
    const line = byId('status-line');
    async function tick() {
      try {
        await step();
        if (line) { line.textContent = 'updated ' + new Date().toLocaleTimeString(); line.classList.remove('error'); }
      } catch (err) {
        if (line) { line.textContent = 'cannot load: ' + err.message; line.classList.add('error'); }
      }
      setTimeout(tick, POLL_MS);
    }
    tick();
  }

  // ---- charts ----------------------------------------------------------------------------------------------------
  function timeAxis() {
    return { type: 'linear', ticks: { callback: (v) => fmtClock(v), maxTicksLimit: 6 } };
  }
  function makeChart(id, config) {
    const canvas = byId(id);
    config.options = Object.assign({ responsive: true, maintainAspectRatio: false, animation: false }, config.options || {});
    return new Chart(canvas, config);
  }
  function lineSet(label, color, extra) {
    return Object.assign({ label: label, data: [], borderColor: color, backgroundColor: color, borderWidth: 2,
      pointRadius: 1.5, spanGaps: false, tension: 0 }, extra || {});
  }

  // ---- rollouts (overview and release page) ----------------------------------------------------------------
  function failures(counts) { return FAILURES.reduce((n, s) => n + (counts[s] || 0), 0); }
  function phaseBar(p) {
    const c = p.counts;
    const parts = [['succeeded', c.succeeded || 0], ['in_progress', c.in_progress || 0],
      ['failed', failures(c)], ['queued', c.queued || 0]];
    const bar = el('div', { class: 'bar', role: 'img', 'data-testid': 'phase-bar',
      'aria-label': parts.map(([k, n]) => k + ' ' + n).join(', ') });
    for (const [key, n] of parts) {
      if (!n || !p.devices) continue;
      const seg = el('div', { class: 'seg ' + key, 'data-status': key, title: key + ': ' + n });
      seg.style.width = (100 * n / p.devices) + '%';
      bar.append(seg);
    }
    const label = 'phase ' + (p.phase + 1) + (p.fraction === null ? ' (late joiners)' : ' · ' + fmtPct(p.fraction)) +
      ' · ' + p.devices + ' device' + (p.devices === 1 ? '' : 's');
    return el('div', { class: 'phase', 'data-phase': p.phase, 'data-testid': 'phase' }, el('span', { class: 'phase-label' }, label), bar);
  }
  function count(label, value, testid) {
    return el('span', { class: 'count' }, label + ' ', el('strong', { 'data-testid': testid }, String(value)));
  }
  function rolloutCard(r) {
    const c = r.counts;
    const head = el('header', {},
      el('strong', { 'data-testid': 'rollout-id' }, r.id), ' ',
      el('span', { class: 'badge status-' + r.status, 'data-testid': 'rollout-status' }, r.status), ' ',
      r.kind === 'rollback' ? 'rollback of ' : 'release ', link('/release/', r.release_id, undefined, 'release-link'),
      ' (' + r.version + ') → group ', el('span', { 'data-testid': 'rollout-group' }, r.group),
      ' · phase ' + (Math.min(r.phase, r.phases.length - 1) + 1) + '/' + r.phases.length,
      ' · started ' + fmtTime(r.created_at));
    const counts = el('div', { class: 'counts' },
      count('succeeded', c.succeeded, 'rollout-succeeded'), count('in progress', c.in_progress, 'rollout-in-progress'),
      count('failed', failures(c), 'rollout-failed'), count('queued', c.queued, 'rollout-queued'),
      count('skipped', c.skipped, 'rollout-skipped'), count('devices', r.devices, 'rollout-devices'));
    const card = el('article', { class: 'rollout', 'data-rollout-id': r.id, 'data-testid': 'rollout' }, head, counts,
      ...r.per_phase.map(phaseBar));
    if (r.reason) card.append(el('p', { class: 'reason', 'data-testid': 'rollout-reason' }, r.reason));
    if (r.skipped.length) card.append(el('p', { class: 'skipped' }, 'skipped (other profile): ' + r.skipped.join(', ')));
    return card;
  }
  function renderRollouts(rollouts) {
    fill('rollouts', rollouts.length ? rollouts.map(rolloutCard) : [el('p', { class: 'empty' }, 'No rollouts.')]);
  }

  // ---- overview page -------------------------------------------------------------------------------------------
  function overviewPage() {
    const stateChart = makeChart('chart-state', {
      type: 'doughnut',
      data: { labels: ['online', 'offline'], datasets: [{ label: 'devices', data: [0, 0], backgroundColor: [COLORS.online, COLORS.offline] }] },
      options: { plugins: { legend: { position: 'bottom' } } },
    });
    const versionChart = makeChart('chart-versions', {
      type: 'bar',
      data: { labels: [], datasets: [{ label: 'devices', data: [], backgroundColor: [] }] },
      options: { plugins: { legend: { display: false } }, scales: { y: { beginAtZero: true, ticks: { precision: 0 } } } },
    });
    poll(async () => {
      const [ov, devs, rels] = await Promise.all([getJSON('/api/overview'), getJSON('/api/devices'), getJSON('/api/releases')]);
      const d = ov.devices;
      setText('devices-total', d.total); setText('devices-online', d.online); setText('devices-offline', d.offline);
      setText('alerts-count', ov.alerts.length); setText('releases-count', ov.releases);
      stateChart.data.datasets[0].data = [d.online, d.offline];
      stateChart.update('none');
      const versions = Object.keys(d.by_version);
      versionChart.data.labels = versions;
      versionChart.data.datasets[0].data = versions.map((v) => d.by_version[v]);
      versionChart.data.datasets[0].backgroundColor = versions.map((_, i) => VERSION_COLORS[i % VERSION_COLORS.length]);
      versionChart.update('none');
      renderRollouts(ov.rollouts);
      fill('devices-body', devs.devices.length ? devs.devices.map((x) => el('tr', { 'data-device-id': x.device_id },
        el('td', {}, link('/device/', x.device_id, undefined, 'device-link')),
        el('td', {}, el('span', { class: 'badge ' + (x.online ? 'online' : 'offline') }, x.online ? 'online' : 'offline')),
        el('td', {}, dash(x.active_version)), el('td', {}, dash(x.profile)), el('td', {}, x.all_groups.join(', ')),
        el('td', {}, dash(x.health)), el('td', {}, fmtTime(x.last_seen)))) : [emptyRow(7, 'No devices yet.')]);
      fill('alerts-body', ov.alerts.length ? ov.alerts.map((a) => el('tr', { 'data-testid': 'alert', 'data-kind': a.kind },
        el('td', {}, fmtTime(a.opened_at)), el('td', {}, link('/device/', a.device_id, undefined, 'alert-device')),
        el('td', {}, a.kind), el('td', {}, el('span', { class: 'badge level-' + a.level }, a.level)),
        el('td', {}, dash(a.version)), el('td', {}, a.detail))) : [emptyRow(6, 'No open alerts.')]);
      fill('releases-body', rels.releases.length ? rels.releases.map((r) => el('tr', { 'data-release-id': r.release_id },
        el('td', {}, link('/release/', r.release_id, undefined, 'release-link')), el('td', {}, r.version),
        el('td', {}, r.profile), el('td', {}, fmtTime(r.created_at)), el('td', {}, fmtBytes(r.size)),
        el('td', {}, el('span', { class: 'badge approval-' + r.approval }, r.approval)))) : [emptyRow(6, 'No releases.')]);
    });
  }

  // ---- device page ---------------------------------------------------------------------------------------------
  function eventDetails(body) {
    const skip = new Set(['device', 'ts', 'seq', 'type']);
    return Object.entries(body).filter(([k]) => !skip.has(k)).slice(0, 8)
      .map(([k, v]) => k + '=' + fmtValue(v)).join(' · ');
  }
  function devicePage() {
    const deviceId = decodeURIComponent(location.pathname.split('/')[2] || '');
    setText('device-id', deviceId);
    document.title = 'edgeops fleet · ' + deviceId;
    const latency = makeChart('chart-latency', {
      type: 'line',
      data: { datasets: [lineSet('p50', COLORS.p50), lineSet('p95', COLORS.p95), lineSet('p99', COLORS.p99)] },
      options: { scales: { x: timeAxis(), y: { beginAtZero: true, title: { display: true, text: 'ms' } } } },
    });
    const drift = makeChart('chart-drift', {
      type: 'line',
      data: { datasets: [lineSet('PSI (max)', COLORS.psi),
        lineSet('warn', COLORS.warn, { borderDash: [6, 4], pointRadius: 0, borderWidth: 1 }),
        lineSet('alert', COLORS.alert, { borderDash: [6, 4], pointRadius: 0, borderWidth: 1 })] },
      options: { scales: { x: timeAxis(), y: { beginAtZero: true, suggestedMax: 0.3 } } },
    });
    poll(async () => {
      const v = await getJSON('/api/devices/' + encodeURIComponent(deviceId));
      const d = v.device;
      facts('device-facts', [
        ['state', d.online ? 'online' : 'offline' + (d.offline_reason ? ' (' + d.offline_reason + ')' : ''), 'state'],
        ['model version', d.active_version, 'version'], ['previous version', d.previous_version, 'previous'],
        ['profile', d.profile, 'profile'], ['groups', d.all_groups.join(', '), 'groups'], ['health', d.health, 'health'],
        ['agent', d.agent_version, 'agent'], ['last seen', fmtTime(d.last_seen), 'last-seen']]);
      const t = v.latest;
      fill('latest', t ? [['p50 ms', fmtNum(t.p50_ms, 2), 'p50'], ['p95 ms', fmtNum(t.p95_ms, 2), 'p95'],
        ['p99 ms', fmtNum(t.p99_ms, 2), 'p99'], ['requests', dash(t.requests), 'requests'], ['errors', dash(t.errors), 'errors'],
        ['drift PSI', fmtNum(t.drift_psi_max, 3) + (t.drift_level ? ' (' + t.drift_level + ')' : ''), 'psi'],
        ['CPU %', fmtNum(t.cpu_percent, 1), 'cpu'], ['RSS MB', fmtNum(t.rss_mb, 1), 'rss'],
        ['model', dash(t.model_version), 'model']].map(([label, value, key]) => el('div', { class: 'tile' },
        el('span', { class: 'tile-label' }, label), el('span', { class: 'tile-value', 'data-testid': 'latest-' + key }, value)))
        : [el('p', { class: 'empty' }, 'No telemetry yet.')]);
      setText('window-label', '(last ' + Math.round(v.window_s / 60) + ' min, ' + v.series.length + ' points)');
      const s = v.series;
      latency.data.datasets[0].data = s.map((p) => ({ x: p.ts, y: p.p50_ms }));
      latency.data.datasets[1].data = s.map((p) => ({ x: p.ts, y: p.p95_ms }));
      latency.data.datasets[2].data = s.map((p) => ({ x: p.ts, y: p.p99_ms }));
      latency.update('none');
      drift.data.datasets[0].data = s.map((p) => ({ x: p.ts, y: p.drift_psi_max }));
      const ends = s.length ? [s[0].ts, s[s.length - 1].ts] : [];
      drift.data.datasets[1].data = ends.map((x) => ({ x: x, y: PSI_WARN }));
      drift.data.datasets[2].data = ends.map((x) => ({ x: x, y: PSI_ALERT }));
      drift.update('none');
      fill('slots-body', v.slots.length ? v.slots.map((x) => el('tr', { 'data-testid': 'slot-change', 'data-type': x.type },
        el('td', {}, fmtTime(x.received_at)), el('td', {}, x.type === 'rollback' ? (x.automatic ? 'automatic rollback' : 'rollback') : x.type),
        el('td', {}, dash(x.version)), el('td', {}, dash(x.previous)), el('td', {}, dash(x.reason)))) : [emptyRow(5, 'No slot changes recorded.')]);
      fill('device-alerts-body', v.alerts.length ? v.alerts.map((a) => el('tr', { 'data-testid': 'device-alert', 'data-kind': a.kind },
        el('td', {}, fmtTime(a.opened_at)), el('td', {}, a.closed_at === null ? 'open' : fmtTime(a.closed_at)),
        el('td', {}, a.kind), el('td', {}, el('span', { class: 'badge level-' + a.level }, a.level)),
        el('td', {}, dash(a.version)), el('td', {}, a.detail))) : [emptyRow(6, 'No alerts.')]);
      fill('events-body', v.events.length ? v.events.map((e) => el('tr', { 'data-testid': 'event', 'data-type': e.type },
        el('td', {}, fmtTime(e.received_at)), el('td', {}, e.seq), el('td', {}, e.type), el('td', { class: 'details' }, eventDetails(e.body))))
        : [emptyRow(4, 'No events.')]);
    });
  }

  // ---- release page --------------------------------------------------------------------------------------------
  const LINEAGE_SECTIONS = [['source', 'Source model'], ['data', 'Data'], ['toolchain', 'Toolchain']];
  function lineageBlock(title, key, pairs) {
    return el('div', { class: 'lineage-block' }, el('h3', {}, title),
      el('table', { class: 'grid kv', 'data-testid': 'lineage-' + key }, el('tbody', {}, ...(pairs.length ? kvRows(pairs, 'lineage-row') : [emptyRow(2, 'not recorded')]))));
  }
  function releasePage() {
    const releaseId = decodeURIComponent(location.pathname.split('/')[2] || '');
    setText('release-id', releaseId);
    document.title = 'edgeops fleet · ' + releaseId;
    poll(async () => {
      const v = await getJSON('/api/releases/' + encodeURIComponent(releaseId));
      const r = v.release;
      facts('release-facts', [['name', r.name, 'name'], ['version', r.version, 'version'], ['profile', r.profile, 'profile'],
        ['created', fmtTime(r.created_at), 'created'], ['target size', fmtBytes(r.size), 'size'],
        ['target sha256', r.target_sha256, 'sha256'], ['approval', r.approval, 'approval'],
        ['approved by', r.approved_by, 'approved-by'], ['approved at', r.approved_at === null ? null : fmtTime(r.approved_at), 'approved-at']]);
      const lineage = r.lineage || {};
      const blocks = LINEAGE_SECTIONS.map(([key, title]) => lineageBlock(title, key, flatten(lineage[key], '', [])));
      const known = new Set(['gate', ...LINEAGE_SECTIONS.map(([k]) => k)]);
      const rest = {};
      for (const [k, value] of Object.entries(lineage)) if (!known.has(k)) rest[k] = value;
      blocks.push(lineageBlock('Build', 'build', flatten(rest, '', [])));
      fill('lineage', blocks);
      const figures = flatten(lineage.gate, '', []);
      fill('gate-figures-body', figures.length ? kvRows(figures, 'gate-figure') : [emptyRow(2, 'No build report figures recorded.')]);
      fill('payloads-body', r.payloads.length ? r.payloads.map((p) => el('tr', { 'data-testid': 'payload', 'data-kind': p.kind },
        el('td', { class: 'mono' }, dash(p.id)), el('td', {}, dash(p.kind)), el('td', {}, dash(p.base_version)),
        el('td', {}, dash(p.codec)), el('td', {}, fmtBytes(p.size)))) : [emptyRow(5, 'No payloads.')]);
      renderRollouts(v.rollouts);
    });
  }

  const pages = { overview: overviewPage, device: devicePage, release: releasePage };
  const page = pages[document.body.dataset.page];
  if (page) page();
})();
