// trainserve dashboard: what every page script shares, loaded before them all: building
// elements, calling the JSON API with the key app.js saves, and polling.
// Every value from the server goes into the page through textContent, never as HTML.
"use strict";

window.trainserveUi = (() => {
  const root = document.querySelector("script[data-root]").dataset.root || "";
  const KEY_STORE = "trainserve.apiKey";

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (name === "className") node.className = value;
      else node.setAttribute(name, value);
    }
    for (const child of children) node.append(child);
    return node;
  }

  // A call to the API with the user's key; the JSON answer (null for 204), or an Error
  // carrying the server's detail.
  async function call(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const key = localStorage.getItem(KEY_STORE) || "";
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const response = await fetch(root + path, { ...options, headers });
    const body = response.status === 204 ? null : await response.json().catch(() => null);
    if (!response.ok) throw new Error((body && body.detail) || `HTTP ${response.status}`);
    return body;
  }

  // Runs task now and again everyMs after each run ends; a failed run waits for the next
  // tick (app.js shows the connection state and the key banner).
  function every(task, everyMs) {
    const tick = async () => {
      try {
        await task();
      } catch (_err) {
        // try again on the next tick
      }
      setTimeout(tick, everyMs);
    };
    tick();
  }

  return { root, el, call, every };
})();
