// The dashboard: charts of history from /v1/metrics, kept current from /v1/live.
import { Tally } from "/sdk/tally.js";

const PALETTE = [
  "#2f6fdf", "#e0712c", "#1d8a5b", "#8e44c9", "#c2412d", "#0f9bb5", "#b58a00", "#d63e8b", "#5b6b7f", "#3aa35b",
  "#7a5af5", "#e35d6a", "#2b8cbe", "#a0522d", "#4caf50", "#ff8f00", "#6d4c41", "#00897b", "#9c27b0", "#546e7a",
];
const RANGES = { "15m": 15 * 60_000, "1h": 3_600_000, "24h": 86_400_000 };
const MAX_BARS = 400;
const REVISED_MS = 2500;

const $ = (id) => document.getElementById(id);
let catalog = [];
const charts = [];
const lags = [];
let lastUpdate = 0;
let wasDown = false;

// Where the server needs a key, the dashboard asks for one (a key with the
// read scope) and keeps it for this tab only.
const TOKEN_KEY = "tally.token";
let token = sessionStorage.getItem(TOKEN_KEY) ?? "";

/** GETs an API path, with the tab's key if it has one. */
function api(path) {
  return fetch(path, token ? { headers: { authorization: `Bearer ${token}` } } : {});
}

/** Asks for a key after a 401; the live connection uses it from then on. */
function askForToken(message) {
  const given = prompt(`${message}\n\nThis tally needs a key with the read scope. Paste its secret; it is kept for this tab only.`);
  if (given === null) return false;
  token = given.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  tally.options.token = token;
  return true;
}

const tally = new Tally(undefined, {
  token: token || undefined,
  onState(state) {
    const pill = $("connection");
    pill.dataset.state = state;
    pill.textContent = { open: "live", connecting: "connecting", reconnecting: "reconnecting", closed: "offline" }[state] ?? state;
    if (state === "open" && wasDown) refreshCatalog().then(() => charts.forEach((c) => c.loadHistory()));
    wasDown = state !== "open";
  },
});

// ---- durations and numbers ----

function parseDuration(text) {
  const m = /^(\d+)(ms|s|m|h|d)$/.exec(text.trim());
  if (!m) return NaN;
  return Number(m[1]) * { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }[m[2]];
}

/** { size, step, tumbling, sizeText } of "tumbling 10s" or "sliding 5m every 10s". */
function parseWindow(text) {
  const parts = text.split(/\s+/);
  const size = parseDuration(parts[1]);
  const tumbling = parts[0] === "tumbling";
  return { size, step: tumbling ? size : parseDuration(parts[3]), tumbling, sizeText: parts[1] };
}

function format(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  const abs = Math.abs(value);
  if (abs >= 1e9) return (value / 1e9).toFixed(abs >= 1e10 ? 0 : 1) + "B";
  if (abs >= 1e6) return (value / 1e6).toFixed(abs >= 1e7 ? 0 : 1) + "M";
  if (abs >= 1e4) return (value / 1e3).toFixed(abs >= 1e5 ? 0 : 1) + "k";
  return Number.isInteger(value) ? String(value) : value.toFixed(2);
}

function clock(ms, seconds) {
  const d = new Date(ms);
  const pad = (n) => String(n).padStart(2, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}` + (seconds ? `:${pad(d.getSeconds())}` : "");
}

const esc = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

/** A quantiles value's quantiles, lowest first: [["0.5", 41.2], ...]. */
const quantiles = (value) => Object.entries(value ?? {}).sort((a, b) => Number(a[0]) - Number(b[0]));
const quantileLabel = (q) => `p${+(Number(q) * 100).toFixed(3)}`;

/**
 * A value as one number, for ranking groups and the tiles: a number as it
 * is, the highest quantile of a quantiles value, the events of a top list.
 */
function scalar(value) {
  if (value === null || value === undefined) return null;
  if (typeof value === "number") return value;
  if (Array.isArray(value)) return value.reduce((sum, item) => sum + item.count, 0);
  return quantiles(value).at(-1)?.[1] ?? null;
}

const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);

// ---- charts ----

class Chart {
  constructor(config) {
    this.config = config;
    this.metric = catalog.find((m) => m.name === config.metric);
    this.kind = this.metric?.aggregate;
    this.window = parseWindow(config.window);
    // group ("" without groupBy) -> Map(window start -> {value, final, revision, revisedAt})
    this.series = new Map();
    this.el = $("chart-template").content.firstElementChild.cloneNode(true);
    this.el.dataset.metric = config.metric;
    this.el.dataset.kind = this.kind ?? "";
    this.el.querySelector(".title").textContent = `${config.metric} · ${this.metric?.aggregate ?? ""}`;
    const filters = config.filters.map(([d, v]) => `${d}=${v}`).join(", ");
    const group = config.groupBy ? ` · top ${config.top} by ${config.groupBy}` : "";
    this.el.querySelector(".subtitle").textContent = `${config.window}${filters ? " · " + filters : ""}${group} · ${rangeLabel(config.range)}`;
    this.el.querySelector(".remove").onclick = () => removeChart(this);
    $("charts").append(this.el);
    const topic = ["metrics", config.metric, ...config.filters.flat()].join(":");
    this.unsubscribe = tally.subscribe(topic, { window: config.window, groupBy: config.groupBy || undefined, onError: (e) => this.showError(e) }, (m) => this.live(m));
    this.loadHistory();
  }

  /** The time range shown: [start, end). */
  range() {
    const { step } = this.window;
    if (typeof this.config.range === "object") return [this.config.range.start, this.config.range.end];
    const end = Math.ceil((Date.now() + 1) / step) * step;
    return [end - RANGES[this.config.range], end];
  }

  async loadHistory() {
    if (!this.window.tumbling) return; // history holds tumbling windows only
    const [start, end] = this.range();
    const params = new URLSearchParams({
      metric: this.config.metric,
      start: String(Math.floor(start / 1000)),
      end: String(Math.ceil(end / 1000)),
      resolution: this.window.sizeText,
    });
    for (const [d, v] of this.config.filters) params.append(d, v);
    // The server ranks the groups: only the top ones travel.
    if (this.config.groupBy) {
      params.set("groupBy", this.config.groupBy);
      params.set("top", String(this.config.top));
    }
    try {
      const response = await api(`/v1/metrics?${params}`);
      const body = await response.json();
      if (!response.ok) return this.showError(body.error ?? response.statusText);
      const series = body.series ?? [{ group: null, dataPoints: body.dataPoints }];
      this.groups = body.groups ?? 0;
      const now = Date.now();
      for (const s of series) {
        const points = this.points(s.group ? Object.values(s.group)[0] : "");
        for (const p of s.dataPoints) {
          const t = Date.parse(p.time);
          // Buckets not closed yet read as empty; live values own them.
          if (t + this.window.size > now - 1000) continue;
          const known = points.get(t);
          if (!known || (!known.final && p.value !== null)) points.set(t, { value: p.value, final: true, revision: -1 });
        }
      }
      this.showError(null);
      schedule(this);
    } catch (e) {
      this.showError(`history: ${e.message}`);
    }
  }

  points(group) {
    if (!this.series.has(group)) this.series.set(group, new Map());
    return this.series.get(group);
  }

  live(m) {
    const now = Date.now();
    // Freshness is event to screen: from when tally took the newest batch
    // this value includes. A final comes when its window closes, so it
    // says nothing about freshness.
    if (!m.final && m.ingestedAt) {
      lags.push(now - Date.parse(m.ingestedAt));
      if (lags.length > 50) lags.shift();
    }
    lastUpdate = now;
    const points = this.points(m.group ? Object.values(m.group)[0] : "");
    const start = Date.parse(m.windowStart);
    const known = points.get(start);
    const revisedAt = m.final && known?.final && (m.revision > known.revision || !same(known.value, m.value)) && known.revision >= 0 ? now : known?.revisedAt;
    points.set(start, { value: m.value, final: m.final, revision: m.revision, revisedAt });
    schedule(this);
  }

  showError(text) {
    const el = this.el.querySelector(".error");
    el.hidden = !text;
    el.textContent = text ?? "";
  }

  /** The groups drawn: all, or the top N by total over the range. */
  shown(start, end) {
    const totals = [...this.series].map(([group, points]) => {
      let total = 0;
      for (const [t, p] of points) if (t >= start && t < end) total += Math.abs(scalar(p.value) ?? 0);
      return [group, total];
    });
    totals.sort((a, b) => b[1] - a[1]);
    return this.config.groupBy ? totals.slice(0, this.config.top).map(([g]) => g) : [""];
  }

  render() {
    const [start, end] = this.range();
    const groups = this.shown(start, end);
    // Forget what scrolled out of a relative range.
    for (const points of this.series.values()) for (const t of points.keys()) if (t < start - this.window.size) points.delete(t);
    if (this.kind === "topk") return this.renderTop(groups[0]);
    this.renderTiles(groups[0]);
    const lines = this.lines(groups);
    const width = Math.max(280, this.el.querySelector(".plot").clientWidth || 560);
    const height = 220;
    const m = { l: 46, r: 8, t: 10, b: 22 };
    const { size, step } = this.window;
    // A window is drawn over its last step, so sliding windows do not overlap.
    const at = (t) => t + size - step;
    let lo = 0;
    let hi = 0;
    for (const line of lines) {
      for (const [t, p] of line.points) {
        if (at(t) < start || at(t) >= end || p.value === null) continue;
        lo = Math.min(lo, p.value);
        hi = Math.max(hi, p.value);
      }
    }
    if (hi === lo) hi = lo + 1;
    // Round the axis to a step of 1, 2 or 5 times a power of ten.
    const raw = (hi - lo) / 4;
    const power = 10 ** Math.floor(Math.log10(raw));
    const tick = [1, 2, 5, 10].map((f) => f * power).find((s) => s >= raw);
    lo = Math.floor(lo / tick) * tick;
    hi = Math.ceil((hi * 1.02) / tick) * tick;
    const x = (t) => m.l + ((t - start) / (end - start)) * (width - m.l - m.r);
    const y = (v) => m.t + (1 - (v - lo) / (hi - lo)) * (height - m.t - m.b);
    const parts = [];
    for (let v = lo; v <= hi + tick / 2; v += tick) {
      parts.push(`<line class="grid-line" x1="${m.l}" x2="${width - m.r}" y1="${y(v)}" y2="${y(v)}"/><g class="axis"><text x="${m.l - 6}" y="${y(v) + 3}" text-anchor="end">${format(v)}</text></g>`);
    }
    const ticks = 5;
    const seconds = end - start <= RANGES["15m"];
    for (let i = 0; i <= ticks; i++) {
      const t = start + ((end - start) * i) / ticks;
      parts.push(`<g class="axis"><text x="${x(t)}" y="${height - 6}" text-anchor="${i === 0 ? "start" : i === ticks ? "end" : "middle"}">${clock(t, seconds)}</text></g>`);
    }
    const now = Date.now();
    const bars = !this.config.groupBy && this.kind !== "quantiles" && (end - start) / step <= MAX_BARS;
    const legend = [];
    lines.forEach(({ label: g, points: all }, i) => {
      const colour = PALETTE[i % PALETTE.length];
      const points = all.filter(([t, p]) => at(t) >= start && at(t) < end && p.value !== null).sort((a, b) => a[0] - b[0]);
      if (bars) {
        const w = Math.max(1, x(start + step) - x(start) - 1);
        for (const [t, p] of points) {
          const classes = ["bar", p.final ? "" : "partial", p.revisedAt && now - p.revisedAt < REVISED_MS ? "revised" : ""].join(" ");
          const top = y(Math.max(p.value, 0));
          const h = Math.max(0, Math.abs(y(p.value) - y(0)));
          const tip = `${clock(t, true)} ${format(p.value)}${p.final ? "" : " (open)"}${p.revision > 0 ? ` · revision ${p.revision}` : ""}`;
          parts.push(`<rect class="${classes}" x="${x(at(t))}" y="${top}" width="${w}" height="${h}" data-start="${t}" data-value="${p.value}" data-final="${p.final}" data-revision="${p.revision}"><title>${esc(tip)}</title></rect>`);
          if (p.revision > 0) parts.push(`<circle class="revision" cx="${x(at(t)) + w / 2}" cy="${top - 4}" r="2.5"><title>revised ${p.revision}×</title></circle>`);
        }
      } else {
        const mid = (t) => x(at(t) + step / 2);
        const finals = points.filter(([, p]) => p.final);
        const d = finals.map(([t, p], k) => `${k ? "L" : "M"}${mid(t).toFixed(1)},${y(p.value).toFixed(1)}`).join("");
        parts.push(`<path class="series" stroke="${colour}" d="${d}" data-group="${esc(g)}"/>`);
        const open = points.filter(([, p]) => !p.final);
        if (open.length) {
          const from = finals.at(-1) ?? open[0];
          const dd = [from, ...open].map(([t, p], k) => `${k ? "L" : "M"}${mid(t).toFixed(1)},${y(p.value).toFixed(1)}`).join("");
          parts.push(`<path class="partial" stroke="${colour}" d="${dd}"/>`);
        }
        for (const [t, p] of finals) if (p.revision > 0) parts.push(`<circle class="revision" cx="${mid(t)}" cy="${y(p.value)}" r="2.5"><title>revised ${p.revision}×</title></circle>`);
        // The newest point, so a series of one point shows too.
        const last = points.at(-1);
        if (last) parts.push(`<circle cx="${mid(last[0])}" cy="${y(last[1].value)}" r="2.5" fill="${colour}"><title>${esc(g)} ${format(last[1].value)}${last[1].final ? "" : " (open)"}</title></circle>`);
      }
      if (lines.length > 1 || this.config.groupBy) legend.push(`<span data-swatch="${colour}">${esc(g || "(none)")}</span>`);
    });
    this.el.querySelector(".plot").innerHTML = `<svg viewBox="0 0 ${width} ${height}" preserveAspectRatio="none" role="img">${parts.join("")}</svg>`;
    const total = Math.max(this.series.size, this.groups ?? 0);
    const more = this.config.groupBy && total > groups.length ? `<span class="muted">top ${groups.length} of ${total}</span>` : "";
    const legendEl = this.el.querySelector(".legend");
    legendEl.innerHTML = legend.join("") + more;
    // Through the CSS object model: the page's Content-Security-Policy
    // allows no style attributes.
    for (const s of legendEl.querySelectorAll("[data-swatch]")) s.style.setProperty("--swatch", s.dataset.swatch);
  }

  /**
   * What the plot draws, each a label and its [start, point] pairs with a
   * number as value: a line or bars per group; for quantiles, a line per
   * quantile, or with groupBy each group's highest quantile.
   */
  lines(groups) {
    if (this.kind !== "quantiles") return groups.map((g) => ({ label: g, points: [...(this.series.get(g) ?? [])] }));
    const pick = (points, q) => points.filter(([, p]) => p.value?.[q] !== undefined).map(([t, p]) => [t, { ...p, value: p.value[q] }]);
    const asked = (g) => {
      const newest = [...(this.series.get(g) ?? []).values()].findLast((p) => p.value);
      return quantiles(newest?.value).map(([q]) => q);
    };
    if (!this.config.groupBy) {
      const points = [...(this.series.get(groups[0]) ?? [])];
      return asked(groups[0]).map((q) => ({ label: quantileLabel(q), points: pick(points, q) }));
    }
    return groups.map((g) => {
      const q = asked(g).at(-1);
      return { label: `${g} ${q ? quantileLabel(q) : ""}`.trim(), points: q ? pick([...(this.series.get(g) ?? [])], q) : [] };
    });
  }

  /** A top list: the newest window's items, ranked, each with its count, a bar, and a mark if it is new since the window before. */
  renderTop(group) {
    const points = [...(this.series.get(group) ?? [])].filter(([, p]) => p.value !== null).sort((a, b) => a[0] - b[0]);
    const current = points.at(-1);
    const before = current && points.filter(([t]) => t < current[0]).at(-1);
    const items = current?.[1].value ?? [];
    const earlier = new Set((before?.[1].value ?? []).map((i) => i.item));
    const most = Math.max(1, ...items.map((i) => i.count));
    const fresh = before ? items.filter((i) => !earlier.has(i.item)) : [];
    const suffix = this.config.groupBy && group ? `<small>${esc(group)}</small>` : "";
    const tile = (cls, html) => (this.el.querySelector(`.value.${cls}`).innerHTML = html);
    tile("current", items.length ? `${esc(items[0].item)}<small>${format(items[0].count)}${current[1].final ? "" : " open"}</small>${suffix}` : "–");
    const previousTop = before?.[1].value?.[0];
    tile("previous", previousTop ? `${esc(previousTop.item)}<small>${format(previousTop.count)}</small>` : "–");
    tile("change", before ? `${fresh.length}<small>new in the top</small>` : "–");
    const rows = items.map((i, rank) => {
      const bounds = i.lower === i.upper ? "exact" : `between ${i.lower} and ${i.upper}`;
      const trending = before && !earlier.has(i.item);
      return `<li data-item="${esc(i.item)}" data-count="${i.count}" data-share="${(i.count / most).toFixed(4)}"${trending ? ' class="trending"' : ""}>
        <span class="rank">${rank + 1}</span><span class="name" title="${esc(bounds)}">${esc(i.item)}</span>
        <span class="meter"><span></span></span><span class="count">${format(i.count)}</span>
        <span class="mark">${trending ? "▲ new" : ""}</span></li>`;
    });
    const when = current ? `${clock(current[0], true)}–${clock(current[0] + this.window.size, true)}${current[1].final ? "" : " (open)"}` : "";
    const plot = this.el.querySelector(".plot");
    plot.innerHTML = items.length ? `<ol class="top">${rows.join("")}</ol><div class="muted when">${esc(when)}</div>` : `<p class="muted">No events in this window yet.</p>`;
    // Through the CSS object model: the page's Content-Security-Policy
    // allows no style attributes.
    for (const li of plot.querySelectorAll("li[data-share]")) li.style.setProperty("--share", li.dataset.share);
    this.el.querySelector(".legend").innerHTML = "";
  }

  renderTiles(group) {
    const points = [...(this.series.get(group) ?? [])]
      .filter(([, p]) => p.value !== null)
      .map(([t, p]) => [t, { ...p, value: scalar(p.value) }])
      .sort((a, b) => a[0] - b[0]);
    const current = points.at(-1);
    const previous = current && points.filter(([t, p]) => t < current[0] && p.final).at(-1);
    const highest = this.kind === "quantiles" ? quantiles(this.series.get(group)?.get(current?.[0])?.value).at(-1) : null;
    const suffix = (highest ? `<small>${quantileLabel(highest[0])}</small>` : "") + (this.config.groupBy && group ? `<small>${esc(group)}</small>` : "");
    const set = (cls, html, value) => {
      const el = this.el.querySelector(`.value.${cls}`);
      el.innerHTML = html;
      el.dataset.value = value ?? "";
      return el;
    };
    set("current", current ? format(current[1].value) + (current[1].final ? "" : "<small>open</small>") + suffix : "–", current?.[1].value);
    set("previous", previous ? format(previous[1].value) : "–", previous?.[1].value);
    const change = set("change", "–", null);
    change.className = "value change";
    if (current && previous && previous[1].value) {
      const pct = ((current[1].value - previous[1].value) / Math.abs(previous[1].value)) * 100;
      change.textContent = `${pct >= 0 ? "+" : ""}${pct.toFixed(1)}%`;
      change.classList.add(pct >= 0 ? "up" : "down");
      if (!current[1].final) change.insertAdjacentHTML("beforeend", "<small>so far</small>");
    }
  }

  remove() {
    this.unsubscribe();
    this.el.remove();
  }
}

// Rendering is batched per animation frame.
const dirty = new Set();
let frame = null;
function schedule(chart) {
  dirty.add(chart);
  frame ??= requestAnimationFrame(() => {
    frame = null;
    for (const c of dirty) c.render();
    dirty.clear();
  });
}

function rangeLabel(range) {
  if (typeof range === "object") return `${new Date(range.start).toLocaleString()} – ${new Date(range.end).toLocaleString()}`;
  return { "15m": "last 15 min", "1h": "last hour", "24h": "last 24 h" }[range];
}

// ---- the chart list, kept in the URL so a view can be shared ----

function save() {
  const configs = charts.map((c) => c.config);
  const encoded = btoa(String.fromCharCode(...new TextEncoder().encode(JSON.stringify(configs))))
    .replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  history.replaceState(null, "", `#charts=${encoded}`);
  localStorage.setItem("tally.charts", JSON.stringify(configs));
  $("empty").hidden = charts.length > 0;
}

function restore() {
  const hash = new URLSearchParams(location.hash.slice(1)).get("charts");
  try {
    if (hash) {
      const base64 = hash.replace(/-/g, "+").replace(/_/g, "/");
      return JSON.parse(new TextDecoder().decode(Uint8Array.from(atob(base64), (c) => c.charCodeAt(0))));
    }
    const stored = localStorage.getItem("tally.charts");
    if (stored) return JSON.parse(stored);
  } catch {
    // An unreadable saved view falls back to the defaults.
  }
  return catalog.map((m) => ({
    metric: m.name,
    window: m.windows.find((w) => w.startsWith("tumbling")) ?? m.windows[0],
    filters: [],
    groupBy: "",
    top: 5,
    range: "15m",
  }));
}

function addChart(config) {
  if (!catalog.some((m) => m.name === config.metric)) return;
  charts.push(new Chart(config));
  save();
}

function removeChart(chart) {
  chart.remove();
  charts.splice(charts.indexOf(chart), 1);
  save();
}

// ---- the form ----

let pendingFilters = [];

function fillForm() {
  const metric = catalog.find((m) => m.name === $("metric").value) ?? catalog[0];
  $("window").innerHTML = metric.windows.map((w) => `<option>${esc(w)}</option>`).join("");
  const dims = metric.dimensions.map((d) => `<option>${esc(d)}</option>`).join("");
  $("filter-dim").innerHTML = dims;
  $("group-by").innerHTML = `<option value="">none</option>${dims}`;
  pendingFilters = pendingFilters.filter(([d]) => metric.dimensions.includes(d));
  renderChips();
  suggestValues();
}

async function suggestValues() {
  const metric = $("metric").value;
  const dim = $("filter-dim").value;
  if (!metric || !dim) return;
  const now = Math.floor(Date.now() / 1000);
  const m = catalog.find((c) => c.name === metric);
  const tumbling = m.windows.map(parseWindow).filter((w) => w.tumbling).sort((a, b) => b.size - a.size)[0];
  const params = new URLSearchParams({ metric, start: String(now - 3600), end: String(now), resolution: tumbling.sizeText, groupBy: dim });
  try {
    const body = await (await api(`/v1/metrics?${params}`)).json();
    const values = (body.series ?? []).map((s) => Object.values(s.group)[0]).filter(Boolean);
    $("filter-values").innerHTML = values.map((v) => `<option value="${esc(v)}">`).join("");
  } catch {
    // Suggestions are a convenience; typing a value works without them.
  }
}

function renderChips() {
  $("filters").innerHTML = pendingFilters.map(([d, v], i) => `<span class="chip">${esc(d)} = ${esc(v)}<button type="button" data-i="${i}" aria-label="remove">×</button></span>`).join("");
}

function wireForm() {
  $("metric").innerHTML = catalog.map((m) => `<option>${esc(m.name)}</option>`).join("");
  $("metric").onchange = fillForm;
  $("filter-dim").onchange = suggestValues;
  $("range").onchange = () => ($("custom-range").hidden = $("range").value !== "custom");
  $("add-filter").onclick = () => {
    const value = $("filter-value").value.trim();
    if (!value) return;
    pendingFilters.push([$("filter-dim").value, value]);
    $("filter-value").value = "";
    renderChips();
  };
  $("filters").onclick = (e) => {
    if (e.target.dataset.i === undefined) return;
    pendingFilters.splice(Number(e.target.dataset.i), 1);
    renderChips();
  };
  $("add").onsubmit = (e) => {
    e.preventDefault();
    let range = $("range").value;
    if (range === "custom") {
      const start = Date.parse($("range-start").value);
      const end = Date.parse($("range-end").value);
      if (!(start < end)) return alert("Pick a start before the end.");
      range = { start, end };
    }
    addChart({
      metric: $("metric").value,
      window: $("window").value,
      filters: pendingFilters,
      groupBy: $("group-by").value,
      top: Math.min(20, Math.max(1, Number($("top").value) || 5)),
      range,
    });
    pendingFilters = [];
    renderChips();
  };
  fillForm();
}

// ---- the catalog: versions and backfills ----

const CATALOG_EVERY_MS = 5000;

/** Reads the catalog again: a chart whose metric has a new active version reloads its history. */
async function refreshCatalog() {
  let fresh;
  try {
    // A server restarting, or one that now wants another key, answers
    // with an error: keep the catalog until it answers again.
    const response = await api("/v1/catalog");
    if (!response.ok) return;
    fresh = (await response.json()).metrics;
  } catch {
    return;
  }
  if (!Array.isArray(fresh)) return;
  const before = new Map(catalog.map((m) => [m.name, m.version]));
  catalog = fresh;
  for (const chart of charts) {
    const metric = catalog.find((m) => m.name === chart.config.metric);
    if (!metric || before.get(metric.name) === metric.version) continue;
    chart.metric = metric;
    chart.series.clear();
    chart.loadHistory();
  }
  if (catalog.map((m) => m.name).join() !== [...before.keys()].join()) {
    const chosen = $("metric").value;
    $("metric").innerHTML = catalog.map((m) => `<option>${esc(m.name)}</option>`).join("");
    if (catalog.some((m) => m.name === chosen)) $("metric").value = chosen;
    fillForm();
  }
  showBackfills();
}

/** A progress bar per metric whose next version is being computed from the log. */
function showBackfills() {
  const building = catalog.filter((m) => m.backfill);
  $("backfills").hidden = building.length === 0;
  $("backfills").innerHTML = building
    .map((m) => {
      const b = m.backfill;
      const percent = Math.floor(b.progress * 100);
      const serving = m.version ? "the current version serves meanwhile" : "new metric";
      // Once the log is read, it meets the live job on the next events.
      const end =
        b.progress >= 1
          ? " · caught up; active with the next events"
          : b.expectedEnd
            ? ` · done about ${new Date(b.expectedEnd).toLocaleTimeString()}`
            : "";
      return `<div class="backfill" data-metric="${esc(m.name)}">
        <span><b>${esc(m.name)}</b>: computing its new definition from the log (${serving})</span>
        <progress max="100" value="${percent}"></progress>
        <span class="muted">${percent}%${b.progress >= 1 ? "" : ` · ${format(b.eventsPerSecond)} records/s`}${end}</span>
      </div>`;
    })
    .join("");
}

// ---- start ----

async function start() {
  for (;;) {
    try {
      const response = await api("/v1/catalog");
      const body = await response.json();
      if (response.status === 401 || response.status === 403) {
        if (!askForToken(body.error)) await new Promise((r) => setTimeout(r, 2000));
        continue;
      }
      catalog = body.metrics;
      break;
    } catch {
      await new Promise((r) => setTimeout(r, 2000));
    }
  }
  wireForm();
  for (const config of restore()) addChart(config);
  save();
  showBackfills();
  setInterval(refreshCatalog, CATALOG_EVERY_MS);
  // Relative ranges slide with the clock; the freshness line ages.
  setInterval(() => {
    for (const c of charts) if (typeof c.config.range !== "object") schedule(c);
    const sorted = [...lags].sort((a, b) => a - b);
    const lag = sorted.length ? sorted[Math.floor(sorted.length / 2)] : null;
    const age = lastUpdate ? ((Date.now() - lastUpdate) / 1000).toFixed(1) : null;
    $("freshness").textContent = lag === null ? "waiting for data" : `event to screen ${Math.max(0, lag)} ms · updated ${age} s ago`;
  }, 1000);
}

start();
