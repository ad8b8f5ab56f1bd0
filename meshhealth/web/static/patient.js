// The patient's page: the audit trail (a chart of reads and refusals over time, and a
// table), the patient's grants, and their own streams. Uses MHView from viewer.js.
(function () {
  "use strict";
  const V = window.MHView;
  const $ = V.$;
  // bucket sizes for the audit chart: the smallest that gives at most 60 buckets
  const BUCKETS = [10, 30, 60, 300, 900, 3600, 21600, 86400, 604800].map((s) => s * 1000);
  const AT_LEAST = 15 * 60000; // the chart spans a quarter of an hour at least
  let me = null;
  let generation = 0;

  function bucketName(size) {
    if (size < 60000) return size / 1000 + " s";
    if (size < 3600000) return size / 60000 + " min";
    return size < 86400000 ? size / 3600000 + " h" : size / 86400000 + " d";
  }

  // Reads and refusals per time bucket, from the first log to now; zero buckets included.
  function perBucket(entries, now) {
    const first = Math.min(entries.length ? entries[0].ts_ms : now, now - AT_LEAST);
    const span = now - first;
    const size = BUCKETS.find((s) => span / s <= 60) || BUCKETS[BUCKETS.length - 1];
    const start = Math.floor(first / size) * size;
    const n = Math.floor((Math.max(now, first) - start) / size) + 1;
    const read = new Array(n).fill(0);
    const denied = new Array(n).fill(0);
    for (const e of entries) {
      const i = Math.floor((e.ts_ms - start) / size);
      if (i >= 0 && i < n) (e.outcome === "read" ? read : denied)[i] += 1;
    }
    const points = (counts) => counts.map((c, i) => [start + i * size, c]);
    return { size, range: [start, start + n * size], read: points(read), denied: points(denied) };
  }

  function readerName(hex) {
    return hex === me.key ? "you" : V.short(hex);
  }

  function drawAudit(doc) {
    $("audit-source").textContent = doc.node ? "from " + doc.node : "";
    const entries = doc.entries;
    const b = perBucket(entries, Date.now());
    const top = Math.max(1, ...b.read.map((p) => p[1]), ...b.denied.map((p) => p[1]));
    MHChart.line($("audit-chart"), {
      series: [
        { label: "read", points: b.read, color: "#1e8449" },
        { label: "denied", points: b.denied, color: "#c0392b" },
      ],
      xRange: b.range,
      yRange: [0, top],
      yLabel: "per " + bucketName(b.size),
    });
    V.fillTable($("audit"), entries.slice().reverse(), (tr, e) => {
      tr.dataset.outcome = e.outcome;
      tr.dataset.reader = e.reader;
      V.td(tr, V.when(e.ts_ms));
      V.td(tr, readerName(e.reader), "mono", e.reader + (e.grant ? " · grant " + e.grant : ""));
      V.td(tr, e.stream);
      V.td(tr, V.when(e.from_ms) + " – " + V.when(e.to_ms));
      tr.dataset.request = e.request;
      let outcome = e.outcome === "read" ? "read" : "denied: " + e.reason;
      if (e.count > 1) outcome += " ×" + e.count;
      // forged: the log does not carry this reader's own signature on the request
      if (e.request === "forged") outcome += " (FORGED: the reader's signature does not verify)";
      else if (e.request === "unsigned") outcome += " (unsigned: old log)";
      V.td(tr, outcome, "vw-outcome");
      V.td(tr, e.readings);
      V.td(tr, e.node_name + " · " + V.short(e.node), "mono", e.node);
    });
  }

  async function loadAudit() {
    const doc = await V.getJSON("api/audit");
    if (doc.error) throw new Error("Could not read your audit trail: " + V.explain(doc.error));
    drawAudit(doc);
  }

  async function loadGrants() {
    const doc = await V.getJSON("api/grants");
    if (doc.error) throw new Error("Could not list your grants: " + V.explain(doc.error));
    V.fillTable($("grants"), doc.grants, (tr, g) => V.grantRow(tr, g, true));
  }

  async function refresh() {
    V.showError("");
    const failed = [];
    await Promise.all([loadAudit(), loadGrants()].map((p) => p.catch((err) => {
      failed.push(String(err.message || err));
    })));
    if (failed.length) V.showError(failed.join(" · "));
  }

  async function showStreams(lo, hi) {
    const mine = ++generation;
    const params = new URLSearchParams({ from: lo, to: hi });
    history.replaceState(null, "", "?" + params);
    await V.drawStreams($("charts"), me.streams, (stream) => {
      return "api/series?" + new URLSearchParams({ stream, from: lo, to: hi });
    }, () => mine === generation);
  }

  async function main() {
    const query = new URLSearchParams(location.search);
    try {
      me = await V.getJSON("api/me");
    } catch (err) {
      V.showError(String(err.message || err));
      return;
    }
    $("who").textContent = "patient " + V.short(me.key) + " · " + me.nodes.length + " node(s)";
    $("refresh").addEventListener("click", refresh);
    const form = V.windowForm(showStreams);
    const now = Date.now();
    const lo = V.numberParam(query, "from") ?? now - V.HOUR;
    const hi = V.numberParam(query, "to") ?? now;
    form.set(lo, hi);
    await Promise.all([refresh(), showStreams(lo, hi)]);
  }

  main();
})();
