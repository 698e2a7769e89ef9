// Compare: one prompt, several models side by side, streamed with the same sampling settings and seed.
// Per column: tokens/s, time to first token, the adapter's version; then where the outputs part.

import { admin, describe, stream, v1 } from "./api.js";
import { $, el, status } from "./dom.js";

let models = [];   // /v1/models ids, base first

export async function refreshModels() {
  const list = await v1("GET", "/v1/models");
  models = list.data.map((m) => m.id);
  $("#model-ids").replaceChildren(...models.map((id) => el("option", { value: id })));
  // Empty columns start as the base and the first adapter.
  document.querySelectorAll(".column-model").forEach((input, i) => {
    if (!input.value && models[i]) input.value = models[i];
  });
  return list.data;
}

function addColumn(value = "") {
  const n = $("#compare-columns").children.length + 1;
  const input = el("input", { list: "model-ids", value, "aria-label": `Model of column ${n}`, class: "column-model" });
  const row = el("div", { class: "column-row" }, input,
    el("button", { type: "button", class: "plain", "aria-label": `Remove column ${n}`,
                   onclick: () => row.remove() }, "Remove"));
  $("#compare-columns").append(row);
}

async function versions() {
  try {   // only the admin API says which version serves a name; without the token, none shown
    const list = await admin("GET", "/admin/adapters");
    return Object.fromEntries(list.data.map((a) => [a.name, a.version]));
  } catch { return {}; }
}

// The longest prefix all outputs share: what follows it is where they part.
export function commonPrefix(texts) {
  if (!texts.length) return 0;
  let n = 0;
  while (texts.every((t) => n < t.length && t[n] === texts[0][n])) n += 1;
  return n;
}

function request(model) {
  const prompt = $("#compare-prompt").value;
  const body = { model, temperature: Number($("#compare-temperature").value), seed: Number($("#compare-seed").value),
                 max_tokens: Number($("#compare-max-tokens").value), stream_options: { include_usage: true } };
  return $("#compare-mode").value === "chat"
    ? ["/v1/chat/completions", { ...body, messages: [{ role: "user", content: prompt }] }]
    : ["/v1/completions", { ...body, prompt }];
}

async function runColumn(model, card, version) {
  const out = el("pre", { class: "output", "aria-label": `Output of ${model}` });
  const stats = el("div", { class: "stats" }, "waiting");
  card.append(el("h3", {}, model), el("div", { class: "stats" }, version ? `version ${version}` : "version —"),
              stats, out);
  const [path, body] = request(model);
  const t0 = performance.now();
  let first = null, last = null, tokens = 0, text = "";
  try {
    for await (const chunk of stream(path, body)) {
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      const choice = chunk.choices && chunk.choices[0];
      const piece = choice ? (choice.delta ? choice.delta.content || "" : choice.text || "") : "";
      if (piece) {
        if (first === null) first = performance.now();
        last = performance.now();
        text += piece;
        out.textContent = text;
      }
    }
    const ttft = first === null ? null : first - t0;
    const rate = first !== null && last > first && tokens > 1 ? ((tokens - 1) / (last - first)) * 1000 : null;
    stats.textContent = `${tokens} tokens · TTFT ${ttft === null ? "—" : ttft.toFixed(0) + " ms"} · `
      + `${rate === null ? "—" : rate.toFixed(1)} tok/s`;
    card.dataset.done = "true";
  } catch (e) {
    status(stats, describe(e), true);
    card.dataset.done = "error";
  }
  return { out, text };
}

async function run(event) {
  event.preventDefault();
  const chosen = [...document.querySelectorAll(".column-model")].map((i) => i.value.trim()).filter(Boolean);
  if (!chosen.length) return status($("#compare-status"), "add a column first", true);
  status($("#compare-status"), `streaming ${chosen.length} columns`);
  const byName = await versions();
  const grid = $("#compare-output");
  grid.replaceChildren();
  const cards = chosen.map((m) => {
    const card = el("article", { class: "column", "data-model": m });
    grid.append(card);
    return card;
  });
  const results = await Promise.all(chosen.map((m, i) => runColumn(m, cards[i], byName[m.split("@")[0]])));
  const ok = results.filter((r) => r.text);
  const n = commonPrefix(ok.map((r) => r.text));
  for (const r of ok) {   // highlight each output from where it parts from the others
    if (ok.length > 1 && n < r.text.length) r.out.replaceChildren(r.text.slice(0, n), el("mark", {}, r.text.slice(n)));
  }
  status($("#compare-status"), ok.length > 1 ? `outputs part after ${n} characters` : "done");
}

export async function init() {
  $("#compare-add").addEventListener("click", () => addColumn());
  $("#compare-form").addEventListener("submit", run);
  addColumn();
  addColumn();
  try {
    await refreshModels();
  } catch (e) {
    status($("#compare-status"), `models: ${describe(e)} (enter the API key above)`, true);
  }
}
