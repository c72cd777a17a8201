// Start-up: ask for a key when the server wants one, then show the tabs. Also follows /readyz for as long as the
// page is open (models loading, the server stopped or restarted), and at once when a request gets no answer.

import * as api from "./api.js";
import { $ } from "./dom.js";
import { forgetThread, pathsFrom, setupAsk } from "./ask.js";
import { setupPassageDialog } from "./answer.js";
import { setupCompare } from "./compare.js";
import { loadDocuments, setupDocuments } from "./documents.js";
import { loadEvals } from "./evals.js";
import { setupPageView } from "./page.js";

const LOADERS = { "panel-documents": loadDocuments, "panel-evals": loadEvals };
const NOT_READY_POLL_MS = 2000;
const READY_RECHECK_MS = 5000;  // a ready server may still stop or restart: the status must not go on saying "Ready"
const READY_TIMEOUT_MS = 5000;
let started = false;
let starting = null;  // the start-up in flight, so that readiness and the key form do not run two at once

function start() {
  starting ??= attemptStart().finally(() => { starting = null; });
  return starting;
}

async function attemptStart() {
  let models, limits;
  try {
    [models, limits] = await Promise.all([api.get("/v1/models"), api.get("/web/config.json")]);
  } catch (error) {
    // A 401/403 has shown the key form (onUnauthorized); no answer at all is the readiness status's to say.
    if (!error.authentication && error.status !== 0) showStatus("error", api.describe(error));
    return;
  }
  $("#login").hidden = true;
  $("#forget-key").hidden = !api.apiKey.get();
  if (!started) {
    started = true;
    const paths = pathsFrom(models);
    setupAsk(paths, limits);
    setupCompare(paths);
    setupDocuments();
    setupPassageDialog();
    setupPageView(limits);
    setupTabs();
  }
  select(document.querySelector("[role=tab][aria-selected=true]"), false);
  performance.mark("app-usable");
  document.documentElement.dataset.ready = "true";
}

function showLogin(error) {
  for (const panel of document.querySelectorAll("[role=tabpanel]")) panel.hidden = true;
  $("#login").hidden = false;
  $("#forget-key").hidden = true;
  $("#login-error").textContent = api.apiKey.get() || error.status === 403 ? api.describe(error) : "";
  api.apiKey.clear();
  $("#login-key").focus();
  performance.mark("app-usable");
}

function setupLogin() {
  $("#login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = $("#login-key").value.trim();
    if (!key) {
      $("#login-error").textContent = "Enter the API key.";
      return;
    }
    api.apiKey.set(key);
    $("#login-key").value = "";
    await start();
  });
  $("#forget-key").addEventListener("click", () => {
    api.apiKey.clear();
    forgetThread();  // the conversation was asked with that key: it goes with it
    location.reload();
  });
}

// ------------------------------------------------------------------------------------------------- tabs
function setupTabs() {
  const tabs = [...document.querySelectorAll("[role=tab]")];
  tabs.forEach((tab, index) => {
    tab.addEventListener("click", () => select(tab));
    tab.addEventListener("keydown", (event) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (event.key === "Home" || event.key === "End" || step) {
        event.preventDefault();
        const next = event.key === "Home" ? 0 : event.key === "End" ? tabs.length - 1
          : (index + step + tabs.length) % tabs.length;
        tabs[next].focus();
        select(tabs[next]);
      }
    });
  });
}

function select(tab, load = true) {
  for (const other of document.querySelectorAll("[role=tab]")) {
    const chosen = other === tab;
    other.setAttribute("aria-selected", String(chosen));
    other.tabIndex = chosen ? 0 : -1;
    $(`#${other.getAttribute("aria-controls")}`).hidden = !chosen;
  }
  const panel = tab.getAttribute("aria-controls");
  if (load && LOADERS[panel]) LOADERS[panel]();
}

// ------------------------------------------------------------------------------------------------ readiness
let readinessTimer = 0;
let checking = null;  // the check in flight: failed requests while it runs do not start more

function followReadiness() {
  checking ??= checkReadiness().finally(() => { checking = null; });
  return checking;
}

async function checkReadiness() {
  clearTimeout(readinessTimer);
  let ready = false;
  try {
    const response = await fetch("/readyz", { cache: "no-store", signal: AbortSignal.timeout(READY_TIMEOUT_MS) });
    const health = await response.json();
    ready = response.ok;
    // `reason` is said for anyone; `checks` (the snapshot) only come with auth off, as this asks without the key.
    const snapshot = health.checks?.snapshot ? `Index snapshot ${health.checks.snapshot}` : "";
    if (ready) showStatus("ready", "Ready", snapshot);
    else showStatus("loading", `Server not ready yet: ${health.reason || "loading models…"}`);
  } catch {  // refused, timed out, or not the API answering (a proxy's error page)
    showStatus("down", "Server down: it cannot be reached. Retrying…");
  }
  // A server that was down when the page opened: start the app once it is up (unless the key form is waiting).
  if (ready && !started && $("#login").hidden) start();
  readinessTimer = setTimeout(followReadiness, ready ? READY_RECHECK_MS : NOT_READY_POLL_MS);
}

function showStatus(state, text, title = "") {
  const status = $("#service-status");
  if (status.textContent !== text) status.textContent = text;  // a live region: the same words are not re-announced
  status.title = title;
  status.dataset.state = state;
}

api.onUnauthorized(showLogin);
api.onUnreachable(followReadiness);
setupLogin();
followReadiness();
start();
