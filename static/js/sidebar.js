// The list of conversations: newest first, grouped by day, with rename and delete.

import { el, iconButton } from "./dom.js";

const DAY = 24 * 60 * 60 * 1000;

function groupOf(iso, now = new Date()) {
  const then = new Date(iso);
  const today = new Date(now.getFullYear(), now.getMonth(), now.getDate()).getTime();
  if (then.getTime() >= today) return "Today";
  if (then.getTime() >= today - DAY) return "Yesterday";
  if (then.getTime() >= today - 6 * DAY) return "Previous 7 days";
  if (then.getTime() >= today - 29 * DAY) return "Previous 30 days";
  return "Older";
}

// Server timestamps are UTC without an offset; read them as UTC.
const asUtc = (iso) => (/[zZ]|[+-]\d\d:\d\d$/.test(iso) ? iso : `${iso}Z`);

export class Sidebar {
  /** actions: {onRename(conv, title), onDelete(conv)}; selection goes through links. */
  constructor(list, actions) {
    this.list = list;
    this.actions = actions;
    this.conversations = [];
    this.activeId = null;
    this.editingId = null;
  }

  render(conversations = this.conversations, activeId = this.activeId) {
    this.conversations = conversations;
    this.activeId = activeId;
    if (this.editingId) return; // don't pull the field from under someone typing
    const focused = document.activeElement && this.list.contains(document.activeElement)
      ? document.activeElement.closest("[data-conversation-id]")?.dataset.conversationId
      : null;
    const groups = new Map();
    for (const conv of conversations) {
      const name = groupOf(asUtc(conv.updated_at));
      if (!groups.has(name)) groups.set(name, []);
      groups.get(name).push(conv);
    }
    const nodes = [];
    for (const [name, convs] of groups) {
      nodes.push(el("li", { class: "group" },
        el("h2", { class: "group-title", text: name }),
        el("ul", { class: "conversations", role: "list" }, ...convs.map((c) => this.item(c)))));
    }
    if (!conversations.length) {
      nodes.push(el("li", { class: "empty", text: "No conversations yet." }));
    }
    this.list.replaceChildren(...nodes);
    if (focused) {
      this.list.querySelector(`[data-conversation-id="${CSS.escape(focused)}"] a`)?.focus();
    }
  }

  item(conv) {
    const active = conv.id === this.activeId;
    const title = conv.title || "New chat";
    return el("li", { class: `conversation${active ? " active" : ""}`,
      "data-conversation-id": conv.id },
      el("a", { href: `#/c/${conv.id}`, class: "conversation-link",
        "aria-current": active ? "page" : null, title }, title),
      el("div", { class: "conversation-actions" },
        iconButton("pencil", `Rename “${title}”`, { onClick: () => this.startRename(conv) }),
        iconButton("trash", `Delete “${title}”`, { onClick: () => this.actions.onDelete(conv) })));
  }

  startRename(conv) {
    const item = this.list.querySelector(`[data-conversation-id="${CSS.escape(conv.id)}"]`);
    if (!item) return;
    this.editingId = conv.id;
    const input = el("input", { type: "text", class: "rename-input", maxlength: 200,
      "aria-label": "Conversation title", value: conv.title || "" });
    let done = false;
    const finish = async (save) => {
      if (done) return;
      done = true;
      this.editingId = null;
      const title = input.value.trim();
      if (save && title && title !== conv.title) {
        await this.actions.onRename(conv, title);
      } else {
        this.render();
      }
      this.list.querySelector(`[data-conversation-id="${CSS.escape(conv.id)}"] a`)?.focus();
    };
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") {
        event.preventDefault();
        finish(true);
      } else if (event.key === "Escape") {
        event.preventDefault();
        event.stopPropagation();
        finish(false);
      }
    });
    input.addEventListener("blur", () => finish(true));
    item.replaceChildren(input);
    item.classList.add("editing");
    input.focus();
    input.select();
  }
}
