// Playground: chat with a model or alias through /v1/chat/completions, streamed; Stop, Regenerate, parameters, RAG
// with numbered citations, token usage, the quota left and the cache badge. Replies are text or safe Markdown.
// Each reply has thumbs up and down (toggle buttons, aria-pressed) that rate it through POST /api/feedback.
import { api, badge, can, checkbox, clear, errorOf, field, h, num, select, session, uid } from "../lib.js";
import { renderMarkdown } from "../markdown.js";

export async function render(container, { signal }) {
  const [models, collections] = await Promise.all([
    api("/v1/models", { signal }),
    can("rag:read") ? api("/api/collections", { signal }).catch(() => ({ data: [] })) : { data: [] },
  ]);
  const names = models.data.map((m) => m.id);
  const model = select(names, { name: "model" });
  const system = h("textarea", { name: "system", rows: 3, placeholder: "You are a helpful assistant." });
  const temperature = h("input", { type: "number", min: 0, max: 2, step: 0.1, value: "0.7", name: "temperature" });
  const maxTokens = h("input", { type: "number", min: 1, max: 32768, step: 1, value: "256", name: "max_tokens" });
  const topP = h("input", { type: "number", min: 0, max: 1, step: 0.05, value: "1", name: "top_p" });
  const seed = h("input", { type: "number", step: 1, name: "seed", placeholder: "random" });
  const markdown = checkbox("Show replies as Markdown", { checked: true });
  const rag = checkbox("Answer from collections (RAG)", { disabled: !collections.data.length });
  const picks = collections.data.map((c) => checkbox(c.name, { value: c.name, "data-collection": c.name }));
  const topK = h("input", { type: "number", min: 1, max: 20, value: "4", name: "top_k" });
  const ragBox = h("fieldset", { class: "hidden" }, h("legend", {}, "Collections"),
    h("div", { class: "checks" }, picks.map((p) => p.el)), field("Sources per answer", topK));
  rag.input.addEventListener("change", () => ragBox.classList.toggle("hidden", !rag.input.checked));

  const transcript = h("div", { class: "transcript", role: "log", "aria-live": "polite", "aria-label": "Transcript",
    tabindex: "0" });
  const empty = h("p", { class: "muted" }, "Send a message to start. Replies stream in as they are generated.");
  transcript.append(empty);
  const message = h("textarea", { name: "message", rows: 3, placeholder: "Ask something… (Ctrl+Enter sends)" });
  const send = h("button", { type: "submit" }, "Send");
  const stop = h("button", { type: "button", class: "secondary", disabled: true }, "Stop");
  const regenerate = h("button", { type: "button", class: "secondary", disabled: true }, "Regenerate");
  const reset = h("button", { type: "button", class: "secondary" }, "Clear");
  const status = h("p", { class: "muted", "aria-live": "polite" });
  const composer = h("form", { class: "composer" }, field("Message", message),
    h("div", { class: "row" }, status, h("span", { class: "spacer" }), reset, regenerate, stop, send));

  const settings = h("section", { class: "panel", "aria-labelledby": "pg-settings" },
    h("h2", { id: "pg-settings" }, "Settings"),
    field("Model", model, "A model, a pinned version (name@N) or an alias."),
    field("System prompt", system),
    h("div", { class: "fields" }, field("Temperature", temperature), field("Max tokens", maxTokens),
      field("Top p", topP), field("Seed", seed)),
    markdown.el, can("rag:read") ? rag.el : null, ragBox);
  const chat = h("section", { class: "panel", "aria-labelledby": "pg-chat" },
    h("h2", { id: "pg-chat", class: "visually-hidden" }, "Conversation"), transcript, composer);
  clear(container, h("div", { class: "playground" }, settings, chat));

  const history = []; // [{role, content}]
  let running = null;

  const setBusy = (busy) => {
    send.disabled = busy;
    stop.disabled = !busy;
    regenerate.disabled = busy || !history.some((m) => m.role === "assistant");
  };

  function bubble(role, text) {
    empty.remove();
    const body = h("div", { class: "body" }, text);
    const meta = h("div", { class: "meta" });
    const el = h("article", { class: `msg ${role}`, "aria-label": role === "user" ? "You" : "Assistant" },
      h("div", { class: "who" }, role === "user" ? "You" : "Assistant"), body, meta);
    transcript.append(el);
    transcript.scrollTop = transcript.scrollHeight;
    return { el, body, meta };
  }

  function showReply(target, text, citations) {
    const cite = (n) => {
      if (!citations.some((c) => c.index === n)) return null;
      return h("a", { href: `#${target.citeId}-${n}`, class: "cite", "aria-label": `source ${n}` }, `[${n}]`);
    };
    if (markdown.input.checked) {
      target.body.classList.add("md");
      clear(target.body, renderMarkdown(text, { citation: cite }));
    } else {
      target.body.classList.remove("md");
      target.body.textContent = text;
    }
  }

  function citationList(target, citations) {
    if (!citations.length) return null;
    return h("ol", { class: "citations", "aria-label": "Sources" }, citations.map((c) => h("li", {
      id: `${target.citeId}-${c.index}`, value: c.index },
    h("a", { href: `/ui/collections?collection=${encodeURIComponent(c.collection)}&document=${encodeURIComponent(c.document_id)}` },
      `${c.collection} / ${c.document_id}`),
    h("span", { class: "muted" }, ` · chunk ${c.chunk_id} · score ${Number(c.score).toFixed(3)}`),
    h("blockquote", {}, c.snippet))));
  }

  async function ask() {
    const controller = new AbortController();
    running = controller;
    signal.addEventListener("abort", () => controller.abort(), { once: true });
    setBusy(true);
    status.textContent = "Generating…";
    const target = bubble("assistant", "");
    target.citeId = uid("cite");
    target.el.setAttribute("aria-busy", "true");
    let text = "";
    let usage = null;
    let citations = [];
    let responseId = null;
    const body = {
      model: model.value,
      messages: [...(system.value.trim() ? [{ role: "system", content: system.value }] : []), ...history],
      stream: true, stream_options: { include_usage: true },
      max_tokens: Number(maxTokens.value) || 256, temperature: Number(temperature.value), top_p: Number(topP.value),
    };
    if (seed.value !== "") body.seed = Number(seed.value);
    const chosen = picks.filter((p) => p.input.checked).map((p) => p.input.value);
    if (rag.input.checked && chosen.length) body.rag = { collections: chosen, top_k: Number(topK.value) || 4 };
    let stopped = false;
    let failed = null;
    let headers = null;
    try {
      const response = await fetch("/v1/chat/completions", { method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": session.csrf }, body: JSON.stringify(body),
        signal: controller.signal });
      if (!response.ok) throw await errorOf(response);
      headers = response.headers;
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") continue;
            const chunk = JSON.parse(data);
            if (chunk.error) throw new Error(chunk.error.message || "the model failed");
            if (chunk.id && !responseId) responseId = chunk.id;
            if (chunk.citations) citations = chunk.citations;
            if (chunk.usage) usage = chunk.usage;
            const delta = chunk.choices?.[0]?.delta?.content;
            if (delta) {
              text += delta;
              target.body.textContent = text;
              transcript.scrollTop = transcript.scrollHeight;
            }
          }
        }
      }
    } catch (err) {
      if (err.name === "AbortError") stopped = true;
      else failed = err;
    }
    running = null;
    target.el.removeAttribute("aria-busy");
    showReply(target, text, citations);
    const list = citationList(target, citations);
    if (list) target.el.insertBefore(list, target.meta);
    if (failed) {
      target.el.classList.add("error");
      target.body.textContent = text ? `${text}\n\n${failed.message}` : failed.message;
      target.body.setAttribute("role", "alert");
    }
    if (text) history.push({ role: "assistant", content: text });
    const served = headers?.get("x-served-model");
    const cache = headers?.get("x-cache");
    const left = headers?.get("x-ratelimit-remaining-tokens-day") ?? headers?.get("x-ratelimit-remaining-tokens");
    clear(target.meta,
      served ? badge(served, "info") : null,
      cache === "hit" ? badge("cache hit", "ok") : null,
      stopped ? badge("stopped", "warn") : null,
      usage ? h("span", {}, `${num(usage.prompt_tokens)} prompt + ${num(usage.completion_tokens)} completion tokens`) : null,
      left !== null && left !== undefined ? h("span", {}, `· quota left: ${num(Number(left))} tokens`) : null,
      responseId && text && !failed ? thumbs(responseId) : null);
    status.textContent = failed ? "The request failed." : stopped ? "Stopped." : "Done.";
    setBusy(false);
  }

  // Rating a reply: one of two toggle buttons is pressed at most; pressing the other changes the rating.
  function thumbs(responseId) {
    const note = h("span", { class: "muted", role: "status" });
    const rate = async (rating, button) => {
      for (const b of buttons) b.disabled = true;
      try {
        await api("/api/feedback", { method: "POST", body: { response_id: responseId, rating } });
        for (const b of buttons) b.setAttribute("aria-pressed", String(b === button));
        note.textContent = rating > 0 ? "Rated good." : "Rated bad.";
      } catch (err) {
        note.textContent = `Not rated: ${err.message}`;
      }
      for (const b of buttons) b.disabled = false;
    };
    const button = (rating, label, symbol) => {
      const b = h("button", { type: "button", class: "thumb", "aria-pressed": "false", "aria-label": label,
        title: label }, symbol);
      b.addEventListener("click", () => rate(rating, b));
      return b;
    };
    const buttons = [button(1, "Good reply", "▲ Good"), button(-1, "Bad reply", "▼ Bad")];  // no emoji font needed
    return h("span", { class: "feedback", role: "group", "aria-label": "Rate this reply" }, ...buttons, note);
  }

  composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = message.value.trim();
    if (!text || running) return;
    if (!model.value) {
      status.textContent = "No model is installed yet: pull one on the Models page.";
      return;
    }
    history.push({ role: "user", content: text });
    bubble("user", text);
    message.value = "";
    ask();
  });
  message.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) composer.requestSubmit();
  });
  stop.addEventListener("click", () => running?.abort());
  regenerate.addEventListener("click", () => {
    if (running || history.at(-1)?.role !== "assistant") return;
    history.pop();
    const last = [...transcript.querySelectorAll(".msg.assistant")].at(-1);
    last?.remove();
    ask();
  });
  reset.addEventListener("click", () => {
    running?.abort();
    history.length = 0;
    clear(transcript, empty);
    setBusy(false);
    message.focus();
  });
  if (!names.length) status.textContent = "No model is installed yet: pull one on the Models page.";
}
