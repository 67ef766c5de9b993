/* edgepipe dashboard page script: polls the receiver's /ui/api endpoints and renders. */
(() => {
  "use strict";
  const body = document.body;
  const page = body.dataset.page;
  const REFRESH = Number(body.dataset.refreshMs) || 5000;
  const $ = (sel) => document.querySelector(sel);

  // -- formatting -------------------------------------------------------------------------
  const nf = new Intl.NumberFormat();
  const num = (n) => (n == null ? "–" : nf.format(n));
  function dur(ms) {
    if (ms == null) return "–";
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 60) return `${s} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min`;
    const h = Math.floor(m / 60);
    if (h < 48) return `${h} h ${m % 60} min`;
    return `${Math.floor(h / 24)} d ${h % 24} h`;
  }
  const ago = (ms, now) => (ms == null ? "never" : `${dur(now - ms)} ago`);
  function bytes(n) {
    if (n == null) return "–";
    const u = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return `${n < 10 && i ? n.toFixed(1) : Math.round(n)} ${u[i]}`;
  }
  const stamp = (ms) => (ms == null ? "–" : new Date(ms).toLocaleString());

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v == null || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else e.setAttribute(k, v === true ? "" : v);
    }
    for (const kid of kids) if (kid != null) e.append(kid);
    return e;
  }

  // -- fetching and the live loop -----------------------------------------------------------
  // Once the page is being left (a form such as "Log out" was submitted), a poll that comes
  // back 401 must not take over the navigation with its own redirect to the login page.
  let leaving = false;
  document.addEventListener("submit", () => { leaving = true; }, true);
  window.addEventListener("beforeunload", () => { leaving = true; });
  window.addEventListener("pageshow", () => { leaving = false; });

  async function getJSON(url) {
    const r = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (r.status === 401) {
      if (leaving) throw new Error("signed out");
      location.href = `/login?next=${encodeURIComponent(location.pathname + location.search)}`;
      throw new Error("signed out");
    }
    if (!r.ok) {
      let detail = r.statusText;
      try { detail = (await r.json()).detail || detail; } catch (_) { /* not JSON */ }
      throw new Error(`${r.status}: ${detail}`);
    }
    return r.json();
  }

  function setLive(ok, err) {
    const b = $("#live");
    if (!b) return;
    b.classList.toggle("stale", !ok);
    b.textContent = ok ? "live" : "reconnecting…";
    b.title = ok ? `updated ${new Date().toLocaleTimeString()}` : String(err);
  }

  function live(fn) {
    let timer = null;
    let running = false;
    const tick = async () => {
      if (running) return;
      running = true;
      clearTimeout(timer);
      try { await fn(); setLive(true); } catch (e) { setLive(false, e); }
      running = false;
      if (!document.hidden) timer = setTimeout(tick, REFRESH);
    };
    document.addEventListener("visibilitychange", () => { if (!document.hidden) tick(); });
    tick();
    return tick;
  }

  // -- shared pieces ----------------------------------------------------------------------
  function cards(container, items) {
    container.replaceChildren(
      ...items.map(([label, value, cls, id]) =>
        el("div", { class: `stat ${cls || ""}`, "data-stat": id || null },
          el("div", { class: "label", text: label }), el("div", { class: "value", text: value })))
    );
  }

  function statusBadge(online) {
    return el("span", { class: `badge ${online ? "ok" : "off"}`, text: online ? "online" : "offline" });
  }

  function logTable(table, cols, rows, empty) {
    const head = el("tr", null, ...cols.map(([label, , cls]) => el("th", { class: cls === "num" ? cls : null, text: label })));
    const tbody = rows.length
      ? rows.map((r) => el("tr", null, ...cols.map(([, f, cls]) => {
          const v = f(r);
          return el("td", { class: cls, title: typeof v === "string" && v.length > 40 ? v : null }, v);
        })))
      : [el("tr", null, el("td", { colspan: cols.length, class: "muted", text: empty }))];
    table.replaceChildren(el("thead", null, head), el("tbody", null, ...tbody));
  }

  const devLink = (name) => (name ? el("a", { href: `/devices/${encodeURIComponent(name)}`, text: name }) : "–");
  const DL_COLS = [
    ["Received", (r) => stamp(r.received_ms)],
    ["Device", (r) => devLink(r.device)],
    ["Topic", (r) => r.topic, "mono"],
    ["Stage", (r) => r.stage || "–"],
    ["Reason", (r) => r.reason, "wrap"],
    ["Size", (r) => bytes(r.size), "num"],
  ];
  const REJ_COLS = [
    ["Time", (r) => stamp(r.ts_ms)],
    ["Device", (r) => devLink(r.device)],
    ["Reason", (r) => el("span", { class: "tag warn", text: r.reason })],
    ["Detail", (r) => r.detail, "wrap"],
    ["Remote", (r) => r.remote || "–", "mono"],
  ];

  async function refreshLogs(device, limit) {
    const q = new URLSearchParams({ limit: String(limit) });
    if (device) q.set("device", device);
    const data = await getJSON(`/ui/api/logs?${q}`);
    const dlCols = device ? DL_COLS.filter((c) => c[0] !== "Device") : DL_COLS;
    const rejCols = device ? REJ_COLS.filter((c) => c[0] !== "Device") : REJ_COLS;
    logTable($("#dl"), dlCols, data.dead_letters, "No dead letters.");
    logTable($("#rej"), rejCols, data.rejections, "No rejected requests.");
  }

  // -- fleet ----------------------------------------------------------------------------------
  function fleetRow(d, now) {
    const err = d.last_error
      ? el("span", { class: "err", title: `${stamp(d.last_error_ms)} — ${d.last_error}`, text: d.last_error })
      : null;
    const rej = d.rejections_24h
      ? el("span", { class: "tag warn", text: `${d.rejections_24h} rejected` })
      : el("span", { class: "muted", text: "none" });
    const backlog = d.backlog_readings == null ? "–" : num(d.backlog_readings);
    return el("tr", { "data-device": d.name, "data-online": String(d.online) },
      el("td", { class: "name" }, devLink(d.name)),
      el("td", null, statusBadge(d.online)),
      el("td", { title: stamp(d.last_seen_ms), text: ago(d.last_seen_ms, now) }),
      el("td", { title: stamp(d.last_sync_ms), text: ago(d.last_sync_ms, now) }),
      el("td", { class: "num", title: d.oldest_unsynced_ms ? `oldest unsynced ${stamp(d.oldest_unsynced_ms)}` : null, text: backlog }),
      el("td", { class: "num", title: d.newest_ts ? `newest reading ${stamp(d.newest_ts)}` : null, text: dur(d.lag_ms) }),
      el("td", { class: "num", text: num(d.today.readings || 0) }),
      el("td", { class: "num", text: bytes(d.today.bytes || 0) }),
      el("td", null, d.link ? el("span", { class: `tag link-${d.link}`, text: d.link }) : "–"),
      el("td", { class: "errors" }, rej, err),
      el("td", { class: "bundle" }, bundleCell(d.bundle || {})));
  }

  // The active bundle version, and whether it is the one the device should run.
  function bundleCell(b) {
    if (b.active_version == null && b.desired_version == null) return el("span", { class: "muted", text: "local chain" });
    const active = b.active_version == null ? "local chain" : `v${b.active_version}`;
    if (b.in_sync) return el("span", { class: "tag ok", "data-in-sync": "true", text: active });
    return el("span", {
      class: "tag warn", "data-in-sync": "false",
      title: b.status ? `last attempt: ${b.status}` : null,
      text: `${active} → v${b.desired_version}`,
    });
  }

  function fleetPage() {
    live(async () => {
      const f = await getJSON("/ui/api/fleet");
      const t = f.totals;
      cards($("#summary"), [
        ["Devices", num(t.devices), "", "devices"],
        ["Online", num(t.online), "ok", "online"],
        ["Offline", num(t.offline), t.offline ? "off" : "", "offline"],
        ["Backlog (online)", num(t.backlog_readings), "", "backlog"],
        ["Readings today", num(t.readings_today), "", "readings"],
        ["Received today", bytes(t.bytes_today), "", "bytes"],
        ["Rejected (24 h)", num(t.rejections_24h), t.rejections_24h ? "warn" : "", "rejections"],
      ]);
      const rows = f.devices.length
        ? f.devices.map((d) => fleetRow(d, f.now))
        : [el("tr", null, el("td", { colspan: 11, class: "muted", text: "No devices yet: add one with `edgepipe-cloud devices add NAME`." }))];
      $("#fleet tbody").replaceChildren(...rows);
    });
  }

  // -- device ---------------------------------------------------------------------------------
  function devicePage() {
    const name = body.dataset.device;
    const chartEl = $("#chart");
    const select = $("#series");
    let range = "15m";
    let zoom = null; // {since, until} while zoomed
    let plot = null;
    let seriesKey = null;

    async function loadSeries() {
      const m = await getJSON(`/ui/api/metrics?device=${encodeURIComponent(name)}`);
      const opts = m.metrics.map((s) => {
        const key = `${s.source}\u0000${s.metric}`;
        return { key, label: `${s.metric} · ${s.source}` };
      });
      const seen = new Set();
      const uniq = opts.filter((o) => !seen.has(o.key) && seen.add(o.key));
      const current = [...select.options].map((o) => o.value).join("|");
      if (current !== uniq.map((o) => o.key).join("|")) {
        select.replaceChildren(...uniq.map((o) => el("option", { value: o.key, text: o.label })));
      }
      if (seriesKey && uniq.some((o) => o.key === seriesKey)) select.value = seriesKey;
      seriesKey = select.value || null;
    }

    function chartSize() {
      const w = chartEl.clientWidth || 600;
      return { width: w, height: window.innerWidth < 640 ? 240 : 340 };
    }

    // Empty buckets come as null.  A run of them shorter than the device's usual cadence
    // (3x the median spacing of its readings) is just the time between two readings: the
    // line spans it (undefined).  A longer run is a real gap: the line breaks and the run
    // is shaded.
    let gaps = [];
    function shapeGaps(ts, avg) {
      const idx = [];
      avg.forEach((v, i) => { if (v != null) idx.push(i); });
      const d = idx.slice(1).map((v, i) => v - idx[i]).sort((a, b) => a - b);
      const cadence = d.length ? d[Math.floor(d.length / 2)] : 1;
      const minRun = Math.max(3, 3 * cadence);
      gaps = [];
      const out = avg.slice();
      for (let k = 1; k < idx.length; k++) {
        const run = idx[k] - idx[k - 1] - 1;
        if (run <= 0) continue;
        if (run < minRun) for (let i = idx[k - 1] + 1; i < idx[k]; i++) out[i] = undefined;
        else gaps.push([ts[idx[k - 1]], ts[idx[k]]]);
      }
      return out;
    }

    function makePlot(data, step) {
      const fmtX = step >= 86400000 ? "{YYYY}-{MM}-{DD}" : "{HH}:{mm}:{ss}";
      const opts = {
        ...chartSize(),
        cursor: { drag: { x: true, y: false, setScale: false } },
        scales: { x: { time: true } },
        legend: { live: true },
        series: [
          { value: (u, v) => (v == null ? "–" : uPlot.fmtDate(fmtX)(new Date(v * 1000))) },
          { label: "avg", stroke: "#2563eb", width: 2, spanGaps: false, points: { size: 4 } },
          { label: "min", stroke: "rgba(37,99,235,.35)", width: 1, dash: [4, 4], spanGaps: false, points: { show: false } },
          { label: "max", stroke: "rgba(37,99,235,.35)", width: 1, dash: [4, 4], spanGaps: false, points: { show: false } },
        ],
        axes: [
          { stroke: "#64748b", grid: { stroke: "#eef1f5" }, ticks: { stroke: "#e2e8f0" } },
          { stroke: "#64748b", grid: { stroke: "#eef1f5" }, ticks: { stroke: "#e2e8f0" }, size: 56 },
        ],
        hooks: {
          drawClear: [(u) => {
            const { ctx } = u;
            ctx.save();
            ctx.fillStyle = "rgba(220, 38, 38, 0.08)";
            for (const [a, b] of gaps) {
              const x0 = u.valToPos(a, "x", true);
              const x1 = u.valToPos(b, "x", true);
              ctx.fillRect(x0, u.bbox.top, Math.max(1, x1 - x0), u.bbox.height);
            }
            ctx.restore();
          }],
          setSelect: [(u) => {
            if (u.select.width > 4) {
              const a = u.posToVal(u.select.left, "x");
              const b = u.posToVal(u.select.left + u.select.width, "x");
              zoom = { since: Math.floor(a * 1000), until: Math.ceil(b * 1000) };
              $("#reset-zoom").hidden = false;
              refreshChart();
            }
            u.setSelect({ left: 0, top: 0, width: 0, height: 0 }, false);
          }],
        },
      };
      chartEl.replaceChildren();
      return new uPlot(opts, data, chartEl);
    }

    async function refreshChart() {
      if (!seriesKey) {
        chartEl.replaceChildren(el("p", { class: "empty muted", text: "No readings received from this device yet." }));
        return;
      }
      const [source, metric] = seriesKey.split("\u0000");
      const q = new URLSearchParams({ device: name, metric, source });
      if (zoom) { q.set("since", zoom.since); q.set("until", zoom.until); } else q.set("range", range);
      const s = await getJSON(`/ui/api/series?${q}`);
      const xs = s.ts.map((t) => t / 1000);
      const avg = shapeGaps(xs, s.avg);
      const span = (arr) => arr.map((v, i) => (avg[i] === undefined ? undefined : v));
      const data = [xs, avg, span(s.min), span(s.max)];
      const pts = s.avg.filter((v) => v != null).length;
      window.edgepipeChart = s;
      Object.assign(chartEl.dataset, {
        points: String(pts),
        nulls: String(s.avg.length - pts),
        readings: String(s.count.reduce((a, b) => a + b, 0)),
        step: String(s.step),
        since: String(s.since),
        until: String(s.until),
        series: seriesKey.replace("\u0000", "/"),
        gaps: String(gaps.length),
        updated: String((Number(chartEl.dataset.updated) || 0) + 1),
      });
      $("#chart-note").textContent =
        `${num(pts)} buckets of ${dur(s.step)} with data, ${num(Number(chartEl.dataset.readings))} readings` +
        `${gaps.length ? `; ${gaps.length} gap${gaps.length > 1 ? "s" : ""} (shaded: no readings received)` : ""}. Drag across the chart to zoom.`;
      if (!plot || plot._step !== s.step || !chartEl.contains(plot.root)) {
        if (plot) plot.destroy();
        plot = makePlot(data, s.step);
        plot._step = s.step;
      } else {
        plot.setData(data);
      }
    }

    async function refreshStatus() {
      const f = await getJSON(`/ui/api/fleet?device=${encodeURIComponent(name)}`);
      const d = f.devices[0];
      const badge = $("#device-status");
      badge.className = `badge ${d.online ? "ok" : "off"}`;
      badge.textContent = d.online ? "online" : "offline";
      body.dataset.online = String(d.online);
      cards($("#device-summary"), [
        ["Last seen", ago(d.last_seen_ms, f.now), "", "last-seen"],
        ["Last sync", ago(d.last_sync_ms, f.now), "", "last-sync"],
        ["Backlog", num(d.backlog_readings), "", "backlog"],
        ["Sync lag", dur(d.lag_ms), "", "lag"],
        ["Readings today", num(d.today.readings || 0), "", "readings"],
        ["Received today", bytes(d.today.bytes || 0), "", "bytes"],
        ["Link", d.link || "–", "", "link"],
      ]);
    }

    let tick = 0;
    const refresh = live(async () => {
      if (tick++ % 4 === 0 || !seriesKey) await loadSeries();
      await Promise.all([refreshStatus(), refreshChart(), refreshLogs(name, 20)]);
    });

    select.addEventListener("change", () => { seriesKey = select.value; zoom = null; $("#reset-zoom").hidden = true; refresh(); });
    for (const b of document.querySelectorAll("[data-range]")) {
      b.addEventListener("click", () => {
        range = b.dataset.range;
        zoom = null;
        $("#reset-zoom").hidden = true;
        for (const o of document.querySelectorAll("[data-range]")) o.setAttribute("aria-pressed", String(o === b));
        refresh();
      });
    }
    $("#reset-zoom").addEventListener("click", () => { zoom = null; $("#reset-zoom").hidden = true; refresh(); });
    new ResizeObserver(() => { if (plot) plot.setSize(chartSize()); }).observe(chartEl);
  }

  // -- logs -----------------------------------------------------------------------------------
  function logsPage() {
    const input = $("#log-device");
    const refresh = live(() => refreshLogs(input.value.trim(), 200));
    let t = null;
    input.addEventListener("input", () => { clearTimeout(t); t = setTimeout(refresh, 300); });
    $("#log-filter").addEventListener("submit", (e) => { e.preventDefault(); refresh(); });
  }

  // for the other page scripts of the bundle (rollout.js)
  window.edgepipeUI = { $, el, live, getJSON, stamp, ago, dur, num, devLink, logTable };

  if (page === "fleet") fleetPage();
  else if (page === "device" && body.dataset.device) devicePage();
  else if (page === "logs") logsPage();
})();
