// The node dashboard: polls GET /v1/dashboard and draws it. Every value goes into
// the page as text (names come from the genesis file, never as markup).
(function () {
  "use strict";
  const POLL_MS = 3000;
  const RECENT = 15; // intervals the "readings / s" card averages
  const $ = (id) => document.getElementById(id);

  function short(hex) {
    return hex.slice(0, 8);
  }

  function chainName(row) {
    return row.name ? row.name + " · " + short(row.node) : short(row.node);
  }

  function seconds(s) {
    if (s < 1) return "0 s";
    if (s < 90) return s.toFixed(0) + " s";
    if (s < 5400) return (s / 60).toFixed(0) + " min";
    return (s / 3600).toFixed(1) + " h";
  }

  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }

  function clock(ms) {
    return new Date(ms).toLocaleTimeString([], { hour12: false });
  }

  const { td } = window.MHDom;
  const fillTable = (id, rows, draw) => window.MHDom.fillTable($(id), rows, draw);

  function card(value, label, cls) {
    const box = document.createElement("div");
    box.className = "dash-card";
    const v = document.createElement("div");
    v.className = "dash-value" + (cls ? " " + cls : "");
    v.textContent = value;
    const l = document.createElement("div");
    l.className = "dash-label";
    l.textContent = label;
    box.append(v, l);
    return box;
  }

  function drawCards(d) {
    const recent = d.history.accepted_per_s.slice(-RECENT);
    const rate = recent.reduce((a, b) => a + b, 0) / Math.max(1, recent.length);
    const authorities = d.peers.filter((p) => p.state !== "observer");
    const connected = authorities.filter((p) => p.state === "connected").length;
    const ratio = d.store.map_size ? d.store.used_bytes / d.store.map_size : 0;
    $("cards").replaceChildren(
      card(rate.toFixed(1), "readings / s, last " + RECENT * d.history.interval_s + " s"),
      card(d.ingest.readings.toLocaleString(), "readings committed since start"),
      card(d.ingest.rejected.toLocaleString(), "rejected since start",
        d.ingest.rejected ? "warn" : ""),
      card(connected + " / " + authorities.length, "peers connected",
        connected < authorities.length ? "warn" : "ok"),
      card(d.mqtt_connected ? "connected" : "down", "MQTT broker",
        d.mqtt_connected ? "ok" : "bad"),
      card(d.ingest.backlog.toLocaleString(), "messages waiting"),
      card(bytes(d.store.used_bytes), (ratio * 100).toFixed(1) + "% of the LMDB map"),
      card(d.store.readings.toLocaleString(), "readings in the replica"),
    );
  }

  function drawNetwork(d) {
    const peers = new Map(d.peers.map((p) => [p.node, p]));
    const held = new Set(d.chains.map((c) => c.node));
    // authorities with no block in our replica yet (down since genesis, or this node
    // before its first block) get a row too
    const authorities = [{ node: d.node, name: d.name, state: "this node" }].concat(
      d.peers.filter((p) => p.state !== "observer"));
    const silent = authorities.filter((p) => !held.has(p.node)).map((p) => ({
      node: p.node, name: p.name, mine: p.node === d.node, height: -1, confirmed: -1,
      unconfirmed: 0, confirmation_lag_s: 0, missing: 0, faulty: p.state === "faulty",
    }));
    fillTable("network", d.chains.concat(silent), (tr, c) => {
      if (c.mine) tr.className = "dash-mine";
      td(tr, chainName(c), "", c.node);
      td(tr, c.height < 0 ? "no blocks" : c.height, c.height < 0 ? "muted" : "");
      td(tr, c.confirmed < 0 ? "none" : c.confirmed);
      td(tr, c.unconfirmed, c.unconfirmed > 3 ? "warn" : "");
      td(tr, c.unconfirmed ? seconds(c.confirmation_lag_s) : "–",
        c.confirmation_lag_s > 30 ? "warn" : "");
      td(tr, c.missing || "–", c.missing ? "warn" : "");
      const p = peers.get(c.node);
      if (c.mine) td(tr, "this node", "muted");
      else if (!p) td(tr, "unknown", "muted");
      else td(tr, p.state + (p.liveness === "alive" ? "" : " (" + p.liveness + ")"),
        p.state === "connected" && p.liveness === "alive" ? "ok" : "warn");
      td(tr, c.faulty ? "FAULTY" : "ok", c.faulty ? "bad" : "ok",
        c.faulty ? "this node signed two blocks at one height" : "");
    });
  }

  function drawCharts(d) {
    const h = d.history;
    // the last window_s, or from the first sample (at least a minute) while it fills up
    const end = h.t_ms.length ? h.t_ms[h.t_ms.length - 1] : d.now_ms;
    const first = h.t_ms.length ? h.t_ms[0] : end;
    const xRange = [Math.max(end - h.window_s * 1000, Math.min(first, end - 60000)), end];
    const at = (values) => h.t_ms.map((t, i) => [t, values[i]]);
    const top = (series) => {
      let m = 0;
      for (const s of series) for (const [, y] of s.points) m = Math.max(m, y);
      return [0, Math.max(1, m * 1.15)];
    };
    const ingest = [{ label: "readings / s", points: at(h.accepted_per_s) }];
    MHChart.line($("ingest-chart"), {
      series: ingest, xRange, yRange: top(ingest), yLabel: "per second",
    });
    let rejects = Object.entries(h.rejected_per_s)
      .map(([reason, values]) => ({ label: reason, points: at(values) }));
    if (!rejects.length) rejects = [{ label: "no rejects", points: at(h.t_ms.map(() => 0)) }];
    MHChart.line($("rejects-chart"), {
      series: rejects, xRange, yRange: top(rejects), yLabel: "per second",
    });
  }

  function drawBlocks(d) {
    fillTable("blocks", d.recent_blocks, (tr, b) => {
      td(tr, chainName(b), "", b.node);
      td(tr, b.height);
      td(tr, clock(b.ts_ms) + " (" + seconds((d.now_ms - b.ts_ms) / 1000) + " ago)");
      td(tr, b.count);
      td(tr, b.links);
      td(tr, b.confirmed ? "confirmed" : "pending", b.confirmed ? "ok" : "warn");
    });
  }

  function draw(d) {
    const me = d.name ? d.name + " · " + short(d.node) : short(d.node);
    document.title = "MeshHealth node " + me;
    $("title").textContent = "MeshHealth node " + me;
    $("subtitle").textContent = "network " + d.network.name + " · up " + seconds(d.uptime_s);
    $("updated").textContent = "updated " + clock(d.now_ms);
    drawCards(d);
    drawNetwork(d);
    drawCharts(d);
    drawBlocks(d);
  }

  async function poll() {
    try {
      await refresh();
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  async function refresh() {
    let d;
    try {
      const r = await fetch("/v1/dashboard", { cache: "no-store" });
      if (!r.ok) throw new Error("HTTP " + r.status);
      d = await r.json();
    } catch (e) {
      $("error").textContent = "This node does not answer (" + e.message + "); retrying.";
      return;
    }
    $("error").textContent = "";
    draw(d); // a fault in drawing is a bug: let it reach the console
  }

  poll();
})();
