// Blend: weight sliders over the registered adapters. "Try" streams a per-request mix at once
// (the `adapters` field: a linear mix, nothing built); "Save" creates a named blend with PEFT's
// add_weighted_adapter and the chosen combination type (and can write it to the store).

import { admin, adminAllowed, describe, stream } from "./api.js";
import { $, el, status } from "./dom.js";
import { refreshModels } from "./compare.js";

let baseId = "";

function parts() {
  return [...document.querySelectorAll(".slider-row")]
    .filter((row) => $("input[type=checkbox]", row).checked)
    .map((row) => ({ name: row.dataset.name, weight: Number($("input[type=range]", row).value) }));
}

function sliderRow(name) {
  const value = el("output", {}, "0.50");
  const range = el("input", { type: "range", min: "-1", max: "2", step: "0.05", value: "0.5",
                              "aria-label": `Weight of ${name}`,
                              oninput: () => { value.textContent = Number(range.value).toFixed(2); } });
  return el("div", { class: "slider-row", "data-name": name },
    el("label", {}, el("input", { type: "checkbox", "aria-label": `Use ${name}` }), name), range, value, el("span"));
}

async function tryMix() {
  const chosen = parts();
  const out = $("#blend-output");
  if (!chosen.length) return status($("#blend-status"), "tick at least one adapter", true);
  if ($("#blend-type").value !== "linear") {
    return status($("#blend-status"), "a per-request mix is linear; save the blend to try another type", true);
  }
  status($("#blend-status"), "streaming the mix");
  out.textContent = "";
  try {
    const body = { model: baseId, adapters: chosen, temperature: 0, max_tokens: 64,
                   messages: [{ role: "user", content: $("#blend-prompt").value }] };
    for await (const chunk of stream("/v1/chat/completions", body)) {
      const d = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (d && d.content) out.textContent += d.content;
    }
    status($("#blend-status"), "done");
  } catch (e) { status($("#blend-status"), describe(e), true); }
}

async function save() {
  const chosen = parts();
  if (!chosen.length) return status($("#blend-status"), "tick at least one adapter", true);
  const type = $("#blend-type").value;
  const body = { name: $("#blend-name").value.trim(), adapters: chosen, combination_type: type,
                 save: $("#blend-store").checked };
  if (["ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune"].includes(type)) {
    body.density = Number($("#blend-density").value);
  }
  try {
    const entry = await admin("POST", "/admin/blends", body);
    status($("#blend-status"), `saved ${entry.name} (version ${entry.version}); it is in /v1/models now`);
    await refreshModels();
  } catch (e) { status($("#blend-status"), describe(e), true); }
}

export async function show() {
  const allowed = await adminAllowed();
  $("#view-blend .needs-admin").hidden = allowed;
  for (const b of ["#blend-try", "#blend-save"]) $(b).disabled = !allowed;
  if (!allowed) return $("#blend-sliders").replaceChildren();
  const list = await admin("GET", "/admin/adapters");
  const models = await refreshModels();
  baseId = (models.find((m) => m.parent === null) || { id: "" }).id;
  const names = list.data.filter((a) => a.kind === "adapter" && a.status === "ok").map((a) => a.name);
  $("#blend-sliders").replaceChildren(...names.map(sliderRow));
}

export function init() {
  $("#blend-try").addEventListener("click", tryMix);
  $("#blend-save").addEventListener("click", save);
}
