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

  // Empty buckets come as null.  A run of them shorter than the device's usual cadence
  // (3x the median spacing of its buckets with data) is just the time between two
  // reports: the line spans it (undefined).  A longer run is a real gap: the line breaks
  // and the run is shaded.  Returns [values, gaps as [x0, x1] pairs].
  function spanGaps(ts, avg) {
    const idx = [];
    avg.forEach((v, i) => { if (v != null) idx.push(i); });
    const d = idx.slice(1).map((v, i) => v - idx[i]).sort((a, b) => a - b);
    const cadence = d.length ? d[Math.floor(d.length / 2)] : 1;
    const minRun = Math.max(3, 3 * cadence);
    const found = [];
    const out = avg.slice();
    for (let k = 1; k < idx.length; k++) {
      const run = idx[k] - idx[k - 1] - 1;
      if (run <= 0) continue;
      if (run < minRun) for (let i = idx[k - 1] + 1; i < idx[k]; i++) out[i] = undefined;
      else found.push([ts[idx[k - 1]], ts[idx[k]]]);
    }
    return [out, found];
  }

  // uPlot hook: shade the gaps of a chart.
  const shadeGaps = (getGaps) => (u) => {
    const { ctx } = u;
    ctx.save();
    ctx.fillStyle = "rgba(220, 38, 38, 0.08)";
    for (const [a, b] of getGaps()) {
      const x0 = u.valToPos(a, "x", true);
      const x1 = u.valToPos(b, "x", true);
      ctx.fillRect(x0, u.bbox.top, Math.max(1, x1 - x0), u.bbox.height);
    }
    ctx.restore();
  };

  const RANGE_MS = { "15m": 9e5, "1h": 36e5, "6h": 216e5, "24h": 864e5, "7d": 6048e5, "30d": 2592e6, "1y": 31536e6 };

  // -- badges: the states an operator must act on, each a link to its evidence -------------
  function badgeHref(device, b) {
    const q = new URLSearchParams({ badge: b.badge, snapshot: String(b.seq), at: String(b.ts), key: b.key });
    return `/devices/${encodeURIComponent(device)}?${q}#evidence`;
  }
  function badgeLinks(device, list) {
    return (list || []).map((b) => el("a", {
      class: `tag attn attn-${b.badge}`, href: badgeHref(device, b), "data-badge": b.badge,
      title: `evidence: snapshot #${b.seq} (${b.key}), ${stamp(b.ts)}`, text: b.text,
    }));
  }

  // -- the device log view (device page and /logs) ----------------------------------------
  const LEVEL_CLASS = { WARNING: "warn", ERROR: "off", CRITICAL: "crit" };
  function logView({ device, deviceInput }) {
    const root = $("#device-log");
    if (!root) return null;
    const table = $("#devlog");
    const more = $("#devlog-more");
    const level = $("#devlog-level");
    const text = $("#devlog-q");
    const range = $("#devlog-range");
    const windowNote = $("#devlog-window");
    const clearWindow = $("#devlog-clear-window");
    const params = new URLSearchParams(location.search);
    level.value = (params.get("level") || "").toUpperCase();
    text.value = params.get("q") || "";
    let fixed = null; // {since, until}: a window given by a link (a badge's evidence)
    const setWindow = (w) => {
      fixed = w;
      windowNote.hidden = clearWindow.hidden = !w;
      range.disabled = !!w;
      if (w) windowNote.textContent = `${stamp(w.since)} – ${stamp(w.until)}`;
    };
    if (params.get("since") && params.get("until")) setWindow({ since: +params.get("since"), until: +params.get("until") });
    let rows = [];
    let next = null;
    let paged = false;
    const who = () => device || (deviceInput ? deviceInput.value.trim() : "");
    const cols = () => [
      ["Time", (r) => el("span", { title: r.n > 1 ? `first ${stamp(r.ts)}, last ${stamp(r.last)}` : null, text: stamp(r.ts) })],
      ...(device ? [] : [["Device", (r) => devLink(r.device)]]),
      ["Level", (r) => el("span", { class: `tag ${LEVEL_CLASS[r.level] || ""}`, text: r.level })],
      ["Logger", (r) => r.logger, "mono"],
      ["Message", (r) => r.msg, "wrap msg"],
      ["Count", (r) => (r.n > 1 ? `×${num(r.n)}` : "1"), "num"],
    ];
    function url(before) {
      const q = new URLSearchParams({ limit: "50" });
      if (who()) q.set("device", who());
      if (level.value) q.set("level", level.value);
      if (text.value.trim()) q.set("q", text.value.trim().slice(0, 200));
      if (fixed) { q.set("since", String(fixed.since)); q.set("until", String(fixed.until)); }
      else if (range.value !== "all") q.set("since", String(Math.max(0, Date.now() - RANGE_MS[range.value])));
      if (before) q.set("before", before);
      return `/v1/logs?${q}`;
    }
    function render(shown) {
      const empty = text.value.trim() || level.value ? "No log records match." : "No warnings logged in this time range.";
      logTable(table, cols(), rows, empty);
      table.querySelectorAll("tbody tr").forEach((tr, i) => {
        if (!rows[i]) return;
        tr.dataset.level = rows[i].level;
        tr.dataset.n = String(rows[i].n);
      });
      more.hidden = !next;
      root.dataset.rows = String(rows.length);
      root.dataset.query = shown;
      root.dataset.updated = String((Number(root.dataset.updated) || 0) + 1);
    }
    // Only the answer to the newest request is shown: one to a filter since changed is
    // dropped, whatever order the answers come in.
    let asked = 0;
    async function refresh(force) {
      if (paged && !force) return; // reading older pages: the live refresh waits
      const mine = ++asked;
      const u = url(null);
      const page = await getJSON(u);
      if (mine !== asked) return;
      rows = page.logs;
      next = page.next;
      paged = false;
      render(u);
    }
    more.addEventListener("click", async () => {
      const mine = ++asked;
      const shown = url(null);
      const page = await getJSON(url(next));
      if (mine !== asked) return;
      rows = rows.concat(page.logs);
      next = page.next;
      paged = true;
      render(shown);
    });
    let t = null;
    const soon = () => { clearTimeout(t); t = setTimeout(() => refresh(true).catch((e) => setLive(false, e)), 300); };
    text.addEventListener("input", soon);
    level.addEventListener("change", soon);
    range.addEventListener("change", soon);
    if (deviceInput) deviceInput.addEventListener("input", soon);
    clearWindow.addEventListener("click", () => { setWindow(null); soon(); });
    $("#devlog-filter").addEventListener("submit", (e) => { e.preventDefault(); soon(); });
    return { refresh, setWindow: (w) => { setWindow(w); soon(); } };
  }

  // -- the health panel (device page) -----------------------------------------------------
  const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563", "#65a30d"];
  function unitFormat(unit) {
    if (unit === "B") return (v) => (v == null ? "–" : bytes(v));
    if (unit === "%") return (v) => (v == null ? "–" : `${v.toFixed(1)} %`);
    if (unit === "s") return (v) => (v == null ? "–" : `${v.toFixed(1)} s`);
    return (v) => (v == null ? "–" : num(v));
  }
  const CHART_OF_KEY = (key) => {
    if (key === "store_used_b" || key === "store_quota_b") return "store";
    if (key === "clock_skew_ms" || key === "receiver_skew_ms") return "skew";
    if (key === "rss_kb") return "rss";
    if (key === "cpu_ms") return "cpu";
    const head = key.split(":")[0];
    return { link_bytes: "link", drops: "drops", dead_letters: "dead_letters", traps: "traps" }[head] || null;
  };

  function healthPanel(name) {
    const root = $("#health");
    const box = $("#health-charts");
    const plots = new Map(); // chart id -> {plot, sig, gaps}
    let highlight = null;

    function chartDiv(c) {
      let div = box.querySelector(`[data-chart="${c.id}"]`);
      if (!div) {
        div = el("div", { class: "hchart", "data-chart": c.id },
          el("h3", { text: c.title }), el("div", { class: "plot" }));
        box.append(div);
      }
      div.classList.toggle("hl", highlight === c.id);
      return div;
    }

    function drawChart(c, h, xs, mask) {
      const div = chartDiv(c);
      const target = div.querySelector(".plot");
      const data = [xs, ...c.series.map((s) => s.values.map((v, i) => (mask[i] === undefined ? undefined : v)))];
      const points = c.series.reduce((a, s) => a + s.values.filter((v) => v != null).length, 0);
      Object.assign(div.dataset, { points: String(points), lines: String(c.series.length) });
      const old = plots.get(c.id);
      if (!c.series.length) {
        if (old) { old.plot.destroy(); plots.delete(c.id); }
        target.replaceChildren(el("p", { class: "muted small empty", text: "none in this time range" }));
        return;
      }
      const sig = `${h.step}|${c.series.map((s) => s.key).join("|")}`;
      if (old && old.sig === sig && target.contains(old.plot.root)) {
        old.gaps = h._gaps;
        old.plot.setData(data);
        return;
      }
      if (old) old.plot.destroy();
      const fmt = unitFormat(c.unit);
      const fmtX = h.step >= 86400000 ? "{YYYY}-{MM}-{DD}" : "{HH}:{mm}:{ss}";
      const entry = { sig, gaps: h._gaps, plot: null };
      const opts = {
        width: target.clientWidth || 400,
        height: 170,
        scales: { x: { time: true } },
        cursor: { drag: { x: false, y: false } },
        legend: { live: true },
        series: [
          { value: (u, v) => (v == null ? "–" : uPlot.fmtDate(fmtX)(new Date(v * 1000))) },
          ...c.series.map((s, i) => ({
            label: s.label, stroke: PALETTE[i % PALETTE.length], width: 1.5, spanGaps: false,
            points: { size: 3 }, value: (u, v) => fmt(v),
          })),
        ],
        axes: [
          { stroke: "#64748b", grid: { stroke: "#eef1f5" }, ticks: { stroke: "#e2e8f0" } },
          { stroke: "#64748b", grid: { stroke: "#eef1f5" }, ticks: { stroke: "#e2e8f0" }, size: 64, values: (u, vals) => vals.map(fmt) },
        ],
        hooks: { drawClear: [shadeGaps(() => entry.gaps)] },
      };
      target.replaceChildren();
      entry.plot = new uPlot(opts, data, target);
      plots.set(c.id, entry);
    }

    function totalsTable(id, cols, rows, empty) {
      const t = $(`#health-${id}`);
      logTable(t, cols, rows, empty);
      t.querySelectorAll("tbody tr").forEach((tr, i) => { if (rows[i]) tr.dataset.key = rows[i].key; });
    }

    function summary(h) {
      const last = h.latest ? h.latest.values : {};
      const cpu = (h.charts.find((c) => c.id === "cpu") || { series: [] }).series[0];
      const lastCpu = cpu ? [...cpu.values].reverse().find((v) => v != null) : null;
      const fill = last.store_quota_b ? last.store_used_b / last.store_quota_b : null;
      const skew = last.clock_skew_ms ?? null;
      const rskew = last.receiver_skew_ms ?? null;
      const th = h.thresholds;
      const skewed = [skew, rskew].some((v) => v != null && Math.abs(v) > th.clock_skew_ms);
      cards($("#health-summary"), [
        ["Last report", h.latest ? ago(h.latest.ts, h.now) : "none in range", "", "last-report"],
        ["CPU", lastCpu == null ? "–" : `${lastCpu.toFixed(1)} %`, "", "cpu"],
        ["RSS", last.rss_kb == null ? "–" : bytes(last.rss_kb * 1024), "", "rss"],
        [last.store_quota_b ? `Store (of ${bytes(last.store_quota_b)})` : "Store", fill == null ? "–" : `${Math.round(fill * 100)} %`, fill != null && fill > th.store_fill ? "off" : "", "store"],
        ["Disk free", bytes(last.disk_free_b), "", "disk"],
        ["Clock skew", skew == null && rskew == null ? "–" : `${skew == null ? "–" : (skew / 1000).toFixed(1)} s / ${rskew == null ? "–" : (rskew / 1000).toFixed(0)} s`, skewed ? "warn" : "", "skew"],
        ["MQTT", last.mqtt_connected == null ? "–" : last.mqtt_connected ? "connected" : "disconnected", last.mqtt_connected === 0 ? "off" : "", "mqtt"],
        ["Chain", h.chain.current || "–", "", "chain"],
      ]);
      const skewCard = $("#health-summary [data-stat=skew]");
      if (skewCard) skewCard.title = "device's estimate (from the receiver's answers) / receiver's measure (of the signed upload time); receiver minus device";
      const chainCard = $("#health-summary [data-stat=chain]");
      if (chainCard) {
        chainCard.classList.add("mono-value");
        chainCard.title = h.chain.changes.length
          ? `active chain (short hash of stage names and module digests); changed ${h.chain.changes.map((c) => `${stamp(c.ts)} → ${c.chain}`).join(", ")}`
          : "active chain (short hash of stage names and module digests)";
      }
    }

    async function refresh(windowQuery) {
      const q = new URLSearchParams({ device: name, ...windowQuery });
      const h = await getJSON(`/ui/api/health?${q}`);
      window.edgepipeHealth = h;
      const xs = h.ts.map((t) => t / 1000);
      const [mask, found] = spanGaps(xs, h.present.map((p) => (p ? 1 : null)));
      h._gaps = found;
      summary(h);
      for (const c of h.charts) drawChart(c, h, xs, mask);
      totalsTable("traps", [["Stage", (r) => r.stage], ["Trap code", (r) => r.code, "mono"], ["Count", (r) => num(r.n), "num"]],
        h.totals.traps, "No traps in this time range.");
      totalsTable("drops", [["Stage", (r) => r.stage], ["Reason", (r) => r.reason, "mono"], ["Count", (r) => num(r.n), "num"]],
        h.totals.drops, "No readings dropped in this time range.");
      totalsTable("dead_letters", [["Stage", (r) => r.stage], ["Reason", (r) => r.reason, "mono"], ["Count", (r) => num(r.n), "num"]],
        h.totals.dead_letters, "No dead letters in this time range.");
      $("#health-note").textContent = h.snapshots
        ? `${num(h.snapshots)} snapshots (the last of each ${dur(h.step)}), ${stamp(h.since)} – ${stamp(h.until)}`
        : "no health snapshots in this time range";
      $("#device-badges").replaceChildren(...badgeLinks(name, h.badges));
      Object.assign(root.dataset, {
        snapshots: String(h.snapshots),
        span: String(h.until - h.since),
        gaps: String(found.length),
        updated: String((Number(root.dataset.updated) || 0) + 1),
      });
    }

    new ResizeObserver(() => {
      for (const { plot } of plots.values()) {
        const w = plot.root.parentElement.clientWidth;
        if (w && Math.abs(w - plot.width) > 2) plot.setSize({ width: w, height: 170 });
      }
    }).observe(box);
    return { refresh, highlight: (key) => { highlight = CHART_OF_KEY(key); } };
  }

  // The evidence of a badge: the snapshot it names, its key highlighted.
  async function showEvidence(name, params, logs) {
    const card = $("#evidence");
    const seq = Number(params.get("snapshot"));
    const at = Number(params.get("at"));
    const key = params.get("key") || "";
    const q = new URLSearchParams({ since: String(at), until: String(at + 1) });
    const h = await getJSON(`/v1/devices/${encodeURIComponent(name)}/health?${q}`);
    const snap = h.snapshots.find((s) => s.seq === seq);
    const what = params.get("badge") || "badge";
    const around = { since: Math.max(0, at - 15 * 60000), until: at + 15 * 60000 };
    const logsBtn = el("button", { type: "button", class: "plain", text: "Device logs around this time" });
    logsBtn.addEventListener("click", () => { if (logs) logs.setWindow(around); $("#device-log").scrollIntoView(); });
    const head = el("h2", null, `Evidence of ${what}`, el("small", { class: "muted", text: snap ? `snapshot #${seq}, ${stamp(at)} (device clock)` : "" }));
    if (!snap) {
      card.replaceChildren(head, el("p", { class: "muted", text: `Snapshot #${seq} is no longer kept (retention) or was never received.` }), logsBtn);
    } else {
      const rows = Object.entries(snap.values).sort(([a], [b]) => (a === key ? -1 : b === key ? 1 : a < b ? -1 : 1));
      const table = el("table", { class: "grid", id: "evidence-values" },
        el("thead", null, el("tr", null, el("th", { text: "Key" }), el("th", { class: "num", text: "Value" }))),
        el("tbody", null, ...rows.map(([k, v]) => el("tr", { class: k === key ? "hl" : null, "data-key": k },
          el("td", { class: "mono", text: k }), el("td", { class: "num mono", text: String(v) })))));
      card.replaceChildren(head, el("div", { class: "toolbar" }, logsBtn), el("div", { class: "table-wrap evidence-values" }, table));
    }
    card.dataset.seq = String(seq);
    card.dataset.key = key;
    card.dataset.found = String(!!snap);
    card.hidden = false;
    card.scrollIntoView();
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
      el("td", { class: "status" }, statusBadge(d.online), ...badgeLinks(d.name, d.badges)),
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
    const active = b.active_version == null ? "local chain"
      : b.chain === "local" ? `local chain (v${b.active_version})` : `v${b.active_version}`;
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
        ["Need attention", num(t.attention), t.attention ? "warn" : "", "attention"],
      ]);
      const rows = f.devices.length
        ? f.devices.map((d) => fleetRow(d, f.now))
        : [el("tr", null, el("td", { colspan: 11, class: "muted", text: "No devices yet: add one with `edgepipe-cloud devices add NAME`." }))];
      $("#fleet tbody").replaceChildren(...rows);
    });
  }

  // -- alerts (fleet page; GET /v1/alerts, docs/alerts.md) ----------------------------------
  const ALERT_COLS = [
    ["State", (a) => el("span", { class: `tag ${a.state === "firing" ? `alert-${a.severity}` : "resolved"}`, text: a.state })],
    ["Severity", (a) => a.severity],
    ["Device", (a) => devLink(a.device)],
    ["Alert", (a) => a.rule, "mono"],
    ["Summary", (a) => a.summary, "wrap"],
    ["Since", (a) => el("span", { title: stamp(a.started_ms), text: stamp(a.started_ms) })],
    ["Resolved", (a) => (a.resolved_ms ? stamp(a.resolved_ms) : "–")],
    ["Delivered", (a) => (a.notified === a.state ? "yes" : "pending")],
  ];

  async function refreshAlerts() {
    const data = await getJSON("/v1/alerts?limit=50");
    const note = $("#alerts-note");
    const firing = data.alerts.filter((a) => a.state === "firing");
    const rows = [...firing, ...data.alerts.filter((a) => a.state !== "firing").slice(0, 10)];
    let empty = "No alerts.";
    if (!data.engine) {
      note.textContent = "no alert rules (edgepipe-cloud serve --alerts FILE)";
      empty = "No alert rules are configured.";
    } else {
      const hooks = data.engine.webhooks.map((w) =>
        `${w.url}: ${w.queued} queued${w.dropped ? `, ${w.dropped} dropped` : ""}${w.last_error && w.queued ? ` (${w.last_error})` : ""}`);
      note.textContent = `${firing.length} firing · ${data.engine.rules.length} rules${hooks.length ? ` · ${hooks.join("; ")}` : ""}`;
    }
    logTable($("#alerts"), ALERT_COLS, rows, empty);
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

    let gaps = [];
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
          drawClear: [shadeGaps(() => gaps)],
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
      const [avg, found] = spanGaps(xs, s.avg);
      gaps = found;
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

    const health = healthPanel(name);
    const logs = logView({ device: name });
    const params = new URLSearchParams(location.search);
    if (params.get("snapshot") && params.get("at")) {
      // a badge's evidence: the window around its snapshot, its chart marked
      const at = Number(params.get("at"));
      zoom = { since: Math.max(0, at - 30 * 60000), until: at + 5 * 60000 };
      $("#reset-zoom").hidden = false;
      health.highlight(params.get("key") || "");
      showEvidence(name, params, logs).catch((e) => setLive(false, e));
    }
    const windowQuery = () => (zoom ? { since: String(zoom.since), until: String(zoom.until) } : { range });
    let tick = 0;
    const refresh = live(async () => {
      if (tick++ % 4 === 0 || !seriesKey) await loadSeries();
      await Promise.all([refreshStatus(), refreshChart(), refreshLogs(name, 20), health.refresh(windowQuery()), logs.refresh()]);
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
    const logs = logView({ device: null, deviceInput: input });
    const refresh = live(() => Promise.all([refreshLogs(input.value.trim(), 200), logs.refresh()]));
    let t = null;
    input.addEventListener("input", () => { clearTimeout(t); t = setTimeout(refresh, 300); });
    $("#log-filter").addEventListener("submit", (e) => { e.preventDefault(); refresh(); });
  }

  // for the other page scripts of the bundle (rollout.js)
  window.edgepipeUI = { $, el, live, getJSON, stamp, ago, dur, num, devLink, logTable };

  if (page === "fleet") { fleetPage(); if ($("#alerts")) live(refreshAlerts); }
  else if (page === "device" && body.dataset.device) devicePage();
  else if (page === "logs") logsPage();
})();
