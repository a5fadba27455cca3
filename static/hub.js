// The /hub/ dashboard: polls /hub/status every 5 s and drives the control API.
// Every value from the hub reaches the page through textContent, never as HTML,
// so a model name or an error message cannot inject markup.
"use strict";

const POLL_MS = 5000;
const TRANSITIONS = new Set(["starting", "stopping", "loading", "unloading"]);
const KEY_STORE = "mlx-hub-api-key";
const state = { status: null, pending: new Set(), offline: false, needKey: false, timer: null, budget: null, promptCache: null };

// ---------------------------------------------------------------- helpers

function $(id) { return document.getElementById(id); }

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "className") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function clock(seconds) {
  if (!seconds) return "";
  return new Date(seconds * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

function megabytes(bytes) { return bytes ? `${(bytes / 1e6).toFixed(1)} MB` : "–"; }

function gigabytes(bytes) { return `${(bytes / 1e9).toFixed(1)} GB`; }

function countdown(seconds) {
  const s = Math.max(0, Math.round(seconds));
  const m = Math.floor(s / 60);
  return m ? `${m}m ${String(s % 60).padStart(2, "0")}s` : `${s}s`;
}

async function api(method, path) {
  const headers = { Accept: "application/json" };
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, { method, headers });
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const message = body && body.error && body.error.message ? body.error.message : `HTTP ${response.status}`;
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return body;
}

// ------------------------------------------------------------ feedback

function toast(message, tone = "success") {
  const node = el("div", { className: `toast ${tone}`, role: "status" }, message);
  $("toasts").append(node);
  setTimeout(() => node.remove(), 6000);
}

function flash(message, tone = "success") {
  const banner = $("flash");
  banner.className = `flash ${tone}`;
  banner.textContent = message;
  banner.hidden = false;
}

// -------------------------------------------------------------- actions

async function act(key, method, path, describe) {
  if (state.pending.has(key)) return;
  state.pending.add(key);
  render();
  try {
    const body = await api(method, path);
    const message = describe(body);
    toast(message, "success");
    flash(message, "success");
  } catch (error) {
    toast(error.message, "error");
    flash(error.message, "error");
  } finally {
    state.pending.delete(key);
    await refresh();
  }
}

function modelAction(name, action) {
  return act(`${name}:${action}`, "POST", `/hub/models/${encodeURIComponent(name)}/${action}`,
    (body) => `${body.name}: ${String(body.status).replace(/_/g, " ")}`);
}

function serviceAction(action) {
  return act(`service:${action}`, "POST", `/hub/service/${action}`, (body) => {
    if (body.reload) {
      const r = body.reload;
      const failed = Object.keys(r.failed || {});
      const text = `Reloaded: ${r.started.length} started, ${r.stopped.length} stopped, ${r.unchanged.length} unchanged`;
      return failed.length ? `${text}; did not start: ${failed.map((n) => `${n} (${r.failed[n]})`).join(", ")}` : text;
    }
    const failed = Object.keys(body.failed || {});
    const done = body.models && body.models.length ? `${body.status}: ${body.models.join(", ")}` : `Nothing to ${action}`;
    return failed.length ? `${done}; did not start: ${failed.map((n) => `${n} (${body.failed[n]})`).join(", ")}` : done;
  });
}

// -------------------------------------------------------------- render

function renderSummary(status) {
  const pill = $("hub-pill");
  if (state.offline) {
    pill.className = "pill offline";
    pill.textContent = "OFFLINE";
  } else if (status) {
    pill.className = `pill ${status.status === "ok" ? "ok" : "degraded"}`;
    pill.textContent = String(status.status).toUpperCase();
  }
  if (!status) return;
  const c = status.counts;
  $("count-started").textContent = `${c.started} / ${c.registered} started`;
  $("count-loaded").textContent = `${c.loaded} / ${c.registered} loaded`;
  $("last-updated").textContent = clock(status.timestamp);
  $("openai-url").textContent = `${window.location.origin}/v1`;
  $("anthropic-url").textContent = window.location.origin;

  const mem = status.memory || {};
  const total = mem.system_total_bytes || 0;
  const used = mem.models_bytes || 0;
  const fill = $("membar-fill");
  fill.style.width = total ? `${Math.min(100, (100 * used) / total).toFixed(2)}%` : "0%";
  const budget = $("membar-budget");
  if (mem.budget_bytes && total) {
    budget.hidden = false;
    budget.style.left = `${Math.min(100, (100 * mem.budget_bytes) / total)}%`;
  } else {
    budget.hidden = true;
  }
  const parts = [`models ${megabytes(used)}`];
  if (total) parts.push(`of ${gigabytes(total)} machine memory`);
  if (mem.budget_bytes) parts.push(`budget ${gigabytes(mem.budget_bytes)}`);
  if (mem.active_bytes !== undefined) parts.push(`MLX active ${megabytes(mem.active_bytes)}`);
  if (mem.reserved_bytes) parts.push(`KV reserved ${megabytes(mem.reserved_bytes)}`);
  if (mem.peak_bytes) parts.push(`peak ${megabytes(mem.peak_bytes)}`);
  state.budget = mem.budget_bytes || null;
  const pc = status.prompt_cache;
  state.promptCache = pc && pc.enabled ? pc : null;
  if (state.promptCache) parts.push(`prompt caches on disk ${megabytes(pc.disk_bytes)} of ${gigabytes(pc.cap_bytes)}`);
  $("mem-text").textContent = parts.join(" · ");

  $("groups").replaceChildren(...(status.groups || []).map((g) => {
    const cap = g.max_loaded === null || g.max_loaded === undefined ? "∞" : g.max_loaded;
    const full = g.max_loaded && g.loaded >= g.max_loaded;
    return el("span", { className: `chip${full ? " full" : ""}`, dataset: { group: g.name } },
      `${g.name} ${g.loaded}/${cap} loaded`);
  }));

  renderCrash(status);
  const warnings = status.warnings || [];
  $("warnings").hidden = warnings.length === 0;
  $("warning-list").replaceChildren(...warnings.map((w) => el("li", {}, w)));
}

// The supervisor restarted the hub: say when, why, what it held back, and what hub.log said last.
function renderCrash(status) {
  const crash = status.last_crash;
  $("crash-banner").hidden = !crash;
  if (!crash) return;
  const restarts = status.restarts || 0;
  $("crash-title").textContent =
    `The hub crashed and was restarted (${restarts} restart${restarts === 1 ? "" : "s"} so far).`;
  $("crash-cause").textContent = `Last crash at ${clock(crash.at)}: ${crash.cause}.`;
  const held = Object.entries(crash.held_back || {});
  $("crash-held").textContent = held.length
    ? `Not loaded again: ${held.map(([name, why]) => `${name} (${why})`).join("; ")}`
    : "Every model that was loaded came back.";
  $("crash-log").textContent = (crash.log_tail || []).join("\n");
}

function stateText(value) { return el("span", { className: `state-${value}` }, String(value).toUpperCase()); }

function processCell(m) {
  const parts = [stateText(m.process_state)];
  if (m.process_state === "running") parts.push(` • PID ${m.pid} • PORT ${m.port}`);
  else if (m.process_state === "failed" && m.exit_code !== null && m.exit_code !== undefined) parts.push(` • exit ${m.exit_code}`);
  const cell = el("td", {}, el("div", {}, parts));
  if (m.process_last_error) cell.append(el("div", { className: "err" }, m.process_last_error));
  return cell;
}

function memoryCell(m) {
  if (m.process_state !== "running" && m.memory_state === "unloaded") return el("td", {}, "—");
  const head = [stateText(m.memory_state)];
  if (m.memory_last_transition_at) head.push(` • ${clock(m.memory_last_transition_at)}`);
  const cell = el("td", {}, el("div", {}, head));
  const details = [];
  if (m.memory_state === "loaded") {
    const cache = m.prompt_cache_bytes || 0;
    details.push(`weights ${megabytes(m.memory_bytes - cache)}`);
    if (cache) details.push(`prompt cache ${megabytes(cache)}`);
    details.push(`KV ${((m.kv_reserved_bytes || 0) / 1e6).toFixed(1)} MB reserved`);
    if (state.budget) details.push(`budget ${gigabytes(state.budget)}`);
    if (m.load_seconds !== null && m.load_seconds !== undefined) details.push(`loaded in ${m.load_seconds.toFixed(2)} s`);
  }
  if (m.idle_seconds_left !== null && m.idle_seconds_left !== undefined) details.push(`unloads in ${countdown(m.idle_seconds_left)}`);
  const pc = state.promptCache;
  if (pc && (m.prompt_cache_disk_bytes || m.prompt_cache_hits || m.prompt_cache_misses)) {
    // kept on disk across unloads and restarts, within the hub's one cap
    details.push(`disk cache ${megabytes(m.prompt_cache_disk_bytes)} of ${gigabytes(pc.cap_bytes)} · ${m.prompt_cache_hits || 0} hits`);
  }
  if (details.length) cell.append(el("div", { className: "sub" }, details.join(" · ")));
  if (m.memory_state === "failed" && m.memory_last_error) cell.append(el("div", { className: "err" }, m.memory_last_error));
  for (const r of m.ranks || []) cell.append(rankLine(r));
  return cell;
}

// A sharded model's ranks, one line each under its memory: where it runs, its process, what it holds.
function rankLine(r) {
  const where = r.local ? r.host : `${r.host} (remote)`;
  const memory = r.memory_bytes === null || r.memory_bytes === undefined ? "" : ` · ${megabytes(r.memory_bytes)}`;
  return el("div", { className: "sub rank" }, `rank ${r.rank} · ${where} · PID ${r.pid ?? "—"} · ${r.state}${memory}`);
}

function actionsCell(name, m) {
  const busy = (action) => state.offline || state.pending.has(`${name}:${action}`)
    || TRANSITIONS.has(m.process_state) || TRANSITIONS.has(m.memory_state);
  const running = m.process_state === "running";
  const processAction = running ? "stop" : "start";
  const cell = el("td", { className: "actions" },
    el("div", { className: "group-label" }, "PROCESS"),
    el("button", {
      type: "button", dataset: { model: name, action: processAction }, disabled: busy(processAction),
      onclick: () => modelAction(name, processAction),
    }, running ? "Stop" : "Start"));
  if (running) {
    const loaded = m.memory_state === "loaded";
    const memoryAction = loaded ? "unload" : "load";
    cell.append(
      el("div", { className: "group-label" }, "MEMORY"),
      el("button", {
        type: "button", dataset: { model: name, action: memoryAction }, disabled: busy(memoryAction),
        onclick: () => modelAction(name, memoryAction),
      }, loaded ? "Unload" : "Load"));
  }
  return cell;
}

function renderModels(status) {
  const rows = (status ? status.models : []).map((row) => {
    const m = row.metadata;
    const name = el("td", { className: "name" }, row.id);
    if (m.in_flight) name.append(el("span", { className: "badge", title: "requests in flight" }, `${m.in_flight} in flight`));
    if (m.waiting) name.append(el("span", { className: "badge", title: "requests waiting" }, `${m.waiting} waiting`));
    const unload = m.auto_unload_minutes ? `${m.auto_unload_minutes} min` : "—";
    return el("tr", { dataset: { model: row.id } },
      name, processCell(m), memoryCell(m), el("td", {}, unload), el("td", {}, m.model_type || "—"),
      el("td", {}, m.group || "—"), el("td", {}, m.default ? "✓" : "—"),
      el("td", { className: "model-path" }, m.model_path), actionsCell(row.id, m));
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "9", className: "muted" }, "No models registered.")));
  $("model-rows").replaceChildren(...rows);
}

function render() {
  renderSummary(state.status);
  renderModels(state.status);
  for (const id of ["btn-start", "btn-reload", "btn-stop"]) {
    $(id).disabled = state.offline || state.pending.has(`service:${id.slice(4)}`);
  }
}

// ------------------------------------------------------------- polling

async function refresh() {
  try {
    state.status = await api("GET", "/hub/status");
    if (state.offline) flash("Controller is back.", "success");
    state.offline = false;
    state.needKey = false;
  } catch (error) {
    if (error.status === 401) {
      if (!state.needKey) flash(sessionStorage.getItem(KEY_STORE) ? "That API key was refused." : "This hub needs an API key.", "warning");
      sessionStorage.removeItem(KEY_STORE);
      state.needKey = true;
    } else {
      if (!state.offline) flash(`Controller not answering (${error.message}); retrying every ${POLL_MS / 1000} s.`, "error");
      state.offline = true;
    }
  }
  $("key-form").hidden = !state.needKey;
  render();
}

function useKey(event) {
  event.preventDefault();
  const input = $("key-input");
  sessionStorage.setItem(KEY_STORE, input.value.trim());
  input.value = "";
  state.needKey = false;
  refresh();
}

function start() {
  $("key-form").addEventListener("submit", useKey);
  $("btn-refresh").addEventListener("click", () => refresh());
  $("btn-start").addEventListener("click", () => serviceAction("start"));
  $("btn-reload").addEventListener("click", () => serviceAction("reload"));
  $("btn-stop").addEventListener("click", () => serviceAction("stop"));
  refresh();
  state.timer = setInterval(refresh, POLL_MS);
}

// ------------------------------------------------- live updates (live.js)

// A status document pushed by /hub/events, shown as a poll's answer would be.
function applyStatus(status) {
  state.status = status;
  if (state.offline) flash("Controller is back.", "success");
  state.offline = false;
  state.needKey = false;
  $("key-form").hidden = true;
  render();
}

// While events arrive, polling only backs them up; without them it is the 5 s poll again.
function setPolling(ms) {
  clearInterval(state.timer);
  state.timer = setInterval(refresh, ms);
}

window.hubDashboard = { state, applyStatus, setPolling, el, toast, keyStore: KEY_STORE, pollMs: POLL_MS };

document.addEventListener("DOMContentLoaded", start);
