// A gateway lost with thousands of dashboards on it, on the real cluster:
// `scripts/cluster.sh start --lb` runs a worker, two gateways and HAProxy in
// front of them; 8,000 SDK clients follow live topics through the proxy
// while events flow; one gateway is killed with SIGKILL. Every client it
// held reconnects, through the proxy, to the other gateway within 30 s, and
// every client ends with every window's final equal to what was sent: none
// missed a final, thanks to the SDK's resume. The same run is made twice:
// with the SDK's jittered backoff, and with the jitter taken out, and each
// reports how fast the clients came back.
//
//   TALLY_BIN=target/debug/tally node tests/js/failover.mjs [CLIENTS]
//
// The services are those of KAFKA_BROKERS, CLICKHOUSE_URL and REDIS_URL
// (scripts/services.sh start prints them); scripts/cluster.sh starts its
// own when they are unset. The clients run in one thread per core, as a
// thread of node's takes about 4,000 reconnections a second at most.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { availableParallelism, tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { isMainThread, parentPort, Worker, workerData } from "node:worker_threads";

import WebSocket from "ws";

import { Tally } from "../../gateway/assets/tally.js";
import { eventually, prometheus, root, windowStart } from "./server.mjs";

const WINDOW_MS = 2_000;
const CAMPAIGNS = ["c1", "c2", "c3"];
// The whole metric, and each campaign's share of it.
const TOPICS = ["metrics:clicks", ...CAMPAIGNS.map((c) => `metrics:clicks:campaignId:${c}`)];
const RECONNECT_LIMIT_MS = 30_000;
// How often a click per campaign is sent.
const EVERY_MS = 500;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** The start of the window an event time falls in, as the server writes it. */
const windowOf = (timestamp) => windowStart(timestamp, WINDOW_MS);

/**
 * A thread of clients: `count` SDK clients through `url`, the i-th on topic
 * `(first + i) % TOPICS.length`. It says when all have values, then answers
 * the main thread's questions: how many are open, and, given what was
 * sent, how many windows they miss, with when each lost, retried and
 * reopened its connection.
 */
function clients({ url, first, count, jitter }) {
  const all = [];
  for (let i = 0; i < count; i++) {
    const c = { topic: TOPICS[(first + i) % TOPICS.length], latest: new Map(), attempts: [], opened: [], lost: [], acknowledged: false };
    c.tally = new Tally(url, {
      // Notes when the SDK opens a connection.
      WebSocket: class extends WebSocket {
        constructor(...args) {
          super(...args);
          c.attempts.push(Date.now());
        }
      },
      // Without jitter, every client waits exactly the backoff's bound.
      random: jitter ? Math.random : () => 1,
      onState: (state) => {
        if (state === "open") c.opened.push(Date.now());
        if (state === "reconnecting") c.lost.push(Date.now());
      },
    });
    c.tally.subscribe(c.topic, {}, (m) => {
      c.acknowledged = true;
      c.latest.set(m.windowStart, { value: m.value, final: m.final });
    });
    all.push(c);
  }
  parentPort.on("message", async (ask) => {
    if (ask.what === "acknowledged") {
      parentPort.postMessage(all.filter((c) => c.acknowledged).length);
    } else if (ask.what === "open") {
      parentPort.postMessage(all.filter((c) => c.tally.state === "open").length);
    } else if (ask.what === "missing") {
      // The windows of `ask.windows` each client lacks, or holds with
      // another value than `ask.expected[topic][window]`.
      let missing = 0;
      let wrong = null;
      for (const c of all) {
        for (const w of ask.windows) {
          const got = c.latest.get(w);
          const want = ask.expected[c.topic][w];
          if (!got?.final || got.value !== want) {
            missing++;
            wrong ??= { topic: c.topic, window: w, got, want };
          }
        }
      }
      parentPort.postMessage({ missing, wrong });
    } else if (ask.what === "times") {
      // Of each client that lost its connection after `ask.since`: when,
      // when it tried again, and when it was open again.
      const dropped = all.filter((c) => c.lost.some((t) => t >= ask.since));
      const after = (times) => times.find((t) => t >= ask.since);
      parentPort.postMessage(dropped.map((c) => [after(c.lost), after(c.attempts), c.opened.at(-1)]));
    } else if (ask.what === "close") {
      for (const c of all) await c.tally.close();
      parentPort.postMessage(null);
    }
  });
}

/** The main thread's side of a thread of clients: asks, and awaits the answer. */
function thread(url, first, count, jitter) {
  const worker = new Worker(new URL(import.meta.url), { workerData: { url, first, count, jitter } });
  worker.on("error", (e) => {
    console.error(`failover: a client thread failed: ${e.stack}`);
    process.exit(1);
  });
  let queue = Promise.resolve();
  const ask = (what, extra = {}) =>
    (queue = queue.then(
      () =>
        new Promise((done) => {
          worker.once("message", done);
          worker.postMessage({ what, ...extra });
        }),
    ));
  return { ask, stop: () => worker.terminate() };
}

/** The configuration of trial `name`: topics, tables and channels of its own. */
const config = (name) => `
[server]
max_connections = 19000

[dataflow]
out_of_orderness = "1s"
idle_timeout = "1s"
allowed_lateness = "10s"

[kafka]
topic = "tally-failover-${process.pid}-${name}"
partitions = 2

[clickhouse]
database = "tally_failover_${process.pid}_${name}"

[redis]
prefix = "tally-failover-${process.pid}-${name}"

[[metric]]
name = "clicks"
event_type = "click"
aggregate = "count"
dimensions = ["campaignId"]
windows = ["tumbling 2s"]
`;

/** `scripts/cluster.sh ARGS…` in `dir`, with its output. */
async function cluster(dir, ...args) {
  const env = { ...process.env, TALLY_CLUSTER_DIR: dir, TALLY_BIN: process.env.TALLY_BIN ?? join(root, "target/debug/tally") };
  const { stdout } = await promisify(execFile)(join(root, "scripts/cluster.sh"), args, { env, maxBuffer: 1 << 20 });
  return stdout;
}

/** The load balancer's address, and each gateway's address and pid, from `status`. */
function parseStatus(text) {
  const lines = text.trim().split("\n").map((l) => l.split(/\s+/));
  const lb = lines.find((l) => l[0] === "lb");
  const gateways = lines.filter((l) => l[0] === "gateway").map((l) => ({ url: l[2], pid: Number(l[4]) }));
  return { lb: lb[1], gateways };
}

/**
 * Posts a click per campaign every `EVERY_MS`, each with an eventId,
 * through `url`; a batch that gets no 202 (its gateway died under it) is
 * sent again with the same ids, which the server counts once. Returns a
 * function that stops it and resolves to what was sent.
 */
function traffic(url) {
  const sent = [];
  let running = true;
  let id = 0;
  const done = (async () => {
    while (running) {
      const now = Date.now();
      const events = CAMPAIGNS.map((campaignId) => ({ eventId: `e${id++}`, eventType: "click", timestamp: now, dimensions: { campaignId } }));
      const body = JSON.stringify(events);
      for (;;) {
        try {
          const response = await fetch(`${url}/v1/events`, { method: "POST", headers: { "content-type": "application/json" }, body });
          if (response.status === 202) break;
        } catch {
          // The connection was cut: send it again.
        }
        await sleep(100);
      }
      sent.push(...events);
      await sleep(EVERY_MS);
    }
  })();
  return async () => {
    running = false;
    await done;
    return sent;
  };
}

/** Events per window start, for each topic. */
function truth(sent) {
  const counts = Object.fromEntries(TOPICS.map((t) => [t, {}]));
  for (const { timestamp, dimensions } of sent) {
    const start = windowOf(timestamp);
    for (const topic of [TOPICS[0], `metrics:clicks:campaignId:${dimensions.campaignId}`]) {
      counts[topic][start] = (counts[topic][start] ?? 0) + 1;
    }
  }
  return counts;
}

/** The largest number of `times` within any `span` ms, per second. */
function peakRate(times, span) {
  const sorted = [...times].sort((a, b) => a - b);
  let peak = 0;
  for (let i = 0, j = 0; j < sorted.length; j++) {
    while (sorted[j] - sorted[i] >= span) i++;
    peak = Math.max(peak, j - i + 1);
  }
  return Math.round((peak * 1000) / span);
}

/** The q-th quantile of numbers, in ms after `from`. */
function after(from, times, q) {
  const sorted = times.map((t) => t - from).sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

/** Asks every thread, and sums or concatenates their answers. */
const askAll = async (threads, what, extra) => Promise.all(threads.map((t) => t.ask(what, extra)));
const sum = (xs) => xs.reduce((a, b) => a + b, 0);

/**
 * One trial: a cluster with the proxy, `clients` clients with or without
 * jitter, a gateway killed. Returns what it measured.
 */
async function trial(name, clients, jitter) {
  const dir = mkdtempSync(join(tmpdir(), "tally-failover-"));
  const file = join(dir, "tally.toml");
  writeFileSync(file, config(name));
  const clusterDir = join(dir, "cluster");
  const threads = [];
  let stop = null;
  let passed = false;
  try {
    const { lb, gateways } = parseStatus(await cluster(clusterDir, "start", "--workers", "1", "--threads", "2", "--gateways", "2", "--config", file, "--lb"));
    stop = traffic(lb);
    const n = Math.max(1, Math.min(availableParallelism(), 4));
    for (let t = 0; t < n; t++) {
      const first = Math.floor((t * clients) / n);
      threads.push(thread(lb, first, Math.floor(((t + 1) * clients) / n) - first, jitter));
    }
    await eventually(`${name}: clients getting values`, async () => {
      const acknowledged = sum(await askAll(threads, "acknowledged"));
      return [acknowledged === clients, { acknowledged }];
    });
    const counts = await Promise.all(gateways.map((g) => prometheus(g.url, "tally_ws_clients")));
    assert.equal(sum(counts), clients, `clients per gateway: ${counts}`);
    // Windows from here on are each client's whole.
    const from = windowOf(Date.now() + WINDOW_MS);
    await sleep(4_000);

    const victim = counts[0] >= counts[1] ? 0 : 1;
    const survivor = gateways[1 - victim];
    const killedAt = Date.now();
    process.kill(gateways[victim].pid, "SIGKILL");
    await eventually(
      `${name}: every client reconnected within ${RECONNECT_LIMIT_MS / 1000} s`,
      async () => {
        const open = sum(await askAll(threads, "open"));
        const onSurvivor = await prometheus(survivor.url, "tally_ws_clients");
        return [open === clients && onSurvivor === clients, { open, onSurvivor }];
      },
      RECONNECT_LIMIT_MS,
    );
    const times = (await askAll(threads, "times", { since: killedAt })).flat();
    assert.ok(times.length >= counts[victim], `${times.length} clients lost their connection, of ${counts[victim]} on the killed gateway`);
    await sleep(4_000);
    const sent = await stop();
    stop = null;

    // Every window from `from` to the last one sent, final, with what was
    // sent, at every client.
    const expected = truth(sent);
    const windows = Object.keys(expected[TOPICS[0]])
      .filter((w) => w >= from)
      .sort();
    await eventually(
      `${name}: every client holding every final`,
      async () => {
        const answers = await askAll(threads, "missing", { expected, windows });
        const missing = sum(answers.map((a) => a.missing));
        return [missing === 0, { missing, wrong: answers.find((a) => a.wrong)?.wrong }];
      },
      30_000,
    );
    const resumes = {};
    for (const outcome of ["complete", "truncated", "unavailable"]) {
      resumes[outcome] = await prometheus(survivor.url, `tally_live_resumes_total{outcome="${outcome}"}`);
    }
    assert.equal(resumes.complete, times.length, `every resume replayed all it was asked: ${JSON.stringify(resumes)}`);
    passed = true;
    const [lost, attempted, opened] = [0, 1, 2].map((i) => times.map((t) => t[i]));
    return { name, dropped: times.length, lost, attempted, opened, killedAt, windows: windows.length, events: sent.length };
  } finally {
    if (stop) await stop();
    for (const t of threads) {
      await t.ask("close");
      await t.stop();
    }
    await cluster(clusterDir, "stop").catch((e) => console.error(`failover: stopping the cluster: ${e.message}`));
    if (passed) rmSync(dir, { recursive: true, force: true });
    else console.error(`failover: the cluster's logs are in ${clusterDir}`);
  }
}

async function main() {
  const clients = Number(process.argv[2] ?? 8_000);
  for (const r of [await trial("jittered", clients, true), await trial("unjittered", clients, false)]) {
    const at = (times) => [0.5, 0.99, 1].map((q) => after(r.killedAt, times, q)).join(" / ");
    console.log(
      `failover (${r.name}): ${clients} clients, ${r.dropped} on the killed gateway; ms after the kill (p50 / p99 / last): ` +
        `lost ${at(r.lost)}, tried again ${at(r.attempted)}, open again ${at(r.opened)}; ` +
        `peak reconnections ${peakRate(r.opened, 1_000)}/s over 1 s, ${peakRate(r.opened, 100)}/s over 100 ms; ` +
        `${r.events} events, ${r.windows} windows final at every client`,
    );
  }
}

if (isMainThread) await main();
else clients(workerData);
