// Building DOM nodes without HTML strings: text always goes in as text nodes, so nothing from a document, an
// answer or a report can become markup. Attributes named on* are refused (handlers are passed as functions).

export const $ = (selector, root = document) => root.querySelector(selector);

export function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value == null || value === false) continue;
    if (typeof value === "function" && name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name.startsWith("on")) throw new Error(`event handler attribute ${name} must be a function`);
    else if (name === "class") element.className = value;
    else if (name === "dataset") Object.assign(element.dataset, value);
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child != null && child !== false) element.append(child instanceof Node ? child : String(child));
  }
  return element;
}

/** Text with every occurrence of `needles` (case-insensitive) wrapped in <mark>. */
export function highlighted(text, needles) {
  const wanted = needles.filter((needle) => needle && needle.trim()).map(escapeRegExp);
  if (!wanted.length) return [text];
  const pattern = new RegExp(`(${wanted.sort((a, b) => b.length - a.length).join("|")})`, "gi");
  return text.split(pattern).map((part, index) => (index % 2 ? h("mark", {}, part) : part));
}

function escapeRegExp(text) {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

export function formatBytes(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  const units = ["KB", "MB", "GB"];
  let value = bytes / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
}

export const basename = (path) => path.split(/[\\/]/).pop();

/** A status line: `kind` is "", "error" or "ok". */
export function say(element, message, kind = "") {
  element.textContent = message;
  element.className = element.className.replace(/\b(error|ok)\b/g, "").trim();
  if (kind) element.classList.add(kind);
}
