// Tidechat's page: wires the sidebar, the conversation view, the composer and the settings
// to the API. The URL names the open conversation (#/c/<id>), so a reload comes back to it.
// Answers are generated on the server whatever the page does: leaving a conversation only
// stops listening, and coming back re-attaches to its stream, which replays from the start.

import { initAccount } from "./account.js";
import { api, FINAL_STATUSES } from "./api.js";
import { Composer } from "./composer.js";
import { announce } from "./dom.js";
import { closeKeys, initKeys } from "./keys.js";
import { AssistantView, userMessage } from "./messages.js";
import { Settings } from "./settings.js";
import { Sidebar } from "./sidebar.js";
import { GenerationStream } from "./stream.js";

const $ = (id) => document.getElementById(id);
const channel = "BroadcastChannel" in window ? new BroadcastChannel("tidechat") : null;
const phone = window.matchMedia("(max-width: 768px)");

const state = {
  conversation: null, // the open conversation (its fields, not its messages); null: new chat
  draft: { model: null, system_prompt: null, temperature: null }, // a new chat's settings
  live: null, // {gid, view, stream, cid}: the answer streaming into the open conversation
  navigation: 0, // bumped on every navigation, so late answers for an old view are dropped
  saving: Promise.resolve(), // settings being saved (a message waits for them)
  stick: true, // keep the newest text in view while it streams
  sidebarLoads: 0,
};

const actions = {
  onRegenerate: () => regenerate(),
  onRetry: () => regenerate(),
  onContinue: (gid) => continueAnswer(gid),
};

// -- views ------------------------------------------------------------------------------

const sidebar = new Sidebar($("conversation-list"), {
  onRename: renameConversation,
  onDelete: confirmDelete,
});
const settings = new Settings(saveSettings);
const composer = new Composer({ onSend: send, onStop: stop });

function showAlert(message) {
  $("alert-text").textContent = message;
  $("alert").hidden = false;
}

function hideAlert() {
  $("alert").hidden = true;
}

function setTitle(title) {
  $("chat-title").textContent = title;
  document.title = title === "New chat" ? "Tidechat" : `${title} · Tidechat`;
}

function setEmpty(empty) {
  $("empty").hidden = !empty;
  $("messages").hidden = empty;
}

function messageViews() {
  return [...$("messages").children];
}

/** Regenerate (or Retry) only on the last answer, and never while one streams. */
function refreshActions() {
  const items = messageViews();
  for (const item of items) {
    const view = item.assistantView;
    if (view) view.showActions(item === items.at(-1) && !state.live);
  }
}

function appendMessage(element, view) {
  if (view) element.assistantView = view;
  $("messages").append(element);
  setEmpty(false);
}

function showConversation(conversation) {
  detachLive();
  state.conversation = withoutMessages(conversation);
  setTitle(conversation.title || "New chat");
  settings.show(conversation);
  sidebar.render(undefined, conversation.id);
  $("messages").replaceChildren();
  for (const message of conversation.messages) {
    if (message.role === "user") {
      appendMessage(userMessage(message));
    } else if (message.role === "assistant") {
      const view = AssistantView.fromStored(message, actions);
      appendMessage(view.element, view);
      if (!FINAL_STATUSES.has(message.status)) attach(view, message.generation_id);
    }
  }
  setEmpty(conversation.messages.length === 0);
  refreshActions();
  scrollToBottom();
}

function withoutMessages(conversation) {
  const { messages: _messages, ...fields } = conversation;
  return fields;
}

// -- streaming --------------------------------------------------------------------------

function attach(view, gid) {
  detachLive();
  view.startStreaming();
  const live = { gid, view, cid: state.conversation.id, stream: null };
  live.stream = new GenerationStream(gid, {
    onText: (text) => view.setText(text),
    onConnection: (connection) => {
      view.setConnection(connection);
      if (state.live === live) announce(connection === "reconnecting" ? "Reconnecting…" : "Connected");
    },
    onDone: (end) => {
      view.finish(end);
      liveEnded(live, end.finish_reason === "cancelled" ? "Stopped" : "Answer complete");
    },
    onError: (error) => {
      view.fail(error);
      liveEnded(live, "The answer failed");
    },
  });
  state.live = live;
  composer.setStreaming(true);
  refreshActions();
}

function liveEnded(live, message) {
  if (state.live !== live) return;
  state.live = null;
  composer.setStreaming(false);
  refreshActions();
  announce(message);
  loadSidebar();
}

/** Stop listening to the open conversation's answer (it goes on on the server). */
function detachLive() {
  if (!state.live) return;
  state.live.stream.close();
  state.live = null;
  composer.setStreaming(false);
}

// -- navigation -------------------------------------------------------------------------

function currentId() {
  const match = /^#\/c\/([\w-]+)$/.exec(window.location.hash);
  return match ? match[1] : null;
}

async function route() {
  closeSidebar();
  const id = currentId();
  if (id) await openConversation(id);
  else openDraft();
}

async function openConversation(id) {
  const navigation = ++state.navigation;
  hideAlert();
  let conversation;
  try {
    conversation = await api.conversation(id);
  } catch (error) {
    if (navigation !== state.navigation) return;
    if (error.status === 404) {
      leaveToDraft();
      showAlert("That conversation doesn't exist any more.");
    } else {
      showAlert(`Could not open the conversation: ${error.message}`);
    }
    return;
  }
  if (navigation !== state.navigation) return;
  state.stick = true;
  showConversation(conversation);
  if (!phone.matches) composer.focus();
}

function openDraft() {
  state.navigation += 1;
  detachLive();
  const model = state.conversation ? settings.model : state.draft.model;
  state.conversation = null;
  state.draft = { model: model || null, system_prompt: null, temperature: null };
  setTitle("New chat");
  settings.show(state.draft);
  sidebar.render(undefined, null);
  $("messages").replaceChildren();
  setEmpty(true);
  if (!phone.matches) composer.focus(); // on a phone, focus would pop up the keyboard
}

/** The open conversation is gone: show a new chat in its place (no history entry). */
function leaveToDraft() {
  history.replaceState(null, "", "#/");
  openDraft();
}

/** Another tab changed this conversation: show what is new, keep what streams. */
async function refreshCurrent() {
  const open = state.conversation;
  if (!open) return;
  const navigation = state.navigation;
  let conversation;
  try {
    conversation = await api.conversation(open.id);
  } catch (error) {
    if (navigation !== state.navigation || error.status !== 404) return;
    leaveToDraft();
    showAlert("This conversation was deleted in another tab.");
    return;
  }
  if (navigation !== state.navigation) return;
  const ids = conversation.messages.map((m) => m.id).join();
  const shown = messageViews().map((item) => item.dataset.messageId).join();
  const last = conversation.messages.at(-1);
  const lastLive = Boolean(last && last.role === "assistant" && !FINAL_STATUSES.has(last.status));
  if (ids === shown && lastLive === Boolean(state.live)) {
    state.conversation = withoutMessages(conversation);
    setTitle(conversation.title || "New chat");
    return;
  }
  showConversation(conversation);
}

// -- actions ----------------------------------------------------------------------------

function sendErrorText(error) {
  if (error.code === "generation_in_progress") {
    return "An answer is still streaming. Wait for it, or stop it first.";
  }
  if (error.status === 429) return "You're sending messages too fast. Wait a moment, then try again.";
  return `Could not send: ${error.message}`;
}

/** An answer just queued in the open conversation: show it and follow its stream. */
function showNewAnswer(generation, model) {
  const view = new AssistantView(
    { id: generation.message_id, generation_id: generation.id, model, content: "" }, actions);
  appendMessage(view.element, view);
  state.stick = true;
  attach(view, generation.id);
  scrollToBottom();
}

async function send(text) {
  hideAlert();
  try {
    await state.saving;
    let conversation = state.conversation;
    if (!conversation) {
      conversation = await createFromDraft();
    }
    const model = settings.model;
    const { message, generation } = await api.send(conversation.id, text, model);
    broadcast(conversation.id);
    loadSidebar();
    if (state.conversation?.id !== conversation.id) return true; // navigated away meanwhile
    if (messageViews().length === 0) setTitle(titleFrom(text));
    appendMessage(userMessage(message));
    showNewAnswer(generation, model);
    return true;
  } catch (error) {
    showAlert(sendErrorText(error));
    return false;
  }
}

async function createFromDraft() {
  const navigation = ++state.navigation;
  let conversation = await api.createConversation();
  const changes = {};
  const { draft } = state;
  if (draft.model && draft.model !== settings.catalog.default) changes.model = draft.model;
  if (draft.system_prompt) changes.system_prompt = draft.system_prompt;
  if (draft.temperature !== null) changes.temperature = draft.temperature;
  if (Object.keys(changes).length) {
    conversation = await api.updateConversation(conversation.id, changes);
  }
  if (navigation === state.navigation) {
    state.conversation = conversation;
    history.pushState(null, "", `#/c/${conversation.id}`);
    sidebar.render(undefined, conversation.id);
  }
  return conversation;
}

// The server's rule (first eight words), so the title shows before the list reloads.
function titleFrom(text) {
  const words = text.split(/\s+/).filter(Boolean);
  let title = words.slice(0, 8).join(" ");
  if (title.length > 80) title = `${title.slice(0, 79).trimEnd()}…`;
  else if (words.length > 8) title += "…";
  return title || "New chat";
}

async function regenerate() {
  const conversation = state.conversation;
  if (!conversation || state.live) return;
  hideAlert();
  try {
    await state.saving;
    const model = settings.model;
    const { generation } = await api.regenerate(conversation.id, model);
    broadcast(conversation.id);
    if (state.conversation?.id !== conversation.id) return;
    const items = messageViews();
    while (items.length && items.at(-1).assistantView) items.pop().remove();
    showNewAnswer(generation, model);
  } catch (error) {
    showAlert(
      error.code === "generation_in_progress"
        ? sendErrorText(error)
        : `Could not regenerate: ${error.message}`,
    );
  }
}

/** Go on with an interrupted answer: its new stream starts with the text so far. */
async function continueAnswer(gid) {
  const conversation = state.conversation;
  if (!conversation || state.live) return;
  hideAlert();
  try {
    const { generation } = await api.continueAnswer(gid);
    broadcast(conversation.id);
    if (state.conversation?.id !== conversation.id) return;
    const last = messageViews().at(-1);
    const model = last?.assistantView?.model || settings.model;
    if (last?.assistantView) last.remove();
    showNewAnswer(generation, model);
  } catch (error) {
    showAlert(`Could not continue: ${error.message}`);
  }
}

async function stop() {
  const live = state.live;
  if (!live) return;
  $("stop").disabled = true;
  try {
    await api.cancel(live.gid); // the stream then ends with finish_reason "cancelled"
    broadcast(live.cid);
  } catch (error) {
    $("stop").disabled = false;
    showAlert(`Could not stop: ${error.message}`);
  }
}

function saveSettings(changes) {
  const conversation = state.conversation;
  if (!conversation) {
    Object.assign(state.draft, changes);
    settings.setStatus("Saved for this new chat.");
    return;
  }
  state.saving = state.saving
    .then(() => api.updateConversation(conversation.id, changes))
    .then((updated) => {
      if (state.conversation?.id === updated.id) state.conversation = updated;
      settings.setStatus("Saved.");
      if ("model" in changes) announce(`Model: ${updated.model}`);
      broadcast(updated.id);
    })
    .catch((error) => settings.setStatus(`Could not save: ${error.message}`));
}

async function renameConversation(conversation, title) {
  try {
    const updated = await api.updateConversation(conversation.id, { title });
    if (state.conversation?.id === updated.id) {
      state.conversation = updated;
      setTitle(updated.title);
    }
    announce(`Renamed to ${updated.title}`);
    broadcast(updated.id);
  } catch (error) {
    showAlert(`Could not rename: ${error.message}`);
  }
  await loadSidebar();
}

function confirmDelete(conversation) {
  const dialog = $("delete-dialog");
  $("delete-title").textContent = conversation.title || "New chat";
  dialog.returnValue = "";
  dialog.onclose = async () => {
    if (dialog.returnValue !== "delete") return;
    try {
      await api.deleteConversation(conversation.id);
      announce("Conversation deleted");
      broadcast(conversation.id);
      if (state.conversation?.id === conversation.id) {
        leaveToDraft();
      }
    } catch (error) {
      showAlert(`Could not delete: ${error.message}`);
    }
    await loadSidebar();
  };
  dialog.showModal();
}

async function loadSidebar() {
  const load = ++state.sidebarLoads;
  try {
    const conversations = await api.conversations();
    if (load === state.sidebarLoads) sidebar.render(conversations, state.conversation?.id ?? null);
  } catch {
    // keep the list we have; the next change reloads it
  }
}

function broadcast(cid) {
  if (channel) channel.postMessage({ cid });
}

// -- scrolling --------------------------------------------------------------------------

function scrollToBottom() {
  const scroller = $("scroller");
  scroller.scrollTop = scroller.scrollHeight;
}

function watchScrolling() {
  const scroller = $("scroller");
  const jump = $("jump");
  const update = () => {
    const distance = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight;
    state.stick = distance < 80;
    jump.hidden = state.stick;
  };
  scroller.addEventListener("scroll", update, { passive: true });
  new ResizeObserver(() => {
    if (state.stick) scrollToBottom();
    else jump.hidden = false;
  }).observe($("messages"));
  jump.addEventListener("click", () => {
    state.stick = true;
    scroller.scrollTo({ top: scroller.scrollHeight, behavior: "smooth" });
    composer.focus();
  });
}

// -- the sidebar on phones ----------------------------------------------------------------

function setSidebarOpen(open) {
  document.body.classList.toggle("sidebar-open", open);
  $("open-sidebar").setAttribute("aria-expanded", String(open));
  $("backdrop").hidden = !open;
  syncSidebarInert();
  if (open) $("new-chat").focus();
}

function closeSidebar() {
  if (!document.body.classList.contains("sidebar-open")) return;
  setSidebarOpen(false);
  if (phone.matches) $("open-sidebar").focus();
}

function syncSidebarInert() {
  const hidden = phone.matches && !document.body.classList.contains("sidebar-open");
  $("sidebar").inert = hidden;
  $("main").inert = phone.matches && !hidden;
}

// -- start ------------------------------------------------------------------------------

function start() {
  const fallback = document.body.dataset.defaultModel || "";
  settings.setCatalog({ default: fallback, models: fallback ? [fallback] : [], backend: "" });
  api.models().then((catalog) => {
    settings.setCatalog(catalog);
    $("backend-line").hidden = !catalog.backend; // named only if the operator named it
  }).catch(() => {});

  $("new-chat").addEventListener("click", () => {
    closeSidebar();
    if (currentId()) window.location.hash = "#/";
    else if (state.conversation) openDraft();
    else composer.focus();
  });
  $("open-sidebar").addEventListener("click", () => setSidebarOpen(true));
  $("close-sidebar").addEventListener("click", () => closeSidebar());
  $("backdrop").addEventListener("click", () => closeSidebar());
  $("alert-close").addEventListener("click", hideAlert);
  // The skip link must not change the URL's hash: that names the open conversation.
  $("skip-link").addEventListener("click", (event) => {
    event.preventDefault();
    closeSidebar();
    composer.focus();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && document.body.classList.contains("sidebar-open")) closeSidebar();
  });
  phone.addEventListener("change", () => {
    if (!phone.matches) setSidebarOpen(false);
    syncSidebarInert();
  });
  for (const chip of document.querySelectorAll("[data-prompt]")) {
    chip.addEventListener("click", () => {
      $("input").value = chip.dataset.prompt;
      $("input").dispatchEvent(new Event("input"));
      composer.focus();
    });
  }
  window.addEventListener("hashchange", route);
  if (channel) {
    channel.addEventListener("message", (event) => {
      loadSidebar();
      if (event.data && event.data.cid === state.conversation?.id) refreshCurrent();
    });
  }
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") loadSidebar();
  });
  watchScrolling();
  syncSidebarInert();
  loadSidebar();
  route();
}

/** The sign-in is gone (signed out elsewhere, disabled): stop everything the chat does. */
function lockPage() {
  detachLive();
  closeSidebar();
  if ($("delete-dialog").open) $("delete-dialog").close();
  closeKeys();
}

// A guest may chat at once; where a sign-in is required, the chat starts (and calls the
// API) only once the server says who is signed in.
initKeys();
const account = initAccount({ onLocked: lockPage, showAlert });
if ((document.body.dataset.authMode || "guest") === "guest") {
  start();
} else {
  account.then((me) => {
    if (me && me.user) start();
  });
}
