/* edgepipe dashboard: the rollout pages (list and detail), polled live; pause/resume/abort. */
(() => {
  "use strict";
  const ui = window.edgepipeUI;
  const body = document.body;
  const page = body.dataset.page;
  if (!ui || (page !== "rollouts" && page !== "rollout")) return;
  const { $, el, live, getJSON, stamp, devLink, logTable } = ui;
  const STATES = ["pending", "downloading", "applied", "healthy", "failed", "rolling_back", "rolled_back", "skipped"];
  const CLS = { healthy: "ok", done: "ok", rolled_back: "warn", failed: "err", halted: "err", aborted: "off", paused: "warn" };
  const badge = (state) => el("span", { class: `tag state-${state} ${CLS[state] || ""}`, "data-state": state, text: state.replace("_", " ") });
  const waveName = (i) => (i === 0 ? "canary" : `wave ${i}`);
  const counts = (c) => STATES.filter((s) => c[s]).map((s) => `${c[s]} ${s.replace("_", " ")}`).join(", ") || "–";

  function listPage() {
    live(async () => {
      const data = await getJSON("/v1/rollouts");
      const rows = data.rollouts.length
        ? data.rollouts.map((r) => el("tr", { "data-rollout": String(r.id) },
            el("td", null, el("a", { href: `/rollouts/${r.id}`, text: `rollout ${r.id}` })),
            el("td", { text: `v${r.bundle_version}` }),
            el("td", { class: "mono", text: r.group }),
            el("td", null, badge(r.state)),
            el("td", { text: r.current_wave < 0 ? "–" : `${waveName(r.current_wave)} of ${r.waves}` }),
            el("td", { text: counts(r.counts || {}) }),
            el("td", { class: "wrap", text: r.reason || "" }),
            el("td", { text: stamp(r.created_ms) })))
        : [el("tr", null, el("td", { colspan: 8, class: "muted", text: "No rollouts yet: start one with `edgepipe-cloud rollout start`." }))];
      $("#rollouts tbody").replaceChildren(...rows);
    });
  }

  function detailPage() {
    const id = body.dataset.rollout;
    const msg = $("#rollout-message");
    let refresh = null;
    const buttons = [...document.querySelectorAll("#rollout-actions button")];

    function render(r) {
      const st = $("#rollout-state");
      st.replaceChildren(badge(r.state));
      st.dataset.state = r.state;
      const s = r.spec;
      $("#rollout-summary").replaceChildren(
        el("dl", { class: "facts" },
          el("dt", { text: "Bundle" }), el("dd", { text: `v${r.bundle_version}` }),
          el("dt", { text: "Group" }), el("dd", { class: "mono", text: r.group }),
          el("dt", { text: "Waves" }), el("dd", { text: `canary ${s.canary}, then ${s.wave} each (${r.waves} in all)` }),
          el("dt", { text: "Soak" }), el("dd", { text: `${s.soak_ms / 1000} s, policy ${s.policy}` }),
          el("dt", { text: "Devices" }), el("dd", { "data-counts": "", text: counts(r.counts) }),
          el("dt", { text: "Reason" }), el("dd", { id: "rollout-reason", text: r.reason || "–" })));
      for (const b of buttons) {
        const a = b.dataset.action;
        b.hidden = !((a === "pause" && r.state === "running") || (a === "resume" && r.state === "paused") ||
          (a === "abort" && ["running", "paused", "halted"].includes(r.state)));
      }
      const waves = new Map();
      for (const d of r.devices) {
        if (!waves.has(d.wave)) waves.set(d.wave, []);
        waves.get(d.wave).push(d);
      }
      $("#rollout-waves").replaceChildren(...[...waves.entries()].map(([w, ds]) =>
        el("section", { class: "wave", "data-wave": String(w) },
          el("h3", { text: `${waveName(w)}${w === r.current_wave ? " (current)" : ""}` }),
          el("table", { class: "grid" },
            el("thead", null, el("tr", null, ...["Device", "State", "Reason", "Previous", "Applied", "Updated"].map((h) => el("th", { text: h })))),
            el("tbody", null, ...ds.map((d) => el("tr", { "data-device": d.device, "data-state": d.state },
              el("td", null, devLink(d.device)),
              el("td", null, badge(d.state)),
              el("td", { class: "wrap", text: d.reason || "" }),
              el("td", { text: d.previous_version == null ? "–" : `v${d.previous_version}` }),
              el("td", { text: stamp(d.applied_ms) }),
              el("td", { text: stamp(d.updated_ms) }))))))));
      logTable($("#rollout-events"), [
        ["Time", (e) => stamp(e.ts_ms)],
        ["Device", (e) => devLink(e.device)],
        ["Event", (e) => el("span", { class: "tag", text: e.kind })],
        ["Detail", (e) => e.detail || "", "wrap"],
      ], r.events.slice().reverse(), "No events.");
    }

    async function act(action) {
      if (action === "abort" && !window.confirm(`Abort rollout ${id}? Devices not yet updated keep what they run.`)) return;
      msg.textContent = `${action}…`;
      const r = await fetch(`/v1/rollouts/${encodeURIComponent(id)}/${action}`, {
        method: "POST", credentials: "same-origin",
        headers: { Accept: "application/json", "X-Edgepipe-CSRF": body.dataset.csrf || "" },
      });
      let data = null;
      try { data = await r.json(); } catch (_) { /* not JSON */ }
      if (!r.ok) { msg.textContent = `${action} refused: ${(data && data.detail) || r.statusText}`; return; }
      msg.textContent = `${action}: done`;
      render(data);
      if (refresh) refresh();
    }
    for (const b of buttons) b.addEventListener("click", () => act(b.dataset.action));
    refresh = live(async () => render(await getJSON(`/v1/rollouts/${encodeURIComponent(id)}`)));
  }

  if (page === "rollouts") listPage();
  else detailPage();
})();
