// A small Markdown renderer for evaluation reports and answers, building DOM nodes (never innerHTML), so a report or
// an answer cannot inject markup or script. It covers what `rag eval` writes and common Markdown: headings,
// paragraphs, lists, tables, fenced code, emphasis, code spans, links (http/https only), images (resolved by the
// caller) and an answer's [n] citation markers (resolved by the caller).

import { h } from "./dom.js";

const INLINE = /(`[^`]+`)|(!\[[^\]]*\]\([^)\s]+\))|(\[[^\]]+\]\([^)\s]+\))|(\*\*[^*]+\*\*)|(\*[^*\s][^*]*\*|(?<!\w)_[^_\s][^_]*_(?!\w))|(\[\d{1,2}\](?!\())/;

/**
 * Nodes for `source`. `image(src, alt)` returns an <img> (or null to show the alt text) for image references,
 * since the report's plots are fetched with the API key. `cite(number, marker)` returns the node for a citation
 * marker "[n]" (by default the marker as text). `breaks`: a paragraph's lines stay lines (an answer's quotes are
 * one a line), rather than joining as Markdown's soft breaks do.
 */
export function render(source, image, cite = (number, marker) => marker, breaks = false) {
  const lines = source.replace(/\r\n?/g, "\n").split("\n");
  const blocks = [];
  let index = 0;
  while (index < lines.length) {
    const line = lines[index];
    if (!line.trim()) { index += 1; continue; }
    const heading = /^(#{1,6})\s+(.*)$/.exec(line);
    if (heading) {
      blocks.push(h(`h${Math.min(heading[1].length + 1, 6)}`, {}, inline(heading[2], image, cite)));
      index += 1;
    } else if (line.startsWith("```")) {
      const code = [];
      for (index += 1; index < lines.length && !lines[index].startsWith("```"); index += 1) code.push(lines[index]);
      blocks.push(h("pre", {}, h("code", {}, code.join("\n"))));
      const after = (lines[index] || "").replace(/^`+/, "").trim();  // "``` [1]": an answer's citation of the code
      if (after) blocks.push(h("p", {}, inline(after, image, cite)));
      index += 1;
    } else if (line.trim().startsWith("|") && /^\s*\|?[\s:|-]+\|?\s*$/.test(lines[index + 1] || "")) {
      const rows = [];
      for (; index < lines.length && lines[index].trim().startsWith("|"); index += 1) rows.push(cells(lines[index]));
      rows.splice(1, 1);  // the |---| separator
      blocks.push(h("div", { class: "table-wrap" }, h("table", {},
        h("thead", {}, h("tr", {}, rows[0].map((cell) => h("th", { scope: "col" }, inline(cell, image, cite))))),
        h("tbody", {}, rows.slice(1).map((row) => h("tr", {}, row.map((cell) => h("td", {}, inline(cell, image, cite)))))))));
    } else if (/^\s*([-*+]|\d+[.)])\s+/.test(line)) {
      const ordered = /^\s*\d/.test(line);
      const items = [];
      for (; index < lines.length && /^\s*([-*+]|\d+[.)])\s+/.test(lines[index]); index += 1) {
        items.push(h("li", {}, inline(lines[index].replace(/^\s*([-*+]|\d+[.)])\s+/, ""), image, cite)));
      }
      blocks.push(h(ordered ? "ol" : "ul", {}, items));
    } else {
      const paragraph = [];
      for (; index < lines.length && lines[index].trim() && !/^(#{1,6}\s|```|\s*\|)/.test(lines[index]); index += 1) {
        paragraph.push(lines[index].trim());
      }
      if (!paragraph.length) { paragraph.push(line); index += 1; }
      blocks.push(h("p", {}, breaks
        ? paragraph.flatMap((text, line) => [line ? h("br") : null, inline(text, image, cite)])
        : inline(paragraph.join(" "), image, cite)));
    }
  }
  return blocks;
}

function cells(row) {
  return row.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((cell) => cell.trim());
}

function inline(text, image, cite) {
  const nodes = [];
  let rest = text;
  for (let match = INLINE.exec(rest); match; match = INLINE.exec(rest)) {
    if (match.index) nodes.push(rest.slice(0, match.index));
    const token = match[0];
    if (match[1]) nodes.push(h("code", {}, token.slice(1, -1)));
    else if (match[2]) {
      const [, alt, src] = /^!\[([^\]]*)\]\(([^)\s]+)\)$/.exec(token);
      nodes.push(image(src, alt) || h("span", {}, `[${alt}]`));
    } else if (match[3]) {
      const [, label, href] = /^\[([^\]]+)\]\(([^)\s]+)\)$/.exec(token);
      nodes.push(/^https?:\/\//i.test(href)
        ? h("a", { href, target: "_blank", rel: "noopener noreferrer" }, label) : label);
    } else if (match[4]) nodes.push(h("strong", {}, token.slice(2, -2)));
    else if (match[5]) nodes.push(h("em", {}, token.slice(1, -1)));
    else nodes.push(cite(Number(token.slice(1, -1)), token));
    rest = rest.slice(match.index + token.length);
  }
  if (rest) nodes.push(rest);
  return nodes;
}
