// How one message looks: the user's as plain text, the assistant's as rendered Markdown
// with its state (thinking, streaming, reconnecting, stopped, failed), usage and actions.

import { copyButton, el, iconButton, throttled } from "./dom.js";
import { renderMarkdown } from "./markdown.js";

export function userMessage(message) {
  return el("article", { class: "message user", "data-message-id": message.id },
    el("h3", { class: "visually-hidden", text: "You said:" }),
    el("div", { class: "bubble", text: message.content }),
    el("div", { class: "actions" },
      copyButton("Copy message", () => message.content)));
}

function usageText(usage) {
  if (!usage) return "";
  const n = (value) => Number(value ?? 0).toLocaleString("en-US");
  return `${n(usage.prompt_tokens)} prompt · ${n(usage.completion_tokens)} completion tokens`;
}

const FINISH_NOTES = {
  cancelled: "Stopped.",
  length: "Cut short: the answer reached the length limit.",
  interrupted: "Interrupted: the server restarted while writing this answer.",
};
// How each finish reason leaves the message (anything else: done).
const FINISH_STATES = { cancelled: "cancelled", interrupted: "interrupted" };

export class AssistantView {
  /** message: {id, model, content, ...}; actions: {onRegenerate, onRetry, onContinue}. */
  constructor(message, actions) {
    this.actions = actions;
    this.gid = message.generation_id;
    this.text = message.content || "";
    this.model = message.model || "";
    this.state = "idle";
    this.render = throttled(() => this.body.replaceChildren(renderMarkdown(this.text)));

    this.body = el("div", { class: "markdown" });
    this.thinking = el("div", { class: "thinking", hidden: true },
      el("span", { class: "dots", "aria-hidden": "true" }, el("i"), el("i"), el("i")),
      el("span", { class: "visually-hidden", text: "Thinking…" }));
    this.notice = el("p", { class: "notice", hidden: true });
    this.errorBox = el("div", { class: "error-box", role: "alert", hidden: true });
    this.usage = el("span", { class: "usage" });
    this.buttons = el("div", { class: "actions" });
    this.element = el("article", { class: "message assistant", "data-message-id": message.id },
      el("h3", { class: "visually-hidden", text: "Assistant said:" }),
      el("div", { class: "avatar", "aria-hidden": "true" }, "✦"),
      el("div", { class: "content" },
        this.body, this.thinking, this.notice, this.errorBox,
        el("div", { class: "footer" }, this.buttons,
          el("span", { class: "model-name", text: this.model }), this.usage)));
    this.render();
  }

  /** Live: text arrives; the region is polite-live but busy until the answer ends. */
  startStreaming() {
    this.state = "streaming";
    this.element.classList.add("streaming");
    this.body.setAttribute("aria-live", "polite");
    this.body.setAttribute("aria-busy", "true");
    this.thinking.hidden = Boolean(this.text);
    this.notice.hidden = true;
    this.errorBox.hidden = true;
    this.showActions(false);
  }

  setText(text) {
    this.text = text;
    if (text) this.thinking.hidden = true;
    this.render();
  }

  setConnection(connection) {
    if (this.state !== "streaming") return;
    const reconnecting = connection === "reconnecting";
    this.element.classList.toggle("reconnecting", reconnecting);
    this.notice.hidden = !reconnecting;
    this.notice.textContent = reconnecting ? "Reconnecting…" : "";
  }

  /** The answer ended normally (or was stopped, or cut at the length limit). */
  finish({ finish_reason: reason, usage }) {
    this.end();
    const note = FINISH_NOTES[reason];
    this.notice.hidden = !note;
    this.notice.textContent = note || "";
    this.usage.textContent = usageText(usage);
    this.state = FINISH_STATES[reason] || "done";
  }

  fail(error) {
    this.end();
    this.state = "error";
    this.element.classList.add("failed");
    const message = (error && (error.message || error.code)) || "Something went wrong.";
    this.errorBox.replaceChildren(
      el("strong", { text: "Error: " }),
      el("span", { class: "error-message", text: message }));
    this.errorBox.hidden = false;
    this.notice.hidden = true;
  }

  end() {
    this.render.flush();
    this.element.classList.remove("streaming", "reconnecting");
    this.body.removeAttribute("aria-busy");
    this.thinking.hidden = true;
  }

  /** Copy always; Regenerate (or Retry, after an error) only on the last answer. */
  showActions(isLast) {
    const buttons = [];
    if (this.state !== "streaming") {
      if (this.text) buttons.push(copyButton("Copy answer", () => this.text));
      if (isLast && this.state === "error") {
        buttons.push(iconButton("refresh", "Retry", {
          text: "Retry", className: "text-button retry", onClick: () => this.actions.onRetry(),
        }));
      } else if (isLast) {
        if (this.state === "interrupted") {
          buttons.push(iconButton("refresh", "Continue", {
            text: "Continue", className: "text-button continue",
            onClick: () => this.actions.onContinue(this.gid),
          }));
        }
        buttons.push(iconButton("refresh", "Regenerate", {
          text: "Regenerate", className: "text-button", onClick: () => this.actions.onRegenerate(),
        }));
      }
    }
    this.buttons.replaceChildren(...buttons);
  }

  /** Show a stored message in its final (or live) state. */
  static fromStored(message, actions) {
    const view = new AssistantView(message, actions);
    if (message.status === "error") view.fail(message.error);
    else if (["done", "cancelled", "interrupted"].includes(message.status)) {
      view.finish({ finish_reason: message.finish_reason, usage: message.usage });
    }
    return view;
  }
}
