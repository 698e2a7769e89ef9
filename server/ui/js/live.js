// Live: throughput, time to first token and inter-token latency per adapter, from /metrics every
// few seconds: each point is the change of a counter (or a histogram's sum and count) over the
// last interval, the same arithmetic as the Grafana dashboard's rate() panels.

import { describe, metricsText } from "./api.js";
import { $, lineChart, status } from "./dom.js";

const EVERY_MS = 3000;
const KEEP = 40;            // points per series on screen
let timer = null;
let previous = null;        // {t, values} of the last scrape
let started = null;         // seconds on the x axis count from the first scrape
const history = { throughput: {}, ttft: {}, itl: {} };

// Prometheus text format -> {"name{adapter}": value}, summed over the other labels (versions).
export function parse(text) {
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const adapter = (m[2] || "").match(/(?:^|,)adapter="((?:[^"\\]|\\.)*)"/);
    const key = `${m[1]}|${adapter ? adapter[1] : ""}`;
    out[key] = (out[key] || 0) + Number(m[3]);
  }
  return out;
}

function delta(now, before, name, adapter) {
  const k = `${name}|${adapter}`;
  return (now[k] || 0) - (before[k] || 0);
}

function push(kind, adapter, x, y) {
  const s = (history[kind][adapter] = history[kind][adapter] || []);
  s.push([x, y]);
  if (s.length > KEEP) s.shift();
}

function draw() {
  const series = (kind) => Object.entries(history[kind]).map(([name, points]) => ({ name, points }));
  lineChart($("#live-throughput"), series("throughput"), { xLabel: "seconds", yLabel: "tok/s" });
  lineChart($("#live-ttft"), series("ttft"), { xLabel: "seconds", yLabel: "ms" });
  lineChart($("#live-itl"), series("itl"), { xLabel: "seconds", yLabel: "ms" });
}

async function scrape() {
  let values;
  try { values = parse(await metricsText()); } catch (e) {
    return status($("#live-status"), `/metrics: ${describe(e)}`, true);
  }
  const now = performance.now() / 1000;
  if (started === null) started = now;
  const t = now - started;
  if (previous) {
    const dt = t - previous.t;
    const adapters = new Set(Object.keys(values).filter((k) => k.startsWith("loraplex_generation_tokens_total|"))
      .map((k) => k.split("|")[1]).filter(Boolean));
    for (const a of adapters) {
      push("throughput", a, t, delta(values, previous.values, "loraplex_generation_tokens_total", a) / dt);
      for (const [kind, name] of [["ttft", "loraplex_time_to_first_token_seconds"],
                                  ["itl", "loraplex_inter_token_latency_seconds"]]) {
        const n = delta(values, previous.values, `${name}_count`, a);
        if (n > 0) push(kind, a, t, (1000 * delta(values, previous.values, `${name}_sum`, a)) / n);
      }
    }
    status($("#live-status"), `${adapters.size} adapters seen · updated ${new Date().toLocaleTimeString()}`);
    draw();
  }
  previous = { t, values };
}

export function show() {
  if (!timer) {
    scrape();
    timer = setInterval(scrape, EVERY_MS);
  }
}

export function hide() {
  clearInterval(timer);
  timer = null;
  previous = null;
}

export function init() { draw(); }
