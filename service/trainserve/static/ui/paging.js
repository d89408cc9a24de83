// Paging of the dashboard's lists: one page of jobs and one of models at a time, with
// "newer" / "older" buttons, so a server with thousands of jobs loads as fast as a new one
// (GET /jobs and GET /models take limit and offset). app.js asks query(kind) for the
// page's parameters, and calls shown(kind, n) with how many items the page held.
(() => {
  "use strict";

  const pages = {
    jobs: { limit: 50, offset: 0, onChange: null },
    models: { limit: 12, offset: 0, onChange: null }, // each card draws a plot: a small page
  };

  function query(kind) {
    const page = pages[kind];
    return `limit=${page.limit}&offset=${page.offset}`;
  }

  function move(kind, step) {
    const page = pages[kind];
    page.offset = Math.max(0, page.offset + step * page.limit);
    if (page.onChange) page.onChange();
  }

  function button(text, kind, step) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "quiet";
    b.textContent = text;
    b.dataset.testid = `${kind}-${step < 0 ? "newer" : "older"}`;
    b.addEventListener("click", () => move(kind, step));
    return b;
  }

  // A pager under the section's list; onChange reloads the list for the new page.
  function install(kind, section, onChange) {
    const page = pages[kind];
    page.onChange = onChange;
    const nav = document.createElement("nav");
    nav.className = "pager";
    nav.dataset.testid = `${kind}-pager`;
    page.label = document.createElement("span");
    page.newer = button("‹ newer", kind, -1);
    page.older = button("older ›", kind, 1);
    nav.append(page.newer, page.label, page.older);
    section.append(nav);
    shown(kind, 0);
  }

  function shown(kind, count) {
    const page = pages[kind];
    if (!page.label) return;
    page.newer.disabled = page.offset === 0;
    page.older.disabled = count < page.limit; // a short page is the last one
    page.label.textContent = count ? `${page.offset + 1}–${page.offset + count}` : "";
  }

  window.trainservePaging = { query, install, shown, pages };
})();
