// The coordinator's live dashboard: one fetch of api/state, then increments from the
// Server-Sent Events of events?since=N until the run has finished. Charts are uPlot.
"use strict";

const SKIP_WINDOW = 20; // rounds in the skip rate's moving mean
const COLORS = { up: "#2f6fde", down: "#12a150", diag: "#c98a04", payload: "#7a5af8", grad: "#d92d20", skip: "#98a2b3" };

// ---------------------------------------------------------------- the run, as columns

const run = {
  n: 1,
  planned: 0,
  config: null,
  cols: { round: [], bits: [], grad: [], gradPartial: [], up: [], down: [], diag: [], dUp: [], dDown: [], dPayload: [], skip: [], skipMean: [] },
  prev: { bits_up_per_worker: 0, wire_bytes_up: 0, wire_bytes_down: 0 },
  skipWindow: [],
  skipTotal: 0,
  last: null, // the latest row
  lastGrad: null, // the latest row with diagnostics
  // Rounds whose figures are over fewer than n workers (some sent no diagnostics: gone, late):
  // how many, the first and last, where the current run of them began, and over how many now.
  partial: { rounds: 0, first: null, last: null, since: null, now: null },
  events: 0,
};

function addRows(rows) {
  const c = run.cols;
  for (const row of rows) {
    const p = run.prev;
    c.round.push(row.round);
    c.bits.push(row.bits_up_per_worker);
    const g = row.grad_norm_sq;
    c.grad.push(g != null && g > 0 ? g : null); // a log scale has no place for 0
    const partial = g != null && row.diag_workers != null && row.diag_workers < run.n;
    c.gradPartial.push(partial && g > 0 ? g : null);
    if (g != null) notePartial(row, partial);
    c.up.push(row.wire_bytes_up);
    c.down.push(row.wire_bytes_down);
    c.diag.push(row.diag_bytes_up);
    c.dUp.push(row.wire_bytes_up - p.wire_bytes_up);
    c.dDown.push(row.wire_bytes_down - p.wire_bytes_down);
    c.dPayload.push(((row.bits_up_per_worker - p.bits_up_per_worker) * run.n) / 8);
    const rate = row.skips / run.n;
    c.skip.push(rate);
    run.skipWindow.push(rate);
    if (run.skipWindow.length > SKIP_WINDOW) run.skipWindow.shift();
    c.skipMean.push(run.skipWindow.reduce((a, b) => a + b, 0) / run.skipWindow.length);
    run.skipTotal += row.skips;
    run.prev = row;
    run.last = row;
    if (g != null) run.lastGrad = row;
  }
}

function notePartial(row, partial) {
  const p = run.partial;
  if (!partial) {
    p.now = null;
    return;
  }
  if (p.now == null) p.since = row.round;
  if (p.first == null) p.first = row.round;
  p.rounds += 1;
  p.last = row.round;
  p.now = row.diag_workers;
}

// ---------------------------------------------------------------- formatting

function si(x, unit, base = 1000) {
  if (x == null || !isFinite(x)) return "–";
  const prefixes = ["", "k", "M", "G", "T", "P"];
  let i = 0;
  while (Math.abs(x) >= base && i < prefixes.length - 1) { x /= base; i++; }
  const shown = i === 0 ? Math.round(x) : parseFloat(x.toPrecision(3)); // 3 digits, no trailing 0s
  return `${shown} ${prefixes[i]}${unit}`;
}
const bytes = (x) => si(x, "B");
const bits = (x) => si(x, "bit");
const sci = (x, digits = 3) => (x == null ? "–" : x.toExponential(digits));
const int = (x) => (x == null ? "–" : x.toLocaleString("en-US"));
const pct = (x) => (x == null || !isFinite(x) ? "–" : `${(100 * x).toFixed(1)} %`);
const sum = (o) => Object.values(o).reduce((a, b) => a + b, 0);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text != null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}
const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------- charts

function axis(label, values, extra = {}) {
  const format = values && ((u, splits) => splits.map((v) => (v == null ? "" : values(v))));
  return { label, values: format, size: 60, ...extra };
}
// Powers of ten only, at most about six of them: a log axis without a grey band of minor lines.
function decades(u, axisIdx, min, max) {
  if (!(min > 0 && max > 0)) return [];
  const lo = Math.floor(Math.log10(min));
  const hi = Math.ceil(Math.log10(max));
  const step = Math.max(1, Math.ceil((hi - lo) / 6));
  const splits = [];
  for (let k = lo; k <= hi; k += step) {
    const v = 10 ** k;
    if (v >= min && v <= max) splits.push(v);
  }
  return splits;
}

function line(label, stroke, extra = {}) {
  return { label, stroke, width: 1.5, points: { show: false }, ...extra };
}

function chartSize(target) {
  return { width: Math.max(300, target.clientWidth), height: 260 };
}

function makeChart(id, series, axes, scales, data) {
  const target = $(id);
  const opts = {
    ...chartSize(target),
    scales: { x: { time: false }, ...scales },
    series,
    axes,
    legend: { live: true },
    cursor: { drag: { x: true, y: false } },
  };
  const chart = new uPlot(opts, data(), target);
  chart.data_ = data;
  new ResizeObserver(() => chart.setSize(chartSize(target))).observe(target);
  return chart;
}

let charts = [];

function createCharts() {
  const c = run.cols;
  charts = [
    makeChart(
      "chart-grad",
      [
        { label: "bits / worker", value: (u, v) => bits(v) },
        line("‖∇f‖²", COLORS.grad, { spanGaps: true, value: (u, v) => sci(v) }),
        // Rounds whose figures miss some workers' diagnostics, marked on the line.
        line(`over fewer than ${run.n} workers`, COLORS.diag, {
          value: (u, v) => sci(v), paths: uPlot.paths.points(), points: { show: true, size: 5, fill: COLORS.diag },
        }),
      ],
      [axis("bits sent per worker", bits), axis("‖∇f(x)‖²", (v) => sci(v, 0), { size: 64, splits: decades, filter: (u, splits) => splits })],
      { y: { distr: 3 } },
      () => [c.bits, c.grad, c.gradPartial],
    ),
    makeChart(
      "chart-cumulative",
      [
        { label: "round" },
        line("up: rounds", COLORS.up, { value: (u, v) => bytes(v) }),
        line("down: rounds", COLORS.down, { value: (u, v) => bytes(v) }),
        line("up: diagnostics", COLORS.diag, { value: (u, v) => bytes(v), dash: [4, 4] }),
      ],
      [axis("round"), axis("bytes", bytes, { size: 70 })],
      {},
      () => [c.round, c.up, c.down, c.diag],
    ),
    makeChart(
      "chart-per-round",
      [
        { label: "round" },
        line("wire up", COLORS.up, { value: (u, v) => bytes(v) }),
        line("wire down", COLORS.down, { value: (u, v) => bytes(v) }),
        line("payload up (bits / 8)", COLORS.payload, { value: (u, v) => bytes(v) }),
      ],
      [axis("round"), axis("bytes per round", bytes, { size: 70 })],
      {},
      () => [c.round, c.dUp, c.dDown, c.dPayload],
    ),
    makeChart(
      "chart-skips",
      [
        { label: "round" },
        line("skipped", COLORS.skip, { value: (u, v) => pct(v), paths: uPlot.paths.points(), points: { show: true, size: 3, fill: COLORS.skip } }),
        line(`mean of ${SKIP_WINDOW} rounds`, COLORS.up, { value: (u, v) => pct(v) }),
      ],
      [axis("round"), axis("share of workers", (v) => `${Math.round(100 * v)} %`)],
      { y: { range: [0, 1] } },
      () => [c.round, c.skip, c.skipMean],
    ),
  ];
}

let redrawPending = false;
function redraw() {
  if (redrawPending) return;
  redrawPending = true;
  setTimeout(() => {
    redrawPending = false;
    for (const chart of charts) chart.setData(chart.data_());
  }, 100);
}

// ---------------------------------------------------------------- the page's text

function describe(component) {
  const params = Object.entries(component).filter(([k]) => k !== "name");
  return params.length ? `${component.name}(${params.map(([k, v]) => `${k}=${v}`).join(", ")})` : component.name;
}

function showConfig(state) {
  const cfg = state.config;
  const plan = state.plan;
  const standIn = $("stand-in");
  standIn.hidden = !plan.stand_in;
  if (plan.stand_in) {
    standIn.textContent = `Synthetic stand-in: the data set "${cfg.data.dataset}" was not found, and the workers ` +
      `train on ${plan.dataset}. These figures are not that data set's.`;
  }
  $("summary").textContent = [
    describe(cfg.method),
    describe(cfg.compressor),
    describe(cfg.problem),
    `n = ${cfg.workers}`,
    `d = ${plan.dim}`,
    `γ = ${plan.gamma.toPrecision(3)}`,
    plan.stand_in ? `${plan.dataset} (synthetic stand-in)` : plan.dataset,
  ].join(" · ");
  document.title = `threepc · ${plan.stand_in ? "synthetic stand-in · " : ""}${cfg.method.name} · ${cfg.compressor.name}`;
  const list = $("config");
  list.replaceChildren();
  const add = (key, value) => {
    const item = el("div");
    item.append(el("dt", key), el("dd", typeof value === "string" ? value : JSON.stringify(value)));
    list.append(item);
  };
  const walk = (prefix, obj) => {
    for (const [k, v] of Object.entries(obj)) {
      const key = prefix ? `${prefix}.${k}` : k;
      if (v && typeof v === "object" && !Array.isArray(v)) walk(key, v);
      else add(key, v);
    }
  };
  walk("", cfg);
  walk("plan", plan);
}

function runState(state) {
  if (state.finished) return state.round >= state.rounds_planned ? "finished" : "stopped";
  return state.started ? "training" : "waiting";
}

function showWorkers(workers) {
  const body = $("workers").tBodies[0];
  body.replaceChildren();
  const total = { bits: 0, skips: 0, messages: 0, absent: 0, late: 0, refused: 0, resyncs: null, up: 0, diag: 0, down: 0, control: 0 };
  for (const w of workers) {
    const tr = el("tr");
    tr.dataset.worker = w.worker_id;
    tr.dataset.state = w.state;
    const perRound = w.messages ? w.bits / w.messages : null;
    const control = w.up_bytes.control + w.down_bytes.control;
    tr.append(
      el("td", `#${w.worker_id}`),
      (() => { const td = el("td"); td.append(el("span", w.state, `pill ${w.state}`)); return td; })(),
      el("td", w.peer ?? "–"),
      el("td", int(w.rows), "num"),
      el("td", int(w.last_round), "num"),
      el("td", int(w.lag), "num"),
      el("td", int(w.bits), "num"),
      el("td", perRound == null ? "–" : perRound.toFixed(1), "num"),
      el("td", w.messages ? `${int(w.skips)} (${pct(w.skips / w.messages)})` : "–", "num"),
      el("td", int(w.absent), w.absent ? "num warn" : "num"),
      el("td", int(w.late), w.late ? "num warn" : "num"),
      el("td", int(w.refused), w.refused ? "num warn" : "num"),
      el("td", int(w.resyncs), "num"),
      el("td", bytes(w.up_bytes.round), "num"),
      el("td", bytes(w.up_bytes.diagnostics), "num"),
      el("td", bytes(w.down_bytes.round), "num"),
      el("td", bytes(control), "num"),
    );
    body.append(tr);
    if (w.error) {
      const err = el("tr");
      // Gone since its last applied update: absent from the round after it.
      const from = (w.last_round ?? -1) + 1;
      const td = el("td", `worker #${w.worker_id} is gone, absent from round ${int(from)}: ${w.error}`, "error");
      td.colSpan = body.closest("table").tHead.rows[0].cells.length;
      err.append(td);
      body.append(err);
    }
    total.bits += w.bits;
    total.skips += w.skips;
    total.messages += w.messages;
    total.absent += w.absent;
    total.late += w.late;
    total.refused += w.refused;
    if (w.resyncs != null) total.resyncs = (total.resyncs ?? 0) + w.resyncs;
    total.up += w.up_bytes.round;
    total.diag += w.up_bytes.diagnostics;
    total.down += w.down_bytes.round;
    total.control += control;
  }
  const foot = $("workers").tFoot;
  foot.replaceChildren();
  const tr = el("tr");
  tr.append(
    el("td", "all"), el("td"), el("td"), el("td"), el("td"), el("td"),
    el("td", int(total.bits), "num"), el("td"),
    el("td", total.messages ? `${int(total.skips)} (${pct(total.skips / total.messages)})` : "–", "num"),
    el("td", int(total.absent), "num"), el("td", int(total.late), "num"),
    el("td", int(total.refused), "num"), el("td", int(total.resyncs), "num"),
    el("td", bytes(total.up), "num"),
    el("td", total.diag ? `${bytes(total.diag)} (${pct(total.diag / (total.diag + total.up))})` : bytes(total.diag), "num"),
    el("td", bytes(total.down), "num"), el("td", bytes(total.control), "num"),
  );
  foot.append(tr);
}

function show(state) {
  const phase = runState(state);
  document.body.dataset.state = phase;
  const status = $("status");
  status.textContent = {
    waiting: "waiting for workers",
    training: "training",
    finished: "finished",
    stopped: `stopped at round ${state.round}`,
  }[phase];
  status.className = `pill ${phase}`;

  const last = run.last;
  const round = $("round");
  round.dataset.round = last ? last.round : -1;
  round.textContent = last ? int(last.round + 1) : "0";
  $("rounds-planned").textContent = ` / ${int(state.rounds_planned)}`;
  const elapsed = state.elapsed_s;
  $("elapsed").textContent = elapsed == null ? "not started" :
    `${elapsed.toFixed(1)} s · ${(state.round / Math.max(elapsed, 1e-9)).toFixed(0)} rounds/s`;

  const g = run.lastGrad;
  $("grad").textContent = g ? sci(g.grad_norm_sq) : "–";
  const fewer = g && g.diag_workers != null && g.diag_workers < run.n;
  $("loss").textContent = !g ? "" : `f(x) = ${g.loss.toPrecision(6)}, round ${int(g.round)}` +
    (fewer ? ` · over ${g.diag_workers} of ${run.n} workers` : "");
  $("loss").classList.toggle("warn", Boolean(fewer));
  const c = run.cols;
  const k = c.round.length - 1;
  $("bits").textContent = last ? bits(last.bits_up_per_worker) : "–";
  $("bits-round").textContent = last ? `+${bits((c.dPayload[k] * 8) / run.n)} last round; values alone ${bits(last.value_bits_up_per_worker)}` : "";
  $("wire-up").textContent = last ? bytes(last.wire_bytes_up) : "–";
  $("wire-up-round").textContent = last ? `+${bytes(c.dUp[k])} last round; diagnostics ${bytes(last.diag_bytes_up)}` : "";
  $("wire-down").textContent = last ? bytes(last.wire_bytes_down) : "–";
  $("wire-down-round").textContent = last ? `+${bytes(c.dDown[k])} last round; control ${bytes(last.control_bytes)} (both ways)` : "";
  showDiagnostics(last);
  const updates = run.n * c.round.length;
  $("skip-rate").textContent = updates ? pct(run.skipTotal / updates) : "–";
  $("skip-note").textContent = !updates ? "" : run.skipTotal ? `${int(run.skipTotal)} of ${int(updates)} updates` : "no update skipped";

  const workers = state.workers;
  const counts = {};
  for (const w of workers) counts[w.state] = (counts[w.state] || 0) + 1;
  $("workers-connected").textContent = `${(counts.connected || 0) + (counts.done || 0)} / ${workers.length}`;
  $("workers-note").textContent = Object.entries(counts).map(([s, n]) => `${n} ${s}`).join(" · ");
  const maxLag = Math.max(0, ...workers.map((w) => w.lag ?? 0));
  if (maxLag > 0 && phase === "training") $("workers-note").textContent += ` · max lag ${maxLag}`;
  showWorkers(workers);

  const gone = workers.filter((w) => w.state === "gone");
  const banner = $("banner");
  const lines = gone.map((w) => `Worker #${w.worker_id} is gone${w.error ? `: ${w.error}` : ""}`);
  if (phase === "stopped") lines.unshift(`The run stopped at round ${state.round} of ${state.rounds_planned}.`);
  if (phase === "finished" && !gone.length) lines.push(`The run finished: ${int(state.round)} rounds in ${elapsed.toFixed(1)} s.`);
  banner.hidden = !lines.length;
  banner.className = phase === "finished" && !gone.length ? "banner ok" : "banner";
  banner.textContent = lines.join(" ");
  showPartial();
  redraw();
}

// What diagnostics cost: a dense float64 gradient per worker each diagnostics round, often
// many times the method's own uplink, so it is said next to the totals.
function showDiagnostics(last) {
  const diag = last ? last.diag_bytes_up : null;
  const up = last ? last.wire_bytes_up : null;
  const tile = $("diag-share");
  tile.parentElement.classList.toggle("warn", diag != null && up != null && diag > up);
  if (diag == null || up == null) {
    tile.textContent = "–";
    $("diag-note").textContent = last ? "not metered (in-process run)" : "";
    return;
  }
  tile.textContent = diag + up ? pct(diag / (diag + up)) : "–";
  const every = run.config.diagnostics_every;
  $("diag-note").textContent = !diag ? "none sent" :
    `${bytes(diag)}, ${up ? `${(diag / up).toFixed(1)}× the method's uplink` : "the method sent none"}` +
    ` · figures every ${every === 1 ? "round" : `${every} rounds`} (diagnostics_every)`;
}

function showPartial() {
  const p = run.partial;
  const note = $("figures-note");
  note.hidden = !p.rounds;
  if (!p.rounds) return;
  const marked = "marked in amber on the ‖∇f‖² chart";
  if (p.now != null) {
    const earlier = p.rounds > p.last - p.since + 1 ? `; ${int(p.rounds)} such rounds in all, the first ${int(p.first)}` : "";
    note.textContent = `Figures over ${p.now} of ${run.n} workers from round ${int(p.since)}: ‖∇f‖² and f(x) ` +
      `are the mean over the workers whose diagnostics came, not the whole f's (${marked}${earlier}).`;
  } else {
    const where = p.rounds === 1 ? `in round ${int(p.first)}` :
      `in ${int(p.rounds)} rounds, from round ${int(p.first)} to ${int(p.last)}`;
    note.textContent = `Figures were over fewer than ${run.n} workers ${where} (${marked}).`;
  }
}

// ---------------------------------------------------------------- the feed

function setLink(text, cls) {
  const link = $("link");
  link.textContent = text;
  link.className = `link ${cls}`;
}

function apply(state) {
  addRows(state.rows);
  show(state);
}

function listen(since) {
  const source = new EventSource(`events?since=${since}`);
  source.onopen = () => setLink("live", "live");
  source.onerror = () => setLink("connection lost, retrying", "lost");
  source.addEventListener("state", (event) => {
    const state = JSON.parse(event.data);
    run.events += 1;
    document.body.dataset.events = run.events;
    apply(state);
    if (state.finished) {
      source.close();
      setLink("final", "");
    }
  });
}

async function main() {
  let state;
  try {
    const response = await fetch("api/state?since=0", { cache: "no-store" });
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    state = await response.json();
  } catch (err) {
    setLink(`cannot reach the coordinator (${err.message})`, "lost");
    return;
  }
  run.n = state.config.workers;
  run.config = state.config;
  run.planned = state.rounds_planned;
  showConfig(state);
  addRows(state.rows);
  document.body.dataset.firstRound = run.last ? run.last.round : -1;
  createCharts();
  show(state);
  if (state.finished) setLink("final", "");
  else listen(state.next);
}

main();
