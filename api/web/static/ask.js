// Ask: a conversation thread. Each question streams its answer from POST /v1/ask ("stream": true), then shows
// the final, source-aligned answer with citations. The thread's earlier turns go with each question as its
// `history` (the API is stateless): the server makes a follow-up standalone before retrieval. The thread is kept
// in sessionStorage beside the key (this tab only), so a reload shows it again; "Forget key" clears both.

import * as api from "./api.js";
import { $, h } from "./dom.js";
import { answerMarkdown, answerView } from "./answer.js";

// The OpenAI-style model names of GET /v1/models and the answer paths they stand for, in the order shown.
const MODEL_PATHS = { "rag-prompt-only": "prompt", "rag": "rag", "rag-finetuned": "finetuned",
  "rag-finetuned-rag": "finetuned-rag" };
const NUMBER_FIELDS = ["k", "max_new_tokens", "temperature"];
const THREAD_NAME = "rag-thread";
let limits = null;  // GET /web/config.json: the server's request limits (api/config.py)
let running = null;  // AbortController of the answer being streamed
let turns = [];  // this thread's answered turns, oldest first: {question, answer} with the API's answer object

/** The answer paths this server offers, from GET /v1/models (fine-tuned ones only with an adapter). */
export function pathsFrom(models) {
  const offered = new Set(models.data.map((model) => model.id));
  return Object.keys(MODEL_PATHS).filter((id) => offered.has(id)).map((id) => MODEL_PATHS[id]);
}

export function setupAsk(paths, serverLimits) {
  limits = serverLimits;
  $("#opt-path").replaceChildren(h("option", { value: "" }, "server default"),
    ...paths.map((path) => h("option", { value: path }, path)));
  $("#opt-path").value = "";
  $("#ask-form").addEventListener("submit", (event) => { event.preventDefault(); ask(); });
  $("#question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); ask(); }
  });
  countCharacters($("#question"), $("#question-count"), $("#question-error"));
  $("#ask-stop").addEventListener("click", () => running?.abort());
  $("#new-thread").addEventListener("click", () => {
    running?.abort(); turns = []; forgetThread(); $("#thread").replaceChildren(); $("#question").focus();
  });
  restoreThread();
}

// ------------------------------------------------------------------------------------------ question limits
/** What is wrong with a question before it is sent, in plain words ("" when nothing). */
export function questionProblem(question) {
  if (!question.trim()) return "Type a question first.";
  if (question.length > limits.max_question_chars) {
    return `The question is too long (${api.count(question.length)} characters; the limit is `
      + `${api.count(limits.max_question_chars)}).`;
  }
  return "";
}

/** Keeps `counter` saying how long the question is against the server's limit, and marks it when over. */
export function countCharacters(textarea, counter, error) {
  const update = () => {
    error.textContent = "";  // about the question as it was sent
    const over = textarea.value.length > limits.max_question_chars;
    counter.textContent = `${api.count(textarea.value.length)} / ${api.count(limits.max_question_chars)} characters`;
    counter.classList.toggle("error", over);
    if (over) textarea.setAttribute("aria-invalid", "true");
    else textarea.removeAttribute("aria-invalid");
  };
  textarea.addEventListener("input", update);
  update();
}

// -------------------------------------------------------------------------------------------------- thread
/** Clears the kept conversation (a new one, or the key forgotten). */
export function forgetThread() {
  sessionStorage.removeItem(THREAD_NAME);
}

function keepThread() {
  try {
    sessionStorage.setItem(THREAD_NAME, JSON.stringify(turns));
  } catch {  // storage full or turned off: the thread goes on, it just will not survive a reload
    forgetThread();
  }
}

function restoreThread() {
  try {
    turns = JSON.parse(sessionStorage.getItem(THREAD_NAME)) || [];
    for (const { question, answer } of turns) {
      const { turn, reply } = turnView(question);
      $("#thread").append(turn);
      finish(turn, reply, question, answer);
    }
  } catch {  // not a thread this version of the page wrote: start a new one rather than fail to start
    turns = [];
    forgetThread();
    $("#thread").replaceChildren();
  }
}

/** The turns sent as `history`, within the server's limits (the prompt keeps the most recent that fit). */
function historyToSend() {
  return turns.slice(-limits.max_history_turns)
    .map(({ question, answer }) => ({ question, answer: api.answerText(answer).slice(0, limits.max_answer_chars) }));
}

/** The generation and retrieval options of the settings panel, as the API names them (empty = server default). */
export function options() {
  const body = { retriever: $("#opt-retriever").value };
  for (const name of NUMBER_FIELDS) {
    const raw = $(`#opt-${name}`).value.trim();
    if (raw !== "") body[name] = Number(raw);
    $(`#opt-${name}`).removeAttribute("aria-invalid");
  }
  $("#settings-error").textContent = "";
  return body;
}

/** Shows a 422 from the API next to the settings it is about; true when it was about them. */
export function showValidation(error) {
  if (error.status !== 422) return false;
  const fields = error.details.map((detail) => String(detail.loc).split(".").pop());
  for (const name of fields) $(`#opt-${name}`)?.setAttribute("aria-invalid", "true");
  const aboutSettings = fields.some((name) => ["path", "retriever", ...NUMBER_FIELDS].includes(name))
    || /max_new_tokens|temperature|\bk\b|retriever|path/.test(error.message);
  if (aboutSettings) {
    $("#settings").open = true;
    $("#settings-error").textContent = api.describe(error);
  }
  return aboutSettings;
}

async function ask() {
  const question = $("#question").value;
  if (running) return;
  const problem = questionProblem(question);
  $("#question-error").textContent = problem;
  if (problem) {
    $("#question").focus();
    return;
  }
  const body = { question, ...options(), history: historyToSend(), stream: true };
  if ($("#opt-path").value) body.path = $("#opt-path").value;
  const streamed = h("p", { class: "answer-text streaming", dataset: { tokens: "0" } });
  const { turn, reply } = turnView(question, streamed, h("p", { class: "meta", role: "status" },
    "Retrieving and generating…"));
  $("#thread").append(turn);
  turn.scrollIntoView({ block: "end" });
  running = new AbortController();
  setBusy(true);
  let answer = null;
  try {
    for await (const { event, data } of api.events("/v1/ask", body, running.signal)) {
      if (event === "token") {
        streamed.append(data.text);
        streamed.dataset.tokens = String(Number(streamed.dataset.tokens) + 1);
      } else if (event === "answer") {
        answer = data;
      } else if (event === "error") {
        throw new api.ApiError(500, data);
      }
    }
    if (!answer) throw new api.ApiError(0, { message: "The answer stream ended before the answer." });
    turn.dataset.tokenEvents = streamed.dataset.tokens;
    finish(turn, reply, question, answer);
    turns = [...turns, { question, answer }].slice(-limits.max_history_turns);
    keepThread();
    $("#question").value = "";
    $("#question").dispatchEvent(new Event("input"));  // the counter
  } catch (error) {
    showValidation(error);
    turn.dataset.state = "error";
    reply.replaceChildren(...(streamed.textContent ? [streamed] : []),
      h("p", { class: "error", role: "alert" }, api.describe(error)));
  } finally {
    reply.removeAttribute("aria-busy");
    running = null;
    setBusy(false);
  }
}

/** A turn of the thread: the question, then a reply holding `pending` (the answer as it streams) until finished. */
function turnView(question, ...pending) {
  const reply = h("div", { class: "reply", "aria-busy": pending.length ? "true" : null }, pending);
  const turn = h("li", { class: "turn", dataset: { state: "streaming" } },
    h("p", { class: "question" }, h("span", { class: "visually-hidden" }, "Question: "), question), reply);
  return { turn, reply };
}

function finish(turn, reply, question, answer) {
  turn.dataset.state = "done";
  const copy = h("button", { type: "button", class: "link copy" }, "Copy as Markdown");
  copy.addEventListener("click", async () => {
    copy.textContent = (await copyText(answerMarkdown(question, answer))) ? "Copied" : "Copy failed";
  });
  reply.replaceChildren(...answerView(answer), h("p", { class: "meta" }, usageLine(answer), " ", copy));
}

export function usageLine(answer, clientMs) {
  const usage = answer.usage || {};
  const timings = answer.timings || {};
  const parts = [`${answer.path}`, `${usage.prompt_tokens ?? "?"} prompt tokens`,
    `${usage.completion_tokens ?? "?"} generated`];
  if (timings.retrieve_ms != null) parts.push(`retrieve ${Math.round(timings.retrieve_ms)} ms`);
  if (timings.generate_ms != null) parts.push(`generate ${Math.round(timings.generate_ms)} ms`);
  if (clientMs != null) parts.push(`total ${Math.round(clientMs)} ms`);
  return parts.join(" · ");
}

async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {  // no clipboard API (plain http to another host): the older way
    const area = h("textarea", { class: "visually-hidden", readonly: true });
    area.value = text;
    document.body.append(area);
    area.select();
    const copied = document.execCommand("copy");
    area.remove();
    return copied;
  }
}

function setBusy(busy) {
  $("#ask-button").disabled = busy;
  $("#ask-stop").hidden = !busy;
}
