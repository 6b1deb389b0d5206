// The LegoDiffusion page: a playground (GET /v1/workflows, POST /v1/generations, progress from
// GET /v1/generations/{id}/events or, failing that, by polling GET /v1/generations/{id}) and a
// cluster view (GET /v1/cluster, polled; the browser keeps the last minutes for sparklines).
// With an API key (a gateway with api_keys), every call carries it as a bearer token; an
// EventSource cannot send one, so progress is then polled. Plain JS, no build step.
"use strict";

const CLUSTER_POLL_MS = 1500;
const STATE_POLL_MS = 250;
const HISTORY_MS = 5 * 60 * 1000;
const DONE = new Set(["succeeded", "failed", "cancelled"]);
const KEY_STORAGE = "legodiffusion.api-key";

const $ = (selector) => document.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child !== undefined && child !== null) node.append(child);
  }
  return node;
}

function apiKey() {
  return $("#api-key").value.trim();
}

function authorized(options = {}) {
  const key = apiKey();
  if (!key) return options;
  return { ...options, headers: { ...(options.headers || {}), Authorization: `Bearer ${key}` } };
}

async function fetchJson(url, options = {}) {
  const response = await fetch(url, authorized(options));
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  return { ok: response.ok, status: response.status, headers: response.headers, body };
}

// ---------------------------------------------------------------- playground: the form

const playground = {
  workflows: {},
  run: null, // {id, stream, timer, ended}
  key: null, // the API key the workflows were last loaded with
};

async function loadWorkflows() {
  playground.key = apiKey();
  const { ok, status, body } = await fetchJson("/v1/workflows");
  if (!ok) {
    showErrors((body && body.error) || { message: `could not list the workflows: HTTP ${status}` });
    return;
  }
  const select = $("#workflow");
  const selected = select.value;
  select.replaceChildren();
  playground.workflows = {};
  for (const spec of body.workflows) {
    playground.workflows[spec.name] = spec;
    select.append(el("option", { value: spec.name }, spec.name));
  }
  if (playground.workflows[selected]) select.value = selected;
  else if (playground.workflows.txt2img) select.value = "txt2img";
  renderParams();
  $("#generate").disabled = false;
}

function limitsHint(param) {
  const parts = [];
  if (param.minimum !== undefined && param.maximum !== undefined) {
    parts.push(`${param.minimum} to ${param.maximum}`);
  } else if (param.minimum !== undefined) {
    parts.push(`at least ${param.minimum}`);
  } else if (param.maximum !== undefined) {
    parts.push(`at most ${param.maximum}`);
  }
  if (param.multiple_of) parts.push(`multiple of ${param.multiple_of}`);
  if (param.max_length) parts.push(`up to ${param.max_length} characters`);
  if (param.max_bytes) parts.push(`up to ${Math.round(param.max_bytes / 1024)} KiB`);
  return parts.join(", ");
}

function placeholder(param) {
  if (param.default !== undefined && param.default !== "") return `default ${param.default}`;
  if (param.random) return "random";
  if (param.default_from) return "the model's size";
  return "";
}

function paramInput(name, param) {
  const id = `param-${name}`;
  const common = { id, name, "aria-describedby": `error-${name}` };
  if (param.type === "string") {
    return el("textarea", {
      ...common, rows: name === "prompt" ? 3 : 2, maxlength: param.max_length,
      placeholder: placeholder(param),
    });
  }
  if (param.type === "integer" || param.type === "number") {
    return el("input", {
      ...common, type: "number", min: param.minimum, max: param.maximum,
      step: param.multiple_of || (param.type === "integer" ? 1 : "any"),
      placeholder: placeholder(param),
    });
  }
  if (param.type === "image") {
    return el("input", { ...common, type: "file", accept: "image/png,image/jpeg,image/webp" });
  }
  if (param.type === "boolean") {
    return el("input", { ...common, type: "checkbox", checked: param.default === true });
  }
  if (param.type === "loras") {
    return el("input", { ...common, type: "text", placeholder: '[{"name": "style", "scale": 0.8}]' });
  }
  return el("input", { ...common, type: "text", placeholder: placeholder(param) });
}

// The form for the selected workflow's parameters; what was typed into a parameter of the
// same name and type stays.
function renderParams() {
  const spec = playground.workflows[$("#workflow").value];
  $("#workflow-description").textContent = spec ? spec.description || "" : "";
  const container = $("#params");
  const typed = {};
  for (const input of container.querySelectorAll("textarea, input:not([type=file])")) {
    typed[input.name] = { type: input.type, value: input.value, checked: input.checked };
  }
  container.replaceChildren();
  if (!spec) return;
  for (const [name, param] of Object.entries(spec.params || {})) {
    const required = param.required ? el("span", { class: "required", title: "required" }, "*") : null;
    const input = paramInput(name, param);
    const before = typed[name];
    if (before && before.type === input.type) {
      input.value = before.value;
      input.checked = before.checked;
    }
    container.append(el("div", { class: "field", dataset: { field: name } },
      el("label", { for: `param-${name}` }, name, required),
      input,
      el("p", { class: "hint" }, limitsHint(param)),
      el("p", { class: "field-error", id: `error-${name}` })));
  }
  clearErrors();
}

function readFileBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function requestBody() {
  const workflow = $("#workflow").value;
  const body = { workflow };
  for (const [name, param] of Object.entries(playground.workflows[workflow].params || {})) {
    const input = document.getElementById(`param-${name}`);
    if (param.type === "image") {
      if (input.files.length) body[name] = await readFileBase64(input.files[0]);
    } else if (param.type === "boolean") {
      body[name] = input.checked;
    } else if (param.type === "loras" && input.value !== "") {
      // JSON, as the API takes it; what does not parse goes as typed, for the API to name
      try { body[name] = JSON.parse(input.value); } catch { body[name] = input.value; }
    } else if (input.value !== "") {
      // Empty means "the workflow's default"; a number the browser cannot read goes as typed,
      // so the API names the field and its limit.
      const numeric = param.type === "integer" || param.type === "number";
      body[name] = numeric && !Number.isNaN(Number(input.value)) ? Number(input.value) : input.value;
    }
  }
  return body;
}

function clearErrors() {
  const list = $("#errors");
  list.replaceChildren();
  list.hidden = true;
  for (const node of document.querySelectorAll(".field-error")) node.textContent = "";
  for (const node of document.querySelectorAll(".field.invalid")) node.classList.remove("invalid");
}

function limitText(limit) {
  return typeof limit === "object" ? JSON.stringify(limit) : String(limit);
}

// An API error ({code, message, field, limit, errors: [...]}): each bad field's message goes
// under its input, and every message into the list below the form.
function showErrors(error) {
  clearErrors();
  const list = $("#errors");
  const items = error.errors && error.errors.length ? error.errors : [error];
  for (const item of items) {
    const limit = item.limit !== undefined ? ` (limit: ${limitText(item.limit)})` : "";
    list.append(el("li", { dataset: { field: item.field || "", code: item.code || "" } },
      `${item.message}${limit}`));
    const fieldError = item.field && document.getElementById(`error-${item.field}`);
    if (fieldError) {
      fieldError.textContent = `${item.message}${limit}`;
      fieldError.closest(".field").classList.add("invalid");
    }
  }
  list.hidden = false;
}

// ---------------------------------------------------------------- playground: one generation

function setStatus(status, text) {
  const node = $("#status");
  node.dataset.status = status;
  node.textContent = text;
}

function showProgress(progress) {
  const bar = $("#progress");
  bar.dataset.updates = String(Number(bar.dataset.updates || 0) + 1);
  bar.max = Math.max(progress.total, 1);
  bar.value = progress.step;
  $("#progress-text").textContent = `${progress.node}: step ${progress.step} of ${progress.total}`;
}

// "queued, 3 ahead in denoiser:..., about 2.4 s left": where a request stands while it waits
function standing(state) {
  const parts = [state.status];
  for (const [pool, ahead] of Object.entries(state.queue_position || {})) {
    if (state.status === "queued" || ahead > 0) parts.push(`${ahead} ahead in ${pool}`);
  }
  if (typeof state.eta_s === "number") parts.push(`about ${state.eta_s.toFixed(1)} s left`);
  return parts.join(", ");
}

function showState(state) {
  if (state.progress) showProgress(state.progress);
  if (!DONE.has(state.status)) setStatus(state.status, `${state.id}: ${standing(state)}`);
}

function describe(state) {
  const params = state.params || {};
  const lines = [];
  const size = params.width && params.height ? `${params.width}x${params.height}, ` : "";
  lines.push(`${state.workflow}, ${size}${params.steps ?? "?"} steps, seed ${params.seed ?? "?"}`);
  if (state.started_at && state.finished_at) {
    lines.push(`${((state.finished_at - state.created_at) * 1000).toFixed(0)} ms from submission`);
  }
  const timings = (state.timings || []).map(
    (t) => `${t.node} ${(t.queue_ms + t.run_ms + (t.held_ms || 0) + t.io_ms).toFixed(0)} ms (batch ${t.batch})`);
  if (timings.length) lines.push(timings.join(", "));
  for (const warning of state.warnings || []) lines.push(`warning: ${warning}`);
  if (state.meta && state.meta.nsfw) lines.push("flagged by the safety checker");
  return lines;
}

function finish(run, state) {
  if (run.ended) return;
  run.ended = true;
  stopTracking(run);
  $("#cancel").disabled = true;
  $("#generate").disabled = false;
  if (state.status === "succeeded") {
    const image = $("#result-image");
    image.onload = () => {
      if (playground.run !== run) return;
      $("#result").hidden = false;
      $("#progress").value = $("#progress").max;
      $("#progress-text").textContent = "";
      setStatus("succeeded", `${state.id}: succeeded`);
    };
    image.onerror = () => setStatus("failed", `${state.id}: the image could not be loaded`);
    image.dataset.id = state.id;
    // fetched, not linked: an <img> cannot send the API key
    fetch(state.links.image, authorized()).then(async (response) => {
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      if (image.src.startsWith("blob:")) URL.revokeObjectURL(image.src);
      image.src = URL.createObjectURL(await response.blob());
    }).catch((error) => setStatus("failed", `${state.id}: the image could not be loaded: ${error}`));
    $("#result-meta").replaceChildren(...describe(state).map((line) => el("div", {}, line)));
  } else if (state.status === "failed") {
    setStatus("failed", `${state.id}: failed`);
    showErrors(state.error || { message: "failed" });
  } else {
    setStatus(state.status, `${state.id}: ${state.status}`);
  }
}

function stopTracking(run) {
  if (run.stream) run.stream.close();
  run.stream = null;
  clearTimeout(run.timer);
}

// Polling, for when the event stream is not there (or broke off): the state carries the
// latest progress while the request runs.
function poll(run) {
  if (run.ended || playground.run !== run) return;
  run.transport = "polling";
  $("#status").dataset.transport = "polling";
  fetchJson(`/v1/generations/${encodeURIComponent(run.id)}`).then(({ ok, body }) => {
    if (run.ended || playground.run !== run) return;
    if (ok) {
      showState(body);
      if (DONE.has(body.status)) return finish(run, body);
    }
    run.timer = setTimeout(() => poll(run), STATE_POLL_MS);
  }, () => {
    run.timer = setTimeout(() => poll(run), STATE_POLL_MS);
  });
}

function track(state) {
  const run = { id: state.id, stream: null, timer: null, ended: false, transport: "events" };
  playground.run = run;
  showState(state);
  if (DONE.has(state.status)) return finish(run, state);
  if (apiKey()) return poll(run);
  $("#status").dataset.transport = "events";
  const stream = new EventSource(`/v1/generations/${encodeURIComponent(state.id)}/events`);
  run.stream = stream;
  stream.addEventListener("state", (event) => {
    const current = JSON.parse(event.data);
    showState(current);
    if (DONE.has(current.status)) finish(run, current);
  });
  stream.addEventListener("progress", (event) => showProgress(JSON.parse(event.data)));
  // Not there (404 before the endpoint exists), or cut off: poll instead of reconnecting.
  stream.onerror = () => {
    if (run.ended) return;
    stream.close();
    run.stream = null;
    poll(run);
  };
}

async function submit(event) {
  event.preventDefault();
  clearErrors();
  if (playground.run) stopTracking(playground.run);
  playground.run = null;
  $("#generate").disabled = true;
  $("#result").hidden = true;
  $("#progress").value = 0;
  $("#progress").dataset.updates = "0";
  $("#progress-text").textContent = "";
  setStatus("submitting", "submitting…");
  let response;
  try {
    response = await fetchJson("/v1/generations", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(await requestBody()),
    });
  } catch (error) {
    response = { ok: false, status: 0, body: { error: { message: String(error) } } };
  }
  if (!response.ok) {
    $("#generate").disabled = false;
    const error = (response.body && response.body.error) || { message: `HTTP ${response.status}` };
    const retry = response.headers && response.headers.get("Retry-After");
    if (retry) error.message += ` (retry after ${retry} s)`;
    setStatus("rejected", `rejected: HTTP ${response.status}`);
    showErrors(error);
    return;
  }
  $("#cancel").disabled = false;
  track(response.body);
}

async function cancel() {
  const run = playground.run;
  if (!run || run.ended) return;
  const { ok, body } = await fetchJson(`/v1/generations/${encodeURIComponent(run.id)}`,
    { method: "DELETE" });
  if (!ok && body && body.error) showErrors(body.error);
}

// ---------------------------------------------------------------- cluster view

const cluster = {
  history: {}, // pool -> [{t, lag, done, p99}]
};

function fmt(value, digits = 1) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function remember(pool, t, view) {
  const points = (cluster.history[pool] ||= []);
  points.push({ t, lag: view.lag, done: view.completion_rate, p99: view.p99_ms });
  while (points.length && points[0].t < t - HISTORY_MS) points.shift();
}

const SVG_NS = "http://www.w3.org/2000/svg";

// A sparkline over the history window (time on x, 0..max on y), as inline SVG.
function sparkline(points, key, now) {
  const width = 72;
  const height = 24;
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const present = points.filter((p) => p[key] !== null && p[key] !== undefined);
  const max = Math.max(0, ...present.map((p) => p[key]));
  const title = document.createElementNS(SVG_NS, "title");
  const seconds = points.length ? Math.round((now - points[0].t) / 1000) : 0;
  title.textContent = `max ${fmt(max)} over the last ${seconds} s`;
  svg.append(title);
  if (present.length) {
    // time runs over what the browser has seen so far, up to the whole window
    const span = Math.max(now - present[0].t, CLUSTER_POLL_MS);
    const x = (t) => width - 2 - ((now - t) / span) * (width - 4);
    const y = (v) => height - 2 - (max > 0 ? (v / max) * (height - 4) : 0);
    const line = document.createElementNS(SVG_NS, "polyline");
    line.setAttribute("points",
      present.map((p) => `${x(p.t).toFixed(1)},${y(p[key]).toFixed(1)}`).join(" "));
    const last = present[present.length - 1];
    const dot = document.createElementNS(SVG_NS, "circle"); // the latest value, even if alone
    dot.setAttribute("cx", x(last.t).toFixed(1));
    dot.setAttribute("cy", y(last[key]).toFixed(1));
    dot.setAttribute("r", "2");
    svg.append(line, dot);
  }
  return el("td", { class: "spark-cell", dataset: { series: key } }, svg);
}

function poolRows(body, now) {
  const workflowsOf = {};
  for (const [workflow, pools] of Object.entries(body.workflows || {})) {
    for (const pool of pools) (workflowsOf[pool] ||= []).push(workflow);
  }
  const pools = [...new Set([...Object.keys(body.models), ...Object.keys(workflowsOf)])].sort();
  return pools.map((pool) => {
    const view = body.models[pool] || {
      kind: "", model: "", replicas: 0, ready: 0, starting: 0, draining: 0, lag: 0,
    };
    remember(pool, now, view);
    const replicas = [`${view.ready} ready`];
    if (view.starting) replicas.push(`${view.starting} starting`);
    if (view.draining) replicas.push(`${view.draining} draining`);
    if (view.failed) replicas.push(`${view.failed} failed`);
    const points = cluster.history[pool];
    return el("tr", { dataset: { pool } },
      el("td", { class: "pool", title: pool },
        el("div", { class: "pool-kind" }, view.kind || pool),
        el("div", { class: "hint" }, view.model || ""),
        el("div", { class: "hint" }, (workflowsOf[pool] || []).join(", ")),
        // a pool whose model cannot load: why, and when it is tried again
        view.failed ? el("div", { class: "pool-error" },
          `cannot load (${view.failures} attempts; next in ${fmt(view.retry_in_s, 0)} s): `
          + view.error) : null),
      el("td", { class: "num", dataset: { col: "replicas" } },
        replicas.map((line) => el("div", {}, line))),
      el("td", { class: "num", dataset: { col: "lag" } }, String(view.lag)),
      el("td", { class: "num" }, `${fmt(view.arrival_rate)} / ${fmt(view.completion_rate)}`),
      el("td", { class: "num" }, `${fmt(view.p50_ms, 0)} / ${fmt(view.p99_ms, 0)}`),
      sparkline(points, "lag", now),
      sparkline(points, "done", now),
      sparkline(points, "p99", now));
  });
}

function deviceCards(body) {
  const byDevice = {};
  for (const replica of body.replicas || []) (byDevice[replica.device] ||= []).push(replica);
  const devices = Object.keys(byDevice).sort();
  if (!devices.length) return [el("p", { class: "hint" }, "no replica reports yet")];
  return devices.map((device) => el("div", { class: "device", dataset: { device } },
    el("h4", {}, device, el("span", { class: "hint" }, ` ${byDevice[device].length} replicas`)),
    el("ul", {}, byDevice[device].map((r) => el("li",
      { dataset: { pool: r.pool, replica: r.replica }, title: `${r.replica} (${r.pool})` },
      el("span", { class: `state state-${r.state}` }, r.state), ` ${r.kind} `,
      el("span", { class: "hint" }, `${r.model}, ${r.held} held`))))));
}

async function refreshCluster() {
  try {
    const { ok, status, body } = await fetchJson("/v1/cluster");
    if (!ok) {
      const reason = body && body.error ? body.error.message : `HTTP ${status}`;
      throw new Error(`GET /v1/cluster: ${reason}`);
    }
    const now = Date.now();
    $("#pools tbody").replaceChildren(...poolRows(body, now));
    $("#devices").replaceChildren(...deviceCards(body));
    $("#cluster-updated").textContent = `updated ${new Date(now).toLocaleTimeString()}`;
    $("#cluster-error").hidden = true;
  } catch (error) {
    $("#cluster-error").textContent = String(error.message || error);
    $("#cluster-error").hidden = false;
  } finally {
    setTimeout(refreshCluster, CLUSTER_POLL_MS);
  }
}

// ---------------------------------------------------------------- start

for (const node of document.querySelectorAll(".history-minutes")) {
  node.textContent = String(HISTORY_MS / 60000);
}
$("#api-key").value = localStorage.getItem(KEY_STORAGE) || "";
$("#key-form").addEventListener("submit", (event) => event.preventDefault());
$("#api-key").addEventListener("change", () => {
  if (apiKey() === playground.key) return;
  localStorage.setItem(KEY_STORAGE, apiKey());
  clearErrors();
  loadWorkflows();
});
$("#workflow").addEventListener("change", renderParams);
$("#generate-form").addEventListener("submit", submit);
$("#cancel").addEventListener("click", cancel);
loadWorkflows();
refreshCluster();
