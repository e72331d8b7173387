// Privacy: what classes of data are held (counts, oldest item, retention, next purge), erasure by subject with a
// receipt, and a purge with a dry run first.
import { act, api, can, clear, confirmDialog, field, h, num, panel, session, table, timeEl } from "../lib.js";

export async function render(container, { signal }) {
  const reportArea = h("div");

  async function loadReport() {
    const report = await api("/api/privacy/report", { signal });
    clear(reportArea,
      h("dl", { class: "kv" }, h("dt", {}, "Next purge"), h("dd", {}, timeEl(report.next_purge)),
        h("dt", {}, "Last purge"), h("dd", {}, timeEl(report.last_purge)),
        h("dt", {}, "Policy digest"), h("dd", { class: "mono" }, String(report.policy_digest).slice(0, 16)),
        h("dt", {}, "Personal data detected"), h("dd", {}, (report.entities || []).join(", ") || "—")),
      table([
        { label: "Data class", value: (c) => h("strong", {}, c.data_class) },
        { label: "Items", num: true, value: (c) => num(c.count) },
        { label: "Oldest", value: (c) => timeEl(c.oldest) },
        { label: "Kept for", value: (c) => c.retention },
        { label: "Note", class: "wrap", value: (c) => c.note },
      ], report.classes));
  }

  const parts = [panel("What this appliance holds", reportArea)];
  if (can("privacy:admin")) {
    // ---- erasure ----
    const subject = h("input", { type: "text", name: "subject", placeholder: "alice or alice@example.com" });
    const receipt = h("div", { "aria-live": "polite" });
    const eraseForm = h("form", {}, field("Subject", subject, "A user name, or a person's e-mail address found in stored data."),
      h("button", { type: "submit", class: "danger" }, "Erase"), receipt);
    eraseForm.addEventListener("submit", async (event) => {
      event.preventDefault();
      const who = subject.value.trim();
      if (!who) { subject.focus(); return; }
      if (!await confirmDialog("Erase a subject", `Erase everything held about "${who}"? This cannot be undone.`, "Erase")) return;
      const result = await act(eraseForm.querySelector("button"), () => api("/api/privacy/erasures", { method: "POST", body: { subject: who } }));
      if (!result) return;
      const at = new Date().toISOString();
      const receiptDoc = { receipt: "erasure", subject: who, at, by: session.me.name, deleted: result.deleted };
      const download = h("a", { class: "button secondary small", download: `erasure-${at.slice(0, 19)}.json`,
        href: URL.createObjectURL(new Blob([JSON.stringify(receiptDoc, null, 2)], { type: "application/json" })) }, "Download receipt");
      clear(receipt, h("div", { class: "alert ok", role: "alert" },
        h("p", {}, h("strong", {}, `Erasure receipt for "${who}"`), ` · ${new Date(at).toLocaleString()} · by ${session.me.name}`),
        table([{ label: "Data class", value: (r) => r[0] }, { label: "Items deleted", num: true, value: (r) => num(r[1]) }],
          Object.entries(result.deleted), { empty: "Nothing was held about this subject." }),
        h("p", { class: "muted" }, "The erasure is recorded in the audit log."), download));
      loadReport();
    });
    parts.push(panel("Erase a subject", eraseForm));

    // ---- purge ----
    const dry = h("button", { type: "button", class: "secondary" }, "Dry run");
    const now = h("button", { type: "button", class: "danger" }, "Purge now");
    const result = h("div", { "aria-live": "polite" });
    const show = (title, deleted) => clear(result, h("h3", {}, title), table([
      { label: "Data class", value: (r) => r[0] }, { label: "Items", num: true, value: (r) => num(r[1]) }],
    Object.entries(deleted), { empty: "Nothing is past its retention." }));
    dry.addEventListener("click", async () => {
      const reply = await act(dry, () => api("/api/privacy/purge?dry_run=true", { method: "POST" }));
      if (reply) show("A purge now would delete", reply.deleted ?? reply.would_delete ?? {});
    });
    now.addEventListener("click", async () => {
      if (!await confirmDialog("Purge", "Delete everything past its retention now?", "Purge")) return;
      const reply = await act(now, () => api("/api/privacy/purge", { method: "POST" }), "Purge done");
      if (reply) { show("Deleted", reply.deleted); loadReport(); }
    });
    parts.push(panel("Purge", h("p", { class: "muted" }, "The purge runs by itself on schedule; run it now, or see first what it would delete."),
      h("div", { class: "row" }, dry, now), result));
  }
  clear(container, parts);
  await loadReport();
}
