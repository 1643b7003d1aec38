// Follow one generation's event stream with a native EventSource.
//
// With no cursor the server replays from the start, so the text is rebuilt exactly; after a
// dropped connection EventSource resumes by itself with Last-Event-ID. If it gives up (the
// stream ended while we were away: HTTP 204; or the server refused: 4xx/5xx), we ask the
// API where the generation stands, and either take its final text or resume from the last
// event id we saw (?after=), so nothing is ever shown twice or missed.

import { api, FINAL_STATUSES } from "./api.js";

const MAX_BACKOFF_MS = 10000;

export class GenerationStream {
  /**
   * handlers: onText(fullText), onConnection("live" | "reconnecting"),
   * onDone({finish_reason, usage}), onError({code, message}).
   */
  constructor(gid, handlers) {
    this.gid = gid;
    this.handlers = handlers;
    this.text = "";
    this.lastId = null;
    this.source = null;
    this.closed = false;
    this.reconnecting = false;
    this.attempts = 0;
    this.timer = 0;
    this.onOnline = () => { if (this.timer) this.retryNow(); };
    window.addEventListener("online", this.onOnline);
    this.open();
  }

  open() {
    if (this.closed) return;
    const source = new EventSource(api.eventsUrl(this.gid, this.lastId));
    this.source = source;
    source.addEventListener("open", () => {
      this.attempts = 0;
      this.setReconnecting(false);
    });
    source.addEventListener("delta", (event) => {
      this.lastId = event.lastEventId || this.lastId;
      this.setReconnecting(false);
      this.text += JSON.parse(event.data).text;
      this.handlers.onText(this.text);
    });
    source.addEventListener("done", (event) => {
      this.finish();
      this.handlers.onDone(JSON.parse(event.data));
    });
    source.addEventListener("error", (event) => {
      if (typeof event.data === "string" && event.data) {
        // The server's own `event: error`: the answer failed.
        this.finish();
        this.handlers.onError(JSON.parse(event.data));
      } else if (source.readyState === EventSource.CONNECTING) {
        this.setReconnecting(true); // EventSource retries by itself, with Last-Event-ID
      } else {
        source.close();
        this.recover();
      }
    });
  }

  /** EventSource gave up: find out from the API whether the answer ended meanwhile. */
  async recover() {
    if (this.closed) return;
    this.setReconnecting(true);
    let state = null;
    try {
      state = await api.generation(this.gid);
    } catch (error) {
      if (error.status === 404 && !this.closed) {
        // Deleted (in another tab, say): there is nothing left to follow.
        this.finish();
        this.handlers.onError({ code: error.code, message: error.message });
        return;
      }
      state = null; // offline, or the server is restarting: try again shortly
    }
    if (this.closed) return;
    if (state && FINAL_STATUSES.has(state.status)) {
      this.finish();
      if (state.text !== this.text) {
        this.text = state.text || "";
        this.handlers.onText(this.text);
      }
      if (state.status === "error") {
        this.handlers.onError(state.error || { code: "error", message: "The answer failed." });
      } else {
        this.handlers.onDone({ finish_reason: state.finish_reason, usage: state.usage });
      }
      return;
    }
    const delay = Math.min(MAX_BACKOFF_MS, 1000 * 2 ** this.attempts);
    this.attempts += 1;
    this.timer = setTimeout(() => this.retryNow(), delay);
  }

  retryNow() {
    clearTimeout(this.timer);
    this.timer = 0;
    this.open();
  }

  setReconnecting(on) {
    if (this.reconnecting === on) return;
    this.reconnecting = on;
    this.handlers.onConnection(on ? "reconnecting" : "live");
  }

  finish() {
    this.closed = true;
    clearTimeout(this.timer);
    window.removeEventListener("online", this.onOnline);
    if (this.source) this.source.close();
    if (this.reconnecting) {
      this.reconnecting = false;
      this.handlers.onConnection("live");
    }
  }

  /** Stop listening (the answer goes on on the server; we can attach again later). */
  close() {
    this.finish();
  }
}
