// Adapters: the registry's table (kind, version, rank, targets, size, resident or evicted, pinned,
// requests, last used) with load, unload, pin and replace, and the folders that failed and why.

import { admin, adminAllowed, describe } from "./api.js";
import { $, ago, bytes, el, status } from "./dom.js";

async function act(label, fn) {
  try {
    await fn();
    status($("#adapters-status"), label);
  } catch (e) { status($("#adapters-status"), describe(e), true); }
  await refresh();
}

function row(a) {
  const name = a.name;
  const pin = el("button", { type: "button", class: "plain", "aria-label": `${a.pinned ? "Unpin" : "Pin"} ${name}`,
    onclick: () => act(`${a.pinned ? "unpinned" : "pinned"} ${name}`,
                       () => admin("PATCH", `/admin/adapters/${encodeURIComponent(name)}`, { pinned: !a.pinned })) },
    a.pinned ? "Unpin" : "Pin");
  const unload = el("button", { type: "button", class: "plain", "aria-label": `Unload ${name}`,
    onclick: () => act(`unloaded ${name}`, () => admin("DELETE", `/admin/adapters/${encodeURIComponent(name)}`)) },
    "Unload");
  const replace = el("button", { type: "button", class: "plain", "aria-label": `Replace ${name}`,
    onclick: () => {
      $("#load-name").value = name;
      $("#load-replace").checked = true;
      $("#load-path").focus();
    } }, "Replace…");
  const state = a.status !== "ok" ? `unavailable: ${a.error}` : a.loaded ? "resident" : "evicted (on disk)";
  return el("tr", { "data-name": name },
    el("td", {}, name), el("td", {}, a.kind), el("td", {}, a.version || ""), el("td", { class: "num" }, a.rank),
    el("td", {}, (a.target_modules || []).join(", ")), el("td", { class: "num" }, bytes(a.size_bytes)),
    el("td", {}, state), el("td", {}, a.pinned ? "yes" : "no"), el("td", { class: "num" }, a.requests_total),
    el("td", {}, ago(a.last_used_at)), el("td", {}, pin, " ", unload, " ", a.kind === "adapter" ? replace : ""));
}

export async function refresh() {
  const list = await admin("GET", "/admin/adapters");
  $("#adapters-table tbody").replaceChildren(...list.data.map(row));
  $("#adapters-failed").replaceChildren(...(list.failed.length ? list.failed.map(
    (f) => el("li", {}, el("code", {}, f.path || f.name), `: ${f.reason}`)) : [el("li", {}, "none")]));
}

async function load(event) {
  event.preventDefault();
  const body = { name: $("#load-name").value.trim(), path: $("#load-path").value.trim(),
                 pinned: $("#load-pinned").checked, replace: $("#load-replace").checked };
  await act(`loaded ${body.name}`, () => admin("POST", "/admin/adapters", body));
  $("#load-replace").checked = false;
}

export async function show() {
  const allowed = await adminAllowed();
  $("#view-adapters .needs-admin").hidden = allowed;
  for (const b of document.querySelectorAll("#load-form button")) b.disabled = !allowed;
  if (!allowed) {
    $("#adapters-table tbody").replaceChildren();
    return;
  }
  await refresh();
}

export function init() {
  $("#load-form").addEventListener("submit", load);
  $("#adapters-refresh").addEventListener("click", () => show());
}
