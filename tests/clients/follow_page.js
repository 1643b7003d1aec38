// Injected into a page on the app's origin by tests/clients/__init__.py: follows one events
// URL with the page's native EventSource or with event-source-polyfill's EventSourcePolyfill
// (default options both), and records what it sees in window.__records, in the same shape
// as tests/clients/eventsource_follow.mjs prints:
//   {t, kind: "open"} | {t, kind: "event", type, id, data}
//   | {t, kind: "error", code, message, readyState} | {t, kind: "end", readyState}
// After the first `done` or `error` event (or once the source has closed itself, on a 204
// say) it keeps the source open for graceMs (so a reconnect loop would show), then closes it and sets window.__ended.
window.__follow = function follow(client, url, graceMs) {
  const records = [];
  window.__records = records;
  window.__ended = false;
  const Source = client === "polyfill" ? window.EventSourcePolyfill : window.EventSource;
  const source = new Source(url);
  window.__source = source;
  const out = (record) => records.push({ t: Date.now(), ...record });

  let ending = false;
  const endSoon = () => {
    if (ending) return;
    ending = true;
    setTimeout(() => {
      out({ kind: "end", readyState: source.readyState });
      source.close();
      window.__ended = true;
    }, graceMs);
  };

  source.addEventListener("open", () => out({ kind: "open" }));
  // A server-sent `event: error` and a failed connection both arrive as "error": only the
  // first carries data. The polyfill's failed connection has .status (a non-200 answer) or
  // .error (a network error or its heartbeat timeout); the native one has neither.
  source.addEventListener("error", (e) => {
    if (typeof e.data === "string") return;
    const message = e.error ? String(e.error.message || e.error) : null;
    out({ kind: "error", code: e.status ?? null, message, readyState: source.readyState });
    if (source.readyState === 2) endSoon(); // it gave up (a 204, say): see that it stays so
  });
  for (const type of ["delta", "done", "error", "ping", "message"]) {
    source.addEventListener(type, (e) => {
      if (typeof e.data !== "string") return;
      out({ kind: "event", type, id: e.lastEventId, data: e.data });
      if (type === "done" || type === "error") endSoon();
    });
  }
};
