// Follow one generation's event stream with a native EventSource.
//
// With no cursor the server replays from the start, so the text is rebuilt exactly; after a
// dropped connection EventSource resumes by itself with Last-Event-ID. If it gives up (the
// stream ended while we were away: HTTP 204; or the server refused: 4xx/5xx), we ask the
// API where the generation stands, and either take its final text or resume from the last
// event id we saw (?after=), so nothing is ever shown twice or missed.
//
// Three more ways a connection can fail us, each handled here:
// - it stalls (open, no bytes: a phone between networks). The server sends a `ping` event
//   every `interval` seconds; with no event for WATCHDOG_PINGS intervals we drop the
//   connection, show "Reconnecting…" and reopen from the last cursor.
// - the tab is hidden: it gives its connection back and re-attaches, from the cursor, when
//   shown again.
// - every stream slot of the browser is taken (slots.js): it polls the API meanwhile.

import { api, FINAL_STATUSES } from "./api.js";
import { takeSlot } from "./slots.js";

const MAX_BACKOFF_MS = 10000;
const POLL_MS = 1000;
const DEFAULT_PING_S = 15; // until the stream's first ping says otherwise
const WATCHDOG_PINGS = 2.5;

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
    this.release = null; // gives back this tab's stream slot
    this.closed = false;
    this.reconnecting = false;
    this.attempts = 0;
    this.timer = 0;
    this.watchdog = 0;
    this.watchdogMs = DEFAULT_PING_S * WATCHDOG_PINGS * 1000;
    this.onOnline = () => { if (this.timer) this.retryNow(); };
    this.onVisibility = () => (document.hidden ? this.park() : this.retryNow());
    window.addEventListener("online", this.onOnline);
    document.addEventListener("visibilitychange", this.onVisibility);
    this.open();
  }

  async open() {
    if (this.closed || document.hidden || this.source) return;
    if (!this.release) this.release = await takeSlot();
    if (this.closed || document.hidden || this.source) return this.giveBackSlot();
    if (!this.release) return this.poll();
    const source = new EventSource(api.eventsUrl(this.gid, this.lastId));
    this.source = source;
    this.armWatchdog();
    source.addEventListener("open", () => {
      this.attempts = 0;
      this.armWatchdog();
      this.setReconnecting(false);
    });
    source.addEventListener("ping", (event) => {
      const interval = Number(JSON.parse(event.data).interval);
      if (interval > 0) this.watchdogMs = interval * WATCHDOG_PINGS * 1000;
      this.armWatchdog();
    });
    source.addEventListener("delta", (event) => {
      this.armWatchdog();
      this.lastId = event.lastEventId || this.lastId;
      this.setReconnecting(false);
      this.text += JSON.parse(event.data).text;
      this.handlers.onText(this.text);
    });
    source.addEventListener("done", (event) => {
      const done = JSON.parse(event.data);
      this.finish();
      // An end read from the database (Redis was out of reach) carries the whole text.
      if (typeof done.text === "string" && done.text !== this.text) {
        this.text = done.text;
        this.handlers.onText(this.text);
      }
      this.handlers.onDone(done);
    });
    source.addEventListener("error", (event) => {
      if (typeof event.data === "string" && event.data) {
        // The server's own `event: error`: the answer failed. After the server lost the
        // stream (state_lost) it carries the whole stored text, which wins.
        const error = JSON.parse(event.data);
        this.finish();
        if (typeof error.text === "string" && error.text !== this.text) {
          this.text = error.text;
          this.handlers.onText(this.text);
        }
        this.handlers.onError(error);
      } else if (source.readyState === EventSource.CONNECTING) {
        this.setReconnecting(true); // EventSource retries by itself, with Last-Event-ID
        this.armWatchdog(); // and may hang doing so
      } else {
        this.dropSource();
        this.recover();
      }
    });
  }

  /** EventSource gave up: find out from the API whether the answer ended meanwhile. */
  async recover() {
    if (this.closed) return;
    this.setReconnecting(true);
    const state = await this.fetchState();
    if (this.closed || state === undefined) return;
    if (state && this.settle(state)) return;
    const delay = Math.min(MAX_BACKOFF_MS, 1000 * 2 ** this.attempts);
    this.attempts += 1;
    this.schedule(delay);
  }

  /** No stream slot free: follow the answer through the API until one is. */
  async poll() {
    const state = await this.fetchState();
    if (this.closed || state === undefined) return;
    if (state && this.settle(state)) return;
    if (state) {
      this.setReconnecting(false);
      if (state.cursor && state.text !== this.text) {
        this.text = state.text;
        this.lastId = state.cursor; // the stream, once we hold one, goes on exactly here
        this.handlers.onText(this.text);
      }
    }
    this.schedule(POLL_MS);
  }

  /** The generation's state; null if unreachable; undefined if it is gone (404: ended). */
  async fetchState() {
    try {
      return await api.generation(this.gid);
    } catch (error) {
      if (error.status === 404 && !this.closed) {
        // Deleted (in another tab, say): there is nothing left to follow.
        this.finish();
        this.handlers.onError({ code: error.code, message: error.message });
        return undefined;
      }
      return null; // offline, or the server is restarting: try again shortly
    }
  }

  /** If the answer has ended, show its final state and stop; true if it had. */
  settle(state) {
    if (!FINAL_STATUSES.has(state.status)) return false;
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
    return true;
  }

  armWatchdog() {
    clearTimeout(this.watchdog);
    this.watchdog = setTimeout(() => {
      // Nothing, not even a ping, for several intervals: the connection is dead.
      this.dropSource();
      this.setReconnecting(true);
      this.retryNow();
    }, this.watchdogMs);
  }

  schedule(delay) {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.retryNow(), delay);
  }

  retryNow() {
    clearTimeout(this.timer);
    this.timer = 0;
    this.open();
  }

  /** Hidden tab: give the connection and the slot back; retryNow() re-attaches. */
  park() {
    clearTimeout(this.timer);
    this.timer = 0;
    this.dropSource();
    this.giveBackSlot();
  }

  dropSource() {
    clearTimeout(this.watchdog);
    if (this.source) this.source.close();
    this.source = null;
  }

  giveBackSlot() {
    if (this.release) this.release();
    this.release = null;
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
    document.removeEventListener("visibilitychange", this.onVisibility);
    this.dropSource();
    this.giveBackSlot();
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
