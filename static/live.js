// Live parts of the /hub/ dashboard: the /hub/events stream (with polling as the fallback),
// the activity table (/hub/requests) and the log panel (/hub/logs). Streams are read with
// fetch, not EventSource, so they carry the API key. Hub values reach the page as text only.
"use strict";

const live = {
  connected: false,
  requests: [],          // newest first, as shown
  requestFilter: "",
  oldestId: null,
  logAbort: null,
  logLines: [],
  statusListeners: [],   // playground.js and the log panel follow the models' states
  memoryListeners: [],
};
const MAX_REQUEST_ROWS = 500;
const MAX_LOG_LINES = 3000;
const LIVE_POLL_MS = 30000;

function hubUi() { return window.hubDashboard; }
function byId(id) { return document.getElementById(id); }
function sleep(ms) { return new Promise((resolve) => setTimeout(resolve, ms)); }

function authHeaders(extra = {}) {
  const headers = { ...extra };
  const key = sessionStorage.getItem(hubUi().keyStore);
  if (key) headers.Authorization = `Bearer ${key}`;
  return headers;
}

async function errorText(response) {
  try {
    const body = await response.json();
    const error = body.error || (body.detail && body.detail.error);
    if (error && error.message) return error.message;
  } catch (_) { /* not JSON */ }
  return `HTTP ${response.status}`;
}

// Read a streamed answer line by line until it ends (or `signal` aborts it).
async function readLines(response, onLine) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let at;
    while ((at = buffer.indexOf("\n")) >= 0) {
      onLine(buffer.slice(0, at).replace(/\r$/, ""));
      buffer = buffer.slice(at + 1);
    }
  }
  if (buffer) onLine(buffer);
}

// Server-sent events from a fetch answer: onEvent(kind, data) per event ("message" when unnamed).
function sseParser(onEvent) {
  let kind = "message";
  let data = [];
  return (line) => {
    if (line === "") {
      if (data.length) onEvent(kind, data.join("\n"));
      kind = "message";
      data = [];
    } else if (line.startsWith("event:")) {
      kind = line.slice(6).trim();
    } else if (line.startsWith("data:")) {
      data.push(line.slice(5).replace(/^ /, ""));
    }
  };
}

// ------------------------------------------------------------------ events

function setLiveMode(connected) {
  live.connected = connected;
  const mode = byId("live-mode");
  mode.textContent = connected ? "live (server events)" : `polling every ${hubUi().pollMs / 1000} s`;
  mode.className = `small ${connected ? "live-on" : "live-off"}`;
  hubUi().setPolling(connected ? LIVE_POLL_MS : hubUi().pollMs);
}

function onHubEvent(kind, text) {
  let data;
  try { data = JSON.parse(text); } catch (_) { return; }
  if (kind === "status") {
    if (!live.connected) setLiveMode(true);
    hubUi().applyStatus(data);
    notifyStatus();
  } else if (kind === "request") {
    addRequest(data);
  } else if (kind === "memory") {
    for (const listener of live.memoryListeners) listener(data);
  } else if (kind === "resync") {
    loadRequests();
  }
}

async function followEvents() {
  let pause = 1000;
  for (;;) {
    try {
      const response = await fetch("/hub/events", { headers: authHeaders({ Accept: "text/event-stream" }) });
      if (!response.ok) throw new Error(await errorText(response));
      pause = 1000;
      await readLines(response, sseParser(onHubEvent));
    } catch (_) { /* the controller went away, or wants a key: polling takes over */ }
    if (live.connected || byId("live-mode").className.indexOf("live-off") < 0) setLiveMode(false);
    await sleep(pause);
    pause = Math.min(pause * 2, 15000);
  }
}

// ---------------------------------------------------------------- activity

function seconds(value) { return value === null || value === undefined ? "–" : `${value.toFixed(2)} s`; }
function count(value) { return value === null || value === undefined ? "–" : String(value); }

function requestRow(r) {
  const el = hubUi().el;
  const time = new Date(r.ts * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  const prompt = r.cached_tokens ? `${count(r.prompt_tokens)} (${r.cached_tokens} cached)` : count(r.prompt_tokens);
  const notes = [r.error, r.disconnected ? "client went away" : null, r.stream ? "stream" : null].filter(Boolean);
  return el("tr", { dataset: { request: String(r.id ?? ""), requestModel: r.model }, className: r.status >= 400 ? "failed" : "" },
    el("td", {}, time), el("td", { className: "name" }, r.model), el("td", {}, r.api),
    el("td", { className: "mono-small" }, `${r.via === "v1" ? "/v1 → " : ""}${r.route}`),
    el("td", { className: r.status >= 400 ? "err-text" : "ok-text" }, String(r.status)),
    el("td", { className: "num" }, prompt), el("td", { className: "num" }, count(r.completion_tokens)),
    el("td", { className: "num" }, seconds(r.wait_s)), el("td", { className: "num" }, seconds(r.ttft_s)),
    el("td", { className: "num" }, r.tokens_per_s === null || r.tokens_per_s === undefined ? "–" : r.tokens_per_s.toFixed(1)),
    el("td", { className: "num" }, seconds(r.total_s)), el("td", { className: "muted" }, notes.join(", ")));
}

function renderRequests() {
  const rows = live.requests.map(requestRow);
  if (!rows.length) rows.push(hubUi().el("tr", {}, hubUi().el("td", { colspan: "12", className: "muted" }, "No requests logged yet.")));
  byId("request-rows").replaceChildren(...rows);
  byId("request-count").textContent = `${live.requests.length} shown, newest first`;
}

function addRequest(r) {
  if (live.requestFilter && r.model !== live.requestFilter) return;
  live.requests.unshift(r);
  if (live.requests.length > MAX_REQUEST_ROWS) live.requests.length = MAX_REQUEST_ROWS;
  byId("request-rows").prepend(requestRow(r));
  const empty = byId("request-rows").querySelector("td[colspan]");
  if (empty) empty.parentElement.remove();
  while (byId("request-rows").children.length > MAX_REQUEST_ROWS) byId("request-rows").lastElementChild.remove();
  byId("request-count").textContent = `${live.requests.length} shown, newest first`;
}

async function loadRequests(more = false) {
  const params = new URLSearchParams({ limit: "100" });
  if (live.requestFilter) params.set("model", live.requestFilter);
  if (more && live.oldestId !== null) params.set("before", String(live.oldestId));
  try {
    const response = await fetch(`/hub/requests?${params}`, { headers: authHeaders({ Accept: "application/json" }) });
    if (!response.ok) return;
    const body = await response.json();
    live.requests = more ? live.requests.concat(body.data) : body.data;
    if (live.requests.length > MAX_REQUEST_ROWS) live.requests.length = MAX_REQUEST_ROWS;
    live.oldestId = body.data.length ? body.data[body.data.length - 1].id : live.oldestId;
    byId("request-more").disabled = body.data.length < 100 || live.requests.length >= MAX_REQUEST_ROWS;
    renderRequests();
  } catch (_) { /* offline: the summary says so */ }
}

// -------------------------------------------------------------------- logs

function showLogLines() {
  const filter = byId("log-filter").value.trim().toLowerCase();
  const el = hubUi().el;
  const shown = live.logLines.filter((line) => !filter || line.toLowerCase().includes(filter));
  const box = byId("log-lines");
  box.replaceChildren(...shown.map((line) => el("div", { className: "log-line" }, line)));
  byId("log-count").textContent = filter ? `${shown.length} of ${live.logLines.length} lines match` : `${live.logLines.length} lines`;
  if (byId("log-follow").checked) box.scrollTop = box.scrollHeight;
}

function addLogLine(line) {
  live.logLines.push(line);
  if (live.logLines.length > MAX_LOG_LINES) live.logLines.splice(0, live.logLines.length - MAX_LOG_LINES);
  const filter = byId("log-filter").value.trim().toLowerCase();
  if (filter && !line.toLowerCase().includes(filter)) return;
  const box = byId("log-lines");
  box.append(hubUi().el("div", { className: "log-line" }, line));
  while (box.children.length > MAX_LOG_LINES) box.firstElementChild.remove();
  if (byId("log-follow").checked) box.scrollTop = box.scrollHeight;
}

async function openLog() {
  if (live.logAbort) live.logAbort.abort();
  const abort = new AbortController();
  live.logAbort = abort;
  live.logLines = [];
  showLogLines();
  const model = byId("log-model").value;
  const follow = byId("log-follow").checked;
  const params = new URLSearchParams({ lines: "300" });
  if (model) params.set("model", model);
  if (follow) params.set("follow", "1");
  byId("log-state").textContent = follow ? "following" : "";
  try {
    const response = await fetch(`/hub/logs?${params}`, { headers: authHeaders(), signal: abort.signal });
    if (!response.ok) {
      byId("log-state").textContent = await errorText(response);
      return;
    }
    await readLines(response, addLogLine);
    if (live.logAbort === abort) byId("log-state").textContent = follow ? "stream ended" : "";
  } catch (error) {
    if (error.name !== "AbortError") byId("log-state").textContent = `log not available (${error.message})`;
  }
}

// The log choices: the hub's log, and each model that writes a file of its own.
function updateLogChoices(status) {
  const select = byId("log-model");
  const wanted = [["", "hub log"]].concat(
    status.models.filter((m) => m.metadata.log_file).map((m) => [m.id, `${m.id} log`]));
  const have = Array.from(select.options).map((o) => o.value);
  if (have.join("\n") === wanted.map((w) => w[0]).join("\n")) return;
  const current = select.value;
  select.replaceChildren(...wanted.map(([value, label]) => hubUi().el("option", { value }, label)));
  select.value = wanted.some((w) => w[0] === current) ? current : "";
}

function showModelLog(name) {
  const select = byId("log-model");
  if (!Array.from(select.options).some((o) => o.value === name)) return;
  select.value = name;
  openLog();
  byId("logs").scrollIntoView({ behavior: "smooth", block: "start" });
}

// ------------------------------------------------------------------- start

let lastStatus = null;

// Hand a new status document (pushed or polled) to the parts that follow the models.
function notifyStatus() {
  const status = hubUi().state.status;
  if (!status || status === lastStatus) return;
  const first = lastStatus === null;
  lastStatus = status;
  for (const listener of live.statusListeners) listener(status);
  if (first) openLog();
}

function updateRequestChoices(status) {
  const select = byId("request-model");
  const wanted = [""].concat(status.models.map((m) => m.id));
  if (Array.from(select.options).map((o) => o.value).join("\n") === wanted.join("\n")) return;
  const current = select.value;
  select.replaceChildren(...wanted.map((name) => hubUi().el("option", { value: name }, name || "all models")));
  select.value = wanted.includes(current) ? current : "";
}

async function startLive() {
  live.statusListeners.push(updateLogChoices, updateRequestChoices);
  byId("request-model").addEventListener("change", (event) => {
    live.requestFilter = event.target.value;
    live.oldestId = null;
    loadRequests();
  });
  byId("request-more").addEventListener("click", () => loadRequests(true));
  byId("log-model").addEventListener("change", openLog);
  byId("log-follow").addEventListener("change", openLog);
  byId("log-filter").addEventListener("input", showLogLines);
  byId("log-clear").addEventListener("click", () => { live.logLines = []; showLogLines(); });
  byId("model-rows").addEventListener("click", (event) => {
    const cell = event.target.closest("td.name");
    if (cell) showModelLog(cell.closest("tr").dataset.model);
  });
  setInterval(notifyStatus, 500);  // a poll's answer reaches the listeners too
  loadRequests();
  followEvents();
}

window.hubLive = { live, authHeaders, readLines, sseParser, errorText };
document.addEventListener("DOMContentLoaded", startLive);
