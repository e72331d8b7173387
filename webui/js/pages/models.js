// Models: each model's versions (stage, digest, size, engine, encryption), promote, rollback, delete, verify; pull
// from the catalog, a URL or hf: with live progress; aliases with canary splits and their live figures beside
// production's; the rollout history from the audit log.
import { act, api, badge, bytes, can, clear, confirmDialog, errorBox, field, h, jsonDetails, ms, num, panel,
  panelWithActions, pct, select, table, timeEl, toast } from "../lib.js";

const ENGINE = { gguf: "llama.cpp", hf: "vLLM", remote: "remote upstream" };

export async function render(container, { signal }) {
  const manage = can("models:manage");
  const modelsArea = h("div");
  const aliasArea = h("div");
  const historyArea = h("div");
  const verifyArea = h("div", { "aria-live": "polite" });
  let live = null;

  const aliasFormArea = h("div");
  async function load() {
    const models = (await api("/api/models", { signal })).data;
    clear(modelsArea, models.length ? models.map((m) => modelPanel(m)) : h("p", { class: "empty" },
      "No model installed. Pull one below."));
    clear(aliasArea, aliasTable(models));
    if (manage) clear(aliasFormArea, aliasForm(models));
    await loadHistory();
  }

  // the live figures, refreshed without touching what the user is typing or where the focus is
  async function refresh() {
    const focus = document.activeElement;
    if (document.hidden || document.querySelector("dialog[open]") || modelsArea.contains(focus) || aliasArea.contains(focus)) return;
    const models = (await api("/api/models", { signal })).data;
    clear(modelsArea, models.map((m) => modelPanel(m)));
    clear(aliasArea, aliasTable(models));
  }

  function modelPanel(m) {
    const rollback = manage ? h("button", { class: "secondary small", onclick: async (e) => {
      if (!await confirmDialog("Roll back", `Roll back ${m.name}? Canaries end first; otherwise production returns to the version served before.`, "Roll back")) return;
      const t = await act(e.target, () => api(`/api/models/${encodeURIComponent(m.name)}/rollback`, { method: "POST" }));
      if (t) { toast(`${m.name}: ${t.summary || "rolled back"}`, "ok"); load(); }
    } }, "Roll back") : null;
    const versions = table([
      { label: "Version", value: (v) => h("div", {}, h("strong", {}, `@${v.version}`), h("div", { class: "muted" }, timeEl(v.created_at))) },
      { label: "Stage", value: (v) => badge(v.stage, v.stage === "production" ? "ok" : v.stage === "staging" ? "info" : "") },
      { label: "Digest and source", class: "wrap", value: (v) => h("div", {}, h("code", { title: v.sha256 }, v.sha256.slice(0, 16)),
        h("div", { class: "muted mono" }, v.source)) },
      { label: "Size", num: true, value: (v) => bytes(v.size_bytes) },
      { label: "Format · engine", value: (v) => `${v.format}${v.quantisation ? ` ${v.quantisation}` : ""} · ${ENGINE[v.format] || v.format}${v.context_length ? ` · ${num(v.context_length)} ctx` : ""}` },
      { label: "At rest", value: (v) => (v.format === "remote" ? "no weights" : badge("encrypted", "ok")) },
      { label: "Live (window)", value: (v) => stats(v.stats) },
      { label: "Actions", value: (v) => (manage ? h("div", { class: "row" },
        v.stage !== "production" ? h("button", { class: "small", "aria-label": `Promote ${m.name}@${v.version}`,
          onclick: async (e) => {
            if (!await confirmDialog("Promote", `Promote ${m.name}@${v.version} to production? It is loaded and warmed up first; the current version is drained.`, "Promote", false)) return;
            const t = await act(e.target, () => api(`/api/models/${encodeURIComponent(m.name)}/promote`, { method: "POST", body: { version: v.version } }));
            if (t) { toast(`${m.name}@${v.version} is now in production`, "ok"); load(); }
          } }, "Promote") : null,
        v.stage !== "production" ? h("button", { class: "danger small", "aria-label": `Delete ${m.name}@${v.version}`,
          onclick: async (e) => {
            if (!await confirmDialog("Delete version", `Delete ${m.name}@${v.version}? Its encrypted weights go when nothing else uses them.`, "Delete")) return;
            if (await act(e.target, () => api(`/api/models/${encodeURIComponent(`${m.name}@${v.version}`)}`, { method: "DELETE" }), `Deleted ${m.name}@${v.version}`) !== undefined) load();
          } }, "Delete") : null) : "—") },
    ], m.versions);
    return panelWithActions(m.name, [rollback], h("p", { class: "muted" },
      `Production: ${m.production_version ? `@${m.production_version}` : "none"} · licence ${m.licence || "unknown"}`), versions);
  }

  function aliasTable(models) {
    const aliases = models.flatMap((m) => m.aliases.map((a) => ({ ...a, versions: m.versions })));
    const rows = table([
      { label: "Alias", value: (a) => h("strong", {}, a.alias) },
      { label: "Target", value: (a) => (a.strategy === "bandit" ? `bandit over ${a.targets.join(", ")}`
        : `${a.model}${a.version ? `@${a.version}` : " (production)"}`) },
      { label: "Split", value: (a) => (a.strategy === "bandit"
        ? Object.entries(a.shares || {}).map(([t, s]) => `${t}: ${Math.round(s * 100)}%`).join(", ") + ` (by ratings, floor ${Math.round(a.floor * 100)}%)`
        : a.weights ? Object.entries(a.weights).map(([v, w]) => `@${v}: ${w}%`).join(", ") : "all to the target") },
      { label: "Canary vs production (live)", class: "wrap", value: (a) => (a.weights ? [...Object.keys(a.weights).map((v) => {
        const ver = a.versions.find((x) => String(x.version) === v);
        return h("div", {}, `@${v} `, stats(ver?.stats));
      }), ...Object.entries(a.quality || {}).map(([v, q]) => h("div", {},
        `@${v} ratings: ${q.decision} (-1: ${q.canary.down}/${q.canary.up + q.canary.down} vs ${q.production.down}/${q.production.up + q.production.down})`))]
        : a.arms ? a.arms.map((arm) => h("div", {}, `${arm.target}: +${arm.up} / -${arm.down}, ${arm.errors} failed`)) : "—") },
      { label: "Updated", value: (a) => timeEl(a.updated_at) },
      { label: "Actions", value: (a) => (manage ? h("button", { class: "danger small", "aria-label": `Remove alias ${a.alias}`,
        onclick: async (e) => {
          if (!await confirmDialog("Remove alias", `Remove the alias ${a.alias}? Clients using it get 404.`, "Remove")) return;
          if (await act(e.target, () => api(`/api/aliases/${encodeURIComponent(a.alias)}`, { method: "DELETE" }), `Removed ${a.alias}`) !== undefined) load();
        } }, "Remove") : "—") },
    ], aliases, { empty: "No aliases. An alias gives clients a stable name, and can send a share of traffic to a canary version." });
    return rows;
  }

  function aliasForm(models) {
    const alias = h("input", { type: "text", name: "alias", required: true });
    const target = select(models.flatMap((m) => [m.name, ...m.versions.map((v) => `${m.name}@${v.version}`)]), { name: "target" });
    const canary = h("input", { type: "number", min: 1, name: "canary", placeholder: "none" });
    const weight = h("input", { type: "number", min: 1, max: 99, value: "10", name: "weight" });
    const form = h("form", {}, h("div", { class: "fields" }, field("Alias", alias), field("Target", target),
      field("Canary version", canary, "A version number that gets a share of the alias's traffic."),
      field("Canary share (%)", weight)), h("button", { type: "submit" }, "Save alias"));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      if (!alias.value.trim()) { alias.focus(); return; }
      const body = { target: target.value };
      if (canary.value) { body.canary = Number(canary.value); body.weight = Number(weight.value) || 10; }
      if (await act(form.querySelector("button"), () => api(`/api/aliases/${encodeURIComponent(alias.value.trim())}`,
        { method: "PUT", body }), `Alias ${alias.value.trim()} saved`)) load();
    });
    return h("div", {}, h("h3", {}, "Set an alias"), form);
  }

  async function loadHistory() {
    if (!can("audit:read")) { clear(historyArea, h("p", { class: "muted" }, "Your role cannot read the audit log.")); return; }
    // the rollout story: pulls, promotions, rollbacks, aliases, canaries, removals (not every load and unload)
    const records = (await api("/api/audit?action=model.*&order=desc&limit=200", { signal })).data
      .filter((r) => !/^model\.(load|unload|evict|crash|hung)/.test(r.action)).slice(0, 20);
    clear(historyArea, table([
      { label: "When", value: (r) => timeEl(r.at) },
      { label: "Action", value: (r) => r.action },
      { label: "Model", value: (r) => r.target },
      { label: "Outcome", value: (r) => badge(r.outcome, r.outcome === "ok" ? "ok" : "bad") },
      { label: "By", value: (r) => r.actor },
      { label: "Details", class: "wrap", value: (r) => jsonDetails(r.details) },
    ], records, { empty: "No rollout events yet." }));
  }

  // ---- pull ----
  function pullForm(catalog) {
    const source = h("input", { type: "text", name: "source", list: "catalog-names", required: true,
      placeholder: "smollm2-135m-instruct, https://…/model.gguf or hf:org/repo" });
    const names = h("datalist", { id: "catalog-names" }, catalog.map((c) => h("option", { value: c.name }, c.description || c.name)));
    const name = h("input", { type: "text", name: "model-name", placeholder: "from the source" });
    const progress = h("div", { "aria-live": "polite" });
    const form = h("form", {}, h("div", { class: "fields" }, field("Source", source, "A catalog name, an https:// URL, hf:ORG/REPO or file:/path on this box."),
      field("Name", name, "A new name, or an existing one to add a staging version.")), names,
    h("button", { type: "submit" }, "Pull model"), progress);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      if (!source.value.trim()) { source.focus(); return; }
      const body = { source: source.value.trim() };
      if (name.value.trim()) body.name = name.value.trim();
      const job = await act(form.querySelector("button"), () => api("/api/models/pull", { method: "POST", body }));
      if (!job) return;
      const bar = h("progress", { max: 100, "aria-label": `Pull of ${body.source}` });
      const text = h("span", { class: "muted" }, "starting");
      clear(progress, h("div", { class: "stack" }, bar, text));
      for (;;) {
        if (signal.aborted) return;
        let state;
        try { state = await api(`/api/models/pulls/${encodeURIComponent(job.id)}`, { signal }); } catch (err) { clear(progress, errorBox(err)); return; }
        if (state.total) bar.value = (100 * state.bytes) / state.total; else bar.removeAttribute("value");
        text.textContent = `${bytes(state.bytes)}${state.total ? ` of ${bytes(state.total)}` : ""} · ${state.status}`;
        if (state.status === "done") { bar.value = 100; text.textContent = `Pulled ${state.model}@${state.version}`; toast(text.textContent, "ok"); load(); return; }
        if (state.status === "failed") { clear(progress, errorBox(state.error || "the pull failed")); return; }
        await new Promise((r) => setTimeout(r, 500));
      }
    });
    return form;
  }

  const verify = manage ? h("button", { class: "secondary", onclick: async (e) => {
    const result = await act(e.target, () => api("/api/models/verify", { method: "POST" }));
    if (!result) return;
    const bad = result.data.filter((r) => !r.ok);
    clear(verifyArea, h("div", { class: `alert ${bad.length ? "bad" : "ok"}`, role: "alert" }, bad.length
      ? `Damaged: ${bad.map((r) => `${r.model}@${r.version} (${r.error})`).join("; ")}`
      : `All ${result.data.length} model versions verified: digests and encryption intact.`));
  } }, "Verify all") : null;

  const catalog = manage ? await api("/api/catalog", { signal }).then((r) => r.data).catch(() => []) : [];
  clear(container,
    h("div", { class: "row" }, verify), verifyArea,
    modelsArea,
    panel("Aliases and canaries", aliasArea, aliasFormArea),
    manage ? panel("Pull a model", pullForm(catalog)) : null,
    panel("Rollout history", historyArea));
  try { await load(); } catch (err) { if (err.name !== "AbortError") modelsArea.append(errorBox(err)); }
  // canary figures move while traffic flows: refresh the tables every 5 s
  live = setInterval(() => refresh().catch(() => {}), 5000);
  signal.addEventListener("abort", () => clearInterval(live));
}

function stats(s) {
  if (!s || !s.requests) return h("span", { class: "muted" }, "no traffic");
  return h("span", {}, `${num(s.requests)} req · errors ${pct(s.error_rate)} · p95 ${ms(s.p95_seconds)}`);
}
