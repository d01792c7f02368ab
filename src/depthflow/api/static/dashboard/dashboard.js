// depthflow live dashboard: one server-sent-events stream, a few panels, charts drawn by hand.
//
// The charts are plain <canvas> drawing, no charting library: there is no vendored dependency to
// keep current (or audit, or ship a licence for), the page works offline, and a few hundred
// points per series is nothing to redraw on every frame.
"use strict";

const MAX_SYMBOLS = 6;
const POINTS = 600;           // the server's ring per symbol
const SPARK = 120;            // samples kept for the KPI sparklines (a minute at 2 frames/s)
const STALE_MS = 4000;        // no frame for this long: the stream pill turns amber
const COLORS = {
  wap: "#60a5fa", short: "#f5b041", long: "#b28cff", bid: "#22c389", ask: "#f2545b",
  grid: "rgba(148, 163, 184, 0.09)", axis: "#5d6a80", text: "#8d99ae",
};

// window.__depthflow is read by the browser test; it is also handy in the console.
const stats = (window.__depthflow = { updates: 0, points: 0, ladderRows: 0, frame: 0, lastUpdateId: {}, symbols: [] });
const $ = (id) => document.getElementById(id);
const state = {
  chosen: loadChoice(),       // symbols asked for ([] = let the server pick the busiest)
  series: new Map(),          // symbol -> {next, points, markers}
  panels: new Map(),          // symbol -> panel elements
  last: null,                 // the latest frame
  lastAt: 0,
  msgSpark: [], tickSpark: [],
  source: null,
  allSymbols: [], allFetchedAt: 0,
};

// -- formatting ---------------------------------------------------------------------------------

const pad = (n) => String(n).padStart(2, "0");
const clock = (s) => { const d = new Date(s * 1000); return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`; };
const int = (n) => (n == null ? "–" : Math.round(n).toLocaleString("en-US"));
function bps(b) { return b == null ? "–" : `${b >= 10 ? b.toFixed(1) : b.toPrecision(2)} bp`; }
function rate(n) { return n == null ? "–" : n >= 100 ? int(n) : n.toFixed(1); }
function seconds(s) {
  if (s == null) return "–";
  if (s < 0.001) return `${(s * 1e6).toFixed(0)} µs`;
  if (s < 1) return `${(s * 1e3).toFixed(s < 0.01 ? 2 : 1)} ms`;
  return `${s.toFixed(2)} s`;
}
function uptime(s) {
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return h ? `up ${h} h ${m} min` : m ? `up ${m} min ${Math.floor(s % 60)} s` : `up ${Math.floor(s)} s`;
}
function qty(q) {
  if (q >= 1e6) return (q / 1e6).toFixed(2) + "M";
  if (q >= 1e4) return (q / 1e3).toFixed(1) + "k";
  return q >= 100 ? q.toFixed(1) : q.toFixed(q >= 1 ? 3 : 4);
}
// Decimals that tell adjacent price levels apart (the tick size), 2 to 8.
function decimalsOf(levels) {
  let step = Infinity;
  for (let i = 1; i < levels.length; i++) step = Math.min(step, Math.abs(levels[i][0] - levels[i - 1][0]));
  if (!isFinite(step) || step <= 0) return 2;
  return Math.min(8, Math.max(2, Math.ceil(-Math.log10(step) - 1e-9)));
}
const price = (p, d) => (p == null ? "–" : p.toLocaleString("en-US", { minimumFractionDigits: d, maximumFractionDigits: d }));
const el = (tag, cls, text) => { const e = document.createElement(tag); if (cls) e.className = cls; if (text != null) e.textContent = text; return e; };

// -- the stream ----------------------------------------------------------------------------------

function connect() {
  if (state.source) state.source.close();
  const query = state.chosen.length ? `?symbols=${encodeURIComponent(state.chosen.join(","))}` : "";
  const source = new EventSource(`dashboard/stream${query}`);
  source.onmessage = (event) => onFrame(JSON.parse(event.data));
  source.onerror = () => setPill("stream", "bad");
  state.source = source;
}

function onFrame(frame) {
  state.last = frame;
  state.lastAt = Date.now();
  stats.updates += 1;
  stats.frame = frame.frame;
  const symbols = Object.keys(frame.books);
  // What the server shows: its default pick, or our choice less the symbols it does not follow.
  if (symbols.length) state.chosen = symbols;
  stats.symbols = symbols;
  for (const [symbol, book] of Object.entries(frame.books)) mergeChart(symbol, book.chart);
  push(state.msgSpark, frame.service.message_rate);
  push(state.tickSpark, frame.service.tick_rate);
  render();
}

function push(list, value) { list.push(value); if (list.length > SPARK) list.shift(); }

// `from` equal to what we hold as `next`: append; anything else: the server sent a whole window.
function mergeChart(symbol, chart) {
  if (!chart) return;
  let s = state.series.get(symbol);
  if (!s || chart.from !== s.next) s = { next: chart.from, points: [], markers: [] };
  s.points = s.points.concat(chart.points);
  if (s.points.length > POINTS) s.points = s.points.slice(s.points.length - POINTS);
  s.next = chart.next;
  s.markers = chart.markers;
  state.series.set(symbol, s);
}

// -- rendering -----------------------------------------------------------------------------------

function render() {
  const f = state.last, svc = f.service;
  $("frame").textContent = int(f.frame);
  $("uptime").textContent = uptime(svc.uptime_s);
  setPill("stream", "ok");
  setPill("feed", svc.feed === "ok" ? "ok" : svc.feed === "disabled" ? "" : svc.feed === "syncing" ? "warn" : "bad");
  setPill("database", svc.database === "ok" ? "ok" : svc.database === "slow" ? "warn" : "bad");
  setPill("redis", svc.redis === "ok" ? "ok" : svc.redis === "disabled" ? "" : "bad");

  $("k-msg").textContent = rate(svc.message_rate);
  $("k-tick").textContent = rate(svc.tick_rate);
  sparkline($("s-msg"), state.msgSpark, COLORS.wap);
  sparkline($("s-tick"), state.tickSpark, COLORS.bid);
  $("k-lat").replaceChildren(seconds(svc.latency.p50), el("small", "", seconds(svc.latency.p99)));
  $("k-lat-sub").textContent = `avg ${seconds(svc.latency.avg)} · max ${seconds(svc.latency.max)}`;
  $("k-lat-sub").title = `frame receipt to tick; event-loop lag (max, last minute) ${seconds(svc.loop_lag_max)}`;
  const live = svc.books.live || 0;
  $("k-books").replaceChildren(int(live), el("small", "", `of ${int(svc.symbols)}`));
  $("k-books-sub").textContent = `${int(svc.connections)} connection${svc.connections === 1 ? "" : "s"} · ${int(svc.resyncs)} resyncs`;
  $("k-loss").textContent = int(svc.loss_total);
  const lossRate = svc.messages ? (100 * svc.loss_total) / svc.messages : 0;
  $("k-loss-sub").textContent = `${lossRate.toFixed(2)} % of messages · ${int(svc.errors)} errors`;
  $("k-sig").replaceChildren(int(svc.signals.open || 0), el("small", "", `· ${int(svc.signals.close || 0)}`));
  $("k-sig-sub").textContent = `SMA ${svc.sma_short} / ${svc.sma_long} crossovers`;

  renderPicker(f);
  renderPanels(f);
  renderLoss(svc.loss);
  renderGaps(f.gaps);
  renderSignals(f.signals);
}

function setPill(name, cls) {
  const pill = document.querySelector(`.pill[data-check="${name}"]`);
  pill.className = `pill ${cls}`;
}

function renderPicker(f) {
  const chosen = $("chosen");
  chosen.replaceChildren(...state.chosen.map((s) => {
    const chip = el("span", "chip on", s);
    chip.append(el("span", "x", "×"));
    chip.title = "Remove";
    chip.onclick = () => choose(state.chosen.filter((c) => c !== s));
    return chip;
  }));
  $("busiest").replaceChildren(...f.top.map((row) => {
    const chip = el("span", state.chosen.includes(row.symbol) ? "chip on" : "chip", row.symbol);
    chip.append(el("span", "r", `${rate(row.rate)}/s`));
    chip.onclick = () => toggle(row.symbol);
    return chip;
  }));
  $("symbol-count").textContent = `${int(f.service.symbols)} symbols followed · ${int(f.service.clients)} viewer${f.service.clients === 1 ? "" : "s"}`;
}

function renderPanels(f) {
  const box = $("panels");
  for (const [symbol, panel] of state.panels) {
    if (!(symbol in f.books)) { panel.root.remove(); state.panels.delete(symbol); }
  }
  let points = 0, rows = 0;
  for (const symbol of Object.keys(f.books)) {
    let panel = state.panels.get(symbol);
    if (!panel) { panel = makePanel(symbol); state.panels.set(symbol, panel); }
    box.append(panel.root); // keeps the panels in the order chosen
    const book = f.books[symbol];
    const top = f.top.find((row) => row.symbol === symbol);
    rows += renderBook(panel, book, top);
    points += drawPanel(panel);
  }
  stats.points = points;
  stats.ladderRows = rows;
}

function makePanel(symbol) {
  const root = $("panel-template").content.firstElementChild.cloneNode(true);
  const q = (sel) => root.querySelector(sel);
  const panel = {
    root, symbol, canvas: q(".chart"), rows: q(".ladder-rows"), hover: null, lastWap: null,
    state: q(".state"), wap: q(".wap"), spread: q(".spread"), rate: q(".rate"), uid: q(".uid"),
    mid: q(".mid"), readout: q(".readout"),
  };
  q(".symbol").textContent = symbol;
  for (let i = 0; i < 20; i++) {
    const row = el("div", "lrow");
    for (const cls of ["c", "q", "bp", "ap", "q", "c"]) row.append(el("span", cls));
    panel.rows.append(row);
  }
  panel.canvas.addEventListener("mousemove", (e) => { panel.hover = e.offsetX; drawPanel(panel); });
  panel.canvas.addEventListener("mouseleave", () => { panel.hover = null; drawPanel(panel); });
  new ResizeObserver(() => drawPanel(panel)).observe(panel.canvas);
  return panel;
}

function renderBook(panel, book, top) {
  const svc = state.last.service;
  panel.root.querySelector(".sma-short").textContent = `SMA ${svc.sma_short}`;
  panel.root.querySelector(".sma-long").textContent = `SMA ${svc.sma_long}`;
  panel.state.textContent = (book.state || "unknown").replace("_", " ");
  panel.state.className = `badge state ${book.state || "unknown"}`;
  const bids = book.bids || [], asks = book.asks || [];
  const d = decimalsOf(bids.length > 1 ? bids : asks);
  const s = state.series.get(panel.symbol);
  const wap = s && s.points.length ? s.points[s.points.length - 1][1] : null;
  panel.wap.textContent = price(wap, d + 1);
  panel.wap.className = `v wap ${wap == null || panel.lastWap == null || wap === panel.lastWap ? "" : wap > panel.lastWap ? "up" : "down"}`;
  panel.lastWap = wap;
  panel.spread.textContent = book.spread == null ? "–" : `${price(book.spread, d)} · ${bps(book.spread_bps)}`;
  panel.rate.textContent = top ? rate(top.rate) : "–";
  panel.uid.textContent = book.last_update_id == null ? "–" : int(book.last_update_id);
  stats.lastUpdateId[panel.symbol] = book.last_update_id;
  panel.mid.textContent = book.mid == null ? "no book" : `mid ${price(book.mid, d + 1)} · ${bids.length} bids · ${asks.length} asks`;
  const maxCum = Math.max(bids.length ? bids[bids.length - 1][2] : 0, asks.length ? asks[asks.length - 1][2] : 0) || 1;
  let filled = 0;
  panel.rows.childNodes.forEach((row, i) => {
    const b = bids[i], a = asks[i], cells = row.childNodes;
    cells[0].textContent = b ? qty(b[2]) : "";
    cells[1].textContent = b ? qty(b[1]) : "";
    cells[2].textContent = b ? price(b[0], d) : "";
    cells[3].textContent = a ? price(a[0], d) : "";
    cells[4].textContent = a ? qty(a[1]) : "";
    cells[5].textContent = a ? qty(a[2]) : "";
    row.style.setProperty("--b", b ? `${(50 * b[2]) / maxCum}%` : "0%");
    row.style.setProperty("--a", a ? `${(50 * a[2]) / maxCum}%` : "0%");
    if (a || b) filled += 1;
  });
  return filled;
}

function renderLoss(loss) {
  const entries = Object.entries(loss).filter(([, n]) => n > 0);
  const box = $("loss");
  if (!entries.length) { box.replaceChildren(el("p", "empty", "No data lost.")); return; }
  const max = Math.max(...entries.map(([, n]) => n));
  box.replaceChildren(...entries.map(([reason, n]) => {
    const bar = el("div", "bar");
    const track = el("div", "track"), fill = el("div", "fill");
    fill.style.width = `${Math.max(2, (100 * n) / max)}%`;
    track.append(fill);
    bar.append(el("span", "name", reason), track, el("span", "n", int(n)));
    return bar;
  }));
}

function renderRows(bodyId, emptyId, rows, cells) {
  const body = $(bodyId), seen = new Set([...body.rows].map((r) => r.dataset.key));
  body.replaceChildren(...rows.map((row) => {
    const tr = el("tr");
    tr.dataset.key = `${row.symbol}:${row.last_update_id ?? row.to_update_id}:${row.time}`;
    if (seen.size && !seen.has(tr.dataset.key)) tr.className = "fresh";
    for (const cell of cells(row)) tr.append(cell);
    return tr;
  }));
  $(emptyId).hidden = rows.length > 0;
}

function renderGaps(gaps) {
  renderRows("gaps", "gaps-empty", gaps, (g) => [
    el("td", "", g.time == null ? "–" : clock(g.time)), el("td", "", g.symbol),
    tagCell(g.reason), el("td", "num", `${int(g.from_update_id)}–${int(g.to_update_id)}`), el("td", "num", int(g.missing)),
  ]);
}

function renderSignals(signals) {
  renderRows("signals", "signals-empty", signals, (s) => [
    el("td", "", clock(s.time)), el("td", "", s.symbol), tagCell(s.signal),
    el("td", "num", price(s.price, 4)), el("td", "num", `${price(s.sma_short, 4)} · ${price(s.sma_long, 4)}`),
  ]);
}

function tagCell(text) { const td = el("td"); td.append(el("span", `tag ${text}`, text)); return td; }

// -- canvas drawing ------------------------------------------------------------------------------

function fitCanvas(canvas) {
  const dpr = window.devicePixelRatio || 1, w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  return { ctx, w, h };
}

function niceStep(range, count) {
  const raw = range / count, mag = Math.pow(10, Math.floor(Math.log10(raw))), r = raw / mag;
  return mag * (r < 1.5 ? 1 : r < 3 ? 2 : r < 7 ? 5 : 10);
}

// Returns how many points it drew.
function drawPanel(panel) {
  const s = state.series.get(panel.symbol);
  const { ctx, w, h } = fitCanvas(panel.canvas);
  const pts = s ? s.points : [];
  const L = 10, R = 78, T = 14, B = 24, pw = w - L - R, ph = h - T - B;
  ctx.font = "11px ui-monospace, Menlo, Consolas, 'DejaVu Sans Mono', monospace";
  if (pts.length < 2 || pw < 10 || ph < 10) {
    ctx.fillStyle = COLORS.text;
    ctx.textAlign = "center";
    ctx.fillText(pts.length ? "collecting ticks…" : "waiting for the first ticks…", w / 2, h / 2);
    return pts.length;
  }
  let lo = Infinity, hi = -Infinity;
  for (const p of pts) for (let k = 1; k < 4; k++) if (p[k] != null) { lo = Math.min(lo, p[k]); hi = Math.max(hi, p[k]); }
  if (hi - lo < 1e-12) { hi += 0.5; lo -= 0.5; }
  const padY = (hi - lo) * 0.08; lo -= padY; hi += padY;
  const t0 = pts[0][0], t1 = pts[pts.length - 1][0], span = Math.max(t1 - t0, 1e-6);
  const x = (t) => L + ((t - t0) / span) * pw, y = (v) => T + (1 - (v - lo) / (hi - lo)) * ph;

  // grid and axes
  const step = niceStep(hi - lo, 5), d = Math.max(0, Math.min(8, Math.ceil(-Math.log10(step))));
  ctx.strokeStyle = COLORS.grid; ctx.lineWidth = 1; ctx.fillStyle = COLORS.text; ctx.textAlign = "left"; ctx.textBaseline = "middle";
  const lastY = y(pts[pts.length - 1][1]);
  for (let v = Math.ceil(lo / step) * step; v <= hi; v += step) {
    const yy = Math.round(y(v)) + 0.5;
    ctx.beginPath(); ctx.moveTo(L, yy); ctx.lineTo(L + pw, yy); ctx.stroke();
    if (Math.abs(yy - lastY) > 14) ctx.fillText(price(v, d), L + pw + 8, yy); // not under the price tag
  }
  const tStep = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600].find((c) => span / c <= 6) || 3600;
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  for (let t = Math.ceil(t0 / tStep) * tStep; t <= t1; t += tStep) {
    const xx = Math.round(x(t)) + 0.5;
    ctx.beginPath(); ctx.moveTo(xx, T); ctx.lineTo(xx, T + ph); ctx.stroke();
    if (xx > L + 28 && xx < L + pw - 28) ctx.fillText(clock(t), xx, T + ph + 7);
  }

  // WAP area, then the averages, then the WAP line on top
  const grad = ctx.createLinearGradient(0, T, 0, T + ph);
  grad.addColorStop(0, "rgba(96, 165, 250, 0.22)"); grad.addColorStop(1, "rgba(96, 165, 250, 0)");
  ctx.beginPath(); ctx.moveTo(x(pts[0][0]), T + ph);
  for (const p of pts) ctx.lineTo(x(p[0]), y(p[1]));
  ctx.lineTo(x(t1), T + ph); ctx.closePath(); ctx.fillStyle = grad; ctx.fill();
  line(ctx, pts, 3, x, y, COLORS.long, 1.4);
  line(ctx, pts, 2, x, y, COLORS.short, 1.4);
  line(ctx, pts, 1, x, y, COLORS.wap, 1.8);

  // signal markers: open below the price, close above it
  for (const [, t, kind, p] of s.markers) {
    if (t < t0 || t > t1) continue;
    const xx = x(t), yy = y(p), up = kind === "open", o = up ? 9 : -9;
    ctx.fillStyle = up ? COLORS.bid : COLORS.ask;
    ctx.shadowColor = ctx.fillStyle; ctx.shadowBlur = 8;
    ctx.beginPath(); ctx.moveTo(xx, yy + o - (up ? 6 : -6)); ctx.lineTo(xx - 5, yy + o + (up ? 3 : -3)); ctx.lineTo(xx + 5, yy + o + (up ? 3 : -3)); ctx.closePath(); ctx.fill();
    ctx.shadowBlur = 0;
  }

  // last price tag on the axis
  const last = pts[pts.length - 1], ly = y(last[1]);
  ctx.setLineDash([3, 3]); ctx.strokeStyle = "rgba(96, 165, 250, 0.5)";
  ctx.beginPath(); ctx.moveTo(L, ly); ctx.lineTo(L + pw, ly); ctx.stroke(); ctx.setLineDash([]);
  ctx.fillStyle = COLORS.wap; roundRect(ctx, L + pw + 2, ly - 9, R - 4, 18, 4); ctx.fill();
  ctx.fillStyle = "#0a0e16"; ctx.textAlign = "left"; ctx.textBaseline = "middle";
  ctx.fillText(price(last[1], d + 1), L + pw + 7, ly);

  drawHover(panel, ctx, pts, x, y, L, T, pw, ph, t0, span, d);
  return pts.length;
}

function line(ctx, pts, k, x, y, color, width) {
  ctx.strokeStyle = color; ctx.lineWidth = width; ctx.lineJoin = "round"; ctx.beginPath();
  let pen = false;
  for (const p of pts) {
    if (p[k] == null) { pen = false; continue; }
    if (pen) ctx.lineTo(x(p[0]), y(p[k])); else { ctx.moveTo(x(p[0]), y(p[k])); pen = true; }
  }
  ctx.stroke();
}

function roundRect(ctx, x, y, w, h, r) {
  ctx.beginPath(); ctx.moveTo(x + r, y); ctx.arcTo(x + w, y, x + w, y + h, r); ctx.arcTo(x + w, y + h, x, y + h, r);
  ctx.arcTo(x, y + h, x, y, r); ctx.arcTo(x, y, x + w, y, r); ctx.closePath();
}

function drawHover(panel, ctx, pts, x, y, L, T, pw, ph, t0, span, d) {
  if (panel.hover == null || panel.hover < L || panel.hover > L + pw) { panel.readout.textContent = ""; return; }
  const t = t0 + ((panel.hover - L) / pw) * span;
  let best = pts[0];
  for (const p of pts) if (Math.abs(p[0] - t) < Math.abs(best[0] - t)) best = p;
  const xx = Math.round(x(best[0])) + 0.5;
  ctx.strokeStyle = "rgba(230, 235, 243, 0.35)"; ctx.lineWidth = 1;
  ctx.beginPath(); ctx.moveTo(xx, T); ctx.lineTo(xx, T + ph); ctx.stroke();
  ctx.fillStyle = COLORS.wap; ctx.beginPath(); ctx.arc(xx, y(best[1]), 3.5, 0, 2 * Math.PI); ctx.fill();
  const f = (v) => (v == null ? "–" : price(v, d + 1));
  panel.readout.textContent = `${clock(best[0])}  WAP ${f(best[1])}  S ${f(best[2])}  L ${f(best[3])}`;
}

function sparkline(canvas, values, color) {
  const { ctx, w, h } = fitCanvas(canvas);
  if (values.length < 2) return;
  // Stretched over the card until SPARK samples exist; 0 at the bottom, the peak near the top.
  const max = Math.max(...values, 1e-9) * 1.15, n = values.length, span = Math.max(n, 2) - 1;
  const x = (i) => (i / span) * w, y = (v) => h - 1 - (v / max) * (h - 4);
  const off = 0;
  const grad = ctx.createLinearGradient(0, 0, 0, h);
  grad.addColorStop(0, color + "55"); grad.addColorStop(1, color + "00");
  ctx.beginPath(); ctx.moveTo(x(off), h);
  values.forEach((v, i) => ctx.lineTo(x(off + i), y(v)));
  ctx.lineTo(x(off + n - 1), h); ctx.closePath(); ctx.fillStyle = grad; ctx.fill();
  ctx.beginPath(); values.forEach((v, i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, x(off + i), y(v)));
  ctx.strokeStyle = color; ctx.lineWidth = 1.5; ctx.stroke();
}

// -- choosing symbols -----------------------------------------------------------------------------

function loadChoice() {
  const hash = new URLSearchParams(location.hash.slice(1)).get("symbols");
  const saved = hash != null ? hash : localStorage.getItem("depthflow.symbols") || "";
  return saved.split(",").map((s) => s.trim().toUpperCase()).filter(Boolean).slice(0, MAX_SYMBOLS);
}

function choose(symbols) {
  state.chosen = [...new Set(symbols)].slice(0, MAX_SYMBOLS);
  localStorage.setItem("depthflow.symbols", state.chosen.join(","));
  history.replaceState(null, "", state.chosen.length ? `#symbols=${state.chosen.join(",")}` : location.pathname);
  connect();
}

function toggle(symbol) {
  choose(state.chosen.includes(symbol) ? state.chosen.filter((s) => s !== symbol) : [...state.chosen, symbol]);
}

async function loadSymbols() {
  if (Date.now() - state.allFetchedAt < 15000) return;
  state.allFetchedAt = Date.now();
  const response = await fetch("dashboard/symbols");
  if (!response.ok) return;
  state.allSymbols = await response.json();
  $("all-symbols").replaceChildren(...state.allSymbols.map((row) => {
    const option = el("option"); option.value = row.symbol; option.label = `${row.state} · ${rate(row.rate)}/s`; return option;
  }));
}

$("add-input").addEventListener("focus", loadSymbols);
$("add-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = $("add-input"), symbol = input.value.trim().toUpperCase();
  const known = !state.allSymbols.length || state.allSymbols.some((row) => row.symbol === symbol);
  input.value = "";
  input.placeholder = known ? "Add symbol…" : `${symbol} is not followed`;
  if (symbol && known && !state.chosen.includes(symbol)) choose([...state.chosen, symbol]);
});

setInterval(() => { if (state.lastAt && Date.now() - state.lastAt > STALE_MS) setPill("stream", "warn"); }, 1000);
loadSymbols();
connect();
