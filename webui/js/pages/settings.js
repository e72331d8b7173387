// Settings: the effective configuration with each value's source (default, file or environment) and its help, and
// the doctor's findings with what to do about each.
import { api, badge, clear, field, h, panel, table } from "../lib.js";

export async function render(container, { signal }) {
  const data = await api("/api/settings", { signal });
  const filter = h("input", { type: "search", name: "filter", placeholder: "e.g. port, rag., timeout" });
  const rows = h("div");
  const findings = data.doctor.findings;
  const problems = findings.filter((f) => f.level !== "ok");
  const sections = [...new Set(data.settings.map((s) => s.name.split(".")[0]))];
  const show = () => {
    const q = filter.value.trim().toLowerCase();
    const shown = data.settings.filter((s) => !q || s.name.toLowerCase().includes(q) || (s.help || "").toLowerCase().includes(q));
    // one collapsible table per section; a section opens when it holds a changed value or the filter is in use
    clear(rows, sections.map((section) => {
      const mine = shown.filter((s) => s.name.split(".")[0] === section);
      if (!mine.length) return null;
      const changed = mine.filter((s) => s.source !== "default").length;
      return h("details", { class: "section", open: Boolean(q) || changed > 0 },
        h("summary", {}, h("strong", {}, section), ` · ${mine.length} setting${mine.length === 1 ? "" : "s"}`,
          changed ? [" · ", badge(`${changed} changed`, "info")] : null),
        table([
          { label: "Setting", value: (s) => h("code", {}, s.name) },
          { label: "Value", class: "wrap", value: (s) => h("span", { class: "mono" }, JSON.stringify(s.value)) },
          { label: "Source", value: (s) => badge(s.source, s.source === "default" ? "" : "info") },
          { label: "What it does", class: "wrap", value: (s) => s.help },
        ], mine, { label: `Settings of ${section}` }));
    }), shown.length ? null : h("p", { class: "empty" }, "No setting matches."));
  };
  filter.addEventListener("input", show);
  clear(container,
    panel("Doctor", h("p", {}, problems.length ? badge(`${problems.length} problem(s)`, "bad") : badge("no problems found", "ok")),
      h("ul", { class: "findings" }, findings.map((f) => h("li", {},
        badge(f.level === "ok" ? "ok" : "problem", f.level === "ok" ? "ok" : "bad"), " ", h("strong", {}, f.topic), ": ", f.message,
        f.fix ? h("div", { class: "muted" }, "Fix: ", h("code", {}, f.fix)) : null)))),
    panel("Effective configuration",
      h("p", { class: "muted" }, data.config_file ? ["Config file: ", h("code", {}, data.config_file), ". Environment variables APPLIANCE_<SECTION>__<KEY> override it."]
        : "No config file: defaults and APPLIANCE_<SECTION>__<KEY> environment variables."),
      field("Filter settings", filter), rows));
  show();
}
