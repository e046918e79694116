// Two small SVG charts, drawn here: a line chart (loss curves) and a bar chart (histograms).

const NS = "http://www.w3.org/2000/svg";

function el(name, attributes = {}, text) {
  const node = document.createElementNS(NS, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function niceTicks(low, high, count = 5, integers = false) {
  if (high === low) return [low];
  const step = integers ? Math.max(1, (high - low) / count) : (high - low) / count;
  const magnitude = 10 ** Math.floor(Math.log10(step));
  const nice = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= step);
  const ticks = [];
  for (let t = Math.ceil(low / nice) * nice; t <= high + 1e-9; t += nice) ticks.push(+t.toPrecision(6));
  return ticks;
}

function frame(svg) {
  svg.replaceChildren();
  const box = svg.viewBox.baseVal;
  return { width: box.width, height: box.height, left: 48, right: 12, top: 24, bottom: 32 };
}

function axes(svg, f, xs, ys, xLabel, yLabel, xTicks = true) {
  const [x0, x1] = xs;
  const [y0, y1] = ys;
  const sx = (x) => f.left + ((x - x0) / (x1 - x0 || 1)) * (f.width - f.left - f.right);
  const sy = (y) => f.height - f.bottom - ((y - y0) / (y1 - y0 || 1)) * (f.height - f.top - f.bottom);
  svg.append(el("line", { x1: f.left, y1: f.height - f.bottom, x2: f.width - f.right, y2: f.height - f.bottom, class: "axis" }));
  svg.append(el("line", { x1: f.left, y1: f.top, x2: f.left, y2: f.height - f.bottom, class: "axis" }));
  for (const t of niceTicks(y0, y1)) {
    svg.append(el("line", { x1: f.left, x2: f.width - f.right, y1: sy(t), y2: sy(t), class: "grid" }));
    svg.append(el("text", { x: f.left - 6, y: sy(t) + 4, "text-anchor": "end", class: "tick" }, String(t)));
  }
  const whole = Number.isInteger(x0) && Number.isInteger(x1);  // steps, token counts: no ticks between them
  for (const t of xTicks ? niceTicks(x0, x1, 5, whole) : []) {
    svg.append(el("text", { x: sx(t), y: f.height - f.bottom + 16, "text-anchor": "middle", class: "tick" }, String(t)));
  }
  svg.append(el("text", { x: f.width - f.right, y: f.height - 4, "text-anchor": "end", class: "label" }, xLabel));
  svg.append(el("text", { x: f.left, y: 14, "text-anchor": "middle", class: "label" }, yLabel));
  return { sx, sy };
}

// series: [{name, points: [[x, y], ...], className}]
export function lineChart(svg, series, { xLabel = "step", yLabel = "loss", empty = "no data yet" } = {}) {
  const f = frame(svg);
  const points = series.flatMap((s) => s.points);
  if (!points.length) {
    svg.append(el("text", { x: f.width / 2, y: f.height / 2, "text-anchor": "middle", class: "label" }, empty));
    return;
  }
  const xs = points.map((p) => p[0]);
  const ys = points.map((p) => p[1]);
  const xMax = Math.max(...xs, 1);
  const yMax = Math.max(...ys);
  const yMin = Math.min(0, Math.min(...ys));
  const { sx, sy } = axes(svg, f, [Math.min(...xs, 0), xMax], [yMin, yMax * 1.05 || 1], xLabel, yLabel);
  series.forEach((s, index) => {
    if (!s.points.length) return;
    const d = s.points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
    svg.append(el("path", { d, class: `series ${s.className || ""}`, "data-series": s.name }));
    for (const p of s.points) svg.append(el("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.5, class: `dot ${s.className || ""}` }));
    svg.append(el("text", { x: f.width - f.right - 4, y: f.top + 14 + 14 * index, "text-anchor": "end", class: `legend ${s.className || ""}` }, s.name));
  });
}

// edges: n + 1 bin edges, counts: n bars
export function barChart(svg, edges, counts, { xLabel = "tokens", yLabel = "examples" } = {}) {
  const f = frame(svg);
  if (!counts.length) {
    svg.append(el("text", { x: f.width / 2, y: f.height / 2, "text-anchor": "middle", class: "label" }, "no usable examples"));
    return;
  }
  const { sx, sy } = axes(svg, f, [edges[0], edges[edges.length - 1]], [0, Math.max(...counts)], xLabel, yLabel);
  counts.forEach((count, i) => {
    const x = sx(edges[i]);
    const width = Math.max(1, sx(edges[i + 1]) - x - 1);
    const bar = el("rect", { x, y: sy(count), width, height: sy(0) - sy(count), class: "bar" });
    bar.append(el("title", {}, `${edges[i]}–${edges[i + 1]} tokens: ${count}`));
    svg.append(bar);
  });
}

// labels: one group per label; series: [{name, values, className}] drawn side by side in each group (values 0..1)
export function groupedBars(svg, labels, series) {
  const f = frame(svg);
  const top = Math.max(1, ...series.flatMap((s) => s.values));
  const { sy } = axes(svg, f, [0, labels.length], [0, top], "", "", false);
  const groupWidth = (f.width - f.left - f.right) / labels.length;
  const barWidth = (groupWidth * 0.7) / series.length;
  labels.forEach((label, g) => {
    const x0 = f.left + g * groupWidth + groupWidth * 0.15;
    series.forEach((s, i) => {
      const value = s.values[g];
      const bar = el("rect", { x: x0 + i * barWidth, y: sy(value), width: barWidth - 2, height: sy(0) - sy(value),
                               class: `bar ${s.className || ""}` });
      bar.append(el("title", {}, `${s.name} ${label}: ${value.toFixed(3)}`));
      svg.append(bar);
    });
    svg.append(el("text", { x: x0 + groupWidth * 0.35, y: f.height - f.bottom + 16, "text-anchor": "middle", class: "tick" }, label));
  });
  series.forEach((s, i) => {
    svg.append(el("text", { x: f.width - f.right - 4, y: f.top + 14 + 14 * i, "text-anchor": "end", class: `legend ${s.className || ""}` }, s.name));
  });
}
