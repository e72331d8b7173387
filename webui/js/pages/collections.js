// Collections: create (with readers and writers), upload many files by drag and drop with progress per file, the
// documents with their chunk counts, delete, and a query tester showing hybrid, vector and keyword side by side.
import { act, api, bytes, can, clear, confirmDialog, errorBox, field, h, list, longTable, num, panel, panelWithActions,
  session, table, timeEl, toast } from "../lib.js";

export async function render(container, { signal, params, navigate }) {
  const state = { collections: [], chosen: params.get("collection") };

  const listArea = h("div");
  const detail = h("div");

  async function loadCollections() {
    state.collections = (await api("/api/collections", { signal })).data;
    if (!state.chosen || !state.collections.some((c) => c.name === state.chosen)) {
      state.chosen = state.collections[0]?.name ?? null;
    }
    clear(listArea, table([
      { label: "Name", value: (c) => h("button", { class: "link", "aria-pressed": String(c.name === state.chosen),
        onclick: () => choose(c.name) }, c.name) },
      { label: "Documents", num: true, value: (c) => num(c.documents ?? 0) },
      { label: "Owner", value: (c) => c.owner },
      { label: "Readers", value: (c) => (c.readers || []).join(", ") || "owner only" },
      { label: "Writers", value: (c) => (c.writers || []).join(", ") || "owner only" },
      { label: "Created", value: (c) => timeEl(c.created_at) },
    ], state.collections, { empty: "No collections yet. Create one to upload documents and chat with them." }));
    await showDetail();
  }

  function choose(name) {
    state.chosen = name;
    navigate(`/ui/collections?collection=${encodeURIComponent(name)}`, true);
  }

  // ---- create ----
  const name = h("input", { type: "text", name: "collection-name", required: true, pattern: "[A-Za-z0-9_.-]+" });
  const readers = h("input", { type: "text", name: "readers", placeholder: "role:user, user:alice" });
  const writers = h("input", { type: "text", name: "writers", placeholder: "role:operator" });
  const createForm = h("form", {},
    h("div", { class: "fields" }, field("Collection name", name), field("Readers", readers, "Comma-separated: role:NAME or user:NAME. Empty: only you (and admins)."),
      field("Writers", writers, "Who may add and delete documents.")),
    h("button", { type: "submit" }, "Create collection"));
  createForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!name.value.trim()) { toast("Give the collection a name", "bad"); name.focus(); return; }
    const made = await act(createForm.querySelector("button"), () => api("/api/collections", { method: "POST",
      body: { name: name.value.trim(), readers: list(readers.value) || [], writers: list(writers.value) || [] } }),
    `Collection ${name.value.trim()} created`);
    if (made) {
      state.chosen = made.name;
      name.value = readers.value = writers.value = "";
      await loadCollections();
    }
  });

  // ---- one collection: its documents (refreshed), the uploader and the query tester (kept, with their state) ----
  let shownFor = null;
  const docsArea = h("div");
  async function showDetail() {
    if (!state.chosen) { clear(detail); shownFor = null; return; }
    const collection = state.chosen;
    if (shownFor !== collection) {
      shownFor = collection;
      const deleteCollection = can("rag:write") ? h("button", { class: "danger small", onclick: async (e) => {
        if (!await confirmDialog("Delete collection", `Delete ${collection} and every document in it?`, "Delete collection")) return;
        if (await act(e.target, () => api(`/api/collections/${encodeURIComponent(collection)}`, { method: "DELETE" }),
          `Deleted ${collection}`) !== undefined) { state.chosen = null; await loadCollections(); }
      } }, "Delete collection") : null;
      clear(docsArea);
      clear(detail,
        panelWithActions(`Documents in ${collection}`, [deleteCollection], docsArea,
          can("rag:write") ? uploader(collection, loadCollections) : null),
        queryTester(collection));
    }
    const docs = (await api(`/api/collections/${encodeURIComponent(collection)}/documents`, { signal })).data;
    const highlight = params.get("document");
    clear(docsArea, longTable([
      { label: "Document", class: "wrap", value: (d) => (d.id === highlight ? h("mark", {}, d.id) : d.id) },
      { label: "Chunks", num: true, value: (d) => num(d.chunks) },
      { label: "Size", num: true, value: (d) => bytes(d.bytes) },
      { label: "Updated", value: (d) => timeEl(d.updated_at) },
      { label: "Actions", value: (d) => (can("rag:write") ? h("button", { class: "danger small",
        "aria-label": `Delete document ${d.id}`, onclick: async (e) => {
          if (!await confirmDialog("Delete document", `Delete "${d.id}" from ${collection}? Its chunks leave both indexes.`, "Delete")) return;
          if (await act(e.target, () => api(`/api/collections/${encodeURIComponent(collection)}/documents/${encodeURIComponent(d.id)}`,
            { method: "DELETE" }), `Deleted ${d.id}`) !== undefined) await loadCollections();
        } }, "Delete") : "—") },
    ], highlight ? [...docs.filter((d) => d.id === highlight), ...docs.filter((d) => d.id !== highlight)] : docs,
    { empty: "No documents yet: drop files below.", text: (d) => d.id, label: "Documents" }));
  }

  clear(container,
    h("p", { class: "muted" }, "Documents you upload are split into chunks, embedded on this box and searched by meaning and by keyword. The Playground's RAG switch answers from them with citations."),
    panel("All collections", listArea),
    can("rag:write") ? panel("New collection", createForm) : null,
    detail);
  try { await loadCollections(); } catch (err) { if (err.name !== "AbortError") listArea.append(errorBox(err)); }
}

// Upload with progress per file: XMLHttpRequest reports upload progress (fetch does not); a large file becomes an
// ingestion job whose progress is polled until it is done.
function uploader(collection, refresh) {
  const input = h("input", { type: "file", multiple: true, accept: ".txt,.md,.markdown,.html,.htm,.pdf,text/*,application/pdf",
    id: "upload-files", class: "visually-hidden" });
  const pick = h("label", { for: "upload-files", class: "button secondary" }, "Choose files");
  const items = h("ul", { class: "uploads", "aria-label": "Uploads" });
  const zone = h("div", { class: "dropzone" }, h("p", {}, "Drop text, Markdown, HTML or PDF files here, or"), pick, input, items);
  const start = (files) => {
    const uploads = [...files].map((file) => send(file));
    Promise.allSettled(uploads).then(refresh);
  };
  function send(file) {
    const bar = h("progress", { max: 100, value: 0, "aria-label": `Upload of ${file.name}` });
    const state = h("span", { class: "muted" }, "uploading");
    items.append(h("li", {}, h("span", { class: "mono" }, file.name), bar, state));
    return new Promise((resolve) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", `/api/collections/${encodeURIComponent(collection)}/documents`);
      xhr.setRequestHeader("X-CSRF-Token", session.csrf);
      xhr.upload.addEventListener("progress", (e) => { if (e.lengthComputable) bar.value = (e.loaded / e.total) * 90; });
      xhr.addEventListener("load", async () => {
        let reply = {};
        try { reply = JSON.parse(xhr.responseText); } catch { /* not JSON */ }
        if (xhr.status >= 400) {
          state.className = "error-text";
          state.textContent = reply.error?.message || `failed (${xhr.status})`;
          if (xhr.status === 401) document.dispatchEvent(new CustomEvent("session-ended"));
        } else if (reply.object === "ingestion.job") {
          state.textContent = "indexing";
          await follow(reply.id, bar, state);
        } else {
          bar.value = 100;
          const chunks = reply.chunks ?? reply.data?.[0]?.chunks ?? 0;
          state.textContent = `done · ${num(chunks)} chunk${chunks === 1 ? "" : "s"}`;
        }
        resolve();
      });
      xhr.addEventListener("error", () => { state.className = "error-text"; state.textContent = "network error"; resolve(); });
      const form = new FormData();
      form.append("file", file, file.name);
      xhr.send(form);
    });
  }
  input.addEventListener("change", () => { start(input.files); input.value = ""; });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => { e.preventDefault(); zone.classList.remove("over"); start(e.dataTransfer.files); });
  return h("div", { class: "stack" }, h("h3", {}, "Upload"), zone);
}

async function follow(jobId, bar, state) {
  for (;;) {
    const job = await api(`/api/jobs/${encodeURIComponent(jobId)}`);
    bar.value = 90 + job.progress * 10;
    state.textContent = `${job.stage || job.state} ${Math.round(job.progress * 100)}%`;
    if (job.state === "done") { bar.value = 100; state.textContent = "done"; return; }
    if (job.state === "failed" || job.error) { state.className = "error-text"; state.textContent = job.error || "failed"; return; }
    await new Promise((r) => setTimeout(r, 700));
  }
}

function queryTester(collection) {
  const query = h("input", { type: "search", name: "query", placeholder: "What does the handbook say about…" });
  const topK = h("input", { type: "number", min: 1, max: 20, value: "5", name: "top_k" });
  const out = h("div", { class: "results" });
  const form = h("form", {}, h("div", { class: "fields" }, field("Query", query), field("Results per mode", topK)),
    h("button", { type: "submit" }, "Search"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!query.value.trim()) { query.focus(); return; }
    const modes = ["hybrid", "vector", "keyword"];
    const replies = await act(form.querySelector("button"), () => Promise.all(modes.map((mode) =>
      api(`/api/collections/${encodeURIComponent(collection)}/query`, { method: "POST",
        body: { query: query.value, top_k: Number(topK.value) || 5, mode } }))));
    if (!replies) return;
    clear(out, replies.map((reply, i) => h("section", { "aria-label": `${modes[i]} results` },
      h("h3", {}, `${modes[i][0].toUpperCase()}${modes[i].slice(1)}`),
      reply.data.length ? reply.data.map((r, rank) => h("div", { class: "result" },
        h("div", { class: "row" }, h("strong", {}, `${rank + 1}. ${r.document_id}`),
          h("span", { class: "muted" }, `chunk ${r.chunk_id} · score ${Number(r.score).toFixed(4)}`)),
        h("div", { class: "text" }, r.text))) : h("p", { class: "empty" }, "No match"))));
  });
  return panel(`Query tester (${collection})`, form, out);
}
