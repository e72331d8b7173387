// Policies: the roles file (RBAC) and the privacy policy, viewed and edited with validation errors shown at their
// line; a box that runs the PII detectors on sample text and shows what each surface would do with it.
import { api, can, clear, errorBox, field, h, panel, table, toast, uid } from "../lib.js";

export async function render(container, { signal }) {
  const parts = [];
  if (can("policies:manage")) {
    const rbac = await api("/api/policies/rbac", { signal });
    const note = rbac.editable === false
      ? `File: ${rbac.path}. This is the roles file shipped with the appliance (an upgrade replaces it), so it is read only here: copy it, set auth.rbac_file to the copy and restart to edit roles in the browser.`
      : `File: ${rbac.path}`;
    parts.push(editor({ title: "Roles and permissions (RBAC)", text: rbac.policy, note,
      editable: rbac.editable !== false, save: (text) => api("/api/policies/rbac", { method: "PUT", body: { policy: text } }),
      extra: table([
        { label: "Permission", value: (p) => h("code", {}, p[0]) },
        { label: "What it allows", class: "wrap", value: (p) => p[1] },
        { label: "Roles", value: (p) => Object.entries(rbac.roles).filter(([, r]) => r.permissions.includes("*") || r.permissions.includes(p[0])).map(([n]) => n).join(", ") },
      ], Object.entries(rbac.permissions), { caption: "Every permission, and the roles that grant it now" }) }));
  }
  if (can("privacy:read")) {
    const privacy = await api("/api/privacy/policy", { signal });
    parts.push(editor({ title: "Privacy policy (PII and retention)", text: privacy.policy,
      note: `Version ${privacy.version || "shipped"} · source ${privacy.source} · digest ${String(privacy.digest).slice(0, 12)}`,
      editable: can("privacy:admin"),
      save: (text) => api("/api/privacy/policy", { method: "PUT", body: { policy: text } }) }));
    parts.push(detector());
  }
  clear(container, parts.length ? parts : h("p", { class: "empty" }, "Your role can see no policy."));
}

function editor({ title, text, note, editable, save, extra }) {
  const errorId = uid("err");
  const area = h("textarea", { class: "code", spellcheck: "false", "aria-describedby": errorId, readonly: !editable,
    rows: 18 });
  area.value = text;
  const error = h("div", { id: errorId, "aria-live": "polite" });
  const saveButton = editable ? h("button", { type: "submit" }, "Validate and save") : null;
  const reset = editable ? h("button", { type: "button", class: "secondary" }, "Revert") : null;
  const form = h("form", {}, h("p", { class: "muted" }, note), field(`${title} (TOML)`, area), error,
    editable ? h("div", { class: "row" }, saveButton, reset) : h("p", { class: "muted" }, "Read only for your role."));
  reset?.addEventListener("click", () => { area.value = text; clear(error); area.removeAttribute("aria-invalid"); });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clear(error);
    area.removeAttribute("aria-invalid");
    saveButton.disabled = true;
    try {
      await save(area.value);
      text = area.value;
      clear(error, h("div", { class: "alert ok", role: "status" }, "Saved: in force now, and recorded in the audit log."));
      toast(`${title}: saved`, "ok");
    } catch (err) {
      area.setAttribute("aria-invalid", "true");
      const go = err.line ? h("button", { type: "button", class: "link" }, `Go to line ${err.line}`) : null;
      go?.addEventListener("click", () => selectLine(area, err.line));
      clear(error, h("div", { class: "alert bad", role: "alert" }, err.message, " ", go));
      if (err.line) selectLine(area, err.line);
    } finally {
      saveButton.disabled = false;
    }
  });
  return panel(title, form, extra || null);
}

function selectLine(area, line) {
  const lines = area.value.split("\n");
  const start = lines.slice(0, line - 1).reduce((a, l) => a + l.length + 1, 0);
  area.focus();
  area.setSelectionRange(start, start + (lines[line - 1] || "").length);
  const lineHeight = area.scrollHeight / Math.max(lines.length, 1);
  area.scrollTop = Math.max(0, (line - 3) * lineHeight);
}

function detector() {
  const sample = h("textarea", { rows: 4, name: "sample" });
  sample.value = "Mail jane.doe@example.com or call +44 20 7946 0958 about card 4111 1111 1111 1111.";
  const out = h("div", { "aria-live": "polite" });
  const form = h("form", {}, field("Sample text", sample, "Nothing is stored: the detectors run on this text and the result comes back."),
    h("button", { type: "submit" }, "Run detectors"), out);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const result = await api("/api/privacy/detect", { method: "POST", body: { text: sample.value } });
      clear(out,
        h("h3", {}, `Found ${result.findings.length}`),
        table([
          { label: "Kind", value: (f) => f.kind },
          { label: "Text", class: "wrap", value: (f) => h("code", {}, f.text) },
          { label: "At", num: true, value: (f) => `${f.start}–${f.end}` },
        ], result.findings, { empty: "No personal data found." }),
        h("h3", {}, "What each surface would do"),
        table([
          { label: "Surface", value: ([name]) => h("strong", {}, name) },
          { label: "Action", value: ([, s]) => (s.blocked ? "block" : s.action) },
          { label: "Result", class: "wrap", value: ([, s]) => (s.blocked ? h("span", { class: "error-text" }, "refused") : h("span", { class: "mono" }, s.text)) },
        ], Object.entries(result.surfaces)));
    } catch (err) { clear(out, errorBox(err)); }
  });
  return panel("Try the PII detectors", form);
}
