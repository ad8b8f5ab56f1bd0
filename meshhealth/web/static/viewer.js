// The local viewers' pages. MHView holds what the provider page and the patient page
// (patient.js) share; the provider page itself runs when <body data-page="provider">.
// Everything comes from the local server, which fetched, verified and decrypted it;
// every value goes into the page as text, never as markup.
(function () {
  "use strict";
  const HOUR = 3600000;
  const DAY = 24 * HOUR;
  const $ = (id) => document.getElementById(id);

  const TITLES = {
    hr: "Heart rate", spo2: "SpO₂", temp: "Body temperature", bp: "Blood pressure",
    rr: "Respiratory rate", steps: "Steps",
  };
  const UNITS = { "/min": "/min", "%": "%", Cel: "°C", "mm[Hg]": "mmHg", "{steps}": "steps" };
  const REASONS = {
    no_grant: "this patient has granted you nothing for this",
    revoked: "the patient revoked the grant",
    expired: "the grant has expired: the window asked for lies after its end",
    outside_grant: "the window asked for lies outside the grant",
    erased: "the patient erased this data",
    not_patient: "only the patient may read this",
    unreachable: "no node could be reached",
    verification_failed: "a node's answer failed verification, so nothing from it is shown",
    bad_request: "the viewer did not understand the request",
    too_large: "the answer would be larger than this viewer allows: pick a shorter window",
    busy: "the viewer is busy with other requests: try again in a moment",
    timeout: "the nodes took too long to answer",
  };
  const UNAVAILABLE = { revoked: "unavailable: grant revoked", not_granted: "unavailable: not granted" };

  function short(hex) {
    return String(hex).slice(0, 8);
  }

  function two(n) {
    return String(n).padStart(2, "0");
  }

  // Local time as the datetime-local inputs and the tables show it.
  function toInput(ms) {
    const d = new Date(ms);
    return d.getFullYear() + "-" + two(d.getMonth() + 1) + "-" + two(d.getDate()) + "T" +
      two(d.getHours()) + ":" + two(d.getMinutes()) + ":" + two(d.getSeconds());
  }

  function when(ms) {
    return toInput(ms).replace("T", " ");
  }

  function fromInput(text) {
    const ms = new Date(text).getTime(); // no offset: local time
    return Number.isFinite(ms) ? ms : null;
  }

  function title(stream) {
    return TITLES[stream] || stream;
  }

  // A node's refusal or trouble, for people: what it means, then what was said.
  function explain(error) {
    const what = REASONS[error.reason] || error.reason;
    return what + " (" + error.message + ")";
  }

  // `path` is relative ("api/me"): the page lives under /s/SECRET/, the run's secret the
  // viewer printed, and every API call carries it the same way (the server refuses any
  // request without it, so another web page cannot make the viewer sign a read).
  async function getJSON(path) {
    const r = await fetch(path, { headers: { Accept: "application/json" } });
    let doc = null;
    try {
      doc = await r.json();
    } catch (_) {
      doc = null;
    }
    if (doc === null || !r.ok) {
      const said = doc && doc.error ? explain(doc.error) : r.status + " " + r.statusText;
      throw new Error(path.split("?")[0] + ": " + said);
    }
    return doc;
  }

  function showError(text) {
    $("error").textContent = text || "";
  }

  const { td, fillTable } = window.MHDom;

  function stateClass(state) {
    return state === "active" ? "ok" : state === "revoked" ? "bad" : "warn";
  }

  // One grant as a table row: id, (grantee), streams, window, state.
  function grantRow(tr, g, withGrantee) {
    td(tr, short(g.id), "mono", g.id);
    if (withGrantee) td(tr, short(g.grantee), "mono", g.grantee);
    td(tr, g.streams.join(", "));
    td(tr, when(g.from_ms));
    td(tr, g.open ? "open (until revoked)" : when(g.until_ms));
    td(tr, g.state + (g.pseudonymous ? " · pseudonymous" : ""), stateClass(g.state));
    tr.dataset.state = g.state;
  }

  // An empty panel per stream, in order; returns {stream: parts}.
  function streamPanels(container, streams) {
    const out = {};
    container.replaceChildren(...streams.map((stream) => {
      const section = document.createElement("section");
      section.className = "mh-panel vw-stream";
      section.dataset.stream = stream;
      const h = document.createElement("h2");
      h.textContent = title(stream);
      const error = document.createElement("div");
      error.className = "mh-error";
      error.setAttribute("role", "alert");
      const chart = document.createElement("div");
      chart.className = "vw-chart";
      chart.textContent = "fetching and verifying…";
      const bands = document.createElement("ul");
      bands.className = "vw-bands";
      const meta = document.createElement("p");
      meta.className = "muted vw-meta";
      section.append(h, error, chart, bands, meta);
      out[stream] = { section, error, chart, bands, meta };
      return section;
    }));
    return out;
  }

  function bandItem(kind, text) {
    const li = document.createElement("li");
    li.className = "vw-band vw-band-" + kind;
    li.dataset.kind = kind;
    li.textContent = text;
    return li;
  }

  // Draw one /api/series answer into its panel.
  function drawSeries(parts, doc) {
    const bands = [];
    const items = [];
    for (const g of doc.grants) {
      const label = "grant " + short(g.id) + (g.open ? " (open)" : "");
      bands.push({ from: g.from_ms, to: g.to_ms, label, kind: "grant" });
      items.push(bandItem("grant", label + ": " + when(g.from_ms) + " – " + when(g.to_ms)));
    }
    for (const u of doc.unavailable) {
      const label = UNAVAILABLE[u.reason] || "unavailable";
      bands.push({ from: u.from_ms, to: u.to_ms, label, kind: "unavailable" });
      items.push(bandItem("unavailable", label + ": " + when(u.from_ms) + " – " + when(u.to_ms)));
    }
    parts.error.textContent = doc.error
      ? "The nodes did not serve this: " + explain(doc.error)
      : "";
    parts.section.dataset.error = doc.error ? doc.error.reason : "";
    const unit = doc.unit ? UNITS[doc.unit] || doc.unit : "";
    MHChart.line(parts.chart, {
      series: doc.series.map((s) => ({ label: s.label, points: s.points })),
      bands,
      xRange: [doc.from_ms, doc.to_ms],
      yLabel: unit,
      empty: doc.error ? "not available" : "no readings in this window",
    });
    parts.bands.replaceChildren(...items);
    const v = doc.verified;
    if (!v) {
      parts.meta.textContent = "";
      return;
    }
    let text = v.shown + " samples shown · " + v.readings + " verified readings in " +
      v.blocks + " blocks from " + doc.node;
    if (v.samples > v.shown) text += " · " + (v.samples - v.shown) + " outside the grant, not shown";
    if (v.undecryptable) text += " · " + v.undecryptable + " readings you hold no key for";
    parts.meta.textContent = text;
  }

  // Fetch and draw every stream at once; `url(stream)` names its /api/series query.
  async function drawStreams(container, streams, url, isCurrent) {
    const panels = streamPanels(container, streams);
    await Promise.all(streams.map(async (stream) => {
      let doc;
      try {
        doc = await getJSON(url(stream));
      } catch (err) {
        if (isCurrent()) {
          panels[stream].error.textContent = String(err.message || err);
          panels[stream].chart.textContent = "";
        }
        return;
      }
      if (isCurrent()) drawSeries(panels[stream], doc);
    }));
  }

  // The window the form shows, kept to the millisecond while its inputs are untouched.
  function windowForm(onShow) {
    const state = { from: 0, to: 0 };
    function set(lo, hi) {
      state.from = lo;
      state.to = hi;
      $("from").value = toInput(lo);
      $("to").value = toInput(hi);
    }
    function read() {
      const lo = $("from").value === toInput(state.from) ? state.from : fromInput($("from").value);
      const hi = $("to").value === toInput(state.to) ? state.to : fromInput($("to").value);
      if (lo === null || hi === null || lo > hi) {
        showError("Choose a window whose start is before its end.");
        return null;
      }
      state.from = lo;
      state.to = hi;
      return state;
    }
    $("pick").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const w = read();
      if (w) onShow(w.from, w.to);
    });
    return { set, state };
  }

  function numberParam(query, name) {
    const v = Number(query.get(name));
    return query.has(name) && Number.isFinite(v) ? v : null;
  }

  window.MHView = {
    HOUR, $, short, when, title, explain, getJSON, showError, td, fillTable, grantRow,
    stateClass, drawStreams, windowForm, numberParam,
  };

  // --- the provider page ------------------------------------------------------------

  // Default window: the latest active grant's (its last day at most, and not past now),
  // else the last hour.
  function defaultWindow(p, now) {
    const live = p.grants.filter((g) => g.state === "active");
    const g = (live.length ? live : p.grants.filter((x) => !x.revoked)).slice(-1)[0];
    if (!g) return [now - HOUR, now];
    const end = g.open ? now : g.from_ms > now ? g.until_ms : Math.min(g.until_ms, now);
    return [Math.max(g.from_ms, end - DAY), end];
  }

  async function provider() {
    let patients = [];
    let generation = 0;
    const query = new URLSearchParams(location.search);

    function current() {
      return patients.find((p) => p.patient === $("patient").value);
    }

    async function show(lo, hi) {
      const p = current();
      if (!p) return;
      const mine = ++generation;
      showError("");
      fillTable($("grants"), p.grants, (tr, g) => grantRow(tr, g, false));
      const params = new URLSearchParams({ patient: p.patient, from: lo, to: hi });
      history.replaceState(null, "", "?" + params);
      await drawStreams($("charts"), p.streams, (stream) => {
        const q = new URLSearchParams({ patient: p.patient, stream, from: lo, to: hi });
        return "api/series?" + q;
      }, () => mine === generation);
    }

    const form = windowForm(show);
    $("patient").addEventListener("change", () => {
      const [lo, hi] = defaultWindow(current(), Date.now());
      form.set(lo, hi);
      show(lo, hi);
    });

    try {
      const me = await getJSON("api/me");
      $("who").textContent = "provider " + short(me.key) + " · " + me.nodes.length + " node(s)";
      const doc = await getJSON("api/grants");
      if (doc.error) {
        showError("Could not list your grants: " + explain(doc.error));
        return;
      }
      patients = doc.patients;
    } catch (err) {
      showError(String(err.message || err));
      return;
    }
    if (!patients.length) {
      showError("No patient has granted you access to anything yet.");
      return;
    }
    $("patient").replaceChildren(...patients.map((p) => {
      const o = document.createElement("option");
      o.value = p.patient;
      o.textContent = short(p.subject) + (p.subject === p.patient ? "" : " (pseudonym)") +
        " · " + p.streams.join(", ") + " · " + p.state;
      return o;
    }));
    const wanted = query.get("patient");
    if (wanted && patients.some((p) => p.patient === wanted)) $("patient").value = wanted;
    let [lo, hi] = defaultWindow(current(), Date.now());
    lo = numberParam(query, "from") ?? lo;
    hi = numberParam(query, "to") ?? hi;
    form.set(lo, hi);
    await show(lo, hi);
  }

  if (document.body.dataset.page === "provider") provider();
})();
