// MHChart: small SVG line charts for the node dashboard and the local viewers.
//
// MHChart.line(container, opts) replaces the container's content with an
// <svg class="mh-chart"> and returns it. opts:
//   series  [{label, points: [[x_ms, y], ...], color?}]  a null y breaks the line
//   bands   [{from, to, label, kind: "grant" | "unavailable"}]  shaded x ranges
//   xRange  [from_ms, to_ms]   default: the data's extent
//   yRange  [min, max]         default: the data's extent, padded
//   yLabel  text beside the y axis
//   empty   what to write across a chart with no points
// The svg carries data-points (points drawn), data-series (series count) and
// data-max (the largest value drawn, "" if none), so tests can tell an empty
// or all-zero chart from a drawn one. No dependencies.
(function () {
  "use strict";
  const NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#c0392b", "#2471a3", "#1e8449", "#b9770e", "#7d3c98", "#117a65"];
  const W = 760, H = 240;
  const M = { top: 12, right: 32, bottom: 40, left: 56 };

  function el(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (parent) parent.appendChild(node);
    return node;
  }

  // Round tick steps: 1, 2 or 5 times a power of ten, about `count` of them.
  function niceTicks(lo, hi, count) {
    if (!(hi > lo)) return [lo];
    const raw = (hi - lo) / count;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((f) => f * mag).find((s) => s >= raw) || raw;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(v);
    return out;
  }

  // Time ticks on whole seconds, minutes or hours, labelled in local time.
  const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200,
    10800, 21600, 43200, 86400].map((s) => s * 1000);

  function timeTicks(lo, hi, count) {
    const raw = (hi - lo) / count;
    const step = TIME_STEPS.find((s) => s >= raw) || TIME_STEPS[TIME_STEPS.length - 1];
    const out = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi; t += step) out.push(t);
    return { ticks: out, step };
  }

  function timeLabel(t, step, span) {
    const d = new Date(t);
    const two = (n) => String(n).padStart(2, "0");
    const hm = two(d.getHours()) + ":" + two(d.getMinutes());
    const text = step < 60000 ? hm + ":" + two(d.getSeconds()) : hm;
    return span > 86400000 ? d.getMonth() + 1 + "/" + d.getDate() + " " + text : text;
  }

  function formatValue(v) {
    const a = Math.abs(v);
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e4) return (v / 1e3).toFixed(0) + "k";
    if (a >= 100 || Number.isInteger(v)) return v.toFixed(0);
    return String(Number(v.toFixed(a >= 10 ? 1 : 2)));
  }

  function extent(series, bands, xRange, yRange) {
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (const s of series) {
      for (const [x, y] of s.points) {
        if (x < x0) x0 = x;
        if (x > x1) x1 = x;
        if (y === null || y === undefined) continue;
        if (y < y0) y0 = y;
        if (y > y1) y1 = y;
      }
    }
    for (const b of bands) {
      if (b.from < x0) x0 = b.from;
      if (b.to > x1) x1 = b.to;
    }
    if (xRange) [x0, x1] = xRange;
    if (!isFinite(x0)) { x1 = Date.now(); x0 = x1 - 60000; }
    if (x1 <= x0) x1 = x0 + 1000;
    if (yRange) [y0, y1] = yRange;
    if (!isFinite(y0)) { y0 = 0; y1 = 1; }
    if (y1 <= y0) { y0 -= 1; y1 += 1; }
    else if (!yRange) { const pad = (y1 - y0) * 0.08; y0 -= pad; y1 += pad; }
    return { x0, x1, y0, y1 };
  }

  function line(container, opts) {
    const series = (opts.series || []).filter((s) => s && Array.isArray(s.points));
    const bands = opts.bands || [];
    const { x0, x1, y0, y1 } = extent(series, bands, opts.xRange, opts.yRange);
    const pw = W - M.left - M.right, ph = H - M.top - M.bottom;
    const sx = (x) => M.left + ((x - x0) / (x1 - x0)) * pw;
    const sy = (y) => M.top + ph - ((y - y0) / (y1 - y0)) * ph;
    const clampX = (x) => Math.min(Math.max(x, x0), x1);

    const svg = el("svg", {
      class: "mh-chart", viewBox: `0 0 ${W} ${H + 22}`, role: "img",
      preserveAspectRatio: "xMidYMid meet",
    });
    const clipId = "mhclip" + Math.random().toString(36).slice(2, 9);
    el("rect", { x: M.left, y: M.top, width: pw, height: ph },
      el("clipPath", { id: clipId }, el("defs", {}, svg)));

    for (const b of bands) {
      const a = sx(clampX(b.from)), z = sx(clampX(b.to));
      if (z <= a) continue;
      const r = el("rect", {
        class: "mh-band mh-band-" + (b.kind || "grant"),
        x: a, y: M.top, width: z - a, height: ph,
      }, svg);
      if (b.label) el("title", {}, r).textContent = b.label;
    }

    const axes = el("g", { class: "mh-axes" }, svg);
    for (const v of niceTicks(y0, y1, 5)) {
      const y = sy(v);
      el("line", { x1: M.left, x2: M.left + pw, y1: y, y2: y, class: "mh-grid" }, axes);
      el("text", { x: M.left - 6, y: y + 4, "text-anchor": "end" }, axes).textContent =
        formatValue(v);
    }
    const { ticks, step } = timeTicks(x0, x1, 6);
    for (const t of ticks) {
      const x = sx(t);
      el("line", { x1: x, x2: x, y1: M.top + ph, y2: M.top + ph + 4, class: "mh-tick" }, axes);
      el("text", { x, y: M.top + ph + 17, "text-anchor": "middle" }, axes).textContent =
        timeLabel(t, step, x1 - x0);
    }
    el("rect", { x: M.left, y: M.top, width: pw, height: ph, class: "mh-frame" }, axes);
    if (opts.yLabel) {
      el("text", {
        x: 12, y: M.top + ph / 2, "text-anchor": "middle",
        transform: `rotate(-90 12 ${M.top + ph / 2})`, class: "mh-ylabel",
      }, axes).textContent = opts.yLabel;
    }

    let drawn = 0;
    let top = -Infinity;
    const plot = el("g", { "clip-path": `url(#${clipId})` }, svg);
    series.forEach((s, i) => {
      const color = s.color || PALETTE[i % PALETTE.length];
      let d = "", pen = false, alone = [];
      s.points.forEach(([x, y], k) => {
        if (y === null || y === undefined) { pen = false; return; }
        d += (pen ? "L" : "M") + sx(x).toFixed(1) + " " + sy(y).toFixed(1);
        const next = s.points[k + 1];
        if (!pen && (!next || next[1] === null || next[1] === undefined)) alone.push([x, y]);
        pen = true;
        drawn += 1;
        if (y > top) top = y;
      });
      if (d) el("path", { d, stroke: color, class: "mh-line" }, plot);
      for (const [x, y] of alone) el("circle", { cx: sx(x), cy: sy(y), r: 2.5, fill: color }, plot);
    });

    if (drawn === 0) {
      el("text", {
        x: M.left + pw / 2, y: M.top + ph / 2, "text-anchor": "middle", class: "mh-empty",
      }, svg).textContent = opts.empty || "no data in this window";
    }

    const legend = el("g", { class: "mh-legend" }, svg);
    let lx = M.left;
    const entries = series.map((s, i) => ({
      label: s.label, swatch: s.color || PALETTE[i % PALETTE.length], cls: "",
    }));
    const kinds = [...new Set(bands.map((b) => b.kind || "grant"))];
    for (const k of kinds) entries.push({ label: k, swatch: null, cls: "mh-band-" + k });
    for (const e of entries) {
      const attrs = { x: lx, y: H + 6, width: 12, height: 10 };
      if (e.swatch) attrs.fill = e.swatch; else attrs.class = "mh-band " + e.cls;
      el("rect", attrs, legend);
      const t = el("text", { x: lx + 16, y: H + 15 }, legend);
      t.textContent = e.label;
      lx += 28 + 7 * String(e.label).length;
    }

    svg.setAttribute("data-points", String(drawn));
    svg.setAttribute("data-series", String(series.length));
    svg.setAttribute("data-max", drawn ? String(top) : "");
    container.replaceChildren(svg);
    return svg;
  }

  window.MHChart = { line, formatValue };
})();
