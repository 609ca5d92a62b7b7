// tally's browser SDK, an ES module: live values over WebSocket, and events
// sent in batches.
//
//   import { Tally } from "/sdk/tally.js";
//   const tally = new Tally();                      // same origin, or new Tally("https://tally.example")
//   // where the server needs a key: new Tally("https://tally.example", { token: "<secret>" })
//   const stop = tally.subscribe("metrics:ad_clicks:country:US", { window: "tumbling 1m" }, (update) => {
//     console.log(update.windowStart, update.value, update.final, update.revision);
//   });
//   tally.track("ad_click", { campaignId: "camp_1", country: "US" }, { amount: 3.5 });
//
// The connection is kept open: after a drop it reconnects with jittered
// exponential backoff and subscribes again with `since`, from the oldest
// window that may have changed while it was away, so the server replays the
// finals and revisions it missed before the current value. Updates already
// seen, by (window, revision), are dropped, so `onUpdate` gets each window's
// latest value once, and never an older value after a newer. Where the
// server could not replay all it was asked for (the store was unreachable,
// or the replay was past the server's bound), the subscription's `onError`
// says from when it did.
// A refused batch that says when to come back (429 or 503 with Retry-After) is
// sent again no sooner than that.

// Windows remembered per subscription at most, beyond those a replay can
// send again.
const SEEN_KEEP = 100_000;

export class Tally {
  /**
   * @param {string} [baseUrl] where tally listens; the page's origin by default
   * @param {object} [options]
   * @param {number} [options.minBackoffMs=1000] the first reconnect waits a random delay up to this
   * @param {number} [options.maxBackoffMs=15000] the bound of that delay doubles with each failure, up to this
   * @param {number} [options.flushEveryMs=1000] how often tracked events are sent
   * @param {number} [options.maxBatch=500] events per request at most
   * @param {string} [options.token] the secret of a key, where the server needs one
   * @param {(state: string) => void} [options.onState] "connecting", "open", "reconnecting", "closed"
   * @param {typeof WebSocket} [options.WebSocket] for tests and non-browser runtimes
   * @param {typeof fetch} [options.fetch]
   * @param {() => number} [options.random]
   */
  constructor(baseUrl, options = {}) {
    const origin = baseUrl ?? globalThis.location?.origin;
    if (!origin) throw new Error("tally: give the server's URL");
    this.baseUrl = origin.replace(/\/$/, "");
    this.options = {
      minBackoffMs: 1000,
      maxBackoffMs: 15000,
      flushEveryMs: 1000,
      maxBatch: 500,
      onState: () => {},
      WebSocket: globalThis.WebSocket,
      fetch: globalThis.fetch?.bind(globalThis),
      random: Math.random,
      ...options,
    };
    this.state = "closed";
    this.subscriptions = new Map();
    this.socket = null;
    this.attempt = 0;
    this.reconnectTimer = null;
    this.closed = false;
    this.queue = [];
    this.flushTimer = null;
    this.sending = null;
  }

  /**
   * Follows a topic. `options` may hold `window` and `groupBy`. Returns a
   * function that stops it.
   */
  subscribe(topic, options, onUpdate) {
    const request = { action: "subscribe", topic, ...(options?.window && { window: options.window }), ...(options?.groupBy && { groupBy: options.groupBy }) };
    const key = JSON.stringify([topic, request.window ?? null, request.groupBy ?? null]);
    const sub = {
      key,
      request,
      onUpdate,
      seen: new Map(),
      errors: options?.onError ?? (() => {}),
      // What the server said of the subscription, and the windows seen:
      // where a resume starts from.
      lateness: undefined,
      revisableFrom: undefined,
      acknowledgedAt: undefined,
      resumedFrom: null,
      size: 0,
      oldestStart: undefined,
      newestFinalEnd: undefined,
    };
    this.subscriptions.set(key, sub);
    this.closed = false;
    if (this.state === "open") this.send(request);
    else if (!this.socket && !this.reconnectTimer) this.connect();
    return () => {
      this.subscriptions.delete(key);
      if (this.state === "open") this.send({ action: "unsubscribe", topic });
    };
  }

  /** Queues an event; it is sent within `flushEveryMs`, with retries. */
  track(eventType, dimensions = {}, values = {}) {
    this.queue.push({
      eventId: randomId(),
      eventType,
      timestamp: Date.now(),
      dimensions,
      ...(Object.keys(values).length && { values }),
    });
    if (this.queue.length >= this.options.maxBatch) this.flush();
    else if (!this.flushTimer) this.flushTimer = setTimeout(() => this.flush(), this.options.flushEveryMs);
  }

  /**
   * Sends what `track` queued. A failed batch is retried with backoff, with
   * the same eventIds, until the server accepts it or says it is invalid.
   */
  async flush() {
    clearTimeout(this.flushTimer);
    this.flushTimer = null;
    while (this.sending) await this.sending;
    if (!this.queue.length) return;
    const batch = this.queue.splice(0, this.options.maxBatch);
    this.sending = this.post(batch).finally(() => (this.sending = null));
    await this.sending;
    if (this.queue.length) await this.flush();
  }

  async post(batch) {
    let retryAfter = 0;
    for (let attempt = 0; ; attempt++) {
      try {
        const response = await this.options.fetch(`${this.baseUrl}/v1/events`, {
          method: "POST",
          headers: {
            "content-type": "application/json",
            ...(this.options.token && { authorization: `Bearer ${this.options.token}` }),
          },
          body: JSON.stringify(batch),
        });
        if (response.ok) return;
        if (response.status >= 400 && response.status < 500 && response.status !== 429) {
          throw new Error(`tally refused the events: ${response.status} ${await response.text()}`);
        }
        // Seconds, as the server says when it may take the batch again.
        retryAfter = Number(response.headers?.get?.("retry-after")) * 1000 || 0;
      } catch (error) {
        if (error.message?.startsWith("tally refused")) throw error;
      }
      await sleep(Math.max(this.backoff(attempt), retryAfter));
      retryAfter = 0;
    }
  }

  /** Closes the connection and stops reconnecting. Tracked events are flushed. */
  async close() {
    this.closed = true;
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    this.socket?.close();
    this.socket = null;
    this.setState("closed");
    await this.flush();
  }

  connect() {
    if (this.closed) return;
    this.reconnectTimer = null;
    this.setState(this.attempt === 0 ? "connecting" : "reconnecting");
    // A browser's WebSocket cannot send headers: the key goes in the query.
    const token = this.options.token ? `?access_token=${encodeURIComponent(this.options.token)}` : "";
    const url = this.baseUrl.replace(/^http/, "ws") + "/v1/live" + token;
    const socket = new this.options.WebSocket(url);
    this.socket = socket;
    socket.onopen = () => {
      this.attempt = 0;
      this.setState("open");
      for (const sub of this.subscriptions.values()) {
        sub.resumedFrom = resumeFrom(sub);
        const since = sub.resumedFrom === null ? undefined : new Date(sub.resumedFrom).toISOString();
        this.send(since ? { ...sub.request, since } : sub.request);
      }
    };
    socket.onmessage = (event) => this.receive(event.data);
    socket.onclose = () => {
      if (this.socket !== socket) return;
      this.socket = null;
      if (this.closed) return;
      this.setState("reconnecting");
      this.reconnectTimer = setTimeout(() => this.connect(), this.backoff(this.attempt++));
    };
    socket.onerror = () => socket.close();
  }

  /**
   * Full jitter: a delay drawn evenly from zero to the exponential bound.
   * When a gateway dies, all its clients lose their connections in the
   * same instant; drawn this way, they come back to the others spread
   * evenly over the first bound rather than together.
   */
  backoff(attempt) {
    const bound = Math.min(this.options.maxBackoffMs, this.options.minBackoffMs * 2 ** attempt);
    return this.options.random() * bound;
  }

  send(message) {
    if (this.socket?.readyState === 1) this.socket.send(JSON.stringify(message));
  }

  receive(data) {
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return;
    }
    // The server acknowledges each subscribe, saying how long a window may
    // be revised after its end, and each unsubscribe; the values that
    // follow are what a subscription is told about.
    if ("subscribed" in message) {
      for (const sub of this.subscriptions.values()) {
        if (!follows(sub, message, message.subscribed)) continue;
        sub.lateness = message.lateness;
        sub.revisableFrom = message.revisableFrom && Date.parse(message.revisableFrom);
        sub.acknowledgedAt ??= Date.now();
        if (sub.resumedFrom !== null && message.since && Date.parse(message.since) > sub.resumedFrom) {
          sub.errors(`resumed from ${message.since}, not ${new Date(sub.resumedFrom).toISOString()}: the windows between are in /v1/metrics`);
        }
      }
      return;
    }
    if ("unsubscribed" in message) return;
    if (message.error) {
      for (const sub of this.subscriptions.values()) if (sub.request.topic === message.topic) sub.errors(message.error);
      return;
    }
    for (const sub of this.subscriptions.values()) {
      if (!follows(sub, message, message.topic)) continue;
      if (Boolean(sub.request.groupBy) !== Boolean(message.group)) continue;
      note(sub, message);
      if (isNew(sub.seen, message)) sub.onUpdate(message);
    }
  }

  setState(state) {
    if (state !== this.state) {
      this.state = state;
      this.options.onState(state);
    }
  }
}

/** Whether a message of `topic` and its window are of subscription `sub`. */
function follows(sub, message, topic) {
  return sub.request.topic === topic && (!sub.request.window || message.window === sub.request.window);
}

/**
 * Notes where a window's message puts the subscription: the newest final
 * and the oldest window seen. Windows older than any resume can replay
 * again are forgotten.
 */
function note(sub, message) {
  const start = Date.parse(message.windowStart);
  const end = Date.parse(message.windowEnd);
  sub.size = end - start;
  sub.oldestStart = Math.min(sub.oldestStart ?? start, start);
  if (message.final && !(end <= sub.newestFinalEnd)) {
    sub.newestFinalEnd = end;
    const from = resumeFrom(sub);
    for (const [key, seen] of sub.seen) if (seen.start < from) sub.seen.delete(key);
  }
}

/**
 * Where a subscription resumes after a reconnect: the start of the oldest
 * window that may have changed since. The watermark had passed the end of
 * the newest final seen, and a window may be revised until the watermark
 * passes its end by `lateness`; so every window that can still change
 * starts at or after that final's end less the lateness and a window's
 * size. Before any final, the server's own word on its last
 * acknowledgement (`revisableFrom`), else the oldest window seen, else the
 * time of the first acknowledgement, stands in. In milliseconds; null
 * before any acknowledgement.
 */
function resumeFrom(sub) {
  if (sub.lateness === undefined) return null;
  if (sub.newestFinalEnd !== undefined) return sub.newestFinalEnd - sub.lateness - sub.size;
  if (sub.revisableFrom) return Math.min(sub.revisableFrom, sub.oldestStart ?? Infinity);
  return (sub.oldestStart ?? sub.acknowledgedAt) - sub.lateness - sub.size;
}

/**
 * Whether `message` is news for a subscription: a final or revision not seen
 * before, or a partial of a window that has no final yet. A final of the
 * revision seen with another value is news too: the server completed the
 * window with groups it had not held (after a restart).
 */
function isNew(seen, message) {
  const key = `${message.windowStart}\u0000${JSON.stringify(message.group ?? null)}`;
  const last = seen.get(key);
  // Values compare as JSON: quantiles and top items are objects and lists.
  const value = JSON.stringify(message.value);
  if (message.final) {
    if (last?.final && (last.revision > message.revision || (last.revision === message.revision && last.value === value))) return false;
  } else if (last?.final || (last && last.value === value)) {
    return false;
  }
  seen.delete(key);
  seen.set(key, { final: message.final, revision: message.revision, value, start: Date.parse(message.windowStart) });
  if (seen.size > SEEN_KEEP) seen.delete(seen.keys().next().value);
  return true;
}

function randomId() {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  return "evt_" + Date.now().toString(36) + Math.random().toString(36).slice(2, 12);
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
