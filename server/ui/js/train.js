// Train and evaluate: start a training job (POST /admin/train), watch it (step, ETA, a live loss
// curve from the job's series), cancel it, read its card; run an evaluation job and show its table.

import { admin, adminAllowed, describe } from "./api.js";
import { $, el, lineChart, status } from "./dom.js";

let current = null;   // the training job being watched
let timer = null;

function num(id) {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

function drawCurve(job) {
  const train = job.series.filter((p) => p.loss !== undefined).map((p) => [p.step, p.loss]);
  const evals = job.series.filter((p) => p.eval_loss !== undefined).map((p) => [p.step, p.eval_loss]);
  lineChart($("#train-chart"), [{ name: "training loss", points: train }, { name: "eval loss", points: evals, markers: true }],
            { xLabel: "optimizer step", yLabel: "loss" });
}

async function poll() {
  if (!current) return;
  let job;
  try { job = await admin("GET", `/admin/jobs/${current}`); } catch (e) {
    status($("#train-status"), describe(e), true);
    return;
  }
  const p = job.progress || {};
  const eta = p.eta_s !== undefined ? ` · ETA ${Math.round(p.eta_s)} s` : "";
  const warn = p.warning ? ` · ${p.warning.message}` : "";
  status($("#train-status"), `${job.status}: step ${p.step || 0} of ${p.total || "?"}${eta}${warn}`
    + (job.error ? ` · ${job.error}` : ""), job.status === "failed");
  drawCurve(job);
  $("#train-status").dataset.job = job.status;
  if (!["queued", "running"].includes(job.status)) {
    clearInterval(timer);
    timer = null;
    $("#train-cancel").disabled = true;
    if (job.result && job.result.card && job.result.card.promotion) {
      const gate = job.result.card.promotion;
      status($("#train-status"), `${job.status}: ${gate.passed ? "promoted" : "not promoted"}: ${gate.reason}`);
    }
    if (job.result && job.result.card) {
      $("#train-card").textContent = JSON.stringify(job.result.card, null, 1);
      $("#train-card-box").hidden = false;
    }
  }
}

async function start(event) {
  event.preventDefault();
  const body = { name: $("#train-name").value.trim(), data: $("#train-data").value.trim(), epochs: num("#train-epochs"),
                 rank: num("#train-rank"), learning_rate: num("#train-lr"), batch_size: num("#train-batch"),
                 max_steps: num("#train-max-steps"), qlora: $("#train-qlora").checked };
  const gate = $("#train-gate").value.trim();
  if (gate) body.promote_if = gate;
  try {
    const job = await admin("POST", "/admin/train", body);
    current = job.job;
    $("#train-card-box").hidden = true;
    $("#train-cancel").disabled = false;
    status($("#train-status"), `job ${current} queued`);
    timer = timer || setInterval(poll, 1000);
  } catch (e) { status($("#train-status"), describe(e), true); }
}

async function cancel() {
  if (!current) return;
  try {
    await admin("DELETE", `/admin/jobs/${current}`);
    status($("#train-status"), "stopping at the next checkpoint");
  } catch (e) { status($("#train-status"), describe(e), true); }
}

function fmt(x, digits = 4) { return x === null || x === undefined ? "—" : Number(x).toFixed(digits); }

async function evaluate(event) {
  event.preventDefault();
  const adapters = $("#eval-adapters").value.split(",").map((s) => s.trim()).filter(Boolean);
  const body = { data: $("#eval-data").value.trim(), adapters, max_examples: num("#eval-max") };
  try {
    const started = await admin("POST", "/admin/evals", body);
    status($("#eval-status"), `job ${started.job} running`);
    for (;;) {
      await new Promise((r) => setTimeout(r, 1000));
      const job = await admin("GET", `/admin/jobs/${started.job}`);
      if (["queued", "running"].includes(job.status)) {
        const p = job.progress || {};
        status($("#eval-status"), `${job.status}${p.model ? `: ${p.model} ${p.done}/${p.total}` : ""}`);
        continue;
      }
      if (job.status !== "succeeded") return status($("#eval-status"), `${job.status}: ${job.error}`, true);
      $("#eval-table tbody").replaceChildren(...job.result.results.map((r) => el("tr", { "data-model": r.model },
        el("td", {}, r.model), el("td", {}, r.kind), el("td", { class: "num" }, fmt(r.loss)),
        el("td", { class: "num" }, r.kind === "base" || r.vs_base === null ? "" : `${(100 * r.vs_base).toFixed(1)} %`),
        el("td", { class: "num" }, r.exact_match === null ? "—" : `${r.exact}/${r.scored}`),
        el("td", { class: "num" }, r.tokens))));
      return status($("#eval-status"), `done: ${job.result.data.evaluated} examples`);
    }
  } catch (e) { status($("#eval-status"), describe(e), true); }
}

export async function show() {
  const allowed = await adminAllowed();
  $("#view-train .needs-admin").hidden = allowed;
  for (const b of document.querySelectorAll("#train-form button[type=submit], #eval-form button")) b.disabled = !allowed;
  if (allowed) {   // the data folder's files, offered in both forms
    const files = await admin("GET", "/admin/data");
    $("#data-files").replaceChildren(...files.data.map((f) => el("option", { value: f.name })));
  }
}

export function init() {
  $("#train-form").addEventListener("submit", start);
  $("#train-cancel").addEventListener("click", cancel);
  $("#eval-form").addEventListener("submit", evaluate);
  lineChart($("#train-chart"), [], {});
}
