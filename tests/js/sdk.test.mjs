// The SDK's reconnect, resubscribe, duplicate and retry logic, against a
// scripted WebSocket and fetch.
import { test } from "node:test";
import assert from "node:assert/strict";

import { Tally } from "../../gateway/assets/tally.js";

/** A WebSocket the test drives: it opens, delivers and drops on command. */
class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeSocket.all.push(this);
  }
  open() {
    this.readyState = 1;
    this.onopen?.();
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  deliver(message) {
    this.onmessage?.({ data: JSON.stringify(message) });
  }
  close() {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.onclose?.();
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function nextSocket(count) {
  for (let i = 0; i < 200 && FakeSocket.all.length < count; i++) await sleep(5);
  assert.equal(FakeSocket.all.length, count, "a new connection was made");
  return FakeSocket.all[count - 1];
}

// Ten-second windows by name: w1 starts at 10:25:00, w2 at 10:25:10.
const windows = { w1: "2026-11-29T10:25:00Z", w2: "2026-11-29T10:25:10Z", w3: "2026-11-29T10:25:20Z" };
const named = Object.fromEntries(Object.entries(windows).map(([name, start]) => [start, name]));

const update = (name, value, final, revision) => ({
  topic: "metrics:ad_clicks",
  window: "tumbling 10s",
  windowStart: windows[name],
  windowEnd: new Date(Date.parse(windows[name]) + 10_000).toISOString(),
  value,
  timestamp: new Date().toISOString(),
  revision,
  final,
});

test("reconnects, resumes from the oldest window that may have changed, and drops what it has seen by (window, revision)", async () => {
  FakeSocket.all = [];
  const states = [];
  const tally = new Tally("http://tally.test", {
    WebSocket: FakeSocket,
    minBackoffMs: 10,
    maxBackoffMs: 40,
    onState: (s) => states.push(s),
  });
  const got = [];
  tally.subscribe("metrics:ad_clicks", { window: "tumbling 10s" }, (m) => got.push([named[m.windowStart], m.value, m.final, m.revision]));

  const first = await nextSocket(1);
  assert.equal(first.url, "ws://tally.test/v1/live");
  first.open();
  assert.deepEqual(first.sent, [{ action: "subscribe", topic: "metrics:ad_clicks", window: "tumbling 10s" }]);
  // The server's acknowledgement is not an update.
  first.deliver({ subscribed: "metrics:ad_clicks", window: "tumbling 10s", groupBy: null, lateness: 32000 });
  first.deliver(update("w1", 3, false, 0));
  first.deliver(update("w1", 3, false, 0)); // the same partial again
  first.deliver(update("w1", 5, true, 0));
  first.deliver(update("w1", 4, false, 0)); // a partial after the final is stale

  // The server goes away; the SDK reconnects and asks again, from the
  // oldest window a late event may still revise: the newest final ended at
  // 10:25:10, and a window may be revised 32 s after its end.
  first.close();
  const second = await nextSocket(2);
  second.open();
  assert.deepEqual(second.sent, [{ ...first.sent[0], since: "2026-11-29T10:24:28.000Z" }]);
  second.deliver(update("w1", 5, true, 0)); // the current value, already seen
  second.deliver(update("w1", 6, true, 1)); // a late correction
  second.deliver(update("w1", 6, true, 1));
  second.deliver(update("w2", 1, false, 0));

  assert.deepEqual(got, [
    ["w1", 3, false, 0],
    ["w1", 5, true, 0],
    ["w1", 6, true, 1],
    ["w2", 1, false, 0],
  ]);
  assert.deepEqual(states, ["connecting", "open", "reconnecting", "open"]);
  await tally.close();
  assert.equal(FakeSocket.all.length, 2, "no reconnect after close");
});

test("a resume the server could not serve in full reaches onError, and a completed window is news", async () => {
  FakeSocket.all = [];
  const tally = new Tally("http://tally.test", { WebSocket: FakeSocket, minBackoffMs: 10, maxBackoffMs: 40 });
  const [got, errors] = [[], []];
  tally.subscribe("metrics:ad_clicks", { onError: (e) => errors.push(e) }, (m) => got.push([named[m.windowStart], m.value, m.revision]));
  const first = await nextSocket(1);
  first.open();
  // Before any final, the server's word says where to resume from.
  first.deliver({ subscribed: "metrics:ad_clicks", window: "tumbling 10s", groupBy: null, lateness: 32000, revisableFrom: "2026-11-29T10:24:38Z" });
  first.deliver(update("w2", 1, false, 0));
  first.close();
  const second = await nextSocket(2);
  second.open();
  assert.equal(second.sent[0].since, "2026-11-29T10:24:38.000Z");
  second.deliver({ subscribed: "metrics:ad_clicks", window: "tumbling 10s", groupBy: null, lateness: 32000, since: "2026-11-29T10:25:10Z" });
  assert.deepEqual(errors, ["resumed from 2026-11-29T10:25:10Z, not 2026-11-29T10:24:38.000Z: the windows between are in /v1/metrics"]);
  // A window the server completed after a restart: same revision, new value.
  second.deliver(update("w2", 3, true, 1));
  second.deliver(update("w2", 5, true, 1));
  second.deliver(update("w2", 5, true, 1));
  assert.deepEqual(got, [["w2", 1, 0], ["w2", 3, 1], ["w2", 5, 1]]);
  await tally.close();
});

test("quantiles and top lists repeated are seen once, and a changed one is news", async () => {
  FakeSocket.all = [];
  const tally = new Tally("http://tally.test", { WebSocket: FakeSocket, minBackoffMs: 10, maxBackoffMs: 40 });
  const got = [];
  tally.subscribe("metrics:ad_clicks", {}, (m) => got.push([named[m.windowStart], m.value, m.final]));
  const first = await nextSocket(1);
  first.open();
  // Each arrives as a new object: equal values are the same value.
  const p = (p50, p99) => ({ "0.5": p50, "0.9": p99, "0.99": p99 });
  first.deliver(update("w1", p(20, 40), false, 0));
  first.deliver(update("w1", p(20, 40), false, 0));
  first.deliver(update("w1", p(30, 40), true, 0));
  first.deliver(update("w1", p(30, 40), true, 0));
  const items = [{ item: "cr_a", count: 2, lower: 2, upper: 2 }];
  first.deliver(update("w2", items, false, 0));
  first.deliver(update("w2", structuredClone(items), false, 0));
  assert.deepEqual(got, [
    ["w1", p(20, 40), false],
    ["w1", p(30, 40), true],
    ["w2", items, false],
  ]);
  await tally.close();
});

test("a refused subscription reaches its onError, and acknowledgements reach nobody", async () => {
  FakeSocket.all = [];
  const tally = new Tally("http://tally.test", { WebSocket: FakeSocket });
  const [updates, errors] = [[], []];
  tally.subscribe("metrics:ad_clicks:campaignId:c9", { onError: (e) => errors.push(e) }, (m) => updates.push(m));
  const socket = await nextSocket(1);
  socket.open();
  socket.deliver({ unsubscribed: "metrics:ad_clicks:campaignId:c9" });
  socket.deliver({ error: "at most 1000 subscriptions per connection", topic: "metrics:ad_clicks:campaignId:c9" });
  assert.deepEqual(updates, []);
  assert.deepEqual(errors, ["at most 1000 subscriptions per connection"]);
  await tally.close();
});

test("backoff is jittered and grows exponentially up to its cap", () => {
  let r = 0;
  const tally = new Tally("http://tally.test", { minBackoffMs: 100, maxBackoffMs: 1000, random: () => r });
  const bounds = [0, 1, 2, 3, 4, 5].map((attempt) => {
    r = 1;
    const high = tally.backoff(attempt);
    r = 0;
    const low = tally.backoff(attempt);
    return [low, high];
  });
  assert.deepEqual(bounds, [[0, 100], [0, 200], [0, 400], [0, 800], [0, 1000], [0, 1000]]);
  r = 0.5;
  assert.equal(tally.backoff(3), 400);
});

test("a dropped connection is retried until it opens, with the delay growing", async () => {
  FakeSocket.all = [];
  const tally = new Tally("http://tally.test", { WebSocket: FakeSocket, minBackoffMs: 10, maxBackoffMs: 80, random: () => 1 });
  tally.subscribe("metrics:ad_clicks", {}, () => {});
  const started = Date.now();
  for (let n = 1; n <= 4; n++) (await nextSocket(n)).close();
  // Delays of 10, 20, 40 ms before the 2nd, 3rd and 4th attempts.
  assert.ok(Date.now() - started >= 70, `retried after ${Date.now() - started} ms`);
  const fifth = await nextSocket(5);
  fifth.open();
  assert.equal(tally.state, "open");
  assert.equal(tally.attempt, 0, "the backoff resets once connected");
  await tally.close();
});

test("track batches events and retries with the same eventIds", async () => {
  const bodies = [];
  const answers = [() => Promise.reject(new Error("network down")), () => ({ ok: false, status: 503, text: async () => "" }), () => ({ ok: true, status: 202 })];
  const tally = new Tally("http://tally.test", {
    minBackoffMs: 1,
    maxBackoffMs: 4,
    fetch: async (url, init) => {
      assert.equal(url, "http://tally.test/v1/events");
      bodies.push(JSON.parse(init.body));
      return answers[bodies.length - 1]();
    },
  });
  tally.track("ad_click", { country: "US" });
  tally.track("purchase", { country: "DE" }, { amount: 9.5 });
  await tally.flush();
  assert.equal(bodies.length, 3, "two failures, then accepted");
  assert.equal(bodies[0].length, 2, "both events in one batch");
  const ids = bodies.map((b) => b.map((e) => e.eventId).join());
  assert.equal(new Set(ids).size, 1, "every attempt carries the same eventIds");
  assert.deepEqual(bodies[2][1].values, { amount: 9.5 });
  assert.equal(bodies[2][0].values, undefined);
});

test("track does not retry events the server refuses", async () => {
  let calls = 0;
  const tally = new Tally("http://tally.test", {
    fetch: async () => {
      calls++;
      return { ok: false, status: 400, text: async () => '{"error":"bad"}' };
    },
  });
  tally.track("ad_click", {});
  await assert.rejects(tally.flush(), /refused the events: 400/);
  assert.equal(calls, 1);
});

test("a token goes in the Authorization header and the WebSocket's query, and Retry-After is honoured", async () => {
  FakeSocket.all = [];
  const sent = [];
  const answers = [
    () => ({ ok: false, status: 429, headers: new Headers({ "retry-after": "1" }), text: async () => "" }),
    () => ({ ok: true, status: 202 }),
  ];
  const tally = new Tally("http://tally.test", {
    token: "wk_secret/+=",
    WebSocket: FakeSocket,
    minBackoffMs: 1,
    maxBackoffMs: 4,
    fetch: async (url, init) => {
      sent.push({ at: Date.now(), authorization: init.headers.authorization });
      return answers[sent.length - 1]();
    },
  });
  tally.subscribe("metrics:ad_clicks", {}, () => {});
  const socket = await nextSocket(1);
  assert.equal(socket.url, "ws://tally.test/v1/live?access_token=wk_secret%2F%2B%3D");
  tally.track("ad_click", {});
  await tally.flush();
  assert.equal(sent.length, 2);
  assert.equal(sent[0].authorization, "Bearer wk_secret/+=");
  assert.ok(sent[1].at - sent[0].at >= 950, `retried after ${sent[1].at - sent[0].at} ms, not the 1 s asked`);
  await tally.close();
});
