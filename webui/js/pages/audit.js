// Audit: the hash-chained log, newest first, filtered by actor, action, outcome and time, paged by sequence number;
// "Verify chain" checks every record's hash link; export as JSON lines with the same filters.
import { act, api, badge, clear, field, h, jsonDetails, num, panel, select, table, timeEl } from "../lib.js";

const PAGE = 50;

export async function render(container, { signal }) {
  const actor = h("input", { type: "text", name: "actor", placeholder: "user:… or key:…" });
  const action = h("input", { type: "text", name: "action", placeholder: "key.create or model.*" });
  const outcome = select([["", "Any"], ["ok", "ok"], ["denied", "denied"], ["error", "error"]], { name: "outcome" });
  const since = h("input", { type: "datetime-local", name: "since" });
  const until = h("input", { type: "datetime-local", name: "until" });
  const apply = h("button", { type: "submit" }, "Filter");
  const exportLink = h("a", { class: "button secondary", download: "audit.jsonl" }, "Export JSONL");
  const filters = h("form", {}, h("div", { class: "fields" }, field("Actor", actor), field("Action", action),
    field("Outcome", outcome), field("Since", since), field("Until", until)), h("div", { class: "row" }, apply, exportLink));
  const verifyButton = h("button", { type: "button" }, "Verify chain");
  const verdict = h("div", { "aria-live": "polite" });
  const rows = h("div");
  const newer = h("button", { type: "button", class: "secondary small" }, "Newer");
  const older = h("button", { type: "button", class: "secondary small" }, "Older");
  const position = h("span", { class: "muted" });
  const cursor = { before: null, after: null };
  const state = { top: null, bottom: null }; // the newest and oldest seq on the page

  const query = () => {
    const q = new URLSearchParams();
    if (actor.value.trim()) q.set("actor", actor.value.trim());
    if (action.value.trim()) q.set("action", action.value.trim());
    if (outcome.value) q.set("outcome", outcome.value);
    if (since.value) q.set("since", new Date(since.value).toISOString());
    if (until.value) q.set("until", new Date(until.value).toISOString());
    return q;
  };

  async function load() {
    const q = query();
    exportLink.href = `/api/audit?${q}&format=jsonl`;
    q.set("limit", String(PAGE));
    q.set("order", "desc");
    if (cursor.before) q.set("before_seq", cursor.before);
    if (cursor.after) { q.set("after_seq", cursor.after); q.set("order", "asc"); }
    const reply = await api(`/api/audit?${q}`, { signal });
    let records = reply.data;
    if (cursor.after) records = records.reverse();
    clear(rows, table([
      { label: "#", num: true, value: (r) => String(r.seq) },
      { label: "When", value: (r) => timeEl(r.at) },
      { label: "Actor", class: "wrap", value: (r) => r.actor },
      { label: "Action", value: (r) => h("code", {}, r.action) },
      { label: "Target", class: "wrap", value: (r) => r.target },
      { label: "Outcome", value: (r) => badge(r.outcome, r.outcome === "ok" ? "ok" : r.outcome === "denied" ? "warn" : "bad") },
      { label: "Details", class: "wrap", value: (r) => jsonDetails(r.details) },
    ], records, { empty: "No audit records match these filters." }));
    const seqs = records.map((r) => r.seq);
    state.top = seqs.length ? Math.max(...seqs) : null;
    state.bottom = seqs.length ? Math.min(...seqs) : null;
    const more = reply.has_more;
    older.disabled = !records.length || (!cursor.after && !more);
    newer.disabled = !cursor.before && !cursor.after ? true : cursor.after ? !more : false;
    position.textContent = records.length ? `records #${num(state.bottom)}–#${num(state.top)}` : "";
  }

  filters.addEventListener("submit", (event) => { event.preventDefault(); cursor.before = cursor.after = null; load(); });
  older.addEventListener("click", () => { cursor.before = state.bottom; cursor.after = null; load(); });
  newer.addEventListener("click", () => { cursor.after = state.top; cursor.before = null; load(); });
  verifyButton.addEventListener("click", async () => {
    clear(verdict, h("p", { class: "muted" }, "Verifying every record…"));
    const result = await act(verifyButton, () => api("/api/audit/verify", { method: "POST" }));
    if (!result) { clear(verdict); return; }
    clear(verdict, result.intact
      ? h("div", { class: "alert ok", role: "alert" }, `The audit chain is intact: ${num(result.records)} records verified.`)
      : h("div", { class: "alert bad", role: "alert" },
        `The audit chain is broken at record #${result.first_broken}: ${result.reason}. Records from there on cannot be trusted; restore the database from a backup and investigate.`));
  });

  clear(container,
    panel("Integrity", h("p", { class: "muted" }, "Each record holds the hash of the one before it, so an edited, removed or reordered record breaks the chain."),
      verifyButton, verdict),
    panel("Records", filters, rows, h("div", { class: "pager" }, position, newer, older)));
  await load();
}
