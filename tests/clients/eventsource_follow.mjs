// Follow one Tidechat events URL with the npm package `eventsource`, as shipped: default
// options, plus the one the package documents for this, a `fetch` that adds the identity
// cookie (and, with --last-event-id, a Last-Event-ID header on the first request only,
// as a client resuming from a stored cursor would).
//
// Prints one JSON line per thing it sees, each with `t` (ms since the epoch):
//   {"kind":"request","n":1,"lastEventId":null}      each request the package makes
//   {"kind":"open"}
//   {"kind":"event","type":"delta","id":"...","data":"..."}
//   {"kind":"error","code":204,"message":"...","readyState":2}   a failed/ended connection
//   {"kind":"end","readyState":1}                    the grace period is over: closing
//   {"kind":"timeout","readyState":0}                no done/error within --timeout
// After the first `done` or `error` event (or once the source has closed itself, on a 204
// say) it keeps the EventSource open for --grace ms,
// so a reconnect loop would show, then closes and exits (0; 2 on timeout).
//
//   node tests/clients/eventsource_follow.mjs --url URL [--cookie 'session=...']
//        [--grace 3000] [--timeout 60000] [--last-event-id ID]
import { parseArgs } from "node:util";

import { EventSource } from "eventsource";

const { values: opts } = parseArgs({
  options: {
    url: { type: "string" },
    cookie: { type: "string", default: "" },
    grace: { type: "string", default: "3000" },
    timeout: { type: "string", default: "60000" },
    "last-event-id": { type: "string" },
  },
});
if (!opts.url) {
  console.error("usage: eventsource_follow.mjs --url URL [--cookie C] [--grace MS]");
  process.exit(64);
}

const out = (record) => process.stdout.write(`${JSON.stringify({ t: Date.now(), ...record })}\n`);

let requests = 0;
function fetchWithCookie(input, init = {}) {
  const headers = { ...init.headers };
  if (opts.cookie) headers.Cookie = opts.cookie;
  if (requests === 0 && opts["last-event-id"] && !headers["Last-Event-ID"]) {
    headers["Last-Event-ID"] = opts["last-event-id"];
  }
  requests += 1;
  out({ kind: "request", n: requests, lastEventId: headers["Last-Event-ID"] ?? null });
  return fetch(input, { ...init, headers });
}

const source = new EventSource(opts.url, { fetch: fetchWithCookie });

function finish(kind, code) {
  out({ kind, readyState: source.readyState });
  source.close();
  process.exit(code);
}

let ending = false;
function endSoon() {
  if (ending) return;
  ending = true;
  setTimeout(() => finish("end", 0), Number(opts.grace));
}

source.addEventListener("open", () => out({ kind: "open" }));
// A server-sent `event: error` and a failed connection both arrive as "error": only the
// first is a MessageEvent, with data.
source.addEventListener("error", (e) => {
  if (typeof e.data === "string") return;
  out({ kind: "error", code: e.code ?? null, message: e.message ?? null, readyState: source.readyState });
  if (source.readyState === source.CLOSED) endSoon(); // it gave up (a 204, say): see it stays so
});
for (const type of ["delta", "done", "error", "ping", "message"]) {
  source.addEventListener(type, (e) => {
    if (typeof e.data !== "string") return;
    out({ kind: "event", type, id: e.lastEventId, data: e.data });
    if (type === "done" || type === "error") endSoon();
  });
}
setTimeout(() => finish("timeout", 2), Number(opts.timeout)).unref();
