// trainserve dashboard, sweeps: the list of sweeps, and for the one chosen its leaderboard,
// every trial's validation curve on one chart, a parallel-coordinates view of the
// parameters against the objective (both drawn here on a canvas, no library), and a button
// that names the best trial's model. Values from the server go in through textContent only.
"use strict";

(() => {
  const POLL_MS = 1500;
  const ENDED = new Set(["complete", "pruned", "failed", "cancelled"]);
  const state = { selected: null, sweep: null, histories: new Map(), listKey: "" };

  const $ = (id) => document.getElementById(id);

  const { el } = window.trainserveUi;

  const apiJson = window.trainserveUi.call;

  const fmt = (v) => (v === null || v === undefined ? "–" : Number(v).toPrecision(4));
  const fmtParam = (v) => (typeof v === "number" && !Number.isInteger(v) ? Number(v).toPrecision(3) : String(v));
  const colour = (i, n) => `hsl(${Math.round((360 * i) / Math.max(n, 1))}, 65%, 45%)`;

  // -- the section -------------------------------------------------------------------------

  function build() {
    const section = el("section", { id: "sweeps", className: "card" });
    section.append(
      el("h2", {}, "Sweeps"),
      el(
        "table",
        {},
        el("thead", {}, el("tr", {}, ...["sweep", "status", "trials", "objective", "best"].map((h) => el("th", {}, h)))),
        el("tbody", { id: "sweep-rows", "data-testid": "sweep-rows" }, el("tr", { className: "empty" }, el("td", { colspan: "5" }, "no sweeps yet"))),
      ),
    );
    const detail = el("div", { id: "sweep-detail", className: "detail", hidden: "" });
    detail.append(
      el("h3", {}, "Sweep ", el("code", { id: "sweep-id" }), " ", el("span", { id: "sweep-status", className: "pill" })),
      el(
        "table",
        { className: "leaderboard" },
        el("thead", { id: "sweep-head" }),
        el("tbody", { id: "sweep-leaderboard", "data-testid": "sweep-leaderboard" }),
      ),
      el("div", { className: "sweep-charts" },
        el("figure", {},
          el("canvas", { id: "sweep-curves", width: "560", height: "260", "aria-label": "validation curves of every trial" }),
          el("figcaption", { id: "sweep-curves-caption" }, "each trial's loss per epoch")),
        el("figure", {},
          el("canvas", { id: "sweep-parallel", width: "560", height: "260", "aria-label": "parameters against the objective" }),
          el("figcaption", {}, "parameters (axes) against the objective (last axis); darker is better")),
      ),
      el("form", { id: "name-best-form", className: "row" },
        el("label", { for: "name-best-input" }, "Name the best trial's model"),
        el("input", { id: "name-best-input", type: "text", placeholder: "e.g. moons-best", required: "" }),
        el("button", { id: "name-best", type: "submit", "data-testid": "name-best" }, "Name the best")),
      el("p", { id: "name-best-result", className: "result", role: "status" }),
    );
    section.append(detail);
    document.querySelector("main").append(section);
    $("name-best-form").addEventListener("submit", nameBest);
  }

  // -- the list ----------------------------------------------------------------------------

  async function refreshList() {
    const sweeps = await apiJson("/sweeps?limit=50");
    const key = JSON.stringify(sweeps.map((s) => [s.id, s.status, s.counts, s.best && s.best.value]));
    if (key === state.listKey) return;
    state.listKey = key;
    const rows = sweeps.map((s) => {
      const done = Object.entries(s.counts).reduce((n, [k, v]) => n + (ENDED.has(k) ? v : 0), 0);
      const row = el(
        "tr",
        { "data-sweep-id": s.id },
        el("td", {}, el("code", {}, s.id.slice(0, 8)), el("span", { className: "name" }, s.name || "")),
        el("td", {}, el("span", { className: `pill ${s.status}` }, s.status)),
        el("td", {}, `${done}/${s.n_trials}`),
        el("td", {}, `${s.objective.direction} ${s.objective.metric}`),
        el("td", {}, s.best ? `${fmt(s.best.value)} (trial ${s.best.number})` : "–"),
      );
      if (s.id === state.selected) row.className = "selected";
      row.addEventListener("click", () => select(s.id));
      return row;
    });
    const body = $("sweep-rows");
    body.replaceChildren(...(rows.length ? rows : [el("tr", { className: "empty" }, el("td", { colspan: "5" }, "no sweeps yet"))]));
  }

  function select(id) {
    state.selected = id;
    state.sweep = null;
    state.histories.clear();
    state.listKey = "";
    $("name-best-result").textContent = "";
    refreshDetail().catch(() => {});
    refreshList().catch(() => {});
  }

  // -- one sweep ---------------------------------------------------------------------------

  async function refreshDetail() {
    if (!state.selected) return;
    const sweep = await apiJson(`/sweeps/${encodeURIComponent(state.selected)}`);
    state.sweep = sweep;
    // A trial's curve: its job's history; an ended trial's never changes again.
    await Promise.all(
      sweep.trials
        .filter((t) => t.job_id && !(ENDED.has(t.state) && state.histories.has(t.number)))
        .map(async (t) => {
          const job = await apiJson(`/jobs/${encodeURIComponent(t.job_id)}`);
          state.histories.set(t.number, job.history || []);
        }),
    );
    render();
  }

  function ranked(sweep) {
    const sign = sweep.objective.direction === "maximize" ? -1 : 1;
    return [...sweep.trials].sort((a, b) => {
      const ca = a.state === "complete" && a.value !== null ? 0 : 1;
      const cb = b.state === "complete" && b.value !== null ? 0 : 1;
      if (ca !== cb) return ca - cb;
      if (a.value !== null && b.value !== null && a.value !== b.value) return sign * (a.value - b.value);
      return a.number - b.number;
    });
  }

  function render() {
    const sweep = state.sweep;
    $("sweep-detail").hidden = false;
    $("sweep-id").textContent = sweep.id.slice(0, 8);
    const status = $("sweep-status");
    status.className = `pill ${sweep.status}`;
    status.textContent = sweep.status;
    const paths = Object.keys(sweep.search);
    $("sweep-head").replaceChildren(
      el("tr", {}, ...["rank", "trial", "state", sweep.objective.metric, "epochs", ...paths].map((h) => el("th", {}, h))),
    );
    const rows = ranked(sweep).map((t, i) =>
      el(
        "tr",
        { "data-trial": String(t.number), className: sweep.best && sweep.best.number === t.number ? "best" : "" },
        el("td", {}, String(i + 1)),
        el("td", {}, String(t.number)),
        el("td", { title: t.reason || "" }, t.state === "pruned" ? `pruned at ${t.pruned_at}` : t.state),
        el("td", {}, fmt(t.value)),
        el("td", {}, `${t.epochs_run}/${t.epochs ?? "–"}`),
        ...paths.map((p) => el("td", {}, fmtParam(t.params[p]))),
      ),
    );
    $("sweep-leaderboard").replaceChildren(...rows);
    drawCurves($("sweep-curves"), sweep);
    drawParallel($("sweep-parallel"), sweep);
  }

  function clear(canvas) {
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    return ctx;
  }

  function drawCurves(canvas, sweep) {
    const ctx = clear(canvas);
    const n = sweep.trials.length;
    const curves = sweep.trials.map((t) => {
      const history = state.histories.get(t.number) || [];
      // validation loss where there is one, else the training loss
      const points = history.map((r) => [r[0], r[2] ?? r[1]]).filter((p) => Number.isFinite(p[1]));
      return { trial: t, points };
    });
    const all = curves.flatMap((c) => c.points);
    if (!all.length) return;
    const pad = { left: 48, right: 10, top: 10, bottom: 26 };
    const maxEpoch = Math.max(...all.map((p) => p[0]), 1);
    const values = all.map((p) => p[1]);
    const logScale = Math.min(...values) > 0 && Math.max(...values) / Math.min(...values) > 100;
    const f = (v) => (logScale ? Math.log10(v) : v);
    const lo = Math.min(...values.map(f));
    const hi = Math.max(...values.map(f));
    const x = (e) => pad.left + ((canvas.width - pad.left - pad.right) * e) / maxEpoch;
    const y = (v) => canvas.height - pad.bottom - ((canvas.height - pad.top - pad.bottom) * (f(v) - lo)) / (hi - lo || 1);
    ctx.strokeStyle = "#c8ccd4";
    ctx.strokeRect(pad.left, pad.top, canvas.width - pad.left - pad.right, canvas.height - pad.top - pad.bottom);
    ctx.fillStyle = "#667085";
    ctx.font = "11px system-ui";
    ctx.fillText(logScale ? `${(10 ** hi).toPrecision(3)} (log)` : hi.toPrecision(3), 2, pad.top + 8);
    ctx.fillText(logScale ? (10 ** lo).toPrecision(3) : lo.toPrecision(3), 2, canvas.height - pad.bottom);
    ctx.fillText(`epoch ${maxEpoch}`, canvas.width - pad.right - 60, canvas.height - 8);
    curves.forEach(({ trial, points }, i) => {
      if (!points.length) return;
      ctx.strokeStyle = colour(i, n);
      ctx.lineWidth = sweep.best && sweep.best.number === trial.number ? 3 : 1.5;
      ctx.setLineDash(trial.state === "pruned" ? [4, 3] : []);
      ctx.beginPath();
      points.forEach(([e, v], j) => (j ? ctx.lineTo(x(e), y(v)) : ctx.moveTo(x(e), y(v))));
      ctx.stroke();
    });
    ctx.setLineDash([]);
  }

  function axisOf(path, sweep) {
    const kind = Object.keys(sweep.search[path])[0];
    const bounds = sweep.search[path][kind];
    if (kind === "choice") {
      return { label: path, at: (v) => (bounds.findIndex((c) => c === v) + 0.5) / bounds.length, ticks: bounds.map(String) };
    }
    const log = kind === "log_uniform";
    const g = (v) => (log ? Math.log10(v) : v);
    const [lo, hi] = [g(bounds[0]), g(bounds[1])];
    return { label: path, at: (v) => (g(v) - lo) / (hi - lo || 1), ticks: [String(bounds[0]), String(bounds[1])] };
  }

  function drawParallel(canvas, sweep) {
    const ctx = clear(canvas);
    const scored = sweep.trials.filter((t) => t.value !== null && Number.isFinite(t.value));
    const paths = Object.keys(sweep.search);
    if (!scored.length || !paths.length) return;
    const values = scored.map((t) => t.value);
    const [vlo, vhi] = [Math.min(...values), Math.max(...values)];
    const axes = [
      ...paths.map((p) => axisOf(p, sweep)),
      { label: sweep.objective.metric, at: (v) => (v - vlo) / (vhi - vlo || 1), ticks: [vlo.toPrecision(3), vhi.toPrecision(3)] },
    ];
    const pad = { left: 30, right: 30, top: 22, bottom: 22 };
    const ax = (i) => pad.left + ((canvas.width - pad.left - pad.right) * i) / Math.max(axes.length - 1, 1);
    const ay = (u) => canvas.height - pad.bottom - (canvas.height - pad.top - pad.bottom) * u;
    ctx.font = "11px system-ui";
    axes.forEach((a, i) => {
      ctx.strokeStyle = "#98a2b3";
      ctx.beginPath();
      ctx.moveTo(ax(i), ay(0));
      ctx.lineTo(ax(i), ay(1));
      ctx.stroke();
      ctx.fillStyle = "#1d2330";
      ctx.textAlign = i === 0 ? "left" : i === axes.length - 1 ? "right" : "center";
      ctx.fillText(a.label, ax(i), 12);
      ctx.fillStyle = "#667085";
      ctx.fillText(a.ticks[0], ax(i), canvas.height - 6);
    });
    const better = sweep.objective.direction === "maximize" ? (v) => (v - vlo) / (vhi - vlo || 1) : (v) => (vhi - v) / (vhi - vlo || 1);
    for (const t of scored) {
      const shade = Math.round(85 - 60 * better(t.value)); // lightness: darker is better
      ctx.strokeStyle = `hsl(220, 70%, ${shade}%)`;
      ctx.lineWidth = sweep.best && sweep.best.number === t.number ? 3 : 1.5;
      ctx.beginPath();
      axes.forEach((a, i) => {
        const u = i === axes.length - 1 ? a.at(t.value) : a.at(t.params[paths[i]]);
        i ? ctx.lineTo(ax(i), ay(u)) : ctx.moveTo(ax(i), ay(u));
      });
      ctx.stroke();
    }
    ctx.textAlign = "left";
  }

  async function nameBest(event) {
    event.preventDefault();
    const result = $("name-best-result");
    if (!state.selected) return;
    const name = $("name-best-input").value.trim();
    try {
      const model = await apiJson(`/sweeps/${encodeURIComponent(state.selected)}/best/name`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ name }),
      });
      result.className = "result";
      result.textContent = `model ${model.id.slice(0, 8)} is now ${model.name} v${model.version}`;
    } catch (err) {
      result.className = "result error";
      result.textContent = String(err.message || err);
    }
  }

  const loop = (task) => window.trainserveUi.every(task, POLL_MS);

  build();
  loop(refreshList);
  loop(refreshDetail);
})();
