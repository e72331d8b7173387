// Users: create (name, role, password, limits), change role and limits, disable and enable.
import { act, api, badge, clear, confirmDialog, errorBox, field, h, intOrNull, num, panel, select, session, table,
  timeEl, toast, uid } from "../lib.js";

export async function render(container, { signal }) {
  const roles = await api("/api/policies/rbac", { signal }).then((r) => Object.keys(r.roles))
    .catch(() => ["admin", "operator", "user", "auditor"]);
  const listArea = h("div");

  async function load() {
    const users = (await api("/api/users", { signal })).data;
    clear(listArea, table([
      { label: "Name", value: (u) => h("strong", {}, u.name) },
      { label: "Role", value: (u) => roleSelect(u) },
      { label: "Status", value: (u) => (u.disabled_at ? badge("disabled", "bad") : badge("active", "ok")) },
      { label: "Limits", value: (u) => [u.rpm && `${num(u.rpm)} rpm`, u.tpm && `${num(u.tpm)} tpm`,
        u.daily_tokens && `${num(u.daily_tokens)}/day`].filter(Boolean).join(", ") || "none" },
      { label: "Created", value: (u) => timeEl(u.created_at) },
      { label: "Actions", value: (u) => h("div", { class: "row" },
        h("button", { class: "secondary small", "aria-label": `Edit limits of ${u.name}`, onclick: () => editLimits(u) }, "Limits"),
        u.name === session.me.name ? null : h("button", { class: u.disabled_at ? "small" : "danger small",
          "aria-label": `${u.disabled_at ? "Enable" : "Disable"} ${u.name}`, onclick: async (e) => {
            const disable = !u.disabled_at;
            if (disable && !await confirmDialog("Disable user", `Disable ${u.name}? Their sessions end at once.`, "Disable")) return;
            if (await act(e.target, () => api(`/api/users/${encodeURIComponent(u.name)}`, { method: "PATCH", body: { disabled: disable } }),
              `${u.name} ${disable ? "disabled" : "enabled"}`)) load();
          } }, u.disabled_at ? "Enable" : "Disable")) },
    ], users, { empty: "No users yet." }));
  }

  function roleSelect(u) {
    const s = select(roles, { value: u.role, "aria-label": `Role of ${u.name}`, disabled: u.name === session.me.name });
    s.addEventListener("change", async () => {
      const done = await act(s, () => api(`/api/users/${encodeURIComponent(u.name)}`, { method: "PATCH", body: { role: s.value } }),
        `${u.name} is now ${s.value}`);
      if (!done) s.value = u.role;
    });
    return s;
  }

  function editLimits(u) {
    const titleId = uid("dlg");
    const rpm = h("input", { type: "number", min: 1, value: u.rpm ?? "", placeholder: "none" });
    const tpm = h("input", { type: "number", min: 1, value: u.tpm ?? "", placeholder: "none" });
    const daily = h("input", { type: "number", min: 1, value: u.daily_tokens ?? "", placeholder: "none" });
    const error = h("div");
    const save = h("button", { type: "submit" }, "Save");
    const cancel = h("button", { type: "button", class: "secondary" }, "Cancel");
    const form = h("form", {}, h("h2", { id: titleId }, `Limits of ${u.name}`), error,
      h("div", { class: "fields" }, field("Requests per minute", rpm), field("Tokens per minute", tpm), field("Tokens per day", daily)),
      h("p", { class: "muted" }, "Empty means no limit."), h("div", { class: "actions" }, cancel, save));
    const dialog = h("dialog", { "aria-labelledby": titleId }, form);
    cancel.addEventListener("click", () => dialog.close());
    dialog.addEventListener("close", () => dialog.remove());
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      try {
        await api(`/api/users/${encodeURIComponent(u.name)}`, { method: "PATCH",
          body: { rpm: intOrNull(rpm.value), tpm: intOrNull(tpm.value), daily_tokens: intOrNull(daily.value) } });
        dialog.close();
        toast(`Limits of ${u.name} saved`, "ok");
        load();
      } catch (err) { clear(error, errorBox(err)); }
    });
    document.body.append(dialog);
    dialog.showModal();
    rpm.focus();
  }

  const name = h("input", { type: "text", name: "username", autocomplete: "off", required: true });
  const role = select(roles, { value: "user", name: "role" });
  const password = h("input", { type: "password", name: "new-password", autocomplete: "new-password", required: true });
  const rpm = h("input", { type: "number", min: 1, placeholder: "none" });
  const tpm = h("input", { type: "number", min: 1, placeholder: "none" });
  const daily = h("input", { type: "number", min: 1, placeholder: "none" });
  const error = h("div");
  const form = h("form", {}, error, h("div", { class: "fields" }, field("User name", name), field("Role", role),
    field("Initial password", password, "At least 12 characters; not the user name.")),
  h("div", { class: "fields" }, field("Requests per minute", rpm), field("Tokens per minute", tpm), field("Tokens per day", daily)),
  h("button", { type: "submit" }, "Create user"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clear(error);
    try {
      await api("/api/users", { method: "POST", body: { name: name.value.trim(), role: role.value, password: password.value,
        rpm: intOrNull(rpm.value), tpm: intOrNull(tpm.value), daily_tokens: intOrNull(daily.value) } });
      toast(`User ${name.value.trim()} created`, "ok");
      name.value = password.value = rpm.value = tpm.value = daily.value = "";
      load();
    } catch (err) { clear(error, errorBox(err)); }
  });

  clear(container, panel("All users", listArea), panel("New user", form));
  await load();
}
