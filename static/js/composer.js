// The message box: grows with its text, Enter sends, Shift+Enter adds a line; its button
// is Send, or Stop while an answer streams.

const $ = (id) => document.getElementById(id);
const MAX_HEIGHT_RATIO = 0.4; // of the window's height

export class Composer {
  /** handlers: onSend(text) -> Promise<boolean> (true: sent, clear the box), onStop(). */
  constructor(handlers) {
    this.handlers = handlers;
    this.form = $("composer");
    this.input = $("input");
    this.send = $("send");
    this.stop = $("stop");
    this.streaming = false;
    this.sending = false;

    this.form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit();
    });
    this.input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        this.submit();
      }
    });
    this.input.addEventListener("input", () => this.update());
    this.stop.addEventListener("click", () => this.handlers.onStop());
    window.addEventListener("resize", () => this.grow());
    this.update();
  }

  async submit() {
    const text = this.input.value;
    if (!text.trim() || this.streaming || this.sending) return;
    this.sending = true;
    this.update();
    try {
      if (await this.handlers.onSend(text)) {
        this.input.value = "";
      }
    } finally {
      this.sending = false;
      this.update();
    }
  }

  setStreaming(streaming) {
    const hadFocus = document.activeElement === this.stop || document.activeElement === this.send;
    this.streaming = streaming;
    this.send.hidden = streaming;
    this.stop.hidden = !streaming;
    this.stop.disabled = false;
    this.update();
    if (hadFocus) this.input.focus(); // the focused button just disappeared
  }

  update() {
    this.send.disabled = !this.input.value.trim() || this.sending;
    this.grow();
  }

  grow() {
    this.input.style.height = "auto";
    const max = Math.round(window.innerHeight * MAX_HEIGHT_RATIO);
    const height = Math.min(this.input.scrollHeight + 2, max);
    this.input.style.height = `${height}px`;
    this.input.style.overflowY = this.input.scrollHeight + 2 > max ? "auto" : "hidden";
  }

  focus() {
    this.input.focus();
  }
}
