// The dashboard's playground: chat with any configured model through the controller's /v1,
// streamed, with its load state, time to first token and tokens/s. It sends the API key the
// page already holds (asked once, kept in this tab's sessionStorage only).
"use strict";

const playground = { messages: [], abort: null, model: "" };

function pgUi() { return window.hubDashboard; }
function pg(id) { return document.getElementById(id); }

function modelRow(name) {
  const status = pgUi().state.status;
  return status ? status.models.find((m) => m.id === name) : undefined;
}

function describeState(row) {
  if (!row) return "";
  const m = row.metadata;
  if (m.memory_state === "loaded") return "loaded";
  if (m.memory_state === "loading") return "loading weights…";
  if (m.memory_state === "failed") return `failed to load: ${m.memory_last_error || "see its log"}`;
  if (m.process_state !== "running") {
    return m.jit_enabled ? "not started (JIT: starts and loads on the first message)" : "not started: press Start first";
  }
  return m.jit_enabled ? "unloaded (JIT: loads on the first message)" : "unloaded: press Load first";
}

function updateModels(status) {
  const select = pg("pg-model");
  const names = status.models.map((m) => m.id);
  if (Array.from(select.options).map((o) => o.value).join("\n") !== names.join("\n")) {
    const current = select.value;
    select.replaceChildren(...names.map((name) => pgUi().el("option", { value: name }, name)));
    if (names.includes(current)) select.value = current;
  }
  showState();
}

function showState() {
  const row = modelRow(pg("pg-model").value);
  const text = describeState(row);
  const node = pg("pg-state");
  node.textContent = text;
  node.className = `small state-${row ? row.metadata.memory_state : ""}`;
}

function bubble(role, text) {
  const node = pgUi().el("div", { className: `pg-msg pg-${role}` },
    pgUi().el("div", { className: "pg-role" }, role), pgUi().el("div", { className: "pg-text" }, text));
  pg("pg-log").append(node);
  pg("pg-log").scrollTop = pg("pg-log").scrollHeight;
  return node.querySelector(".pg-text");
}

function showStats(started, first, ended, usage, chunks) {
  const parts = [];
  if (first !== null) parts.push(`TTFT ${((first - started) / 1000).toFixed(2)} s`);
  const tokens = usage && usage.completion_tokens !== undefined ? usage.completion_tokens : chunks;
  if (first !== null && ended > first && tokens > 1) parts.push(`${((tokens - 1) / ((ended - first) / 1000)).toFixed(1)} tokens/s`);
  parts.push(`${tokens} tokens`);
  if (usage && usage.prompt_tokens !== undefined) {
    const cached = usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens;
    parts.push(`prompt ${usage.prompt_tokens}${cached ? ` (${cached} cached)` : ""}`);
  }
  parts.push(`${((ended - started) / 1000).toFixed(2)} s total`);
  pg("pg-stats").textContent = parts.join(" · ");
}

// One streamed chat completion; returns the answer text.
async function streamAnswer(model, target, signal) {
  const body = { model, messages: playground.messages, stream: true, max_tokens: Number(pg("pg-max").value) || 256 };
  const started = performance.now();
  let first = null;
  let usage = null;
  let chunks = 0;
  let text = "";
  const response = await fetch("/v1/chat/completions", {
    method: "POST", signal, body: JSON.stringify(body),
    headers: window.hubLive.authHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
  });
  if (!response.ok) throw new Error(await window.hubLive.errorText(response));
  await window.hubLive.readLines(response, window.hubLive.sseParser((_, data) => {
    if (data === "[DONE]") return;
    let event;
    try { event = JSON.parse(data); } catch (_) { return; }
    if (event.error) throw new Error(event.error.message || "the model failed");
    if (event.usage) usage = event.usage;
    const delta = event.choices && event.choices[0] && event.choices[0].delta;
    const piece = delta ? (delta.content || delta.reasoning_content || "") : "";
    if (!piece) return;
    if (first === null) first = performance.now();
    chunks += 1;
    text += piece;
    target.textContent = text;
    pg("pg-log").scrollTop = pg("pg-log").scrollHeight;
    showStats(started, first, performance.now(), usage, chunks);
  }));
  showStats(started, first, performance.now(), usage, chunks);
  return text;
}

async function send(event) {
  event.preventDefault();
  const input = pg("pg-input");
  const content = input.value.trim();
  const model = pg("pg-model").value;
  if (!content || !model || playground.abort) return;
  if (model !== playground.model) clearChat();
  playground.model = model;
  input.value = "";
  playground.messages.push({ role: "user", content });
  bubble("user", content);
  const target = bubble("assistant", "…");
  target.parentElement.classList.add("pending");
  playground.abort = new AbortController();
  pg("pg-send").disabled = true;
  pg("pg-stop").disabled = false;
  pg("pg-stats").textContent = describeState(modelRow(model)) === "loaded" ? "waiting for the first token…" : "starting the model…";
  try {
    const answer = await streamAnswer(model, target, playground.abort.signal);
    playground.messages.push({ role: "assistant", content: answer });
    if (!answer) target.textContent = "(no text: the model ended its answer at once)";
  } catch (error) {
    playground.messages.pop();
    target.parentElement.classList.add("pg-error");
    target.textContent = error.name === "AbortError" ? `${target.textContent} [stopped]` : error.message;
  } finally {
    target.parentElement.classList.remove("pending");
    playground.abort = null;
    pg("pg-send").disabled = false;
    pg("pg-stop").disabled = true;
  }
}

function clearChat() {
  playground.messages = [];
  pg("pg-log").replaceChildren();
  pg("pg-stats").textContent = "";
}

function startPlayground() {
  pg("pg-form").addEventListener("submit", send);
  pg("pg-stop").addEventListener("click", () => playground.abort && playground.abort.abort());
  pg("pg-clear").addEventListener("click", clearChat);
  pg("pg-model").addEventListener("change", showState);
  pg("pg-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) pg("pg-form").requestSubmit();
  });
  window.hubLive.live.statusListeners.push(updateModels);
}

document.addEventListener("DOMContentLoaded", startPlayground);
