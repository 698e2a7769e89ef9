// The console's entry point: the credentials form and the tabs (arrow keys move between them).
// Each view module owns its section of index.html; this one only switches between them.

import { describe, setCredentials } from "./api.js";
import { $, status } from "./dom.js";
import * as adapters from "./adapters.js";
import * as blend from "./blend.js";
import * as compare from "./compare.js";
import * as live from "./live.js";
import * as train from "./train.js";

const VIEWS = { compare, blend, adapters, train, live };
let active = "compare";

async function select(name, focus = false) {
  if (VIEWS[active].hide) VIEWS[active].hide();
  active = name;
  for (const tab of document.querySelectorAll("[role=tab]")) {
    const on = tab.id === `tab-${name}`;
    tab.setAttribute("aria-selected", String(on));
    tab.tabIndex = on ? 0 : -1;
    if (on && focus) tab.focus();
    $(`#${tab.getAttribute("aria-controls")}`).hidden = !on;
  }
  try {
    if (VIEWS[name].show) await VIEWS[name].show();
  } catch (e) { status($("#auth-state"), describe(e), true); }
}

function tabs() {
  const names = Object.keys(VIEWS);
  for (const name of names) $(`#tab-${name}`).addEventListener("click", () => select(name));
  $("nav").addEventListener("keydown", (e) => {
    const i = names.indexOf(active);
    if (e.key === "ArrowRight") select(names[(i + 1) % names.length], true);
    else if (e.key === "ArrowLeft") select(names[(i + names.length - 1) % names.length], true);
  });
}

function auth() {
  $("#auth").addEventListener("submit", async (e) => {
    e.preventDefault();
    setCredentials($("#api-key").value, $("#admin-token").value);
    status($("#auth-state"), "using these credentials (memory only)");
    try {
      await compare.refreshModels();
    } catch (err) { status($("#auth-state"), `models: ${describe(err)}`, true); }
    await select(active);
  });
}

window.addEventListener("DOMContentLoaded", async () => {
  tabs();
  auth();
  for (const v of Object.values(VIEWS)) await v.init();
  await select("compare");
  document.body.dataset.ready = "true";
});
