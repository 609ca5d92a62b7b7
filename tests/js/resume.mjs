// Live resume with no gap, against a real `tally run`: two SDK clients
// follow the same topics, one directly and one through a proxy that cuts
// its connection for 30 s while windows close and late events revise them.
// After the cut, and again after a restart of the server, both end with
// the same (window -> value, revision) map, which is also what a new client
// resuming from the first window gets, and what was sent.
//
//   TALLY_BIN=target/debug/tally node tests/js/resume.mjs
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { connect, createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

import WebSocket from "ws";

import { Tally } from "../../gateway/assets/tally.js";
import { eventually, freePort, post, prometheus, startTally, stopTally, windowStart } from "./server.mjs";

const WINDOW_MS = 2_000;
const CUT_MS = 30_000;
const CONFIG = `
[dataflow]
out_of_orderness = "1s"
idle_timeout = "1s"
allowed_lateness = "20s"

[[metric]]
name = "clicks"
event_type = "click"
aggregate = "count"
dimensions = ["campaignId"]
windows = ["tumbling 2s"]
`;
const CAMPAIGNS = ["c1", "c2", "c3"];

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A TCP proxy whose connections can be cut, and new ones refused, for a while. */
function cuttableProxy(port) {
  const open = new Set();
  let cut = false;
  const server = createServer((client) => {
    if (cut) return client.destroy();
    const upstream = connect(port, "127.0.0.1");
    open.add(client);
    open.add(upstream);
    client.pipe(upstream).pipe(client);
    for (const socket of [client, upstream]) {
      socket.on("error", () => {});
      socket.on("close", () => {
        open.delete(socket);
        client.destroy();
        upstream.destroy();
      });
    }
  });
  return new Promise((done) =>
    server.listen(0, "127.0.0.1", () =>
      done({
        server,
        url: `http://127.0.0.1:${server.address().port}`,
        cut() {
          cut = true;
          for (const socket of open) socket.destroy();
        },
        restore() {
          cut = false;
        },
      }),
    ),
  );
}

/** The start of the window an event time falls in, as the server writes it. */
const windowOf = (timestamp) => windowStart(timestamp, WINDOW_MS);

/** Keeps an update in `latest`, by window and campaign ("*" for the whole topic). */
const keep = (latest) => (m) =>
  latest.set(`${m.windowStart} ${m.group?.campaignId ?? "*"}`, { value: m.value, revision: m.revision, final: m.final });

/** An SDK client following the topic whole and by campaign, keeping every window's latest update. */
function follower(url) {
  const states = [];
  const client = new Tally(url, { WebSocket, minBackoffMs: 100, maxBackoffMs: 1000, onState: (s) => states.push(s) });
  const latest = new Map();
  client.subscribe("metrics:clicks", {}, keep(latest));
  client.subscribe("metrics:clicks", { groupBy: "campaignId" }, keep(latest));
  return { client, latest, states };
}

/** The entries of a follower's map, sorted, for comparison. */
const entries = (f) => [...f.latest.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));

/** What was sent: events per window start, whole and by campaign. */
function truth(sent) {
  const counts = new Map();
  for (const { timestamp, dimensions } of sent) {
    const start = windowOf(timestamp);
    for (const key of [`${start} *`, `${start} ${dimensions.campaignId}`]) counts.set(key, (counts.get(key) ?? 0) + 1);
  }
  return counts;
}

/**
 * Sends clicks now, every 200 ms, and each second one late click into the
 * window that closed 6 s ago, which the job takes as a revision; returns a
 * function that stops it.
 */
function traffic(url, sent) {
  let running = true;
  const done = (async () => {
    for (let tick = 0; running; tick++) {
      const now = Date.now();
      const events = [0, 1, 2].map((i) => ({
        eventType: "click",
        timestamp: now,
        dimensions: { campaignId: CAMPAIGNS[(tick + i) % 3] },
      }));
      if (tick % 5 === 0) events.push({ eventType: "click", timestamp: now - 6_000, dimensions: { campaignId: CAMPAIGNS[tick % 2] } });
      await post(url, events);
      sent.push(...events);
      await sleep(200);
    }
  })();
  return async () => {
    running = false;
    await done;
  };
}

/** Waits until every window sent is final, with what was sent, in `f`'s map. */
async function settled(f, sent, what) {
  await eventually(what, async () => {
    const expected = truth(sent);
    const wrong = [...expected].filter(([key, count]) => {
      const got = f.latest.get(key);
      return !got || !got.final || got.value !== count;
    });
    const partial = [...f.latest].filter(([, u]) => !u.final);
    return [wrong.length === 0 && partial.length === 0, { wrong: wrong.slice(0, 5), partial: partial.slice(0, 5) }];
  });
}

async function main() {
  const dataDir = mkdtempSync(join(tmpdir(), "tally-resume-"));
  const config = join(dataDir, "tally.toml");
  writeFileSync(config, CONFIG);
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  let tally = await startTally(port, join(dataDir, "data"), config);
  const proxy = await cuttableProxy(port);
  const sent = [];
  const stayed = follower(url);
  const away = follower(proxy.url);
  const clients = [stayed.client, away.client];
  try {
    // Both follow the traffic; then one is cut off for 30 s while windows
    // close and late events revise them.
    let stop = traffic(url, sent);
    await sleep(4_000);
    proxy.cut();
    const cutAt = Date.now();
    await sleep(CUT_MS);
    proxy.restore();
    await sleep(4_000);
    await stop();
    await settled(stayed, sent, "the connected client's windows");
    await settled(away, sent, "the cut client's windows");
    assert.deepEqual(entries(away), entries(stayed));
    const closedDuringCut = [...stayed.latest].filter(([key, u]) => key.endsWith(" *") && Date.parse(key.split(" ")[0]) > cutAt && Date.parse(key.split(" ")[0]) + WINDOW_MS < cutAt + CUT_MS - 2_000);
    assert.ok(closedDuringCut.length >= 10, `${closedDuringCut.length} windows closed during the cut`);
    assert.ok(closedDuringCut.filter(([, u]) => u.revision > 0).length >= 5, "late events revised windows during the cut");
    assert.ok(away.states.filter((s) => s === "reconnecting").length >= 1, "the cut client lost its connection");
    const windows = [...stayed.latest.keys()].filter((k) => k.endsWith(" *")).length;
    console.log(`resume: cut for ${CUT_MS / 1000} s while ${closedDuringCut.length} windows closed; both clients hold the same ${stayed.latest.size} (window, group) values of ${windows} windows`);

    // The server restarts; both clients reconnect and resume. Late events
    // then revise windows that closed before the restart.
    await stopTally(tally);
    await sleep(3_000);
    tally = await startTally(port, join(dataDir, "data"), config);
    // A client that first subscribes now, without anything to resume.
    const joined = follower(url);
    clients.push(joined.client);
    const last = Math.max(...sent.map((e) => e.timestamp));
    const late = CAMPAIGNS.map((campaignId, i) => ({ eventType: "click", timestamp: last - i * WINDOW_MS, dimensions: { campaignId } }));
    await post(url, late);
    sent.push(...late);
    stop = traffic(url, sent);
    await sleep(4_000);
    await stop();
    await settled(stayed, sent, "the first client's windows after the restart");
    await settled(away, sent, "the second client's windows after the restart");
    assert.deepEqual(entries(away), entries(stayed));
    const revisedAcross = late.map((e) => `${windowOf(e.timestamp)} *`);
    assert.ok(revisedAcross.every((k) => stayed.latest.get(k).revision > 0), "windows closed before the restart were revised after it");
    // It sees those revisions as the whole window's value, not only the
    // groups the late events changed.
    for (const key of revisedAcross) assert.deepEqual(joined.latest.get(key), stayed.latest.get(key), key);

    // A new client resuming from the first window gets the same from the
    // store and the hub.
    const first = [...stayed.latest.keys()].sort()[0].split(" ")[0];
    const fresh = { latest: new Map() };
    // What a resume sends is asked for directly: the SDK's own first
    // subscribe has nothing to resume from.
    await new Promise((resolve, reject) => {
      const socket = new WebSocket(url.replace("http", "ws") + "/v1/live");
      socket.onopen = () => {
        socket.send(JSON.stringify({ action: "subscribe", topic: "metrics:clicks", since: first }));
        socket.send(JSON.stringify({ action: "subscribe", topic: "metrics:clicks", groupBy: "campaignId", since: first }));
      };
      let acks = 0;
      socket.onmessage = ({ data }) => {
        const m = JSON.parse(data);
        if (m.error) reject(new Error(m.error));
        if ("subscribed" in m) {
          assert.equal(m.since, first, "the replay is complete from the first window");
          acks += 1;
        } else keep(fresh.latest)(m);
      };
      // Everything is final and nothing changes any more: what arrives
      // within a second is the replay.
      setTimeout(() => {
        socket.close();
        acks === 2 ? resolve() : reject(new Error(`${acks} acknowledgements`));
      }, 1_000);
    });
    assert.deepEqual(entries(fresh), entries(stayed));
    assert.ok((await prometheus(url, 'tally_live_resumes_total{outcome="complete"}')) >= 4);
    console.log(`resume: after a restart, both clients and a client resuming from the first window hold the same ${stayed.latest.size} values; every window equals what was sent`);
  } finally {
    for (const client of clients) await client.close();
    proxy.server.close();
    await stopTally(tally);
    rmSync(dataDir, { recursive: true, force: true });
  }
}

await main();
