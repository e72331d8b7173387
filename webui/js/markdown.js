// Markdown from a model shown safely: the text is parsed into DOM nodes built one by one with text content, so no
// raw HTML in the reply ever becomes markup (a "<script>" stays the visible text "<script>"). Supports paragraphs,
// headings, lists, fenced and inline code, emphasis, links to http(s) only, and citation markers like [1].
import { h } from "./lib.js";

const INLINE = /(`[^`]+`)|(\*\*[^*]+\*\*)|(\*[^*\s][^*]*\*)|(\[[^\]]+\]\((https?:\/\/[^\s)]+)\))|(\[(\d{1,2})\])/g;

function inline(text, opts) {
  const out = [];
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) out.push(text.slice(last, m.index));
    const [all] = m;
    if (m[1]) out.push(h("code", {}, all.slice(1, -1)));
    else if (m[2]) out.push(h("strong", {}, all.slice(2, -2)));
    else if (m[3]) out.push(h("em", {}, all.slice(1, -1)));
    else if (m[4]) {
      const label = all.slice(1, all.indexOf("]("));
      out.push(h("a", { href: m[5], rel: "noopener noreferrer nofollow", target: "_blank" }, label));
    } else if (m[6]) {
      const n = Number(m[7]);
      out.push(opts.citation && opts.citation(n) ? opts.citation(n) : all);
    }
    last = m.index + all.length;
  }
  if (last < text.length) out.push(text.slice(last));
  return out;
}

export function renderMarkdown(text, opts = {}) {
  const root = document.createDocumentFragment();
  const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  let para = [];
  const flush = () => {
    if (para.length) root.append(h("p", {}, inline(para.join(" "), opts)));
    para = [];
  };
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*(```|~~~)\s*([\w+-]*)\s*$/);
    if (fence) {
      flush();
      const body = [];
      i++;
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
      i++;
      root.append(h("pre", {}, h("code", fence[2] ? { "data-lang": fence[2] } : {}, body.join("\n"))));
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      flush();
      // model headings sit below the page's own: h3..h6
      root.append(h(`h${Math.min(6, heading[1].length + 2)}`, {}, inline(heading[2], opts)));
      i++;
      continue;
    }
    const bullet = line.match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
    if (bullet) {
      flush();
      const ordered = /\d/.test(bullet[1]);
      const items = [];
      while (i < lines.length) {
        const m = lines[i].match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
        if (!m || /\d/.test(m[1]) !== ordered) break;
        items.push(h("li", {}, inline(m[2], opts)));
        i++;
      }
      root.append(h(ordered ? "ol" : "ul", {}, items));
      continue;
    }
    if (!line.trim()) flush();
    else para.push(line.trim());
    i++;
  }
  flush();
  return root;
}
