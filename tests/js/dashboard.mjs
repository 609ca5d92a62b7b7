// The dashboard in real headless Chromium, against a real `tally run`:
// values appear within 2 s of a POST, a late event visibly revises its bar,
// and after a server restart the page reconnects and updates again. Then,
// on a server that needs keys, the page asks for one and works with it.
//
//   TALLY_BIN=target/debug/tally node tests/js/dashboard.mjs
//
// A screenshot is saved to tests/artifacts/dashboard.png.
import { mkdtempSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { chromium } from "playwright-core";

import { freePort, post, root, startTally, stopTally } from "./server.mjs";

const artifacts = join(root, "tests/artifacts");
const WINDOW = 10_000;

const click = (ms) => ({ eventType: "ad_click", timestamp: ms, dimensions: { campaignId: "camp_1", country: "US", deviceType: "MOBILE", userId: "usr_1" } });
/** A click with a latency and a creative, for the quantiles and top-K charts. */
const shown = (ms, latency, creative) => ({ ...click(ms), dimensions: { ...click(ms).dimensions, creativeId: creative }, values: { latency_ms: latency } });

/** Polls `read` in the page until `check` holds of what it returns. */
async function until(page, what, read, arg, check, timeout) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const seen = await page.evaluate(read, arg);
    if (check(seen)) return seen;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}; the page shows: ${JSON.stringify(seen)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** The top list of the top_creatives chart: [item, count, trending] rows. */
const topList = () =>
  [...document.querySelectorAll('.card[data-metric="top_creatives"] ol.top li')].map((li) => [li.dataset.item, Number(li.dataset.count), li.classList.contains("trending")]);
/** The quantiles chart's lines, by their legend. */
const quantileLines = () => [...document.querySelectorAll('.card[data-metric="ad_latency"] .legend span')].map((s) => s.textContent);

/**
 * Waits until the bar of the window starting at `start` satisfies `check`.
 * The check runs here, not in the page, whose Content-Security-Policy
 * allows no code made from strings.
 */
async function bar(page, start, check, timeout) {
  const read = () => page.evaluate((start) => {
    const rect = document.querySelector(`.card[data-metric="events"] rect.bar[data-start="${start}"]`);
    if (!rect) return { seen: "no bar" };
    return {
      seen: rect.outerHTML,
      bar: { value: Number(rect.dataset.value), final: rect.dataset.final === "true", revision: Number(rect.dataset.revision), revised: rect.classList.contains("revised") },
    };
  }, start);
  const deadline = Date.now() + timeout;
  for (;;) {
    const { seen, bar } = await read();
    if (bar && check(bar)) return bar;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${check} on the bar at ${start}; it is: ${seen}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);

function step(name, since) {
  console.log(`ok - ${name} (${Date.now() - since} ms)`);
}

async function main() {
  const dataDir = mkdtempSync(join(tmpdir(), "tally-dashboard-"));
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  // The browser first: if it cannot start, no server is left running.
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  let tally = await startTally(port, dataDir);
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 860 } });
    page.on("pageerror", (e) => {
      throw new Error(`page error: ${e.message}`);
    });
    // The page must work within its own Content-Security-Policy.
    const violations = [];
    page.on("console", (m) => {
      if (m.text().includes("Content Security Policy")) violations.push(m.text());
    });
    const charts = [
      { metric: "events", window: "tumbling 10s", filters: [], groupBy: "", top: 5, range: "15m" },
      { metric: "ad_clicks", window: "tumbling 1m", filters: [], groupBy: "country", top: 5, range: "1h" },
      { metric: "ad_latency", window: "tumbling 10s", filters: [], groupBy: "", top: 5, range: "15m" },
      { metric: "top_creatives", window: "tumbling 10s", filters: [], groupBy: "", top: 5, range: "15m" },
    ];
    const hash = Buffer.from(JSON.stringify(charts)).toString("base64url");
    await page.goto(`${url}/#charts=${hash}`);
    await page.waitForSelector('#connection[data-state="open"]', { timeout: 10_000 });
    await page.waitForSelector('.card[data-metric="events"]');

    // Events in the current window, 3 to 4 s before its end: far enough
    // not to cross it, near enough that the wall clock soon passes it.
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    let now = Date.now();
    if (now % WINDOW > WINDOW - 3000) {
      await sleep(WINDOW - (now % WINDOW) + 100);
      now = Date.now();
    }
    if (now % WINDOW < WINDOW - 4000) {
      await sleep(WINDOW - 4000 - (now % WINDOW));
      now = Date.now();
    }
    const start = now - (now % WINDOW);
    let since = Date.now();
    await post(url, Array.from({ length: 25 }, () => click(now)));
    await bar(page, start, (b) => b.value >= 25, 2000);
    step("the open window shows posted events within 2 s", since);

    // Quantiles draw a line per quantile; a top list ranks the creatives,
    // reorders as counts change, and marks those new since the window
    // before (which held cr_a alone). The 14 events of this window count
    // in the events bar too.
    since = Date.now();
    const creatives = [["cr_a", 5], ["cr_b", 3], ["cr_c", 2]].flatMap(([c, n]) => Array(n).fill(c));
    await post(url, [...Array(3)].map((_, i) => shown(start - 5000, 20 + i, "cr_a")));
    await post(url, creatives.map((c, i) => shown(now, 10 * (i + 1), c)));
    await until(page, "a line per quantile", quantileLines, null, (lines) => same(lines, ["p50", "p90", "p99"]), 3000);
    await until(page, "the top list", topList, null, (rows) => same(rows, [["cr_a", 5, false], ["cr_b", 3, true], ["cr_c", 2, true]]), 3000);
    await post(url, [...Array(4)].map(() => shown(now, 5, "cr_c")));
    await until(page, "the top list reordered", topList, null, (rows) => same(rows, [["cr_c", 6, true], ["cr_a", 5, false], ["cr_b", 3, true]]), 3000);
    step("quantiles draw a line each; the top list reorders live and marks newcomers", since);

    // Events at the current time, one to each of the 8 partitions, move
    // every partition's watermark past the window once the wall clock has
    // passed its end and the 2 s out-of-orderness (an event moves the
    // watermark no further than the time it was received), which closes it.
    // A late event then revises it, once the next round carries the
    // watermark a tick of the job (a second at most) past it.
    const advance = async () => {
      for (let i = 0; i < 8; i++) await post(url, [click(Date.now())]);
    };
    await sleep(Math.max(0, start + WINDOW + 2500 - Date.now()));
    since = Date.now();
    await advance();
    await bar(page, start, (b) => b.final && b.value === 25 + 14, 5000);
    await post(url, [click(now)]);
    await sleep(1200);
    await advance();
    const revised = await bar(page, start, (b) => b.final && b.value === 26 + 14 && b.revision >= 1, 5000);
    if (!revised.revised) throw new Error("the revised bar is not marked as revised");
    step("a late event revises the final bar", since);

    // Restart the server: the page reconnects and updates again.
    since = Date.now();
    await stopTally(tally);
    await page.waitForSelector('#connection:not([data-state="open"])', { timeout: 10_000 });
    tally = await startTally(port, dataDir);
    await page.waitForSelector('#connection[data-state="open"]', { timeout: 30_000 });
    step("the page reconnects after a restart", since);
    since = Date.now();
    await post(url, [click(now)]);
    await sleep(1200);
    await advance();
    await bar(page, start, (b) => b.final && b.value === 27 + 14, 5000);
    step("and shows a correction made after the restart", since);

    mkdirSync(artifacts, { recursive: true });
    if (violations.length) throw new Error(`the page broke its Content-Security-Policy:\n${violations.join("\n")}`);
    step("nothing the page did broke its Content-Security-Policy", Date.now());
    await page.screenshot({ path: join(artifacts, "dashboard.png"), fullPage: true });
    console.log(`screenshot: ${join(artifacts, "dashboard.png")}`);

    // A server that needs keys: a new tab asks for one, once, and then
    // shows history and live values with it.
    since = Date.now();
    await stopTally(tally);
    const [read, write] = ["rk_dashboard_0123456789", "wk_dashboard_0123456789"];
    const config = join(dataDir, "keys.toml");
    writeFileSync(config, `${readFileSync(join(root, "cluster.toml"), "utf8")}
[[auth.keys]]
name = "dashboard"
secret = "${read}"
scopes = ["read"]

[[auth.keys]]
name = "sdk"
secret = "${write}"
scopes = ["write"]
`);
    tally = await startTally(port, dataDir, config);
    const keyed = await browser.newPage({ viewport: { width: 1280, height: 860 } });
    let asked = 0;
    keyed.on("dialog", (dialog) => {
      asked++;
      dialog.accept(read);
    });
    await keyed.goto(`${url}/#charts=${hash}`);
    await keyed.waitForSelector('#connection[data-state="open"]', { timeout: 10_000 });
    await keyed.waitForSelector('.card[data-metric="events"]');
    const at = Date.now();
    await post(url, [click(at), click(at)], write);
    const keyedStart = at - (at % WINDOW);
    await bar(keyed, keyedStart, (b) => b.value >= 2, 5000);
    if (asked !== 1) throw new Error(`the page asked for a key ${asked} times`);
    step("on a server with keys, the page asks for one once and shows live values", since);
  } finally {
    await browser.close();
    await stopTally(tally);
    rmSync(dataDir, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(`not ok - ${e.stack ?? e}`);
  process.exit(1);
});
