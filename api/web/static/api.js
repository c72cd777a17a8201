// Every call the app makes goes through here, to the same /v1 routes any client uses, with the same key.
// The key lives in sessionStorage (this tab only; never in a URL or localStorage) and is sent as a Bearer token.

const KEY_NAME = "rag-api-key";

export const apiKey = {
  get: () => sessionStorage.getItem(KEY_NAME),
  set: (key) => sessionStorage.setItem(KEY_NAME, key),
  clear: () => sessionStorage.removeItem(KEY_NAME),
};

/** A failed call: the API's `{"error": {...}}` body, or what happened on the way. */
export class ApiError extends Error {
  constructor(status, error = {}) {
    super(error.message || `Request failed (HTTP ${status}).`);
    this.status = status;
    this.code = error.code || "";
    this.details = error.details || [];
    this.requestId = error.request_id || "";
  }

  get authentication() {
    return this.status === 401 || this.status === 403;
  }
}

let unauthorized = () => {};
/** Called with the ApiError when a key is missing, wrong or revoked (to ask for one again). */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

let unreachable = () => {};
/** Called when a request got no answer or the server said it is not available (to re-check its readiness). */
export function onUnreachable(handler) {
  unreachable = handler;
}

const UNAVAILABLE = new Set([0, 502, 503, 504]);

function headers(extra = {}) {
  const result = new Headers(extra);
  const key = apiKey.get();
  if (key) result.set("Authorization", `Bearer ${key}`);
  return result;
}

async function failure(response) {
  let error = {};
  try {
    error = (await response.json()).error || {};
  } catch {
    error = { message: `${response.status} ${response.statusText}`.trim() };
  }
  const failed = new ApiError(response.status, error);
  if (failed.authentication) unauthorized(failed);
  if (UNAVAILABLE.has(failed.status)) unreachable(failed);
  return failed;
}

async function send(method, path, body, signal) {
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }), signal };
  if (body !== undefined) init.body = JSON.stringify(body);
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    const failed = new ApiError(0, { message: "The server cannot be reached." });
    unreachable(failed);
    throw failed;
  }
  if (!response.ok) throw await failure(response);
  return response;
}

export const get = async (path, signal) => (await send("GET", path, undefined, signal)).json();
export const post = async (path, body, signal) => (await send("POST", path, body, signal)).json();
export const remove = async (path) => (await send("DELETE", path)).json();
export const text = async (path) => (await send("GET", path)).text();
/** The response itself, for files (blob + content type). */
export const file = (path) => send("GET", path);

/**
 * Server-Sent Events from a POST (EventSource can only GET): yields {event, data} as each event arrives.
 * An error before the stream starts throws ApiError with the API's message, like any other call.
 */
export async function* events(path, body, signal) {
  const response = await send("POST", path, body, signal);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    const blocks = buffer.split(/\r?\n\r?\n/);
    buffer = blocks.pop();
    for (const block of blocks) {
      const parsed = parseEvent(block);
      if (parsed) yield parsed;
    }
  }
}

function parseEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split(/\r?\n/)) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (!data.length) return null;
  return { event, data: JSON.parse(data.join("\n")) };
}

/** Multipart upload with byte progress (fetch cannot report upload progress; XMLHttpRequest can). */
export function upload(path, files, onProgress) {
  return new Promise((resolve, reject) => {
    const form = new FormData();
    for (const item of files) form.append("files", item, item.name);
    const request = new XMLHttpRequest();
    request.open("POST", path);
    const key = apiKey.get();
    if (key) request.setRequestHeader("Authorization", `Bearer ${key}`);
    request.upload.onprogress = (event) => event.lengthComputable && onProgress(event.loaded / event.total);
    request.onerror = () => {
      const failed = new ApiError(0, { message: "The upload could not reach the server." });
      unreachable(failed);
      reject(failed);
    };
    request.onload = () => {
      let body = {};
      try { body = JSON.parse(request.responseText); } catch { /* reported below with the status */ }
      if (request.status >= 200 && request.status < 300) return resolve(body);
      const failed = new ApiError(request.status, body.error || { message: `Upload failed (HTTP ${request.status}).` });
      if (failed.authentication) unauthorized(failed);
      if (UNAVAILABLE.has(failed.status)) unreachable(failed);
      reject(failed);
    };
    request.send(form);
  });
}

/** The answer's text, whichever name the API gives it. */
export const answerText = (answer) => answer.answer ?? answer.text ?? "";

/** A message for a failure, with the request id to quote when there is one. */
export function describe(error) {
  if (error.name === "AbortError") return "Stopped.";
  const id = error.requestId ? ` (request ${error.requestId})` : "";
  const plain = error.code === "validation_error" && error.details.length
    ? error.details.map(invalidField).join(" ") : error.message;
  return `${plain}${id}`;
}

// ---------------------------------------------------------------------------------------- invalid requests
// A 422's details name the field (`loc`) and the rule it broke (pydantic's `type`); its `msg` is written for
// developers ("body.question: String should have at most 2000 characters"). Said here in the form's words.
const FIELD_NAMES = { question: "The question", query: "The question", answer: "An earlier answer",
  history: "The conversation", k: "Chunks in the prompt (k)", max_new_tokens: "Max new tokens",
  temperature: "Temperature", retriever: "Retriever", path: "Path" };
const RULES = {
  string_too_long: (name, limit) => `${name} is too long (the limit is ${limit} characters).`,
  string_too_short: (name) => `${name} is empty.`,
  missing: (name) => `${name} is missing.`,
  too_long: (name, limit) => `${name} is too long (the limit is ${limit}).`,
  less_than_equal: (name, limit) => `${name} must be at most ${limit}.`,
  less_than: (name, limit) => `${name} must be below ${limit}.`,
  greater_than_equal: (name, limit) => `${name} must be at least ${limit}.`,
  greater_than: (name, limit) => `${name} must be above ${limit}.`,
  int_parsing: (name) => `${name} must be a whole number.`,
  int_from_float: (name) => `${name} must be a whole number.`,
  float_parsing: (name) => `${name} must be a number.`,
  literal_error: (name) => `${name} is not one of the choices.`,
};

function invalidField(detail) {
  const field = String(detail.loc).split(".").pop();
  const name = FIELD_NAMES[field] || `“${field}”`;
  const limit = /-?\d+(\.\d+)?/.exec(detail.msg || "")?.[0];  // the rule's bound is the first number it says
  const rule = RULES[detail.type];
  if (rule) return rule(name, count(limit));
  if (/empty or only whitespace/.test(detail.msg || "")) return `${name} is empty.`;  // schemas.py's _not_blank
  return `${name}: ${detail.msg}.`;
}

/** A number for people: 2000 → "2,000". */
export const count = (value) => Number(value).toLocaleString("en");
