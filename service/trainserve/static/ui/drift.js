// trainserve dashboard: a drift panel on each model card (GET /models/{id}/drift): per feature,
// the population stability index of the logged requests against the training data, features
// over the server's threshold marked; for a category, also the share of levels never seen in
// training. Loaded after app.js; values go in through textContent.
"use strict";

(() => {
  const POLL_MS = 5000;
  const open = new Set(); // model ids whose panel is open: refreshed while open

  const getJson = (path) => window.trainserveUi.call(path);

  const { el } = window.trainserveUi;

  function table(report) {
    if (!report.window_rows) return el("p", { className: "empty" }, "no logged requests yet");
    const rows = report.features.map((f) =>
      el(
        "tr",
        { className: f.drifted ? "drifted" : "", "data-feature": f.feature },
        el("td", {}, f.feature),
        el("td", {}, Number(f.psi).toFixed(3)),
        el("td", {}, `${(100 * f.missing_share).toFixed(1)}%`),
        el("td", { className: "unseen" }, f.unseen_share == null ? "–" : `${(100 * f.unseen_share).toFixed(1)}%`),
        el("td", {}, f.drifted ? "drifted" : "ok"),
      ),
    );
    return el(
      "div",
      {},
      el("p", { className: "legend" }, `${report.window_rows} logged rows; PSI over ${report.threshold} is marked`),
      el(
        "table",
        { className: "drift-table" },
        el("thead", {}, el("tr", {}, el("th", {}, "feature"), el("th", {}, "PSI"), el("th", {}, "missing"), el("th", {}, "unseen"), el("th", {}, ""))),
        el("tbody", {}, ...rows),
      ),
    );
  }

  async function load(card) {
    const id = card.dataset.modelId;
    const panel = card.querySelector(".drift-panel");
    if (!panel || !open.has(id)) return;
    try {
      panel.replaceChildren(table(await getJson(`/models/${encodeURIComponent(id)}/drift`)));
    } catch (err) {
      panel.replaceChildren(el("p", { className: "result error" }, err.message));
    }
  }

  function decorate(card) {
    if (card.querySelector(".drift")) return;
    const id = card.dataset.modelId;
    const panel = el("div", { className: "drift-panel", "data-testid": "drift" });
    const button = el("button", { type: "button", className: "quiet" }, "drift");
    button.addEventListener("click", () => {
      if (open.has(id)) {
        open.delete(id);
        panel.replaceChildren();
      } else {
        open.add(id);
        panel.replaceChildren(el("p", {}, "measuring…"));
        load(card);
      }
    });
    card.append(el("div", { className: "drift" }, button, panel));
    if (open.has(id)) load(card);
  }

  const cards = () => [...document.querySelectorAll("#model-cards article.model[data-model-id]")];

  function start() {
    new MutationObserver(() => cards().forEach(decorate)).observe(document.getElementById("model-cards"), {
      childList: true,
    });
    cards().forEach(decorate);
    const tick = () => {
      cards().forEach(load);
      setTimeout(tick, POLL_MS);
    };
    setTimeout(tick, POLL_MS);
  }

  start();
})();
