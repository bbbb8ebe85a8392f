// ACE-Step Studio: a form, a queue and a history over the REST API of the server that serves it.
// Everything the server returns reaches the page through textContent or a checked URL, never as markup.
(function () {
  'use strict';

  const KEY_STORE = 'acestep.studio.apiKey';
  const HISTORY_STORE = 'acestep.studio.history';
  const HISTORY_MAX = 50;
  const POLL_MS = 1000;
  const MAX_ADAPTERS = 4;  // stacked per request (engine/request.py)
  const API_BASE = new URL('..', window.location.href);  // the page lives at <api>/studio/

  const $ = (sel, root) => (root || document).querySelector(sel);
  const form = $('#generate-form');
  const state = {
    apiKey: localStorage.getItem(KEY_STORE) || '',
    history: loadHistory(),      // [{id, caption, taskType, created, state, error}]
    cards: new Map(),            // task id -> {li, rendered}
    source: null,                // {kind: 'file', file, name} | {kind: 'result', file: the result's file URL, name}
    adapters: [],                // GET /v1/adapters' entries: {name, type, rank, fits_models, ...}
    polling: false,
  };

  // --- HTTP -----------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  function apiUrl(path) { return new URL(path.replace(/^\//, ''), API_BASE); }

  // A URL from the server (result files): same-origin relative or absolute http(s) only.
  function safeUrl(value) {
    if (typeof value !== 'string' || !value) return null;
    const url = value.startsWith('/') ? apiUrl(value) : new URL(value, API_BASE);
    return (url.protocol === 'http:' || url.protocol === 'https:') ? url.href : null;
  }

  function detailText(body, response) {
    if (body && typeof body === 'object') {
      const d = body.detail !== undefined ? body.detail : body.error;
      if (Array.isArray(d)) return d.map(e => (e && e.msg) ? `${(e.loc || []).join('.')}: ${e.msg}` : JSON.stringify(e)).join('; ');
      if (d !== undefined && d !== null) return String(d);
    }
    return `${response.status} ${response.statusText}`;
  }

  async function api(path, options) {
    const opts = Object.assign({ method: 'GET', headers: {} }, options || {});
    if (state.apiKey) opts.headers.Authorization = 'Bearer ' + state.apiKey;
    if (opts.json !== undefined) {
      opts.headers['Content-Type'] = 'application/json';
      opts.body = JSON.stringify(opts.json);
      delete opts.json;
    }
    let response;
    try {
      response = await fetch(apiUrl(path), opts);
    } catch (err) {
      throw new ApiError(0, `cannot reach the server: ${err.message}`);
    }
    let body = null;
    try { body = await response.json(); } catch (_) { /* not JSON */ }
    if (response.status === 401 || response.status === 403) {
      showAuthProblem(detailText(body, response));
      throw new ApiError(response.status, detailText(body, response));
    }
    if (!response.ok) throw new ApiError(response.status, detailText(body, response));
    if (body && typeof body.code === 'number' && body.code >= 400) throw new ApiError(body.code, detailText(body, response));
    hideAuthProblem();
    return body ? body.data : null;
  }

  function showAuthProblem(detail) {
    const p = $('#auth-message');
    p.textContent = state.apiKey
      ? `The server refused the API key (${detail}). Enter the right key above.`
      : `This server needs an API key (${detail}). Enter it above and press "Save key".`;
    p.hidden = false;
  }
  function hideAuthProblem() { $('#auth-message').hidden = true; }

  // --- server info ----------------------------------------------------------------------------

  async function loadServerInfo() {
    const status = $('#server-status');
    try {
      const health = await api('/health');
      const workers = health.workers_alive;
      status.textContent = `${health.status} · ${workers} worker${workers === 1 ? '' : 's'} · ${health.queue_waiting || 0} waiting`;
      $('#demo-warning').hidden = !health.demo;
    } catch (err) {
      status.textContent = `health: ${err.message}`;
    }
    try {
      const models = await api('/v1/models');
      fillModels(models);
    } catch (_) { /* shown by the auth banner or on submit */ }
    await loadAdapters();
  }

  function fillModels(listing) {
    const select = $('#model-select');
    const current = select.value;
    select.replaceChildren();
    const models = (listing && Array.isArray(listing.models)) ? listing.models : [];
    for (const m of models) {
      const option = document.createElement('option');
      option.value = String(m.name);
      option.textContent = String(m.name) + (m.is_default ? ' (default)' : '');
      if (m.is_default && !current) option.selected = true;
      select.append(option);
    }
    if (current) select.value = current;
    $('#lm-options').hidden = !(listing && listing.lm_model);
  }

  // --- adapters -------------------------------------------------------------------------------

  async function loadAdapters() {
    const note = $('#adapter-note');
    try {
      const listing = await api('/v1/adapters');
      state.adapters = (listing && Array.isArray(listing.adapters)) ? listing.adapters : [];
      const d = (listing && listing.default) || {};
      const names = Array.isArray(d.adapters) ? d.adapters.map(a => String(a && a.name !== undefined ? a.name : a)) : [];
      note.textContent = (d.lora_loaded && d.use_lora && names.length)
        ? `with none picked, the server's default applies: ${names.join(', ')}`
        : (state.adapters.length ? '' : 'no adapters on this server yet: upload one');
    } catch (err) {
      state.adapters = [];
      note.textContent = err.status === 404 ? 'this server has no adapters' : `adapters: ${err.message}`;
    }
    renderAdapterOptions();
  }

  function fitsModel(adapter, model) {
    return !model || (Array.isArray(adapter.fits_models) && adapter.fits_models.map(String).includes(model));
  }

  function adapterLabel(adapter) {
    const fits = Array.isArray(adapter.fits_models) && adapter.fits_models.length ? adapter.fits_models.join(', ') : 'no served model';
    return `${adapter.name} · ${adapter.type || '?'} r${adapter.rank} · fits ${fits}`;
  }

  function adapterRows() { return Array.from(document.querySelectorAll('#adapter-rows .adapter-row')); }

  // Every row's choices; an adapter that does not fit the chosen model is shown but cannot be picked.
  function renderAdapterOptions() {
    const model = $('#model-select').value;
    for (const row of adapterRows()) {
      const select = $('.adapter-pick', row);
      const current = select.value;
      const none = document.createElement('option');
      none.value = '';
      none.textContent = 'no adapter';
      select.replaceChildren(none);
      for (const adapter of state.adapters) {
        const option = document.createElement('option');
        option.value = String(adapter.name);
        option.textContent = adapterLabel(adapter);
        option.disabled = !fitsModel(adapter, model);
        if (option.disabled) option.title = `does not fit ${model}`;
        select.append(option);
      }
      const keep = state.adapters.some(a => String(a.name) === current && fitsModel(a, model));
      select.value = keep ? current : '';
    }
    $('#add-adapter').disabled = adapterRows().length >= MAX_ADAPTERS || !state.adapters.length;
  }

  function addAdapterRow() {
    if (adapterRows().length >= MAX_ADAPTERS) return null;
    const row = $('#adapter-row-template').content.firstElementChild.cloneNode(true);
    $('.adapter-remove', row).addEventListener('click', () => {
      if (adapterRows().length > 1) row.remove(); else $('.adapter-pick', row).value = '';
      renderAdapterOptions();
    });
    $('#adapter-rows').append(row);
    renderAdapterOptions();
    return row;
  }

  // `adapter` / `adapter_scale` as acestep.cpp names them: one name and one scale, or a list of each (stacked).
  function collectAdapters(req) {
    const names = [], scales = [];
    for (const row of adapterRows()) {
      const name = $('.adapter-pick', row).value;
      if (!name) continue;
      const scale = $('.adapter-scale', row).value.trim();
      names.push(name);
      scales.push(scale === '' ? 1 : Number(scale));
    }
    if (!names.length) return;  // the server's default (if it has one) applies
    req.adapter = names.length === 1 ? names[0] : names;
    req.adapter_scale = scales.length === 1 ? scales[0] : scales;
  }

  // A file through an upload ticket (POST /v1/adapters/uploads, PUT: any size on every backend), then
  // POST /v1/adapters, which checks it against the chosen model: its 400 says what does not fit.
  async function uploadAdapter() {
    const error = $('#adapter-error');
    const button = $('#adapter-upload');
    error.textContent = '';
    const file = $('#adapter-file').files[0];
    if (!file) { error.textContent = 'choose a .safetensors file or a .zip of a PEFT folder first'; return; }
    button.disabled = true;
    try {
      const slot = await api('/v1/adapters/uploads', { method: 'POST', json: { filename: file.name } });
      await putUpload(slot, file);
      const body = { key: slot.key };
      const name = $('#adapter-name').value.trim();
      if (name) body.name = name;
      const model = $('#model-select').value;
      if (model) body.model = model;
      const stored = await api('/v1/adapters', { method: 'POST', json: body });
      await loadAdapters();
      const adapter = stored.adapter;
      let row = adapterRows().find(r => !$('.adapter-pick', r).value) || addAdapterRow();
      if (row && fitsModel(adapter, model)) $('.adapter-pick', row).value = String(adapter.name);
      $('#adapter-note').textContent = `${stored.created ? 'uploaded' : 'already uploaded'}: ${adapterLabel(adapter)}`;
      $('#adapter-file').value = '';
      $('#adapter-name').value = '';
    } catch (err) {
      error.textContent = err.status ? `${err.status}: ${err.message}` : err.message;
    } finally {
      button.disabled = false;
    }
  }

  // --- the form -------------------------------------------------------------------------------

  function updateTaskType() {
    const type = $('#task-type').value;
    $('#source').hidden = type === 'text2music';
    for (const label of document.querySelectorAll('#source [data-for]')) {
      label.hidden = !label.dataset.for.split(' ').includes(type);
    }
  }

  function setSource(source) {
    state.source = source;
    $('#source-current').textContent = source ? `using: ${source.name}` : 'none chosen';
    if (source && source.kind === 'result') $('#source-file').value = '';
  }

  const NUMBER_FIELDS = ['audio_duration', 'bpm', 'batch_size', 'inference_steps', 'lm_temperature', 'lm_cfg_scale',
    'lm_top_p', 'repainting_start', 'repainting_end', 'audio_cover_strength'];
  const TEXT_FIELDS = ['prompt', 'lyrics', 'key_scale', 'time_signature', 'vocal_language', 'audio_format', 'model', 'task_type'];

  function collectRequest() {
    const data = new FormData(form);
    const req = {};
    for (const name of TEXT_FIELDS) {
      const v = (data.get(name) || '').toString();
      if (v !== '' || name === 'prompt' || name === 'lyrics') req[name] = v;
    }
    for (const name of NUMBER_FIELDS) {
      const input = form.elements[name];
      if (input.closest('[hidden]')) continue;
      const v = (data.get(name) || '').toString().trim();
      if (v !== '') req[name] = Number(v);
    }
    const seed = (data.get('seed') || '').toString().trim();
    if (seed) req.seed = /^-?\d+$/.test(seed) ? Number(seed) : seed;
    if (!$('#lm-options').hidden) {
      req.thinking = form.elements.thinking.checked;
      req.use_cot_caption = form.elements.use_cot_caption.checked;
    }
    const type = req.task_type;
    if (type === 'lego' || type === 'extract') req.track_name = data.get('track_name');
    if (type === 'complete') {
      req.complete_track_classes = (data.get('complete_track_classes') || '').toString()
        .split(',').map(s => s.trim()).filter(Boolean);
    }
    collectAdapters(req);
    return req;
  }

  // A local file goes through the upload flow (POST /v1/uploads, PUT), so large files work on every backend.
  async function uploadSource(source) {
    const blob = source.file;
    const name = source.name;
    const type = blob.type && blob.type.startsWith('audio/') ? blob.type : 'application/octet-stream';
    const slot = await api('/v1/uploads', { method: 'POST', json: { filename: name, content_type: type, role: 'src_audio' } });
    await putUpload(slot, blob);
    return slot.key;
  }

  // PUT to an upload ticket's URL: the API key goes to this server only, never to S3's presigned URL.
  async function putUpload(slot, blob) {
    const target = slot.upload_url.startsWith('/') ? apiUrl(slot.upload_url) : new URL(slot.upload_url);
    const headers = Object.assign({}, slot.headers || {});
    if (target.origin === window.location.origin && state.apiKey) headers.Authorization = 'Bearer ' + state.apiKey;
    const put = await fetch(target, { method: slot.method || 'PUT', headers, body: blob });
    if (!put.ok) {
      let body = null;
      try { body = await put.json(); } catch (_) { /* S3 answers XML */ }
      throw new ApiError(put.status, `upload failed: ${detailText(body, put)}`);
    }
  }

  async function submit(event) {
    event.preventDefault();
    const error = $('#submit-error');
    error.textContent = '';
    const button = $('#submit');
    button.disabled = true;
    try {
      const req = collectRequest();
      if (req.task_type !== 'text2music') {
        if (!state.source) throw new ApiError(400, `${req.task_type} needs source audio: upload a file or use a result`);
        if (state.source.kind === 'result') req.src_audio_path = state.source.file;  // the server copies its own result
        else req.src_audio_key = await uploadSource(state.source);
      }
      const data = await api('/release_task', { method: 'POST', json: req });
      addTask({ id: String(data.task_id), caption: req.prompt, taskType: req.task_type, created: Date.now(),
                state: 'queued', queuePosition: data.queue_position });
    } catch (err) {
      error.textContent = err.status ? `${err.status}: ${err.message}` : err.message;
    } finally {
      button.disabled = false;
    }
  }

  // --- queue and history ----------------------------------------------------------------------

  function loadHistory() {
    try {
      const items = JSON.parse(localStorage.getItem(HISTORY_STORE) || '[]');
      return Array.isArray(items) ? items.filter(t => t && typeof t.id === 'string') : [];
    } catch (_) { return []; }
  }
  function saveHistory() {
    const keep = state.history.slice(0, HISTORY_MAX).map(t => ({ id: t.id, caption: t.caption, taskType: t.taskType,
      created: t.created, state: t.state, error: t.error }));
    localStorage.setItem(HISTORY_STORE, JSON.stringify(keep));
  }

  function addTask(task) {
    state.history.unshift(task);
    saveHistory();
    renderCard(task);
    poll();
  }

  function renderCard(task) {
    let card = state.cards.get(task.id);
    if (!card) {
      const li = $('#task-template').content.firstElementChild.cloneNode(true);
      li.dataset.taskId = task.id;
      $('.task-title', li).textContent = `${task.taskType && task.taskType !== 'text2music' ? task.taskType + ': ' : ''}${task.caption || '(no caption)'}`;
      $('.task-id', li).textContent = task.id;
      $('.remove', li).addEventListener('click', () => removeTask(task.id));
      $('.cancel', li).addEventListener('click', () => cancelTask(task));
      const list = $('#task-list');
      const after = state.history.indexOf(task);
      list.insertBefore(li, list.children[after] || null);
      card = { li, rendered: false };
      state.cards.set(task.id, card);
    }
    const li = card.li;
    li.dataset.state = task.state;
    $('.badge', li).textContent = task.state;
    $('.bar', li).style.width = `${Math.round(100 * (task.progress || 0))}%`;
    let stage = '';
    if (task.state === 'queued') stage = task.queuePosition ? `queued, position ${task.queuePosition}` : 'queued';
    else if (task.state === 'running') stage = `${task.stage || 'running'} · ${Math.round(100 * (task.progress || 0))}%`;
    $('.stage', li).textContent = stage;
    $('.task-error', li).textContent = (task.state === 'failed' || task.state === 'cancelled') ? (task.error || task.state) : '';
    $('.cancel', li).hidden = !(task.state === 'queued' || task.state === 'running');
  }

  async function cancelTask(task) {
    try {
      await api(`/v1/tasks/${encodeURIComponent(task.id)}/cancel`, { method: 'POST' });
      poll();
    } catch (err) {
      task.error = err.status === 404 && err.message === 'Not Found' ? 'this server does not support cancel' : err.message;
      $('.task-error', state.cards.get(task.id).li).textContent = task.error;
    }
  }

  function removeTask(id) {
    const card = state.cards.get(id);
    if (card) {
      for (const ws of card.players || []) ws.destroy();
      card.li.remove();
    }
    state.cards.delete(id);
    state.history = state.history.filter(t => t.id !== id);
    saveHistory();
  }

  function firstItem(entry) {
    try {
      const items = JSON.parse(entry.result || '[]');
      return Array.isArray(items) ? items : [];
    } catch (_) { return []; }
  }

  function applyEntry(task, entry) {
    const items = firstItem(entry);
    const first = items[0] || {};
    if (entry.status === 1) {
      task.state = 'succeeded';
      task.progress = 1;
    } else if (entry.status === 2) {
      task.state = first.stage === 'cancelled' ? 'cancelled' : 'failed';
      task.error = String(entry.error || first.error || 'the task failed (the server gave no reason)');
    } else {
      const stage = first.stage ? String(first.stage) : '';
      task.state = (stage === '' || stage === 'queued') ? 'queued' : 'running';
      task.stage = stage;
      task.progress = Number(first.progress) || 0;
      task.queuePosition = Number.isInteger(first.queue_position) ? first.queue_position : null;
    }
    renderCard(task);
    const card = state.cards.get(task.id);
    if (task.state === 'succeeded' && !card.rendered) {
      card.rendered = true;
      renderResults(task, card, items);
    }
  }

  // Finished tasks are queried once per page load (their signed audio URLs expire); others every second.
  async function poll() {
    if (state.polling) return;
    state.polling = true;
    try {
      const ids = state.history.filter(t => {
        const card = state.cards.get(t.id);
        return t.state === 'queued' || t.state === 'running' || (t.state === 'succeeded' && !card.rendered) || !card.seen;
      }).map(t => t.id);
      if (!ids.length) return;
      const entries = await api('/query_result', { method: 'POST', json: { task_id_list: ids.slice(0, 200) } });
      for (const entry of entries || []) {
        const task = state.history.find(t => t.id === entry.task_id);
        if (!task) continue;
        state.cards.get(task.id).seen = true;
        applyEntry(task, entry);
      }
      saveHistory();
    } catch (_) {
      // network blips and 401s (the banner says why) are retried on the next tick
    } finally {
      state.polling = false;
    }
  }

  // --- results --------------------------------------------------------------------------------

  function metasText(item) {
    const m = (item && typeof item.metas === 'object' && item.metas) || {};
    const parts = [];
    const add = (label, v) => { if (v !== undefined && v !== null && v !== '' && v !== 'N/A') parts.push(`${label} ${v}`); };
    add('bpm', m.bpm);
    add('key', m.keyscale);
    add('time', m.timesignature);
    add('duration', typeof m.duration === 'number' ? `${Math.round(m.duration * 10) / 10}s` : m.duration);
    add('seed', item.seed !== undefined ? item.seed : item.seed_value);
    add('model', item.dit_model);
    return parts.join(' · ');
  }

  function renderResults(task, card, items) {
    const box = $('.results', card.li);
    box.replaceChildren();
    card.players = [];
    items.forEach((item, index) => {
      const url = safeUrl(item.file);
      if (!url) return;
      const ext = String(item.format || 'mp3').replace(/[^a-z0-9]/gi, '');
      const node = $('#result-template').content.firstElementChild.cloneNode(true);
      const audio = $('audio', node);
      audio.src = url;
      const play = $('.play', node);
      play.addEventListener('click', () => { if (audio.paused) audio.play().catch(() => {}); else audio.pause(); });
      audio.addEventListener('play', () => { play.textContent = 'Pause'; });
      audio.addEventListener('pause', () => { play.textContent = 'Play'; });
      $('.metas', node).textContent = metasText(item);
      const link = $('.download', node);
      link.href = url;
      link.setAttribute('download', `${task.id}_${index}.${ext}`);
      const name = `${(task.caption || 'result').slice(0, 40)} #${index + 1}.${ext}`;
      const source = { kind: 'result', file: String(item.file), name };
      $('.use-source', node).addEventListener('click', () => useAsSource(source, null));
      box.append(node);
      attachWaveform(node, audio, source, card);
    });
  }

  function attachWaveform(node, audio, source, card) {
    if (!window.WaveSurfer) return;  // the <audio> element still plays
    const regions = window.WaveSurfer.Regions.create();
    const ws = window.WaveSurfer.create({ container: $('.waveform', node), media: audio, height: 64,
      waveColor: '#a5b4fc', progressColor: '#4f46e5', plugins: [regions] });
    card.players.push(ws);
    node.wavesurfer = ws;
    regions.enableDragSelection({ color: 'rgba(79, 70, 229, 0.2)' });
    let selected = null;
    const button = $('.repaint-selection', node);
    const label = $('.selection', node);
    const select = (region) => {
      for (const other of regions.getRegions()) if (other !== region) other.remove();
      selected = region;
      button.disabled = false;
      label.textContent = `selected ${region.start.toFixed(2)}–${region.end.toFixed(2)} s`;
    };
    regions.on('region-created', select);
    regions.on('region-updated', select);
    button.addEventListener('click', () => {
      if (selected) useAsSource(source, { start: selected.start, end: selected.end });
    });
  }

  function useAsSource(source, region) {
    setSource(source);
    const type = $('#task-type');
    if (region) {
      type.value = 'repaint';
      form.elements.repainting_start.value = region.start.toFixed(2);
      form.elements.repainting_end.value = region.end.toFixed(2);
    } else if (type.value === 'text2music') {
      type.value = 'cover';
    }
    updateTaskType();
    $('#compose').scrollIntoView({ behavior: 'smooth' });
  }

  // --- start ----------------------------------------------------------------------------------

  function start() {
    $('#api-key').value = state.apiKey;
    $('#settings').addEventListener('submit', (event) => {
      event.preventDefault();
      state.apiKey = $('#api-key').value.trim();
      if (state.apiKey) localStorage.setItem(KEY_STORE, state.apiKey); else localStorage.removeItem(KEY_STORE);
      hideAuthProblem();
      loadServerInfo();
      poll();
    });
    $('#task-type').addEventListener('change', updateTaskType);
    $('#model-select').addEventListener('change', renderAdapterOptions);
    $('#add-adapter').addEventListener('click', addAdapterRow);
    $('#adapter-upload').addEventListener('click', uploadAdapter);
    addAdapterRow();
    $('#source-file').addEventListener('change', (event) => {
      const file = event.target.files[0];
      setSource(file ? { kind: 'file', file, name: file.name } : null);
    });
    $('#clear-history').addEventListener('click', () => {
      for (const t of state.history.slice()) if (!(t.state === 'queued' || t.state === 'running')) removeTask(t.id);
    });
    form.addEventListener('submit', submit);
    updateTaskType();
    for (const task of state.history) renderCard(task);
    loadServerInfo();
    poll();
    setInterval(poll, POLL_MS);
  }

  start();
}());
