// Documents: what the index holds (GET /v1/documents), uploads (POST /v1/documents, then GET /v1/jobs/{id} until
// the job ends, with each file's result) and deletion after a confirmation. A document is named by its `source`
// as the API gives it (a display name, not a server path). On a phone each row is a card (style.css).

import * as api from "./api.js";
import { $, formatBytes, h, say } from "./dom.js";

const POLL_MS = 400;

export function setupDocuments() {
  const drop = $("#drop");
  $("#file-input").addEventListener("change", (event) => {
    if (event.target.files.length) uploadFiles([...event.target.files]);
    event.target.value = "";
  });
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length) uploadFiles([...event.dataTransfer.files]);
  });
  $("#confirm-cancel").addEventListener("click", () => $("#confirm").close("cancel"));
  $("#confirm-ok").addEventListener("click", () => $("#confirm").close("ok"));
}

export async function loadDocuments() {
  const status = $("#documents-status");
  try {
    const listing = await api.get("/v1/documents");
    const rows = listing.documents.map((doc) => h("tr", { dataset: { docId: doc.doc_id } },
      h("th", { scope: "row" }, doc.source,
        doc.warnings.map((warning) => h("span", { class: "warning warned" }, warning))),
      h("td", { class: "num", dataset: { label: "Size" } }, formatBytes(doc.size)),
      h("td", { class: "num", dataset: { label: "Chunks" } }, String(doc.chunk_count)),
      h("td", { dataset: { label: "Ingested" } },
        h("time", { datetime: doc.ingested_at }, new Date(doc.ingested_at).toLocaleString())),
      h("td", { class: "actions-cell" }, h("button", { type: "button", class: "danger small",
        "aria-label": `Delete ${doc.source}`, onclick: () => remove(doc) }, "Delete"))));
    $("#documents tbody").replaceChildren(...rows);
    $("#documents-caption").textContent = `${listing.counts.documents} documents, ${listing.counts.chunks} chunks`;
    say(status, listing.documents.length ? "" : "The index is empty: add documents above.");
  } catch (error) {
    $("#documents tbody").replaceChildren();
    say(status, api.describe(error), "error");
  }
}

async function uploadFiles(files) {
  const panel = $("#upload");
  const progress = $("#upload-progress");
  const label = $("#upload-label");
  const results = $("#upload-results");
  panel.hidden = false;
  panel.dataset.state = "uploading";
  results.replaceChildren();
  progress.value = 0;
  label.textContent = `Uploading ${files.length} file${files.length > 1 ? "s" : ""}…`;
  try {
    const accepted = await api.upload("/v1/documents", files, (share) => { progress.value = share; });
    panel.dataset.state = "ingesting";
    progress.removeAttribute("value");  // indeterminate until the job reports progress
    let job;
    for (;;) {
      job = await api.get(accepted.status_url);
      const { files_done: done, files_total: total } = job.progress;
      label.textContent = `Ingesting: ${done} of ${total} files (${job.status})`;
      if (done || job.status !== "queued") progress.value = total ? done / total : 1;
      if (["succeeded", "partial", "failed"].includes(job.status)) break;
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    }
    progress.value = 1;
    const failed = job.files.filter((file) => file.status === "failed").length;
    const warned = job.files.filter((file) => file.warnings.length).length;
    label.textContent = job.status === "failed" ? `Ingestion failed: ${job.error}`
      : `Done: ${job.files.length - failed} ingested, ${failed} failed${warned ? `, ${warned} with warnings` : ""}.`;
    results.replaceChildren(...job.files.map((file) => h("li", {
      class: file.status === "failed" ? "error" : file.warnings.length ? "warned" : "ok",
      dataset: { status: file.status } }, `${file.filename}: ${file.status}`,
      file.status === "failed" ? ` (${file.error})` : `, ${file.chunks} chunk${file.chunks === 1 ? "" : "s"}`,
      file.warnings.map((warning) => h("span", { class: "warning" }, warning)))));
    panel.dataset.state = job.status;
    await loadDocuments();
  } catch (error) {
    panel.dataset.state = "failed";
    progress.value = 0;
    label.textContent = api.describe(error);
  }
}

async function remove(doc) {
  const dialog = $("#confirm");
  $("#confirm-text").textContent = `Delete “${doc.source}” from the index? Answers will no longer cite it.`;
  dialog.returnValue = "";
  dialog.showModal();
  $("#confirm-cancel").focus();
  const choice = await new Promise((resolve) => dialog.addEventListener("close", () => resolve(dialog.returnValue),
    { once: true }));
  if (choice !== "ok") return;
  const status = $("#documents-status");
  try {
    await api.remove(`/v1/documents/${encodeURIComponent(doc.doc_id)}`);
    say(status, `Deleted ${doc.source}.`, "ok");
    await loadDocuments();
    say(status, `Deleted ${doc.source}.`, "ok");
  } catch (error) {
    say(status, api.describe(error), "error");
  }
}
