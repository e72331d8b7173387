// API keys: an admin sees and manages every key (/api/keys), anyone else their own (/api/me/keys). A new key is
// shown once with a copy button; scopes, models, collections, limits and expiry narrow it.
import { act, api, badge, can, checkbox, clear, confirmDialog, copyText, errorBox, field, h, intOrNull, list, longTable,
  num, panelWithActions, select, session, timeEl, uid } from "../lib.js";

export async function render(container, { signal }) {
  const admin = can("keys:manage");
  const base = admin ? "/api/keys" : "/api/me/keys";
  const listArea = h("div");
  const created = h("div", { "aria-live": "polite" });
  const create = h("button", { type: "button" }, "Create key");

  const [roles, models] = await Promise.all([
    admin && can("policies:manage") ? api("/api/policies/rbac", { signal }).then((r) => Object.keys(r.roles)).catch(() => null) : null,
    can("models:read") ? api("/v1/models", { signal }).then((r) => r.data.map((m) => m.id)).catch(() => []) : [],
  ]);
  const roleNames = roles || ["admin", "operator", "user", "auditor"];

  async function load() {
    const keys = (await api(base, { signal })).data;
    const now = Date.now();
    clear(listArea, longTable([
      { label: "Name", class: "wrap", value: (k) => k.name },
      { label: "Key", value: (k) => h("code", {}, `${k.prefix || k.id}…`) },
      { label: "Role", value: (k) => k.role },
      { label: "Narrowed to", class: "wrap", value: (k) => narrowed(k) },
      { label: "Expires · last used", value: (k) => h("div", {}, k.expires_at ? timeEl(k.expires_at) : "never expires",
        h("div", { class: "muted" }, k.last_used_at ? ["used ", timeEl(k.last_used_at)] : "never used")) },
      { label: "Status", value: (k) => (k.revoked_at ? badge("revoked", "bad")
        : k.expires_at && Date.parse(k.expires_at) < now ? badge("expired", "warn") : badge("active", "ok")) },
      { label: "Actions", value: (k) => (k.revoked_at ? "—" : h("button", { class: "danger small",
        "aria-label": `Revoke key ${k.name}`, onclick: async (e) => {
          if (!await confirmDialog("Revoke key", `Revoke "${k.name}"? Programs using it stop working at once.`, "Revoke")) return;
          if (await act(e.target, () => api(`${base}/${encodeURIComponent(k.id)}`, { method: "DELETE" }), `Revoked ${k.name}`) !== undefined) load();
        } }, "Revoke")) },
    ], keys, { empty: "No API keys yet. Create one for a program that uses the OpenAI-compatible API.",
      text: (k) => `${k.name} ${k.id} ${k.role}`, label: "API keys" }));
  }

  create.addEventListener("click", () => openForm());

  function openForm() {
    const titleId = uid("dlg");
    const name = h("input", { type: "text", name: "name", required: true, maxlength: 100 });
    const role = select(roleNames, { name: "role", value: admin ? "user" : session.me.role });
    const expires = select([["", "Never"], ["1d", "1 day"], ["7d", "7 days"], ["30d", "30 days"], ["90d", "90 days"], ["365d", "1 year"]],
      { name: "expires", value: "30d" });
    const scopeBoxes = session.me.permissions.map((p) => checkbox(p, { value: p }));
    const modelField = h("input", { type: "text", name: "models", placeholder: "all models", list: "key-models" });
    const modelList = h("datalist", { id: "key-models" }, models.map((m) => h("option", { value: m })));
    const collectionsField = h("input", { type: "text", name: "collections", placeholder: "all it may read" });
    const rpm = h("input", { type: "number", min: 1, name: "rpm", placeholder: "none" });
    const tpm = h("input", { type: "number", min: 1, name: "tpm", placeholder: "none" });
    const daily = h("input", { type: "number", min: 1, name: "daily_tokens", placeholder: "none" });
    const error = h("div", { role: "alert" });
    const submit = h("button", { type: "submit" }, "Create");
    const cancel = h("button", { type: "button", class: "secondary" }, "Cancel");
    const form = h("form", {}, h("h2", { id: titleId }, "Create an API key"), error,
      field("Name", name, "What the key is for, e.g. 'laptop' or 'ci'."),
      h("div", { class: "fields" }, admin ? field("Role", role) : null, field("Expires", expires)),
      h("fieldset", {}, h("legend", {}, "Scopes (none ticked: the whole role)"),
        h("div", { class: "checks" }, scopeBoxes.map((b) => b.el))),
      h("div", { class: "fields" }, field("Models", modelField, "Comma-separated; empty: every model."),
        field("Collections", collectionsField, "Comma-separated; empty: every one it may read.")), modelList,
      h("div", { class: "fields" }, field("Requests per minute", rpm), field("Tokens per minute", tpm),
        field("Tokens per day", daily)),
      h("div", { class: "actions" }, cancel, submit));
    const dialog = h("dialog", { "aria-labelledby": titleId }, form);
    cancel.addEventListener("click", () => dialog.close());
    dialog.addEventListener("close", () => dialog.remove());
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      clear(error);
      if (!name.value.trim()) { clear(error, errorBox("Give the key a name.")); name.focus(); return; }
      const scopes = scopeBoxes.filter((b) => b.input.checked).map((b) => b.input.value);
      const body = { name: name.value.trim(), expires: expires.value || null, scopes: scopes.length ? scopes : null,
        models: list(modelField.value), collections: list(collectionsField.value),
        rpm: intOrNull(rpm.value), tpm: intOrNull(tpm.value), daily_tokens: intOrNull(daily.value) };
      if (admin) body.role = role.value;
      submit.disabled = true;
      try {
        const key = await api(base, { method: "POST", body });
        dialog.close();
        showSecret(key);
        load();
      } catch (err) {
        clear(error, errorBox(err));
      } finally {
        submit.disabled = false;
      }
    });
    document.body.append(dialog);
    dialog.showModal();
    name.focus();
  }

  function showSecret(key) {
    const copy = h("button", { type: "button", class: "secondary" }, "Copy");
    copy.addEventListener("click", () => copyText(key.key, copy));
    const done = h("button", { type: "button", class: "link" }, "I have stored it");
    done.addEventListener("click", () => { clear(created); create.focus(); });
    clear(created, h("div", { class: "alert ok", role: "alert" },
      h("p", {}, h("strong", {}, `Key "${key.name}" created.`), " Copy it now: it is shown only this once."),
      h("div", { class: "secret-box" }, h("code", { "aria-label": "The new API key" }, key.key), copy),
      h("p", { class: "muted" }, "Use it as a Bearer token, e.g. with the openai SDK: base_url = ",
        h("code", {}, `${location.origin}/v1`)), done));
    copy.focus();
  }

  clear(container, h("p", { class: "muted" }, admin ? "Every API key on this appliance. Secrets are never shown again after creation."
    : "Your own API keys. They carry your role; narrow them with scopes, models and limits."),
  created, panelWithActions(admin ? "All keys" : "Your keys", [create], listArea));
  await load();
}

// What narrows a key beyond its role: scopes, models, collections and limits; "whole role" when nothing does.
function narrowed(k) {
  const parts = [];
  if (k.scopes) parts.push(`scopes: ${k.scopes.join(", ")}`);
  if (k.models) parts.push(`models: ${k.models.join(", ")}`);
  if (k.collections) parts.push(`collections: ${k.collections.join(", ")}`);
  const limit = limits(k);
  if (limit !== "none") parts.push(`limits: ${limit}`);
  return parts.length ? parts.map((part) => h("div", {}, part)) : "whole role";
}

function limits(k) {
  const parts = [];
  if (k.rpm) parts.push(`${num(k.rpm)} rpm`);
  if (k.tpm) parts.push(`${num(k.tpm)} tpm`);
  if (k.daily_tokens) parts.push(`${num(k.daily_tokens)}/day`);
  return parts.join(", ") || "none";
}
