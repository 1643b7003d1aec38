// API keys, for the OpenAI-compatible API at /v1: the dialog that lists this identity's
// keys (a guest's, or the signed-in account's), creates one (its secret is shown once,
// here, and never again: the server keeps only a digest) and revokes one.

import { api } from "./api.js";
import { announce, copyButton, el } from "./dom.js";

const $ = (id) => document.getElementById(id);

const keys = {
  busy: false,
  loads: 0, // bumped on every load of the list, so a late answer does not overwrite a newer one
  shownId: null, // the key whose secret the dialog shows
  revoking: null, // the key the confirmation asks about
  opener: null, // the button that opened the dialog: focus goes back to it
};

/** Wire the "API keys" buttons (one for guests, one for accounts) and the dialogs. */
export function initKeys() {
  for (const button of document.querySelectorAll(".keys-open")) {
    button.addEventListener("click", () => openKeys(button));
  }
  $("keys-close").addEventListener("click", () => $("keys-dialog").close());
  $("keys-dialog").addEventListener("close", () => {
    forgetSecret(); // shown once: reopening the dialog does not bring it back
    showError("");
    $("key-name").value = "";
    if (keys.opener && keys.opener.checkVisibility()) keys.opener.focus();
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    createKey();
  });
  $("revoke-dialog").addEventListener("close", () => {
    const key = keys.revoking;
    keys.revoking = null;
    if (key && $("revoke-dialog").returnValue === "revoke") revokeKey(key);
  });
  $("keys-base-copy").replaceChildren(
    namedCopyButton("Copy the base URL", () => $("keys-base-url").value));
  $("key-secret-copy").replaceChildren(
    namedCopyButton("Copy the new key", () => $("key-secret").value));
}

/** A "Copy" button whose accessible name says what it copies (two are side by side). */
function namedCopyButton(label, getText) {
  const button = copyButton(label, getText, { text: "Copy" });
  button.setAttribute("aria-label", label);
  return button;
}

/** Close both dialogs (the sign-in is gone, say). */
export function closeKeys() {
  if ($("revoke-dialog").open) $("revoke-dialog").close();
  if ($("keys-dialog").open) $("keys-dialog").close();
}

function baseUrl() {
  return `${window.location.origin}/v1`;
}

async function openKeys(opener) {
  keys.opener = opener;
  showError("");
  forgetSecret();
  $("keys-base-url").value = baseUrl();
  $("keys-example").textContent = [
    "from openai import OpenAI",
    "",
    "client = OpenAI(",
    `    base_url="${baseUrl()}",`,
    '    api_key="tc-…",  # your key',
    ")",
  ].join("\n");
  $("keys-dialog").showModal();
  $("key-name").focus();
  await loadKeys();
}

function showError(message) {
  $("keys-error").textContent = message;
  $("keys-error").hidden = !message;
}

function forgetSecret() {
  keys.shownId = null;
  $("key-secret").value = "";
  $("key-secret-box").hidden = true;
}

async function loadKeys() {
  const load = ++keys.loads;
  const list = $("keys-list");
  list.setAttribute("aria-busy", "true");
  try {
    const found = await api.keys();
    if (load === keys.loads) render(found);
  } catch (error) {
    if (load === keys.loads) showError(`Could not load your keys: ${error.message}`);
  } finally {
    if (load === keys.loads) list.removeAttribute("aria-busy");
  }
}

function render(found) {
  const list = $("keys-list");
  if (!found.length) {
    list.replaceChildren(el("li", { class: "keys-empty", text: "No keys yet." }));
    return;
  }
  list.replaceChildren(...found.map(keyRow));
}

const nameOf = (key) => key.name || "Unnamed key";

// Server timestamps are UTC without an offset; read them as UTC.
const asUtc = (iso) => (/[zZ]|[+-]\d\d:\d\d$/.test(iso) ? iso : `${iso}Z`);

function when(iso) {
  const date = new Date(asUtc(iso));
  const text = date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
  return el("time", { datetime: date.toISOString(), text });
}

function keyRow(key) {
  const name = nameOf(key);
  const revoke = el("button", {
    type: "button",
    class: "text-button danger-text",
    text: "Revoke",
    "aria-label": `Revoke ${name} (${key.hint})`,
    title: `Revoke ${name}`,
  });
  revoke.addEventListener("click", () => confirmRevoke(key));
  const used = key.last_used_at
    ? el("span", { class: "key-used" }, "Last used ", when(key.last_used_at))
    : el("span", { class: "key-used never", text: "Never used" });
  return el("li", { class: "key-item", "data-key-id": key.id },
    el("div", { class: "key-main" },
      el("p", { class: "key-title" },
        el("span", { class: "key-name", text: name, title: name }),
        el("span", { class: "key-hint", text: key.hint, title: `The key ending in ${key.hint.slice(1)}` })),
      el("p", { class: "key-dates" },
        el("span", { class: "key-created" }, "Created ", when(key.created_at)),
        used)),
    revoke);
}

async function createKey() {
  if (keys.busy) return;
  keys.busy = true;
  const button = $("key-create");
  button.disabled = true;
  $("key-form").setAttribute("aria-busy", "true");
  showError("");
  try {
    const key = await api.createKey($("key-name").value.trim());
    keys.shownId = key.id;
    $("key-secret-label").textContent = `Your new key “${nameOf(key)}”`;
    $("key-secret").value = key.key;
    $("key-secret-box").hidden = false;
    $("key-name").value = "";
    $("key-secret").focus();
    $("key-secret").select();
    announce("API key created. Copy it now: it will not be shown again.");
    await loadKeys();
  } catch (error) {
    showError(error.status === 429
      ? "Too many new keys at once. Wait a moment, then try again."
      : `Could not create a key: ${error.message}`);
    $("key-name").focus();
  } finally {
    keys.busy = false;
    button.disabled = false;
    $("key-form").removeAttribute("aria-busy");
  }
}

function confirmRevoke(key) {
  keys.revoking = key;
  $("revoke-name").textContent = nameOf(key);
  $("revoke-hint").textContent = key.hint;
  const dialog = $("revoke-dialog");
  dialog.returnValue = "";
  dialog.showModal();
}

async function revokeKey(key) {
  showError("");
  try {
    await api.revokeKey(key.id);
  } catch (error) {
    // 404: already gone (revoked in another tab), as wanted.
    if (error.status !== 404) {
      showError(`Could not revoke ${nameOf(key)}: ${error.message}`);
      return;
    }
  }
  if (keys.shownId === key.id) forgetSecret();
  announce(`${nameOf(key)} revoked`);
  await loadKeys();
  const next = $("keys-list").querySelector("button") || $("key-name");
  next.focus();
}
