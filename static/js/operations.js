// The operator's view, in the admin's panel ("Answers"): the queue's depth, the answers
// running and queued (whose, which model, how old, on which worker) each with a Stop
// button, the workers and their health, and the last day's errors by code. From
// GET /api/admin/answers, again every few seconds while the view shows; Stop is
// POST /api/admin/generations/<id>/cancel.
//
// Rows are kept by key from one refresh to the next and only their text changes, so a
// refresh does not take the focus away from a Stop button (nor re-announce the tables).

import { api, FINAL_STATUSES } from "./api.js";
import { announce, el } from "./dom.js";

const $ = (id) => document.getElementById(id);
const REFRESH_MS = 3000;

const ops = {
  active: false, // the view shows: keep refreshing
  timer: 0,
  loads: 0, // bumped on every load (and on stop), so a late answer is dropped
  loaded: false, // something has been shown since the view opened
  stopping: new Set(), // answers asked to stop, still listed
};

/** Show the view and keep it fresh (every REFRESH_MS) until stopAnswers(). */
export function startAnswers() {
  if (ops.active) return;
  ops.active = true;
  ops.loaded = false;
  // Nothing from an earlier opening: it may be long over.
  for (const id of ["ops-answers", "ops-workers", "ops-errors"]) $(id).replaceChildren();
  for (const id of ["ops-queue-depth", "ops-running-count", "ops-queued-count", "ops-worker-count"]) {
    $(id).textContent = "–";
  }
  $("ops-updated").textContent = "Loading…";
  refresh();
}

/** The view is closed (or another tab shows): no more requests. */
export function stopAnswers() {
  ops.active = false;
  ops.loads += 1;
  clearTimeout(ops.timer);
  ops.timer = 0;
}

async function refresh() {
  clearTimeout(ops.timer);
  ops.timer = 0;
  if (!ops.active) return;
  if (document.visibilityState === "hidden" && ops.loaded) {
    schedule(); // nobody is looking: ask again later
    return;
  }
  const load = ++ops.loads;
  const panel = $("admin-answers-panel");
  if (!ops.loaded) panel.setAttribute("aria-busy", "true");
  let view;
  try {
    view = await api.answers();
  } catch (error) {
    if (load !== ops.loads) return;
    panel.removeAttribute("aria-busy");
    showError(`Could not load the answers: ${error.message}`);
    // Not (or no longer) an admin, or signed out: asking again will not help.
    if (error.status === 401 || error.status === 403 || error.status === 404) stopAnswers();
    else schedule();
    return;
  }
  if (load !== ops.loads) return;
  panel.removeAttribute("aria-busy");
  showError("");
  render(view);
  ops.loaded = true;
  schedule();
}

function schedule() {
  clearTimeout(ops.timer);
  ops.timer = ops.active ? setTimeout(refresh, REFRESH_MS) : 0;
}

function showError(message) {
  const box = $("ops-error");
  if (box.textContent === message && box.hidden === !message) return; // said already
  box.textContent = message;
  box.hidden = !message;
}

// -- rendering ----------------------------------------------------------------------------

function render(view) {
  const running = view.running || [];
  const queued = view.queued || [];
  const workers = view.workers || [];
  const errors = view.errors || [];
  setText($("ops-queue-depth"), count(view.queue_depth));
  setText($("ops-running-count"), count(running.length));
  setText($("ops-queued-count"), count(queued.length));
  setText($("ops-worker-count"), count(workers.length));
  const listed = new Set([...running, ...queued].map((a) => a.generation_id));
  for (const gid of ops.stopping) if (!listed.has(gid)) ops.stopping.delete(gid);

  syncRows($("ops-answers"), [...running, ...queued], {
    key: (a) => a.generation_id,
    make: answerRow,
    fill: fillAnswer,
    empty: "No answers are running or waiting.",
    columns: 6,
    fallback: $("ops-answers-heading"),
  });
  syncRows($("ops-workers"), workers, {
    key: (w) => w.id,
    make: workerRow,
    fill: fillWorker,
    empty: "No worker has reported in the last few seconds.",
    columns: 3,
  });
  syncRows($("ops-errors"), errors, {
    key: (e) => e.code,
    make: errorRow,
    fill: fillError,
    empty: "None.",
    columns: 2,
  });
  const time = new Date().toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  $("ops-updated").textContent = `Updated at ${time}; refreshes every ${REFRESH_MS / 1000} s.`;
}

/**
 * Make body's rows those of items, in order: a row whose key was there already is kept
 * (its cells refilled), so whatever has the focus keeps it. If the focused row went
 * away, the focus goes to `fallback` rather than to the page's top.
 */
function syncRows(body, items, { key, make, fill, empty, columns, fallback }) {
  const focused = body.contains(document.activeElement) ? document.activeElement : null;
  const old = new Map();
  for (const row of body.children) if (row.dataset.key !== undefined) old.set(row.dataset.key, row);
  const rows = items.map((item) => {
    const k = String(key(item));
    let row = old.get(k);
    if (!row) {
      row = make(item);
      row.dataset.key = k;
    }
    fill(row, item);
    return row;
  });
  if (!rows.length) {
    rows.push(body.querySelector("tr.ops-empty")
      || el("tr", { class: "ops-empty" }, el("td", { colspan: columns, text: empty })));
  }
  const same = rows.length === body.children.length
    && rows.every((row, i) => body.children[i] === row);
  if (same) return;
  body.replaceChildren(...rows);
  if (!focused) return;
  if (focused.isConnected) focused.focus();
  else if (fallback) fallback.focus();
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

const count = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));

/** "12 s", "3 min", "2 h 5 min": how long an answer has run (or waited). */
export function formatAge(seconds) {
  const s = Math.max(0, Math.floor(Number(seconds) || 0));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  const minutes = Math.floor((s % 3600) / 60);
  return `${Math.floor(s / 3600)} h${minutes ? ` ${minutes} min` : ""}`;
}

// An answer: owner, model, status, age, worker, Stop.
function answerRow(answer) {
  const owner = el("th", { scope: "row", class: "email" });
  const model = el("td", { class: "ops-model" });
  const status = el("td", {}, el("span", { class: "ops-status" }));
  const age = el("td", { class: "number ops-age" });
  const worker = el("td", { class: "ops-worker" });
  const stop = el("button", { type: "button", class: "text-button danger-text", text: "Stop" });
  stop.addEventListener("click", () => stopAnswer(answer.generation_id, stop));
  return el("tr", { "data-generation-id": answer.generation_id },
    owner, model, status, age, worker, el("td", { class: "action" }, stop));
}

function fillAnswer(row, answer) {
  const [owner, model, status, age, worker, action] = row.children;
  const name = answer.owner || "guest";
  setText(owner, name);
  owner.title = answer.owner ? name : "A guest (or an API key without an account)";
  owner.classList.toggle("ops-guest", !answer.owner);
  setText(model, answer.model || "");
  model.title = answer.model || "";
  const stopping = ops.stopping.has(answer.generation_id);
  const state = stopping ? "stopping" : answer.status;
  const badge = status.firstElementChild;
  setText(badge, state);
  badge.className = `ops-status is-${state}`;
  if (answer.status === "running" && !answer.leased && !stopping) {
    badge.title = "No worker holds its lease: it ends (worker_lost) unless one takes it on.";
  } else badge.removeAttribute("title");
  setText(age, formatAge(answer.age_s));
  age.title = `${answer.status === "running" ? "Running" : "Waiting"} for ${Math.round(answer.age_s)} s`;
  setText(worker, answer.worker || "–");
  worker.title = answer.worker || "No worker yet";
  worker.classList.toggle("ops-none", !answer.worker);
  const button = action.firstElementChild;
  const label = `Stop the answer of ${name} (${answer.model})`;
  if (button.getAttribute("aria-label") !== label) {
    button.setAttribute("aria-label", label);
    button.title = label;
  }
  button.disabled = stopping;
}

async function stopAnswer(gid, button) {
  button.disabled = true;
  ops.stopping.add(gid);
  showError("");
  let view;
  try {
    view = await api.stopAnswer(gid);
  } catch (error) {
    ops.stopping.delete(gid);
    button.disabled = false;
    showError(`Could not stop the answer: ${error.message}`);
    return;
  }
  announce(view && FINAL_STATUSES.has(view.status) ? "Answer stopped" : "Stopping the answer");
  if (ops.active) await refresh();
}

// A worker: id, answers running, health (and which part fails).
function workerRow() {
  return el("tr", {},
    el("th", { scope: "row", class: "ops-worker" }),
    el("td", { class: "number" }),
    el("td", {}, el("span", { class: "ops-health" })));
}

function fillWorker(row, worker) {
  const [id, running, health] = row.children;
  setText(id, worker.id);
  id.title = `${worker.host}, process ${worker.pid}; heard from ${worker.seen_s_ago} s ago`;
  setText(running, count(worker.running));
  const failing = [
    worker.stream_writer !== "ok" && "stream writer failing",
    worker.lease_keeper !== "ok" && "lease keeper failing",
  ].filter(Boolean);
  const words = [worker.healthy ? "Healthy" : "Unhealthy"];
  if (failing.length) words[0] += `: ${failing.join(", ")}`;
  if (worker.draining) words.push("draining");
  const badge = health.firstElementChild;
  setText(badge, words.join(" · "));
  badge.className = `ops-health ${worker.healthy ? "is-healthy" : "is-unhealthy"}`;
}

// An error code and how many answers ended with it.
function errorRow() {
  return el("tr", {},
    el("th", { scope: "row", class: "ops-code" }),
    el("td", { class: "number" }));
}

function fillError(row, error) {
  const [code, n] = row.children;
  setText(code, error.code);
  setText(n, count(error.count));
}
