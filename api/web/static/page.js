// The page viewer beside the conversation: a PDF page as an image with the quoted words highlighted, from
// GET /v1/documents/{doc_id}/pages/{page}.png?highlight=<quote>. The image is fetched with the key (an <img src>
// cannot send it) and shown from a blob: URL, which the page's CSP allows for images only.

import * as api from "./api.js";
import { $ } from "./dom.js";

let maxHighlightChars = 0;  // GET /web/config.json: the route's limit on `highlight`
let shown = null;  // the request on screen or loading: a later click wins over an earlier slow one
let objectUrl = "";

export function setupPageView(limits) {
  maxHighlightChars = limits.max_highlight_chars;
  $("#page-close").addEventListener("click", closePage);
}

// Pages the server renders (GET /v1/documents/{id}/pages/{n}.png): PDFs and image files (scans, read by OCR).
export const hasPageImage = (evidence) =>
  evidence.doc_id && evidence.page != null && /\.(pdf|png|jpe?g|tiff?)$/i.test(evidence.source);

/** Shows page `evidence.page` of its document with `evidence.quote` highlighted. */
export async function showPage(evidence) {
  const request = { ...evidence };
  shown = request;
  const view = $("#page-view");
  const image = $("#page-image");
  $("#page-title").textContent = `${evidence.source} · page ${evidence.page}`;
  $("#page-quote").textContent = evidence.readable || evidence.quote;
  $("#page-error").textContent = "";
  image.hidden = true;
  view.dataset.docId = evidence.doc_id;
  view.dataset.page = String(evidence.page);
  view.setAttribute("aria-busy", "true");
  view.hidden = false;
  $("#main").classList.add("with-page");
  view.scrollIntoView({ block: "nearest" });
  const highlight = encodeURIComponent(evidence.quote.slice(0, maxHighlightChars));
  try {
    const response = await api.file(`/v1/documents/${encodeURIComponent(evidence.doc_id)}/pages/`
      + `${encodeURIComponent(evidence.page)}.png?highlight=${highlight}`);
    const blob = new Blob([await response.blob()], { type: "image/png" });
    if (shown !== request) return;
    if (objectUrl) URL.revokeObjectURL(objectUrl);
    objectUrl = URL.createObjectURL(blob);
    image.alt = `Page ${evidence.page} of ${evidence.source}, the quoted words highlighted`;
    image.src = objectUrl;
    image.hidden = false;
  } catch (error) {
    if (shown === request) $("#page-error").textContent = api.describe(error);
  } finally {
    if (shown === request) view.removeAttribute("aria-busy");
  }
}

function closePage() {
  shown = null;
  $("#page-view").hidden = true;
  $("#main").classList.remove("with-page");
  $("#page-image").removeAttribute("src");
  if (objectUrl) URL.revokeObjectURL(objectUrl);
  objectUrl = "";
}
