// An answer on screen: its text (Markdown, built as DOM nodes) with clickable [n] citations, its evidence (the
// quoted words, each opening its page (PDF or image) beside the conversation or its passage), its sources, and the passage
// dialog that shows a cited passage (document, page, heading, the cited words highlighted) with a link to the
// original file. Only what the API returned is shown: an [n] links only when the response's `citations` hold n
// (none when the answer is `supported: false`), and a document is named by its `source` as the API gives it (a
// display name), never by a path built here.

import * as api from "./api.js";
import { $, basename, h, highlighted } from "./dom.js";
import { render } from "./markdown.js";
import { hasPageImage, showPage } from "./page.js";

const CITATION = /\[(\d{1,2})\]/g;
const IDK = /don't know|do not know/i;

export const isIdk = (text) => !text.trim() || IDK.test(text);

/** Nodes for a final answer (the API's answer object): its text with citation buttons, its evidence, its sources. */
export function answerView(answer) {
  const text = api.answerText(answer).trim();
  const unsupported = answer.supported === false;  // the decoder's words, found in no source: cited to none
  const citations = new Map((unsupported ? [] : answer.citations || []).map((c) => [c.number, c]));
  const listed = answer.answerable === false ? answer.see_also || answer.sources : answer.sources;
  const sources = new Map([...(listed || []), ...citations.values()].map((s) => [s.number, s]));
  const plain = text.replace(CITATION, "").trim();
  const body = h("div", { class: "answer-text" });
  if (answer.answerable === false) {
    body.classList.add("idk");
    body.append(h("strong", {}, text || "The documents don't answer this question."),
      answer.confidence != null ? ` (confidence ${answer.confidence.toFixed(2)})` : "");
  } else if (isIdk(text)) {
    body.classList.add("idk");
    body.append(h("strong", {}, "No answer found in the sources. "), text ? `The model said: “${text}”` : "");
  } else {
    // A marker the server did not ground stays plain text; images in an answer are never fetched (alt text only).
    body.append(...render(text, () => null, (number, marker) => {
      const citation = citations.get(number);
      return citation ? citeButton(citation, plain) : marker;
    }, true));
  }
  const list = [...sources.values()].sort((a, b) => a.number - b.number).map((source) => h("li", {},
    h("button", { type: "button", class: "link source", onclick: () => openPassage(source, plain) },
      `[${source.number}] ${describeSource(source)}`),
    citations.has(source.number) ? h("span", { class: "badge" }, "cited") : null));
  const nodes = [body];
  if (answer.searched) nodes.unshift(h("p", { class: "meta searched" }, "Searched for: ", h("q", {}, answer.searched)));
  if (unsupported && answer.answerable !== false) {
    body.classList.add("unsupported");
    nodes.push(h("p", { class: "unsupported-note" }, "Not verified: the figures or names in this answer were not "
      + "found in its sources, so it cites none. Check the evidence below."));
  }
  if (answer.finish_reason === "length") {
    nodes.push(h("p", { class: "truncated" }, "Truncated: generation stopped at the max new tokens limit "
      + "(Ask › Settings), so the answer may be incomplete."));
  }
  if ((answer.evidence || []).length) nodes.push(evidenceView(answer.evidence));
  if (!list.length) return nodes;
  const title = answer.answerable === false ? `See also (${list.length})` : `Sources (${list.length})`;
  return [...nodes, h("details", { class: "sources",
    open: citations.size || answer.answerable === false ? true : null }, h("summary", {}, title), h("ol", {}, list))];
}

/** The quoted words that answer the question, best first: each opens its PDF page, or else its passage. */
function evidenceView(evidence) {
  const items = evidence.map((item) => {
    const where = [`[${item.number}] ${item.source}`, item.page != null ? `page ${item.page}` : null]
      .filter(Boolean).join(" · ");
    const quote = item.kind === "code" ? h("pre", {}, h("code", {}, item.quote.replace(/^```.*\n?|\n?```\s*$/g, "")))
      : h("blockquote", {}, item.readable || item.quote);
    const open = hasPageImage(item)
      ? h("button", { type: "button", class: "link show-page", onclick: () => showPage(item) },
        `Show page ${item.page}`)
      : item.chunk_id != null ? h("button", { type: "button", class: "link show-passage", onclick: () => openPassage(
        { number: item.number, chunk_id: item.chunk_id, source: item.source, page: item.page, heading: "",
          snippet: item.quote }, "") }, "Show passage") : null;
    return h("li", { class: "evidence-item", dataset: { kind: item.kind } }, quote,
      h("p", { class: "meta" }, where, " ", open));
  });
  return h("details", { class: "evidence", open: true }, h("summary", {}, `Evidence (${items.length})`),
    h("ol", {}, items));
}

function citeButton(source, answerText) {
  return h("button", { type: "button", class: "cite", "aria-label": `Source ${source.number}: ${describeSource(source)}`,
    onclick: () => openPassage(source, answerText) }, `[${source.number}]`);
}

export function describeSource(source) {
  return [source.source, source.page != null ? `page ${source.page}` : null, source.heading]
    .filter(Boolean).join(" · ");
}

/** Markdown for an answer with its citations, for the clipboard. */
export function answerMarkdown(question, answer) {
  const cited = (answer.citations || []).length ? answer.citations : answer.sources || [];
  const notes = cited.map((s) => `[${s.number}]: ${s.source}${s.page != null ? `, page ${s.page}` : ""}`
    + `${s.heading ? ` — ${s.heading}` : ""}`);
  return [`**Q:** ${question}`, "", api.answerText(answer).trim(), "", ...notes].join("\n").trim() + "\n";
}

// ------------------------------------------------------------------------------------------- passage dialog
let current = null;  // the source shown in the dialog

export function setupPassageDialog() {
  $("#passage-close").addEventListener("click", () => $("#passage").close());
  $("#passage-open").addEventListener("click", () => openOriginal(current));
}

async function openPassage(source, answerText) {
  current = source;
  const dialog = $("#passage");
  $("#passage-title").textContent = source.source;
  $("#passage-meta").textContent = [source.page != null ? `page ${source.page}` : null, source.heading]
    .filter(Boolean).join(" · ");
  const text = $("#passage-text");
  text.textContent = source.snippet || "";
  text.setAttribute("aria-busy", "true");
  $("#passage-error").textContent = "";
  const link = $("#passage-link");
  link.hidden = true;
  link.removeAttribute("href");
  const open = $("#passage-open");
  open.textContent = source.page != null ? `Open original at page ${source.page}` : "Open original";
  open.disabled = true;  // until the passage says which document it belongs to
  if (!dialog.open) dialog.showModal();
  if (source.chunk_id == null) return text.removeAttribute("aria-busy");
  try {
    const passage = await api.get(`/v1/chunks/${encodeURIComponent(source.chunk_id)}`);
    if (current !== source) return;
    text.replaceChildren(...highlighted(passage.text, citedWords(passage.text, source.snippet, answerText)));
    current = { ...source, doc_id: passage.doc_id };
    open.disabled = false;
  } catch (error) {
    $("#passage-error").textContent = api.describe(error);
  } finally {
    text.removeAttribute("aria-busy");
  }
}

/** What to highlight: the quoted span when the answer quotes one, else the answer's longer words. */
function citedWords(passage, snippet, answerText) {
  const span = (snippet || "").replace(/…$/, "").trim();
  if (span && passage.includes(span) && !passage.startsWith(span)) return [span];
  if (answerText && passage.includes(answerText)) return [answerText];
  return [...new Set((answerText || "").toLowerCase().match(/[\p{L}\p{N}][\p{L}\p{N}'-]{3,}/gu) || [])];
}

/**
 * The original file, fetched with the key (a plain link cannot send it) and opened from a blob: PDF in the
 * browser's viewer at the cited page, text as text/plain, other formats downloaded. The blob's type is set here,
 * from that list, so a file can never open as a page of this origin.
 */
async function openOriginal(source) {
  const error = $("#passage-error");
  error.textContent = "";
  try {
    const response = await api.file(`/v1/documents/${encodeURIComponent(source.doc_id)}/file`);
    const type = response.headers.get("Content-Type") || "";
    const kind = type.startsWith("application/pdf") ? "application/pdf"
      : type.startsWith("text/") ? "text/plain;charset=utf-8" : "application/octet-stream";
    const url = URL.createObjectURL(new Blob([await response.blob()], { type: kind }));
    const link = $("#passage-link");
    link.href = kind === "application/pdf" && source.page != null ? `${url}#page=${source.page}` : url;
    if (kind === "application/octet-stream") link.download = basename(source.source);  // a file name has no folders
    else link.removeAttribute("download");
    link.textContent = `${source.source}${kind === "application/pdf" && source.page != null ? ` (page ${source.page})` : ""}`;
    link.hidden = false;
    link.click();
  } catch (failure) {
    error.textContent = api.describe(failure);
  }
}
