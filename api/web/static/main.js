// Start-up: ask for a key when the server wants one, then show the tabs. Also follows /readyz (models loading).

import * as api from "./api.js";
import { $ } from "./dom.js";
import { pathsFrom, setupAsk } from "./ask.js";
import { setupPassageDialog } from "./answer.js";
import { setupCompare } from "./compare.js";
import { loadDocuments, setupDocuments } from "./documents.js";
import { loadEvals } from "./evals.js";

const LOADERS = { "panel-documents": loadDocuments, "panel-evals": loadEvals };
const READY_POLL_MS = 2000;
let started = false;

async function start() {
  let models;
  try {
    models = await api.get("/v1/models");
  } catch (error) {
    if (!error.authentication) $("#service-status").textContent = api.describe(error);
    return;  // a 401/403 has shown the key form (onUnauthorized)
  }
  $("#login").hidden = true;
  $("#forget-key").hidden = !api.apiKey.get();
  if (!started) {
    started = true;
    const paths = pathsFrom(models);
    setupAsk(paths);
    setupCompare(paths);
    setupDocuments();
    setupPassageDialog();
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
async function followReadiness() {
  const status = $("#service-status");
  try {
    const response = await fetch("/readyz");
    const health = await response.json();
    if (response.ok) {
      status.textContent = "Ready";
      status.title = `Index snapshot ${health.checks.snapshot}`;
      status.dataset.state = "ready";
      return;
    }
    status.textContent = health.checks.error || "Loading models…";
    status.dataset.state = "loading";
  } catch {
    status.textContent = "The server cannot be reached.";
    status.dataset.state = "error";
  }
  setTimeout(followReadiness, READY_POLL_MS);
}

api.onUnauthorized(showLogin);
setupLogin();
followReadiness();
start();
