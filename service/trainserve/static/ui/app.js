// trainserve dashboard: plain JavaScript over the JSON API, no framework and no CDN.
// Every value from the server goes into the page through textContent, never as HTML.
"use strict";

(() => {
  const { el } = window.trainserveUi;
  const root = window.trainserveUi.root;
  const KEY_STORE = "trainserve.apiKey";
  const ACTIVE = new Set(["queued", "running"]);
  const JOB_POLL_MS = 1000;
  const MODEL_POLL_MS = 3000;

  const $ = (id) => document.getElementById(id);
  const state = {
    rows: new Map(), // job id -> <tr>
    jobs: new Map(), // job id -> the job as GET /jobs listed it last
    live: new Map(), // job id -> [[epoch, train_loss, val_loss]] seen while polling a running job
    history: new Map(), // job id -> the final history of an ended job (it never changes)
    selected: null,
    detail: null,
    modelKey: "",
    plots: new Map(), // model id -> object URL of its plot, or null when there is none
    succeeded: 0,
  };

  // -- talking to the API ------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, body) {
      super(describeError(status, body));
      this.status = status;
    }
  }

  function describeError(status, body) {
    if (!body || typeof body !== "object") return `HTTP ${status}`;
    const lines = [String(body.detail || `HTTP ${status}`)];
    for (const item of body.errors || []) {
      const where = Array.isArray(item.loc) ? item.loc.join(".") : "";
      if (item.msg && item.msg !== body.detail) lines.push(`${where ? where + ": " : ""}${item.msg}`);
    }
    return lines.join("\n");
  }

  function apiKey() {
    return localStorage.getItem(KEY_STORE) || "";
  }

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const key = apiKey();
    if (key) headers.set("Authorization", `Bearer ${key}`);
    let response;
    try {
      response = await fetch(root + path, { ...options, headers });
    } catch (err) {
      setConnection("bad", "server unreachable");
      throw err;
    }
    if (response.status === 401) {
      setConnection("bad", "needs API key");
      showBanner(
        key
          ? "The server refused this API key: type the right one at the top and press Save."
          : "This server needs an API key: type it at the top and press Save.",
        "key",
      );
    } else {
      setConnection("ok", "connected");
      if ($("banner").dataset.kind === "key") showBanner("");
    }
    return response;
  }

  async function apiJson(path, options) {
    const response = await api(path, options);
    const body = await response.json().catch(() => null);
    if (!response.ok) throw new ApiError(response.status, body);
    return body;
  }

  function setConnection(kind, text) {
    const pill = $("connection");
    pill.className = `pill ${kind}`;
    pill.textContent = text;
  }

  function showBanner(text, kind = "") {
    const banner = $("banner");
    banner.dataset.kind = kind;
    banner.textContent = text;
    banner.hidden = !text;
  }

  // -- formatting --------------------------------------------------------------------------

  const fmtLoss = (v) => (v === null || v === undefined ? "–" : Number(v).toPrecision(4));
  const fmtTime = (iso) => (iso ? new Date(iso).toLocaleTimeString() : "–");
  const shortId = (id) => id.slice(0, 8);


  // -- jobs --------------------------------------------------------------------------------

  function jobRow(job) {
    const cancel = el("button", { type: "button", className: "danger", "data-action": "cancel" }, "Cancel");
    cancel.addEventListener("click", (event) => {
      event.stopPropagation();
      cancelJob(job.id, cancel);
    });
    const row = el(
      "tr",
      { "data-job-id": job.id },
      el("td", {}, el("code", { title: job.id }, shortId(job.id)), job.name ? el("span", { className: "name" }, job.name) : ""),
      el("td", {}, el("span", { className: "pill" })),
      el("td", {}, el("span", { className: "bar" }, el("span")), " ", el("span", { className: "epochs" })),
      el("td", { className: "train-loss" }),
      el("td", { className: "val-loss" }),
      el("td", { className: "started" }),
      el("td", {}, cancel),
    );
    row.addEventListener("click", () => select(job.id));
    return row;
  }

  function updateRow(row, job) {
    row.dataset.status = job.status;
    const [, statusCell, progressCell, trainCell, valCell, startedCell, actionCell] = row.children;
    const pill = statusCell.firstChild;
    pill.className = `pill ${job.status}`;
    pill.textContent = job.cancel_requested && job.status === "running" ? "cancelling" : job.status;
    if (job.error) pill.title = job.error;
    const done = job.epochs ? Math.min(1, job.epoch / job.epochs) : 0;
    progressCell.querySelector(".bar > span").style.width = `${(done * 100).toFixed(1)}%`;
    progressCell.querySelector(".epochs").textContent = `${job.epoch}/${job.epochs}`;
    trainCell.textContent = fmtLoss(job.train_loss);
    valCell.textContent = fmtLoss(job.val_loss);
    startedCell.textContent = fmtTime(job.started_at || job.created_at);
    actionCell.firstChild.hidden = !ACTIVE.has(job.status);
    row.classList.toggle("selected", job.id === state.selected);
  }

  function rememberLivePoint(job) {
    if (job.status !== "running" || job.train_loss === null || !job.epoch) return;
    const points = state.live.get(job.id) || [];
    if (!points.length || points[points.length - 1][0] < job.epoch) {
      points.push([job.epoch, job.train_loss, job.val_loss]);
      state.live.set(job.id, points);
    }
  }

  async function refreshJobs() {
    const jobs = await apiJson(`/jobs?${window.trainservePaging.query("jobs")}`);
    window.trainservePaging.shown("jobs", jobs.length);
    const body = $("job-rows");
    const seen = new Set();
    let succeeded = 0;
    state.jobs = new Map(jobs.map((job) => [job.id, job]));
    for (const job of jobs) {
      seen.add(job.id);
      let row = state.rows.get(job.id);
      if (!row) {
        row = jobRow(job);
        state.rows.set(job.id, row);
      }
      updateRow(row, job);
      rememberLivePoint(job);
      body.append(row); // in the server's order (newest first); moving a node keeps its listeners
      if (job.status === "succeeded") succeeded += 1;
    }
    for (const [id, row] of state.rows) {
      if (!seen.has(id)) {
        row.remove();
        state.rows.delete(id);
      }
    }
    body.querySelector("tr.empty")?.remove();
    if (!jobs.length) body.append(el("tr", { className: "empty" }, el("td", { colspan: "7" }, "no jobs yet")));
    if (!state.selected && jobs.length) state.selected = jobs[0].id;
    if (succeeded !== state.succeeded) {
      state.succeeded = succeeded;
      refreshModels().catch(() => {});
    }
    await refreshDetail();
  }

  async function cancelJob(id, button) {
    button.disabled = true;
    try {
      await apiJson(`/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" });
      await refreshJobs();
    } catch (err) {
      showBanner(`Could not cancel job ${id}: ${err.message}`);
    } finally {
      button.disabled = false;
    }
  }

  function select(id) {
    state.selected = id;
    for (const [jobId, row] of state.rows) row.classList.toggle("selected", jobId === id);
    refreshDetail().catch(() => {});
  }

  async function refreshDetail() {
    const id = state.selected;
    if (!id) return;
    const known = state.detail && state.detail.id === id ? state.detail : null;
    const listed = state.jobs.get(id);
    const ended = listed ? !ACTIVE.has(listed.status) : known && !ACTIVE.has(known.status);
    // Fetch the job when it is new here, when it has just ended (for its final history),
    // and while it runs unless its event stream is bringing the epochs.
    const needed = !known || (ended && !state.history.has(id)) || (!ended && stream.jobId !== id);
    let job = known;
    if (needed) {
      job = await apiJson(`/jobs/${encodeURIComponent(id)}`);
      if (!ACTIVE.has(job.status)) state.history.set(id, job.history || []);
    }
    if (state.selected !== id) return; // another job was picked while this one loaded
    state.detail = listed && !needed ? { ...job, ...listed } : job;
    if (ACTIVE.has(state.detail.status)) follow(id);
    renderDetail();
  }

  function chartHistory(job) {
    if (state.history.has(job.id)) return state.history.get(job.id);
    const fetched = job.history || [];
    const live = state.live.get(job.id) || [];
    const lastOf = (points) => (points.length ? points[points.length - 1][0] : 0);
    return lastOf(live) >= lastOf(fetched) ? live : fetched;
  }

  function renderDetail() {
    const job = state.detail;
    if (!job) return;
    $("job-detail").hidden = false;
    $("detail-id").textContent = job.id;
    const pill = $("detail-status");
    pill.className = `pill ${job.status}`;
    pill.textContent = job.status;
    drawLoss($("loss-chart"), chartHistory(job), job.epochs);
    const parts = [];
    const name = job.name || (job.spec && job.spec.name);
    if (name) parts.push(`name ${name}`);
    if (job.device) parts.push(`device ${job.device}`);
    if (job.model_id) parts.push(`model ${job.model_id}`);
    if (job.val_metrics) {
      for (const [name, value] of Object.entries(job.val_metrics)) parts.push(`val ${name} ${fmtLoss(value)}`);
    }
    const text = $("detail-text");
    text.textContent = [parts.join(" · "), job.error || ""].filter(Boolean).join("\n");
    text.classList.toggle("error", job.status === "failed");
  }

  // -- live epochs of the selected job: GET /jobs/{id}/events (Server-Sent Events) --------
  // EventSource cannot send an Authorization header, so the stream is read with fetch.
  // Where it is unavailable the detail falls back to polling GET /jobs/{id}.

  const stream = { jobId: null, controller: null, refused: new Set(), retryAt: 0 };

  function follow(id) {
    if (stream.jobId === id || stream.refused.has(id) || Date.now() < stream.retryAt) return;
    stream.controller?.abort();
    const controller = new AbortController();
    Object.assign(stream, { jobId: id, controller });
    readEvents(id, controller.signal)
      .catch(() => {
        stream.retryAt = Date.now() + 2000; // a dropped connection: poll, then try again
      })
      .finally(() => {
        if (stream.controller === controller) Object.assign(stream, { jobId: null, controller: null });
      });
  }

  async function readEvents(id, signal) {
    const response = await api(`/jobs/${encodeURIComponent(id)}/events`, {
      signal,
      headers: { Accept: "text/event-stream" },
    });
    if (!response.ok || !response.body) {
      stream.refused.add(id);
      return;
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      for (let cut = buffer.indexOf("\n\n"); cut >= 0; cut = buffer.indexOf("\n\n")) {
        onEvent(id, parseEvent(buffer.slice(0, cut)));
        buffer = buffer.slice(cut + 2);
      }
    }
  }

  function parseEvent(block) {
    let name = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) name = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    return { name, data: data.length ? JSON.parse(data.join("\n")) : null };
  }

  function onEvent(id, event) {
    if (event.name === "epoch") {
      const { epoch, train_loss: train, val_loss: val } = event.data;
      const points = state.live.get(id) || [];
      if (!points.length || points[points.length - 1][0] < epoch) points.push([epoch, train, val]);
      state.live.set(id, points);
      if (state.detail && state.detail.id === id) {
        Object.assign(state.detail, { epoch, train_loss: train, val_loss: val });
        renderDetail();
      }
    } else if (event.name === "end" || event.name === "status") {
      refreshJobs().catch(() => {});
    }
  }

  // -- the loss chart (canvas, no library) --------------------------------------------------

  function drawLoss(canvas, history, epochs) {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || canvas.width;
    const height = Math.round((width * 260) / 720);
    canvas.width = width * ratio;
    canvas.height = height * ratio;
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#667085";
    const pad = { left: 56, right: 12, top: 10, bottom: 26 };
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    const values = history.flatMap((p) => [p[1], p[2]]).filter((v) => v !== null && Number.isFinite(v));
    if (!values.length) {
      ctx.fillText("no loss reported yet", pad.left, pad.top + plotH / 2);
      return;
    }
    const lastEpoch = history[history.length - 1][0];
    const xMax = Math.max(epochs || 1, lastEpoch, 1);
    const xMin = Math.min(history[0][0], 1);
    let lo = Math.min(...values);
    let hi = Math.max(...values);
    // A loss that falls by orders of magnitude reads better on a log scale.
    const log = lo > 0 && hi / lo > 20;
    const tf = (v) => (log ? Math.log10(v) : v);
    lo = tf(lo);
    hi = tf(hi);
    if (hi - lo < 1e-12) {
      hi += 0.5;
      lo -= 0.5;
    }
    const x = (epoch) => pad.left + ((epoch - xMin) / Math.max(xMax - xMin, 1e-9)) * plotW;
    const y = (v) => pad.top + (1 - (tf(v) - lo) / (hi - lo)) * plotH;

    ctx.strokeStyle = "#e3e6eb";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i += 1) {
      const t = lo + ((hi - lo) * i) / 4;
      const py = pad.top + (1 - i / 4) * plotH;
      ctx.beginPath();
      ctx.moveTo(pad.left, py);
      ctx.lineTo(pad.left + plotW, py);
      ctx.stroke();
      ctx.fillText((log ? 10 ** t : t).toPrecision(3), pad.left - 6, py);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (let i = 0; i <= 5; i += 1) {
      const epoch = xMin + ((xMax - xMin) * i) / 5;
      ctx.fillText(String(Math.round(epoch)), x(epoch), pad.top + plotH + 6);
    }
    if (log) {
      ctx.textAlign = "right";
      ctx.fillText("log scale", pad.left + plotW - 4, pad.top + 2);
    }

    const series = (column, color) => {
      const points = history.filter((p) => p[column] !== null && Number.isFinite(p[column]));
      if (!points.length) return;
      ctx.strokeStyle = color;
      ctx.lineWidth = 2;
      ctx.beginPath();
      points.forEach((p, i) => (i ? ctx.lineTo(x(p[0]), y(p[column])) : ctx.moveTo(x(p[0]), y(p[column]))));
      ctx.stroke();
      if (points.length === 1) {
        ctx.fillStyle = color;
        ctx.fillRect(x(points[0][0]) - 2, y(points[0][column]) - 2, 4, 4);
      }
    };
    series(1, "#2f6fde");
    series(2, "#e8772e");
  }

  // -- models ------------------------------------------------------------------------------

  async function plotFor(model, frame) {
    if (!state.plots.has(model.id)) {
      let url = null;
      try {
        // Fetched rather than <img src> so that the Authorization header goes with it.
        const response = await api(`/models/${encodeURIComponent(model.id)}/plot.png`);
        if (response.ok && (response.headers.get("content-type") || "").startsWith("image/")) {
          url = URL.createObjectURL(await response.blob());
        }
      } catch (_err) {
        url = null;
      }
      state.plots.set(model.id, url);
    }
    const url = state.plots.get(model.id);
    frame.replaceChildren(
      url
        ? el("img", { src: url, alt: `plot of model ${model.id}`, "data-testid": "model-plot" })
        : el("div", { className: "placeholder", "data-testid": "plot-placeholder" }, "no plot for this model"),
    );
  }

  // The spec names a loss, optimizer or layer by a string or by {"type": ...}.
  const typeName = (item) => (typeof item === "string" ? item : item ? item.type : "");

  // "Linear(30) Tanh Linear(2)": the spec's layers as torch names, widths in brackets.
  function layersSummary(spec) {
    return ((spec && spec.model) || [])
      .map((layer) => {
        if (typeof layer === "string") return layer;
        const width = layer.out_features ?? layer.p;
        return width === undefined ? layer.type : `${layer.type}(${width})`;
      })
      .join(" ");
  }

  function modelCard(model) {
    const title = model.name ? `${model.name} v${model.version}` : shortId(model.id);
    const facts = el("dl");
    const fact = (name, value) => facts.append(el("dt", {}, name), el("dd", { title: String(value) }, String(value)));
    fact("id", model.id);
    fact("layers", layersSummary(model.spec));
    fact("training", `${typeName(model.spec.loss)}, ${typeName(model.spec.optimizer) || "SGD"}`);
    fact("task", model.task);
    for (const [name, value] of Object.entries(model.metrics || {})) fact(name, fmtLoss(value));
    fact("features", (model.features || []).join(", "));
    fact("parameters", model.n_parameters);
    fact("trained", `${Number(model.train_seconds).toFixed(2)} s on ${model.device}`);
    fact("job", model.job_id);
    const frame = el("div", { className: "frame" }, el("div", { className: "placeholder" }, "loading plot…"));
    plotFor(model, frame);
    // data-model-name/-version: hooks for aliases.js, which adds the card's aliases.
    const marks = { "data-model-name": model.name || "", "data-model-version": String(model.version ?? "") };
    return el("article", { className: "model", "data-model-id": model.id, ...marks }, el("h3", {}, title), frame, facts);
  }

  async function refreshModels() {
    const models = await apiJson(`/models?${window.trainservePaging.query("models")}`);
    window.trainservePaging.shown("models", models.length);
    const key = models.map((m) => m.id).join(",");
    if (key === state.modelKey) return;
    state.modelKey = key;
    const cards = $("model-cards");
    cards.replaceChildren(...models.map(modelCard));
    if (!models.length) cards.append(el("p", { className: "empty" }, "no models yet"));
  }

  // -- the form ----------------------------------------------------------------------------

  function defaultSpec() {
    return $("default-spec").textContent.trim();
  }

  async function submitTraining(event) {
    event.preventDefault();
    const result = $("train-result");
    const file = $("train-file").files[0];
    const spec = $("train-spec").value;
    result.classList.remove("error");
    if (!file) {
      result.classList.add("error");
      result.textContent = "Choose a CSV or .npz file first.";
      return;
    }
    try {
      JSON.parse(spec);
    } catch (err) {
      result.classList.add("error");
      result.textContent = `The spec is not valid JSON: ${err.message}`;
      return;
    }
    const form = new FormData();
    form.append("file", file, file.name);
    form.append("spec", spec);
    $("train-submit").disabled = true;
    result.textContent = "uploading…";
    try {
      const job = await apiJson("/train", { method: "POST", body: form });
      result.textContent = `queued job ${job.id}`;
      result.dataset.jobId = job.id;
      select(job.id);
      await refreshJobs();
    } catch (err) {
      result.classList.add("error");
      result.textContent = err.message;
    } finally {
      $("train-submit").disabled = false;
    }
  }

  // -- start -------------------------------------------------------------------------------

  const loop = window.trainserveUi.every;

  function start() {
    $("train-spec").value = defaultSpec();
    $("spec-reset").addEventListener("click", () => {
      $("train-spec").value = defaultSpec();
    });
    $("train-form").addEventListener("submit", submitTraining);
    $("api-key").value = apiKey();
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("api-key").value.trim();
      if (key) localStorage.setItem(KEY_STORE, key);
      else localStorage.removeItem(KEY_STORE);
      showBanner("");
      state.modelKey = "";
      state.plots.clear();
      refreshJobs().catch(() => {});
      refreshModels().catch(() => {});
    });
    window.trainservePaging.install("jobs", $("jobs"), () => refreshJobs().catch(() => {}));
    window.trainservePaging.install("models", $("models"), () => refreshModels().catch(() => {}));
    loop(refreshJobs, JOB_POLL_MS);
    loop(refreshModels, MODEL_POLL_MS);
  }

  start();
})();
