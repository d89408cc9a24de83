// trainserve dashboard: model aliases on the model cards (GET /models/by-name/{name}, PUT its aliases).
// Loaded after app.js; finds cards by their data attributes, so app.js only marks them.
// Every value from the server goes into the page through textContent, never as HTML.
"use strict";

(() => {
  const POLL_MS = 3000;
  const ALIAS = /^[a-z][a-z0-9_-]{0,31}$/;
  const names = new Map(); // model name -> GET /models/by-name/{name}, as last read

  const { call } = window.trainserveUi;

  const byName = (name) => `/models/by-name/${encodeURIComponent(name)}`;

  const { el } = window.trainserveUi;

  function render(card) {
    const name = card.dataset.modelName;
    const version = Number(card.dataset.modelVersion);
    const info = names.get(name);
    if (!name || !info) return;
    let box = card.querySelector(".aliases");
    if (!box) {
      box = el("div", { className: "aliases", "data-testid": "aliases" });
      card.querySelector("h3").after(box);
    }
    const here = info.aliases.filter((a) => a.version === version);
    const pills = here.map((a) =>
      el("span", { className: "pill alias", title: tooltip(info, a), "data-alias": a.alias }, `@${a.alias}`),
    );
    if (info.serving_version === version) {
      pills.push(el("span", { className: "pill serving", title: "answers requests naming only the model" }, "serving"));
    }
    const input = el("input", { type: "text", value: "production", "aria-label": "alias", size: "10" });
    const button = el("button", { type: "submit" }, "point here");
    const status = el("span", { className: "result", role: "status" });
    const form = el("form", { className: "alias-form" }, input, button, status);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      move(name, input.value.trim(), version, status, button);
    });
    const shown = pills.map((p) => `${p.textContent} ${p.title}`).join(" ");
    // Keep the form (and what is typed in it) while the aliases are unchanged.
    if (box.dataset.shown === shown && box.querySelector("form")) return;
    box.dataset.shown = shown;
    box.replaceChildren(el("span", { className: "alias-pills" }, ...pills), form);
  }

  // The alias's note, and who moved it here: the name of the API key of its newest move
  // (history is newest first; who is null on a server without keys).
  function tooltip(info, alias) {
    const last = info.history.find((e) => e.alias === alias.alias);
    const who = last && last.who ? `moved here by ${last.who}` : "";
    return [alias.note || "", who].filter(Boolean).join(" — ");
  }

  async function move(name, alias, version, status, button) {
    status.classList.remove("error");
    if (!ALIAS.test(alias)) {
      status.classList.add("error");
      status.textContent = "an alias is lowercase letters, digits, _ or -, starting with a letter";
      return;
    }
    button.disabled = true;
    try {
      const note = `from the dashboard`;
      await call(`${byName(name)}/aliases/${encodeURIComponent(alias)}`, {
        method: "PUT",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ version, note }),
      });
      status.textContent = `${name}@${alias} → v${version}`;
      await refresh();
    } catch (err) {
      status.classList.add("error");
      status.textContent = err.message;
    } finally {
      button.disabled = false;
    }
  }

  function cards() {
    return [...document.querySelectorAll("#model-cards article.model[data-model-name]")].filter(
      (card) => card.dataset.modelName,
    );
  }

  async function refresh() {
    const wanted = new Set(cards().map((card) => card.dataset.modelName));
    for (const name of wanted) {
      try {
        names.set(name, await call(byName(name)));
      } catch (_err) {
        names.delete(name); // deleted meanwhile, or the key is wrong: app.js shows that
      }
    }
    cards().forEach(render);
  }

  function start() {
    const holder = document.getElementById("model-cards");
    // app.js replaces the cards when the model list changes: decorate the new ones at once.
    new MutationObserver(() => cards().forEach(render)).observe(holder, { childList: true });
    window.trainserveUi.every(refresh, POLL_MS);
  }

  start();
})();
