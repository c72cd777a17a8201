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
    throw new ApiError(0, { message: "The server cannot be reached." });
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
    request.onerror = () => reject(new ApiError(0, { message: "The upload could not reach the server." }));
    request.onload = () => {
      let body = {};
      try { body = JSON.parse(request.responseText); } catch { /* reported below with the status */ }
      if (request.status >= 200 && request.status < 300) return resolve(body);
      const failed = new ApiError(request.status, body.error || { message: `Upload failed (HTTP ${request.status}).` });
      if (failed.authentication) unauthorized(failed);
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
  return `${error.message}${id}`;
}
