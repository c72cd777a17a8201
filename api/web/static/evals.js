// Evaluations: the reports `rag eval` wrote (GET /v1/evals), each rendered from its report.md with its plots.

import * as api from "./api.js";
import { $, h } from "./dom.js";
import { render } from "./markdown.js";

let objectUrls = [];  // plot images of the report on screen, released when another one is opened

export async function loadEvals() {
  const list = $("#eval-list");
  try {
    const { evals } = await api.get("/v1/evals");
    if (!evals.length) {
      list.replaceChildren(h("li", { class: "hint" }, "No reports yet: `rag eval --out results/NAME` writes one."));
      return;
    }
    list.replaceChildren(...evals.map((report) => h("li", {},
      h("button", { type: "button", class: "link eval", dataset: { name: report.name },
        onclick: (event) => open(report, event.currentTarget) },
        h("strong", {}, report.name), h("span", { class: "meta" }, ` ${report.title}`),
        h("time", { class: "meta", datetime: report.modified_at }, new Date(report.modified_at).toLocaleDateString())))));
  } catch (error) {
    list.replaceChildren(h("li", { class: "error" }, api.describe(error)));
  }
}

async function open(report, button) {
  document.querySelectorAll("#eval-list .eval").forEach((b) => b.removeAttribute("aria-current"));
  button.setAttribute("aria-current", "true");
  const article = $("#eval-report");
  article.setAttribute("aria-busy", "true");
  objectUrls.forEach((url) => URL.revokeObjectURL(url));
  objectUrls = [];
  const base = `/v1/evals/${encodeURIComponent(report.name)}/`;
  try {
    const markdown = await api.text(`${base}report.md`);
    const image = (src, alt) => {
      if (!report.files.includes(src)) return null;  // only the report's own files, fetched with the key
      const img = h("img", { alt, loading: "lazy" });
      api.file(base + encodeURIComponent(src)).then((response) => response.blob()).then((blob) => {
        const url = URL.createObjectURL(new Blob([blob], { type: "image/png" }));
        objectUrls.push(url);
        img.src = url;
      }).catch(() => img.replaceWith(h("span", { class: "error" }, `[${alt}: not available]`)));
      return img;
    };
    article.replaceChildren(...render(markdown, image));
  } catch (error) {
    article.replaceChildren(h("p", { class: "error" }, api.describe(error)));
  } finally {
    article.removeAttribute("aria-busy");
  }
}
