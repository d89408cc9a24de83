// trainserve dashboard: the Datasets card, each column's profile as a table (GET /datasets).
// Loaded after app.js; owns its own <section>. Values go in through textContent, never as HTML.
"use strict";

(() => {
  const POLL_MS = 3000;
  const state = { listKey: "", selected: null, shown: "" };

  const { el } = window.trainserveUi;

  const getJson = (path) => window.trainserveUi.call(path);

  const fmtNumber = (v) => (v === null || v === undefined ? "–" : Number(v).toPrecision(4).replace(/\.?0+$/, ""));
  const fmtShare = (share) => `${(100 * share).toFixed(share && share < 0.001 ? 2 : 1)}%`;

  function summary(profile) {
    if (profile.top) return profile.top.map((t) => `${t.value === "" ? "(blank)" : t.value} ×${t.count}`).join(", ");
    if (profile.min === undefined || profile.min === null) return "–";
    return `${fmtNumber(profile.min)} … ${fmtNumber(profile.max)}, mean ${fmtNumber(profile.mean)}`;
  }

  function columnRow(column) {
    const profile = column.profile;
    const warnings = el("td", { className: "warnings" });
    if (profile) {
      for (const text of profile.warnings) warnings.append(el("div", { className: "warning" }, text));
    }
    const cells = profile
      ? [
          el("td", {}, `${profile.missing} (${fmtShare(profile.missing_share)})`),
          el("td", {}, String(profile.distinct)),
          el("td", { className: "values" }, summary(profile)),
          warnings,
        ]
      : [el("td", {}, String(column.missing)), el("td", {}, "–"), el("td", {}, "no profile (uploaded before profiles)"), warnings];
    const row = el("tr", { "data-column": column.name }, el("td", {}, column.name), el("td", {}, column.kind), ...cells);
    if (profile && profile.warnings.length) row.classList.add("warned");
    return row;
  }

  function renderProfile(dataset) {
    const key = `${dataset.id}`;
    if (state.shown === key) return;
    state.shown = key;
    $profile.dataset.datasetId = dataset.id;
    $caption.textContent = `${dataset.filename || dataset.id} · ${dataset.n_rows} rows · ${dataset.columns.length} columns · ${dataset.format}`;
    $rows.replaceChildren(...dataset.columns.map(columnRow));
    $profile.hidden = false;
  }

  async function refresh() {
    const datasets = await getJson("/datasets?limit=50");
    const key = datasets.map((d) => d.id).join(",");
    if (key !== state.listKey) {
      state.listKey = key;
      const options = datasets.map((d) => el("option", { value: d.id }, `${d.filename || d.id.slice(0, 8)} (${d.n_rows} rows)`));
      $select.replaceChildren(...options);
      $empty.hidden = datasets.length > 0;
      $select.hidden = datasets.length === 0;
      if (!datasets.some((d) => d.id === state.selected)) state.selected = datasets.length ? datasets[0].id : null;
      if (state.selected) $select.value = state.selected;
    }
    const dataset = datasets.find((d) => d.id === state.selected);
    if (dataset) renderProfile(dataset);
    else $profile.hidden = true;
  }

  const $section = el("section", { id: "datasets", className: "card" }, el("h2", {}, "Datasets"));
  const $select = el("select", { id: "dataset-select", "aria-label": "dataset" });
  const $empty = el("p", { className: "empty" }, "no datasets yet");
  const $caption = el("caption", { id: "dataset-caption" });
  const $rows = el("tbody", { id: "profile-rows" });
  const head = ["column", "kind", "missing", "distinct", "values", "warnings"].map((h) => el("th", {}, h));
  const $profile = el("table", { id: "dataset-profile", className: "profile" }, $caption, el("thead", {}, el("tr", {}, ...head)), $rows);
  $profile.hidden = true;
  $select.hidden = true;
  $section.append($select, $empty, $profile);
  $select.addEventListener("change", () => {
    state.selected = $select.value;
    state.shown = "";
    refresh().catch(() => {});
  });

  function start() {
    (document.querySelector("main") || document.body).append($section);
    window.trainserveUi.every(refresh, POLL_MS);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
