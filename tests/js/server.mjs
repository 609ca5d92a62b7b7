// A real `tally run` for the node tests: started on a free port in a
// directory of the test's, stopped with SIGTERM.
import { spawn } from "node:child_process";
import { createServer } from "node:net";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

/** The repository's root. */
export const root = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const binary = resolve(root, process.env.TALLY_BIN ?? "target/debug/tally");

/** A port nothing listens on now. */
export function freePort() {
  return new Promise((done) => {
    const server = createServer().listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => done(port));
    });
  });
}

/** Starts `tally run` and resolves once it listens. */
export function startTally(port, dataDir, config = join(root, "cluster.toml"), env = {}) {
  const child = spawn(binary, ["run", "--listen", `127.0.0.1:${port}`, "--data-dir", dataDir, "--config", config], {
    env: { ...process.env, RUST_LOG: "warn", ...env },
    stdio: ["ignore", "pipe", "inherit"],
  });
  return new Promise((done, fail) => {
    child.once("exit", (code) => fail(new Error(`tally exited with ${code}`)));
    createInterface({ input: child.stdout }).once("line", (line) => {
      if (!line.startsWith("listening on ")) fail(new Error(`unexpected first line: ${line}`));
      done(child);
    });
  });
}

/** Stops it with SIGTERM and resolves once it has exited. */
export function stopTally(child) {
  return new Promise((done) => {
    child.removeAllListeners("exit");
    child.once("exit", done);
    child.kill("SIGTERM");
  });
}

/** POSTs events and insists on a 202. */
export async function post(url, events, key) {
  const headers = { "content-type": "application/json", ...(key && { authorization: `Bearer ${key}` }) };
  const response = await fetch(`${url}/v1/events`, { method: "POST", headers, body: JSON.stringify(events) });
  if (response.status !== 202) throw new Error(`POST answered ${response.status}: ${await response.text()}`);
}

/** A value from the Prometheus text at `/metrics`. */
export async function prometheus(url, name) {
  const text = await (await fetch(`${url}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith(`${name} `));
  return line === undefined ? undefined : Number(line.split(" ")[1]);
}

/**
 * Calls `check`, which resolves to [ok, what it saw], every 250 ms until it
 * is ok, and resolves to what it saw; fails after `timeout` ms with it.
 */
export async function eventually(what, check, timeout = 60_000) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const [ok, seen] = await check();
    if (ok) return seen;
    if (Date.now() > deadline) throw new Error(`${what}: still ${JSON.stringify(seen)} after ${timeout} ms`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

/**
 * The start of the tumbling window of `size` ms that an event time falls
 * in, as the server writes it.
 */
export const windowStart = (timestamp, size) => new Date(Math.floor(timestamp / size) * size).toISOString().replace(".000Z", "Z");
