// Small SVG charts drawn with DOM calls (no library, no inline style): a line chart of recent values and a stacked
// bar chart. Each is an image with a text alternative that states the latest figures.
import { h } from "./lib.js";

const W = 300;
const H = 90;

function scaleMax(values, floor) {
  const max = Math.max(floor, ...values.filter((v) => Number.isFinite(v)));
  if (max <= 0) return 1;
  const magnitude = 10 ** Math.floor(Math.log10(max));
  return Math.ceil(max / magnitude) * magnitude;
}

// series: [{values: [..], cls: "c1"}]; label: the text alternative
export function lineChart(series, { label, min = 1, points = 60, unit = "" } = {}) {
  const all = series.flatMap((s) => s.values);
  const max = scaleMax(all, min);
  const svg = h("svg:svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": label,
    preserveAspectRatio: "none" });
  for (const frac of [0.5, 1]) {
    const y = (H - 12) * (1 - frac) + 6;
    svg.append(h("svg:line", { x1: 0, x2: W, y1: y, y2: y, class: "grid-line" }));
  }
  for (const s of series) {
    const values = s.values.slice(-points);
    if (values.length < 2) continue;
    const step = W / (points - 1);
    const offset = (points - values.length) * step;
    const coords = values.map((v, i) => [offset + i * step, (H - 12) * (1 - (Number.isFinite(v) ? v : 0) / max) + 6]);
    const d = coords.map(([x, y], i) => `${i ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`).join(" ");
    svg.append(h("svg:path", { d: `${d} L${coords.at(-1)[0].toFixed(1)},${H} L${coords[0][0].toFixed(1)},${H} Z`,
      class: `area ${s.cls}` }));
    svg.append(h("svg:path", { d, class: `line ${s.cls}`, "vector-effect": "non-scaling-stroke" }));
  }
  // the scale as HTML: SVG text would be stretched with the chart
  return h("div", {}, svg, h("div", { class: "chart-scale", "aria-hidden": "true" },
    h("span", {}, `${points * 2} s ago`), h("span", {}, `top of scale: ${max}${unit}`)));
}

// bars: [{label, parts: [{value, cls}]}]
export function barChart(bars, { label, height = 160 } = {}) {
  const max = scaleMax(bars.map((b) => b.parts.reduce((a, p) => a + p.value, 0)), 1);
  const width = Math.max(W, bars.length * 24);
  const svg = h("svg:svg", { viewBox: `0 0 ${width} ${height}`, class: "chart bars", role: "img", "aria-label": label,
    preserveAspectRatio: "xMinYMid meet" });
  svg.setAttribute("height", String(height));
  const bw = width / Math.max(bars.length, 1);
  bars.forEach((bar, i) => {
    let y = height - 14;
    for (const part of bar.parts) {
      const hgt = ((height - 24) * part.value) / max;
      y -= hgt;
      svg.append(h("svg:rect", { x: i * bw + bw * 0.15, y, width: bw * 0.7, height: Math.max(hgt, 0),
        class: `bar ${part.cls}` }));
    }
    if (bars.length <= 16 || i % Math.ceil(bars.length / 12) === 0) {
      svg.append(h("svg:text", { x: i * bw + bw / 2, y: height - 2, "text-anchor": "middle" }, bar.label));
    }
  });
  svg.append(h("svg:text", { x: 2, y: 10 }, String(max)));
  return svg;
}

export function meter(used, total, label) {
  const ratio = total ? Math.min(1, used / total) : 0;
  const kind = ratio > 0.9 ? "bad" : ratio > 0.75 ? "warn" : "";
  const fill = h("span", { class: `meter-fill ${kind}` });
  fill.style.width = `${(ratio * 100).toFixed(1)}%`; // CSSOM: allowed by the CSP, unlike a style attribute
  return h("span", { class: "meter", role: "meter", "aria-label": label, "aria-valuemin": "0", "aria-valuemax": "100",
    "aria-valuenow": (ratio * 100).toFixed(0) }, fill);
}
