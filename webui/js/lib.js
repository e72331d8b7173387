// What every page needs: elements built with text nodes only, the JSON API with the CSRF header and OpenAI-shaped
// errors turned into messages, the session's permissions, formatting and small UI pieces (toasts, confirm, tables).

export const session = { me: null, csrf: null };

export class ApiError extends Error {
  constructor(message, status, code, extra = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.line = extra.line ?? null;
    this.param = extra.param ?? null;
  }
}

// h("button", {class: "x", onclick: fn, "aria-label": "..."}, "text", child, [more])
// Strings become text nodes: nothing is ever parsed as HTML.
export function h(tag, props, ...children) {
  const svg = tag.startsWith("svg:");
  const el = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag.slice(4)) : document.createElement(tag);
  for (const [name, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (name === "text") el.textContent = String(value);
    else if (name === "value" && !svg) el.value = value;
    else if (name === "checked" || name === "selected" || name === "disabled" || name === "multiple"
             || name === "required" || name === "open") el[name] = Boolean(value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function clear(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

let ids = 0;
export const uid = (prefix = "f") => `${prefix}-${++ids}`;

// A labelled control: field("Name", input) -> <div class=field><label for=id>Name</label>input<hint></div>
export function field(label, control, hint) {
  if (!control.id) control.id = uid();
  const parts = [h("label", { for: control.id }, label), control];
  if (hint) {
    const hintId = uid("hint");
    control.setAttribute("aria-describedby", hintId);
    parts.push(h("div", { class: "hint", id: hintId }, hint));
  }
  return h("div", { class: "field" }, parts);
}

export function checkbox(label, props = {}) {
  const input = h("input", { type: "checkbox", id: uid(), ...props });
  return { input, el: h("label", { class: "check", for: input.id }, input, label) };
}

export function select(options, props = {}) {
  return h("select", props, options.map((o) => {
    const [value, text] = Array.isArray(o) ? o : [o, o];
    return h("option", { value, selected: props.value === value }, text);
  }));
}

// ---- the API ----
const MUTATING = new Set(["POST", "PUT", "PATCH", "DELETE"]);

export async function api(path, { method = "GET", body, headers = {}, signal, raw = false } = {}) {
  const init = { method, headers: { ...headers }, credentials: "same-origin", signal, cache: "no-store" };
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  if (MUTATING.has(method) && session.csrf) init.headers["X-CSRF-Token"] = session.csrf;
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError("The appliance did not answer; check that it is running and reload the page.", 0, "network");
  }
  if (!response.ok) throw await errorOf(response);
  if (raw) return response;
  if (response.status === 204) return null;
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

export async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  let extra = {};
  try {
    const data = await response.json();
    const error = data.error || data;
    message = error.message || error.detail || message;
    code = error.code || null;
    extra = { line: error.line, param: error.param };
  } catch { /* not JSON */ }
  if (response.status === 401 && session.me) {
    document.dispatchEvent(new CustomEvent("session-ended", { detail: message }));
  }
  if (response.status === 429) {
    const wait = response.headers.get("retry-after");
    if (wait && !message.includes("wait")) message += ` (try again in ${Math.ceil(Number(wait))} s)`;
  }
  return new ApiError(message, response.status, code, extra);
}

export const can = (permission) => Boolean(session.me?.permissions?.includes(permission));
export const canAny = (...permissions) => permissions.some(can);

// ---- formatting ----
export function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = Number(n);
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${v.toFixed(v >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
}
export function num(n, digits = 0) {
  if (n === null || n === undefined || Number.isNaN(n)) return "—";
  return Number(n).toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: digits });
}
export function ms(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  return seconds < 1 ? `${Math.round(seconds * 1000)} ms` : `${seconds.toFixed(2)} s`;
}
export function pct(ratio) {
  return ratio === null || ratio === undefined ? "—" : `${(ratio * 100).toFixed(1)}%`;
}
const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "short", timeStyle: "medium" }); // one, reused
export function when(iso) {
  if (!iso) return "—";
  const d = new Date(typeof iso === "number" ? iso * 1000 : iso);
  return Number.isNaN(d.getTime()) ? String(iso) : dateFormat.format(d);
}
export function timeEl(iso) {
  return iso ? h("time", { datetime: typeof iso === "number" ? new Date(iso * 1000).toISOString() : iso }, when(iso))
    : "—";
}

// ---- feedback ----
export function toast(message, kind = "info") {
  const area = document.getElementById("toasts");
  if (!area) return;
  const el = h("div", { class: `toast ${kind}` }, message);
  area.append(el);
  setTimeout(() => el.remove(), kind === "bad" ? 9000 : 5000);
}

export function errorBox(err) {
  const text = err instanceof Error ? err.message : String(err);
  return h("div", { class: "alert bad", role: "alert" }, text);
}

// Runs an action from a button: disables it meanwhile, reports failure in a toast; returns the action's result.
export async function act(button, action, done) {
  if (button) button.disabled = true;
  try {
    const result = await action();
    if (done) toast(done, "ok");
    return result;
  } catch (err) {
    if (err.name !== "AbortError") toast(err.message, "bad");
    return undefined;
  } finally {
    if (button) button.disabled = false;
  }
}

// A modal confirmation in a real <dialog> (focus is trapped and Escape cancels); resolves true or false.
export function confirmDialog(title, message, confirmText = "Confirm", danger = true) {
  return new Promise((resolve) => {
    const titleId = uid("dlg");
    const ok = h("button", { class: danger ? "danger" : "", value: "ok" }, confirmText);
    const cancel = h("button", { class: "secondary", value: "cancel" }, "Cancel");
    const form = h("form", { method: "dialog" }, h("h2", { id: titleId }, title), h("p", {}, message),
      h("div", { class: "actions" }, cancel, ok));
    const dialog = h("dialog", { "aria-labelledby": titleId }, form);
    dialog.addEventListener("close", () => { resolve(dialog.returnValue === "ok"); dialog.remove(); });
    document.body.append(dialog);
    dialog.showModal();
    cancel.focus();
  });
}

// A table: columns [{label, value: row => node|string, num?: bool, class?}], rows; an empty message otherwise.
export function table(columns, rows, { caption, empty = "Nothing here yet.", label } = {}) {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  // a region that may scroll sideways on a phone: focusable, so that the keyboard can scroll it too
  return h("div", { class: "table-wrap", tabindex: "0", role: "region",
    "aria-label": label || caption || columns.map((c) => c.label).slice(0, 3).join(", ") }, h("table", {},
    caption ? h("caption", {}, caption) : null,
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col", class: c.num ? "num" : c.class }, c.label)))),
    h("tbody", {}, rows.map((row) => h("tr", {}, columns.map((c) => {
      const value = c.value(row);
      return h("td", { class: c.num ? "num" : c.class }, value === null || value === undefined || value === "" ? "—" : value);
    }))))));
}

export function badge(text, kind = "") {
  return h("span", { class: `badge ${kind}` }, text);
}

// A section with a heading that names it (a landmark for screen readers).
export function panel(title, ...children) {
  const id = uid("panel");
  return h("section", { class: "panel", "aria-labelledby": id }, h("h2", { id }, title), children);
}

export function panelWithActions(title, actions, ...children) {
  const id = uid("panel");
  return h("section", { class: "panel", "aria-labelledby": id },
    h("div", { class: "panel-head" }, h("h2", { id }, title), h("div", { class: "row" }, actions)), children);
}

// Splits "a, b,c" into ["a","b","c"]; an empty field is null (no restriction).
export function list(text) {
  const items = String(text || "").split(/[,\n]/).map((s) => s.trim()).filter(Boolean);
  return items.length ? items : null;
}

export function intOrNull(text) {
  const t = String(text ?? "").trim();
  return t === "" ? null : Number.parseInt(t, 10);
}

export async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
    if (button) {
      const label = button.textContent;
      button.textContent = "Copied";
      setTimeout(() => { button.textContent = label; }, 2000);
    }
    toast("Copied to the clipboard", "ok");
  } catch {
    toast("The browser refused the clipboard; select the text and copy it by hand", "bad");
  }
}

// A poller that stops when the page is left and pauses while the tab is hidden.
export function every(seconds, fn, signal) {
  let timer = null;
  const tick = async () => {
    if (signal.aborted) return;
    if (!document.hidden) {
      try { await fn(); } catch (err) { if (err.name !== "AbortError") console.warn(err); }
    }
    if (!signal.aborted) timer = setTimeout(tick, seconds * 1000);
  };
  signal.addEventListener("abort", () => clearTimeout(timer));
  tick();
}

// A JSON object as a one-line summary that opens to the whole, indented (audit details, job results).
export function jsonDetails(value, max = 70) {
  const text = JSON.stringify(value ?? {});
  if (text.length <= max) return h("span", { class: "mono" }, text);
  return h("details", { class: "json" }, h("summary", {}, `${text.slice(0, max)}…`), h("pre", {}, JSON.stringify(value, null, 2)));
}

// A long list as a table of its first `pageSize` rows, a filter over `text(row)` and "Show more": a thousand keys
// or documents stay quick to draw and to read.
export function longTable(columns, rows, { pageSize = 100, text, label, empty } = {}) {
  if (rows.length <= pageSize) return table(columns, rows, { label, empty });
  let shown = pageSize;
  let matching = rows;
  const area = h("div");
  const count = h("p", { class: "muted", "aria-live": "polite" });
  const more = h("button", { type: "button", class: "secondary small" }, `Show ${pageSize} more`);
  const filter = h("input", { type: "search", placeholder: `Filter ${rows.length} rows` });
  const draw = () => {
    clear(area, table(columns, matching.slice(0, shown), { label, empty: "No row matches the filter." }));
    count.textContent = `Showing ${Math.min(shown, matching.length)} of ${matching.length}`;
    more.classList.toggle("hidden", shown >= matching.length);
  };
  filter.addEventListener("input", () => {
    const q = filter.value.trim().toLowerCase();
    matching = q ? rows.filter((r) => text(r).toLowerCase().includes(q)) : rows;
    shown = pageSize;
    draw();
  });
  more.addEventListener("click", () => { shown += pageSize; draw(); });
  draw();
  return h("div", { class: "stack" }, field("Filter", filter), area, h("div", { class: "row" }, count, more));
}
