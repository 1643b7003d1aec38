// Accounts on the page: who is signed in (the sidebar's footer), the sign-in and sign-up
// form (in a dialog for guests; the whole page where the site requires a sign-in), and the
// admin's panel of users and invitations.
//
// Signing in, up or out reloads the page (and the page's other tabs), so every view starts
// over as the new identity: its own chats, its own streams. When the server says the
// sign-in is gone (401 login_required: signed out on another device, the account disabled)
// the page puts the sign-in screen back in place of the chat.
//
// The admin's panel has two tabs: Users (and invitations), and Answers (operations.js:
// the answers running now, refreshed while that tab shows).

import { api, onLoginRequired } from "./api.js";
import { announce, copyButton, el } from "./dom.js";
import { startAnswers, stopAnswers } from "./operations.js";

const $ = (id) => document.getElementById(id);
const channel = "BroadcastChannel" in window ? new BroadcastChannel("tidechat-auth") : null;

// What `/?auth_error=<code>` means (single sign-on came back without a sign-in).
const AUTH_ERRORS = {
  sso_failed: "Single sign-on did not work. Try again.",
  account_disabled: "This account is disabled.",
  invite_required: "Sign-up here needs a valid invitation code.",
};
const SIGNED_OUT = "You were signed out. Sign in again to go on.";

const auth = {
  me: null, // what /api/auth/me said
  mode: document.body.dataset.authMode || "guest",
  signingUp: false,
  busy: false,
  locked: false, // the sign-in screen is showing instead of the chat
  onLocked: () => {},
  showAlert: () => {},
  adminTab: "users", // the admin panel's tab: the last one chosen, again on reopening
};

/**
 * Set up the account UI and find out who is signed in. Resolves to /api/auth/me's answer
 * (null if the server could not be asked). Where the site requires a sign-in, the chat is
 * shown only if someone is signed in; otherwise the sign-in screen is.
 * options: onLocked() (the chat must stop: the sign-in is gone), showAlert(message).
 */
export async function initAccount({ onLocked, showAlert } = {}) {
  if (onLocked) auth.onLocked = onLocked;
  if (showAlert) auth.showAlert = showAlert;
  wireForm();
  wireFooter();
  wireAdmin();
  onLoginRequired(() => lock(SIGNED_OUT));
  if (channel) {
    // Another tab signed in or out: this one follows (the cookie is the browser's).
    channel.addEventListener("message", (event) => reload(Boolean(event.data?.signedOut)));
  }

  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") recheck();
  });

  const params = new URLSearchParams(window.location.search);
  const invite = params.get("invite");
  const authError = params.get("auth_error");
  if (authError !== null) {
    // Shown once: a reload should not bring the message back.
    params.delete("auth_error");
    replaceUrl(params, window.location.hash);
  }
  if (invite) $("auth-invite").value = invite;

  let me;
  try {
    me = await api.me();
  } catch (error) {
    if (auth.mode === "guest") {
      auth.showAlert(`Could not check your sign-in: ${error.message}`);
    } else {
      showScreen(false, `Could not reach the server: ${error.message}`);
    }
    return null;
  }
  auth.me = me;
  auth.mode = me.mode || auth.mode;
  renderFooter();
  setView(false);
  const message = authError === null
    ? ""
    : AUTH_ERRORS[authError] || "Signing in did not work. Try again.";
  if (me.user) {
    showApp();
    if (message) auth.showAlert(message);
  } else if (auth.mode === "guest") {
    showApp();
    if (invite || message) openDialog(Boolean(invite), message);
  } else {
    showScreen(Boolean(invite), message);
  }
  return me;
}

/**
 * Back in this tab: is it still signed in as the account it shows? (Signed out on another
 * device, a guest site gives this browser a new guest identity without a word.)
 */
async function recheck() {
  const shown = auth.me && auth.me.user;
  if (!shown || auth.locked) return;
  let me;
  try {
    me = await api.me();
  } catch {
    return; // offline: the next request will tell
  }
  if (me.user && me.user.id === shown.id) return;
  if (me.user || auth.mode === "guest") reload(!me.user);
  else lock(SIGNED_OUT);
}

// -- the sign-in form ---------------------------------------------------------------------

function wireForm() {
  $("auth-form").addEventListener("submit", (event) => {
    event.preventDefault();
    submit();
  });
  $("auth-switch").addEventListener("click", () => {
    setView(!auth.signingUp);
    showError("");
    $("auth-email").focus();
  });
  $("auth-close").addEventListener("click", () => $("auth-dialog").close());
  $("auth-dialog").addEventListener("close", () => {
    $("auth-password").value = "";
    showError("");
  });
  $("auth-invite").addEventListener("input", () => updateOidcLink());
}

/** Sign in (false) or sign up (true): the heading, the button, the fields that apply. */
function setView(signingUp) {
  auth.signingUp = signingUp;
  const me = auth.me;
  const guest = auth.mode === "guest";
  $("auth-heading").textContent = signingUp ? "Sign up" : "Sign in";
  $("auth-submit").textContent = signingUp ? "Sign up" : "Sign in";
  $("auth-intro").textContent = signingUp
    ? guest
      ? "Create an account to keep your chats and use them on any device. The chats you have now come with you."
      : auth.mode === "invite"
        ? "Create your account with the invitation you were sent."
        : "Create an account to start chatting."
    : guest
      ? "Sign in to see your chats on any device. The chats you have now come with you."
      : "Sign in to chat.";
  $("auth-switch-text").textContent = signingUp ? "Already have an account?" : "No account yet?";
  $("auth-switch").textContent = signingUp ? "Sign in instead" : "Create an account";
  $("auth-password").autocomplete = signingUp ? "new-password" : "current-password";
  $("auth-invite-field").hidden = !(signingUp && auth.mode === "invite");
  const oidc = me && me.oidc;
  $("auth-oidc").hidden = !oidc;
  $("auth-or").hidden = !oidc;
  if (oidc) $("auth-oidc").textContent = `Continue with ${oidc.label}`;
  updateOidcLink();
}

function updateOidcLink() {
  const oidc = auth.me && auth.me.oidc;
  if (!oidc) return;
  const code = $("auth-invite").value.trim();
  const withInvite = auth.signingUp && auth.mode === "invite" && code;
  $("auth-oidc").href = withInvite ? `${oidc.url}?invite=${encodeURIComponent(code)}` : oidc.url;
}

function showError(message) {
  $("auth-error").textContent = message;
  $("auth-error").hidden = !message;
}

function setBusy(busy) {
  auth.busy = busy;
  $("auth-submit").disabled = busy;
  $("auth-form").setAttribute("aria-busy", String(busy));
}

async function submit() {
  if (auth.busy) return;
  const email = $("auth-email").value.trim();
  const password = $("auth-password").value;
  if (!email) return fieldMissing("auth-email", "Enter your email address.");
  if (!password) return fieldMissing("auth-password", "Enter your password.");
  const fields = { email, password };
  if (!$("auth-invite-field").hidden && $("auth-invite").value.trim()) {
    fields.invite = $("auth-invite").value.trim();
  }
  showError("");
  setBusy(true);
  try {
    await (auth.signingUp ? api.signUp(fields) : api.logIn(fields));
  } catch (error) {
    setBusy(false);
    showError(formError(error));
    const field = error.code === "invalid_email" || error.code === "email_taken"
      ? "auth-email"
      : error.code === "invite_required" ? "auth-invite" : "auth-password";
    $(field).focus();
    return;
  }
  announce(auth.signingUp ? "Account created" : "Signed in");
  changed(false);
}

function fieldMissing(id, message) {
  showError(message);
  $(id).focus();
}

function formError(error) {
  if (error.status === 429) return "Too many attempts. Wait a minute, then try again.";
  return error.message;
}

// -- where the form shows -----------------------------------------------------------------

function showApp() {
  auth.locked = false;
  $("auth-screen").hidden = true;
  $("app").hidden = false;
  $("skip-link").hidden = false;
}

/** The sign-in screen, in place of the chat (sign-in required, and nobody signed in). */
function showScreen(signingUp, message = "") {
  auth.locked = true;
  $("auth-dialog").close();
  $("admin-dialog").close();
  $("auth-screen-slot").append($("auth-form"));
  $("auth-close").hidden = true;
  setView(signingUp);
  showError(message);
  setBusy(false);
  $("app").hidden = true;
  $("skip-link").hidden = true;
  $("auth-screen").hidden = false;
  document.title = signingUp ? "Sign up · Tidechat" : "Sign in · Tidechat";
  $("auth-email").focus();
}

/** A guest's sign-in (or sign-up) dialog, over the chat. */
function openDialog(signingUp, message = "") {
  const dialog = $("auth-dialog");
  dialog.append($("auth-form"));
  $("auth-close").hidden = false;
  setView(signingUp);
  showError(message);
  if (!dialog.open) dialog.showModal();
  $("auth-email").focus();
}

/** The server no longer knows this browser's sign-in: back to the sign-in screen. */
function lock(message) {
  if (auth.mode === "guest" || auth.locked) return;
  auth.onLocked();
  if (auth.me) auth.me = { ...auth.me, user: null };
  renderFooter();
  showScreen(false, message);
}

// -- the sidebar's footer -----------------------------------------------------------------

function wireFooter() {
  $("sign-in").addEventListener("click", () => openDialog(false));
  $("sign-up").addEventListener("click", () => openDialog(true));
  $("sign-out").addEventListener("click", (event) => signOut(false, event.currentTarget));
  $("sign-out-everywhere").addEventListener("click",
    (event) => signOut(true, event.currentTarget));
  $("admin-open").addEventListener("click", openAdmin);
}

function renderFooter() {
  const user = auth.me && auth.me.user;
  $("account").hidden = !auth.me;
  $("account-guest").hidden = Boolean(user) || auth.mode !== "guest";
  $("account-user").hidden = !user;
  if (!user) return;
  $("account-email").textContent = user.email || "your account";
  $("account-line").title = user.email ? `Signed in as ${user.email}` : "Signed in";
  $("admin-open").hidden = !user.admin;
}

async function signOut(everywhere, button) {
  button.disabled = true;
  try {
    await api.logOut(everywhere);
  } catch (error) {
    button.disabled = false;
    auth.showAlert(`Could not sign out: ${error.message}`);
    return;
  }
  announce("Signed out");
  changed(true);
}

/** This tab changed who is signed in: every tab of the page starts over as the new one. */
function changed(signedOut) {
  if (channel) channel.postMessage({ signedOut });
  reload(signedOut);
}

function reload(signedOut) {
  const params = new URLSearchParams(window.location.search);
  params.delete("invite");
  params.delete("auth_error");
  // Signed out, the open chat is no longer this browser's: start at a new chat.
  replaceUrl(params, signedOut ? "" : window.location.hash);
  window.location.reload();
}

function replaceUrl(params, hash) {
  const query = params.toString();
  history.replaceState(null, "", `${window.location.pathname}${query ? `?${query}` : ""}${hash}`);
}

// -- the admin's panel --------------------------------------------------------------------

const ADMIN_TABS = ["users", "answers"];
const tabButton = (name) => $(`admin-tab-${name}`);

function wireAdmin() {
  $("admin-close").addEventListener("click", () => $("admin-dialog").close());
  $("admin-dialog").addEventListener("close", () => stopAnswers());
  $("create-invite").addEventListener("click", createInvite);
  for (const name of ADMIN_TABS) {
    const tab = tabButton(name);
    tab.addEventListener("click", () => showAdminTab(name));
    tab.addEventListener("keydown", (event) => {
      // The tabs pattern: arrows (and Home, End) move between the tabs and show them.
      const i = ADMIN_TABS.indexOf(name);
      const next = {
        ArrowRight: ADMIN_TABS[(i + 1) % ADMIN_TABS.length],
        ArrowLeft: ADMIN_TABS[(i + ADMIN_TABS.length - 1) % ADMIN_TABS.length],
        Home: ADMIN_TABS[0],
        End: ADMIN_TABS[ADMIN_TABS.length - 1],
      }[event.key];
      if (!next) return;
      event.preventDefault();
      showAdminTab(next);
      tabButton(next).focus();
    });
  }
}

async function openAdmin() {
  adminError("");
  $("invite-result").hidden = true;
  $("admin-users").replaceChildren();
  $("admin-dialog").showModal();
  await showAdminTab(auth.adminTab);
}

/** Show one tab of the admin panel; the answers refresh only while theirs shows. */
async function showAdminTab(name) {
  auth.adminTab = name;
  for (const other of ADMIN_TABS) {
    const selected = other === name;
    const tab = tabButton(other);
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    $(tab.getAttribute("aria-controls")).hidden = !selected;
  }
  if (name === "answers") {
    startAnswers();
  } else {
    stopAnswers();
    await loadUsers();
  }
}

function adminError(message) {
  $("admin-error").textContent = message;
  $("admin-error").hidden = !message;
}

async function loadUsers() {
  const body = $("admin-users");
  body.setAttribute("aria-busy", "true");
  try {
    const users = await api.users();
    body.replaceChildren(...users.map(userRow));
  } catch (error) {
    adminError(`Could not load the users: ${error.message}`);
  } finally {
    body.removeAttribute("aria-busy");
  }
}

const count = (n) => Number(n || 0).toLocaleString("en-US");

function userRow(user) {
  const self = auth.me && auth.me.user && user.id === auth.me.user.id;
  const name = user.email || "(no email)";
  let action;
  if (self) {
    action = el("span", { class: "you", text: "You" });
  } else {
    const verb = user.disabled ? "Enable" : "Disable";
    action = el("button", {
      type: "button",
      class: user.disabled ? "text-button" : "text-button danger-text",
      text: verb,
      "aria-label": `${verb} ${name}`,
      title: `${verb} ${name}`,
    });
    action.addEventListener("click", () => setDisabled(user, !user.disabled, action));
  }
  return el("tr", { "data-user-id": user.id, class: user.disabled ? "is-disabled" : null },
    el("th", { scope: "row", class: "email", text: name, title: name }),
    el("td", { text: user.admin ? "Admin" : "User" }),
    el("td", { class: "number", text: count(user.conversations) }),
    el("td", { class: "number", text: count(user.tokens_today) }),
    el("td", { class: user.disabled ? "status-disabled" : null,
      text: user.disabled ? "Disabled" : "Active" }),
    el("td", { class: "action" }, action));
}

async function setDisabled(user, disabled, button) {
  button.disabled = true;
  adminError("");
  try {
    await api.setUserDisabled(user.id, disabled);
  } catch (error) {
    button.disabled = false;
    adminError(`Could not ${disabled ? "disable" : "enable"} ${user.email}: ${error.message}`);
    return;
  }
  announce(`${user.email || "The account"} ${disabled ? "disabled" : "enabled"}`);
  await loadUsers();
  const row = $("admin-users").querySelector(`[data-user-id="${CSS.escape(user.id)}"] button`);
  if (row) row.focus();
}

async function createInvite() {
  const button = $("create-invite");
  button.disabled = true;
  adminError("");
  try {
    const { url } = await api.createInvite();
    $("invite-url").value = url;
    $("invite-copy").replaceChildren(
      copyButton("Copy the invitation link", () => $("invite-url").value, { text: "Copy" }));
    $("invite-result").hidden = false;
    $("invite-url").focus();
    $("invite-url").select();
    announce("Invitation created");
  } catch (error) {
    adminError(`Could not create an invitation: ${error.message}`);
  } finally {
    button.disabled = false;
  }
}
