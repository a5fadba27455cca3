// Memory over time, drawn as plain SVG (no library, no CDN: the hub works offline).
// Stacked areas: weights, prompt cache, KV reserved; lines: MLX active memory and the budget.
// A second chart: each model's decode tokens/s, from the requests that finished in each sample.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const SPAN_S = 3600;
const chart = { samples: [] };
const SERIES = [
  { key: "weights_bytes", label: "weights", color: "#4f7cff" },
  { key: "prompt_cache_bytes", label: "prompt cache", color: "#a77bff" },
  { key: "kv_reserved_bytes", label: "KV reserved", color: "#f59e4b" },
];
const PALETTE = ["#6ee7a0", "#7aa2ff", "#f5c451", "#ff6b6b", "#a77bff", "#4fd1c5", "#f59e4b", "#e879f9"];

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function sizeLabel(bytes) {
  if (bytes >= 1e9) return `${(bytes / 1e9).toFixed(1)} GB`;
  if (bytes >= 1e6) return `${(bytes / 1e6).toFixed(0)} MB`;
  return `${(bytes / 1e3).toFixed(0)} kB`;
}

function niceMax(value) {
  if (value <= 0) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

// The time the charts span: the last hour, or less while the hub is younger (at least 5 min).
function span() {
  const first = chart.samples.length ? chart.samples[0].t : Date.now() / 1000;
  return Math.min(SPAN_S, Math.max(300, Date.now() / 1000 - first));
}

// Axes, grid and time labels; returns the x and y scales.
function frame(root, width, height, top, format) {
  const pad = { left: 64, right: 12, top: 10, bottom: 22 };
  const now = Date.now() / 1000;
  const seconds = span();
  const x = (t) => pad.left + ((t - (now - seconds)) / seconds) * (width - pad.left - pad.right);
  const y = (v) => height - pad.bottom - (v / top) * (height - pad.top - pad.bottom);
  for (let i = 0; i <= 4; i += 1) {
    const value = (top * i) / 4;
    root.append(svg("line", { x1: pad.left, x2: width - pad.right, y1: y(value), y2: y(value), class: "grid" }));
    root.append(svg("text", { x: pad.left - 6, y: y(value) + 4, class: "axis", "text-anchor": "end" }, format(value)));
  }
  for (let i = 4; i >= 0; i -= 1) {
    const back = (seconds * i) / 4;
    const label = i ? `-${back >= 120 ? `${Math.round(back / 60)} min` : `${Math.round(back)} s`}` : "now";
    root.append(svg("text", { x: x(now - back), y: height - 6, class: "axis", "text-anchor": "middle" }, label));
  }
  return { x, y, now };
}

function path(points) {
  return points.map(([px, py], i) => `${i ? "L" : "M"}${px.toFixed(1)},${py.toFixed(1)}`).join("");
}

function legend(container, items) {
  const el = window.hubDashboard.el;
  container.replaceChildren(...items.map(([label, color, value, dashed]) =>
    el("span", { className: "legend-item" },
      el("span", { className: `swatch${dashed ? " dashed" : ""}`, style: `background:${color}` }), `${label} ${value}`)));
}

function drawMemory() {
  const box = document.getElementById("chart-memory");
  const width = Math.max(320, box.clientWidth || 900);
  const height = 200;
  const samples = chart.samples;
  const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "memory over the last hour" });
  const used = Math.max(1, ...samples.map((s) => Math.max(
    s.weights_bytes + s.prompt_cache_bytes + s.kv_reserved_bytes, s.active_bytes)));
  const budget = Math.max(0, ...samples.map((s) => s.budget_bytes || 0));
  // A budget far above what is used would flatten the chart: it is then named, not drawn.
  const showBudget = budget > 0 && budget <= 3 * used;
  const { x, y } = frame(root, width, height, niceMax(Math.max(used, showBudget ? budget : 0) * 1.05), sizeLabel);
  let base = samples.map(() => 0);
  for (const series of SERIES) {
    const tops = samples.map((s, i) => base[i] + (s[series.key] || 0));
    if (samples.length) {
      const upper = samples.map((s, i) => [x(s.t), y(tops[i])]);
      const lower = samples.map((s, i) => [x(s.t), y(base[i])]).reverse();
      root.append(svg("path", { d: `${path(upper.concat(lower))}Z`, fill: series.color, "fill-opacity": 0.55, class: `area ${series.key}` }));
    }
    base = tops;
  }
  if (samples.length) {
    root.append(svg("path", { d: path(samples.map((s) => [x(s.t), y(s.active_bytes)])), class: "line active", stroke: "#6ee7a0" }));
    const budgeted = showBudget ? samples.filter((s) => s.budget_bytes) : [];
    if (budgeted.length) root.append(svg("path", { d: path(budgeted.map((s) => [x(s.t), y(s.budget_bytes)])), class: "line budget", stroke: "#f5c451" }));
  }
  box.replaceChildren(root);
  const last = samples[samples.length - 1] || {};
  legend(document.getElementById("legend-memory"), [
    ...SERIES.map((s) => [s.label, s.color, sizeLabel(last[s.key] || 0), false]),
    ["MLX active", "#6ee7a0", sizeLabel(last.active_bytes || 0), false],
    ["budget", "#f5c451", last.budget_bytes ? sizeLabel(last.budget_bytes) + (showBudget ? "" : " (above the chart)") : "none", true],
  ]);
}

function drawSpeed() {
  const box = document.getElementById("chart-speed");
  const width = Math.max(320, box.clientWidth || 900);
  const height = 150;
  const names = [...new Set(chart.samples.flatMap((s) => Object.keys(s.models || {})))].sort();
  const speeds = (name) => chart.samples
    .filter((s) => s.models && s.models[name] && s.models[name].tokens_per_s)
    .map((s) => [s.t, s.models[name].tokens_per_s]);
  const all = names.flatMap((n) => speeds(n).map(([, v]) => v));
  const root = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "decode tokens per second" });
  const { x, y } = frame(root, width, height, niceMax(Math.max(1, ...all) * 1.05), (v) => `${v.toFixed(0)} t/s`);
  const items = [];
  names.forEach((name, i) => {
    const points = speeds(name);
    const color = PALETTE[i % PALETTE.length];
    if (!points.length) return;
    root.append(svg("path", { d: path(points.map(([t, v]) => [x(t), y(v)])), class: "line speed", stroke: color, "data-model": name }));
    for (const [t, v] of points) root.append(svg("circle", { cx: x(t), cy: y(v), r: 2.5, fill: color }));
    items.push([name, color, `${points[points.length - 1][1].toFixed(1)} tok/s`, false]);
  });
  box.replaceChildren(root);
  legend(document.getElementById("legend-speed"), items.length ? items : [["no finished requests in the last hour", "transparent", "", false]]);
}

function drawCharts() {
  const cutoff = Date.now() / 1000 - SPAN_S;
  chart.samples = chart.samples.filter((s) => s.t >= cutoff);
  drawMemory();
  drawSpeed();
}

async function loadHistory() {
  try {
    const response = await fetch("/hub/history", { headers: window.hubLive.authHeaders({ Accept: "application/json" }) });
    if (!response.ok) return;
    chart.samples = (await response.json()).samples;
    drawCharts();
  } catch (_) { /* offline: drawn again when the next sample arrives */ }
}

function startCharts() {
  window.hubLive.live.memoryListeners.push((sample) => {
    chart.samples.push(sample);
    drawCharts();
  });
  loadHistory();
  // Without the event stream, the history is fetched again each minute.
  setInterval(() => { if (!window.hubLive.live.connected) loadHistory(); }, 60000);
  window.addEventListener("resize", drawCharts);
}

window.hubChart = chart;
document.addEventListener("DOMContentLoaded", startCharts);
