// Tidechat page: POST creates a generation, a native EventSource (GET) streams it.
// Text is only ever set through textContent, so nothing the user or model writes runs.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { conversationId: null, source: null, generation: null };

async function api(method, url, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(url, init);
  const data = response.status === 204 ? null : await response.json();
  if (!response.ok) {
    const error = (data && data.error) || { message: response.statusText };
    throw new Error(error.message);
  }
  return data;
}

function addMessage(role, text) {
  const item = document.createElement("li");
  item.className = `message ${role}`;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  item.append(body);
  $("messages").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function showError(item, error) {
  item.classList.remove("streaming");
  item.classList.add("error");
  const note = document.createElement("span");
  note.className = "error-text";
  note.textContent = `Error: ${error.message || error.code}`;
  item.append(note);
}

function showNote(item, text) {
  const note = document.createElement("span");
  note.className = "note";
  note.textContent = text;
  item.append(note);
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  if (!busy) $("status").textContent = "";
}

// Stream one generation into its message element. With no cursor the server replays
// from the start, so the text is rebuilt exactly; EventSource itself resumes from the
// last event id after a dropped connection.
function follow(generationId, item) {
  const body = item.querySelector(".text");
  body.textContent = "";
  item.classList.add("streaming");
  state.generation = generationId;
  setBusy(true);
  const source = new EventSource(`/api/generations/${generationId}/events`);
  state.source = source;
  const finish = () => {
    source.close();
    item.classList.remove("streaming");
    state.source = null;
    state.generation = null;
    setBusy(false);
  };
  source.onopen = () => { $("status").textContent = ""; };
  source.addEventListener("delta", (event) => {
    body.textContent += JSON.parse(event.data).text;
    item.scrollIntoView({ block: "end" });
  });
  source.addEventListener("done", (event) => {
    const data = JSON.parse(event.data);
    if (data.finish_reason === "cancelled") showNote(item, "Stopped");
    finish();
  });
  source.addEventListener("error", (event) => {
    if (event.data) {  // a server-sent error event, not a connection problem
      showError(item, JSON.parse(event.data));
      finish();
    } else if (source.readyState === EventSource.CLOSED) {
      finish();
      refreshGeneration(generationId, item);
    } else {
      $("status").textContent = "Reconnecting…";
    }
  });
}

async function refreshGeneration(generationId, item) {
  const generation = await api("GET", `/api/generations/${generationId}`);
  item.querySelector(".text").textContent = generation.text;
  if (generation.status === "error" && generation.error) showError(item, generation.error);
}

async function loadConversation() {
  const { conversations } = await api("GET", "/api/conversations");
  const conversation = conversations.length
    ? conversations[0]
    : await api("POST", "/api/conversations");
  state.conversationId = conversation.id;
  const full = await api("GET", `/api/conversations/${conversation.id}`);
  $("messages").replaceChildren();
  for (const message of full.messages) {
    const item = addMessage(message.role, message.content);
    if (message.role !== "assistant") continue;
    if (message.status === "queued" || message.status === "streaming") {
      follow(message.generation_id, item);
    } else if (message.status === "error" && message.error) {
      showError(item, message.error);
    } else if (message.status === "cancelled") {
      showNote(item, "Stopped");
    }
  }
}

async function send(event) {
  event.preventDefault();
  const content = $("input").value;
  if (!content.trim() || state.source) return;
  try {
    const { generation } = await api(
      "POST", `/api/conversations/${state.conversationId}/messages`, { content }
    );
    $("input").value = "";
    addMessage("user", content);
    follow(generation.id, addMessage("assistant", ""));
  } catch (error) {
    $("status").textContent = `Could not send: ${error.message}`;
  }
}

async function stop() {
  if (!state.generation) return;
  try {
    await api("POST", `/api/generations/${state.generation}/cancel`);
  } catch (error) {
    $("status").textContent = `Could not stop: ${error.message}`;
  }
}

$("composer").addEventListener("submit", send);
$("stop").addEventListener("click", stop);
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
loadConversation().catch((error) => {
  $("status").textContent = `Could not load: ${error.message}`;
});
