// The SDK's track() against a real `tally run`, through a proxy that drops
// the first answer of every request: the SDK sends each batch again, with
// the same eventIds, and tally counts every event once.
//
//   TALLY_BIN=target/debug/tally node tests/js/retries.mjs
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { Tally } from "../../gateway/assets/tally.js";
import { eventually, freePort, post, prometheus, startTally, stopTally } from "./server.mjs";

const TRACKED = 1_234;
const PARTITIONS = 8;

/**
 * Forwards POST /v1/events to `target`. The first time it sees a body, it
 * lets tally take it and then cuts the connection instead of answering, as
 * a network that loses the answer does; later sends get tally's answer.
 */
function lossyProxy(target) {
  const seen = new Set();
  const counts = { requests: 0, dropped: 0 };
  const server = createServer(async (request, response) => {
    const chunks = [];
    for await (const chunk of request) chunks.push(chunk);
    const body = Buffer.concat(chunks).toString();
    counts.requests++;
    const answer = await fetch(`${target}${request.url}`, { method: request.method, headers: { "content-type": request.headers["content-type"] }, body });
    const text = await answer.text();
    if (!seen.has(body)) {
      seen.add(body);
      counts.dropped++;
      request.socket.destroy();
      return;
    }
    response.writeHead(answer.status, { "content-type": "application/json" }).end(text);
  });
  return new Promise((done) => server.listen(0, "127.0.0.1", () => done({ server, counts, url: `http://127.0.0.1:${server.address().port}` })));
}

async function main() {
  const dataDir = mkdtempSync(join(tmpdir(), "tally-retries-"));
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const tally = await startTally(port, dataDir);
  const proxy = await lossyProxy(url);
  try {
    const client = new Tally(proxy.url, { minBackoffMs: 20, maxBackoffMs: 100, maxBatch: 200 });
    const started = Date.now();
    for (let i = 0; i < TRACKED; i++) {
      client.track("ad_click", { campaignId: "camp_retried", country: "US", deviceType: "MOBILE", userId: `usr_${i % 50}` });
    }
    await client.flush();
    const batches = Math.ceil(TRACKED / 200);
    assert.equal(proxy.counts.dropped, batches, "every batch lost its first answer");
    assert.equal(proxy.counts.requests, 2 * batches, "and was sent exactly twice");

    // Windows close as the watermark passes them: events now, in every
    // partition, until they have.
    const range = `start=${Math.floor(started / 60_000) * 60 - 60}&end=${Math.ceil(Date.now() / 60_000) * 60 + 60}`;
    const counted = await eventually("the stored count", async () => {
      for (let i = 0; i < PARTITIONS; i++) await post(url, [{ eventType: "flush", timestamp: Date.now() }]);
      const answer = await (await fetch(`${url}/v1/metrics?metric=ad_clicks&resolution=10s&campaignId=camp_retried&${range}`)).json();
      const sum = (answer.dataPoints ?? []).reduce((total, point) => total + (point.value ?? 0), 0);
      return [sum === TRACKED, answer];
    });
    assert.ok(counted);
    assert.equal(await prometheus(url, "tally_duplicate_events_total"), TRACKED, "each event's second send was dropped");
    console.log(`retries: ${TRACKED} events tracked in ${batches} batches, each sent twice; ${TRACKED} stored, ${TRACKED} duplicates dropped`);
  } finally {
    proxy.server.close();
    await stopTally(tally);
    rmSync(dataDir, { recursive: true, force: true });
  }
}

await main();
