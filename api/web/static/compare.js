// Compare: one question on several answer paths, side by side, each streamed in turn (the server generates one
// answer at a time anyway), with token counts, the server's timings and the latency seen here.

import * as api from "./api.js";
import { $, h } from "./dom.js";
import { answerView } from "./answer.js";
import { countCharacters, options, questionProblem, showValidation, usageLine } from "./ask.js";

export function setupCompare(paths) {
  $("#compare-paths").replaceChildren(...paths.map((path) => h("label", { class: "check" },
    h("input", { type: "checkbox", name: "path", value: path, checked: path === "prompt" || path === "rag" || null }),
    ` ${path}`)));
  $("#compare-form").addEventListener("submit", (event) => { event.preventDefault(); compare(); });
  countCharacters($("#compare-question"), $("#compare-count"), $("#compare-error"));
}

async function compare() {
  const question = $("#compare-question").value;
  const paths = [...document.querySelectorAll("#compare-paths input:checked")].map((input) => input.value);
  const problem = questionProblem(question) || (paths.length ? "" : "Choose at least one path.");
  $("#compare-error").textContent = problem;
  if (problem) return;
  const settings = options();
  const columns = paths.map((path) => {
    const body = h("div", { class: "reply" }, h("p", { class: "meta" }, "Waiting…"));
    return { path, body, column: h("article", { class: "column", dataset: { path, state: "waiting" } },
      h("h3", {}, path), body) };
  });
  $("#compare-results").replaceChildren(...columns.map((c) => c.column));
  $("#compare-button").disabled = true;
  try {
    for (const column of columns) await run(question, settings, column);
  } finally {
    $("#compare-button").disabled = false;
  }
}

async function run(question, settings, { path, body, column }) {
  const streamed = h("p", { class: "answer-text streaming" });
  body.replaceChildren(streamed, h("p", { class: "meta" }, "Generating…"));
  column.dataset.state = "streaming";
  const started = performance.now();
  try {
    let answer = null;
    for await (const { event, data } of api.events("/v1/ask", { question, path, ...settings, stream: true })) {
      if (event === "token") streamed.append(data.text);
      else if (event === "answer") answer = data;
      else if (event === "error") throw new api.ApiError(500, data);
    }
    if (!answer) throw new api.ApiError(0, { message: "The answer stream ended before the answer." });
    body.replaceChildren(...answerView(answer), h("p", { class: "meta usage" }, usageLine(answer, performance.now() - started)));
    column.dataset.state = "done";
  } catch (error) {
    if (!showValidation(error)) $("#compare-error").textContent = "";
    body.replaceChildren(h("p", { class: "error", role: "alert" }, api.describe(error)));
    column.dataset.state = "error";
  }
}
