// Small DOM helpers and the one chart the console draws (SVG lines, no library needed for it).

export const $ = (sel, root = document) => root.querySelector(sel);

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v === true) node.setAttribute(k, "");
    else if (v !== false && v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const c of children.flat()) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

export function status(node, text, isError = false) {
  node.textContent = text;
  node.classList.toggle("error", isError);
}

export function bytes(n) {
  if (n == null) return "";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

export function ago(ts) {
  if (!ts) return "never";
  const s = Math.max(0, Date.now() / 1000 - ts);
  return s < 60 ? `${s.toFixed(0)} s ago` : s < 3600 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
}

const COLOURS = ["#0b5cad", "#d9480f", "#2b8a3e", "#862e9c", "#c2255c", "#5c940d", "#1864ab", "#e67700"];
const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// series: [{name, points: [[x, y], ...], markers?}]; draws every series on shared axes with a legend.
export function lineChart(target, series, { xLabel = "", yLabel = "" } = {}) {
  const W = 600, H = 220, L = 48, R = 10, T = 10, B = 34;
  target.replaceChildren();
  const pts = series.flatMap((s) => s.points);
  target.dataset.points = String(pts.length);
  if (!pts.length) {
    target.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no data yet"));
    return;
  }
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) x1 = x0 + 1;
  const pad = (y1 - y0) * 0.08 || Math.abs(y1) * 0.1 || 1;   // a flat line still gets a visible range
  [y0, y1] = [Math.max(Math.min(...ys) >= 0 ? 0 : -Infinity, y0 - pad), y1 + pad];
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  target.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#aab" }));
  target.append(svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#aab" }));
  target.append(svg("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, y1.toPrecision(3)));
  target.append(svg("text", { x: L - 4, y: H - B, "text-anchor": "end" }, y0.toPrecision(3)));
  target.append(svg("text", { x: L, y: H - B + 14 }, String(+x0.toPrecision(4))));
  target.append(svg("text", { x: W - R, y: H - B + 14, "text-anchor": "end" }, String(+x1.toPrecision(4))));
  target.append(svg("text", { x: (L + W) / 2, y: H - 4, "text-anchor": "middle" }, xLabel));
  target.append(svg("text", { x: L + 6, y: T + 10 }, yLabel));
  series.forEach((s, i) => {
    const colour = COLOURS[i % COLOURS.length];
    const d = s.points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
    target.append(svg("polyline", { points: d, fill: "none", stroke: colour, "stroke-width": 1.6,
                                    "data-series": s.name }));
    if (s.points.length === 1 || s.markers) {   // sparse series (evaluations) show each point
      for (const p of s.points) target.append(svg("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 3, fill: colour }));
    }
    target.append(svg("text", { x: W - R - 4, y: T + 12 + 13 * i, "text-anchor": "end", fill: colour }, s.name));
  });
}
