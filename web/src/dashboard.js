// The closedloop operator dashboard, bundled by esbuild into closedloop/dashboard/_web/dashboard.js.
//
// closedloop/dashboard/page.html loads it; the page opens the server-sent event stream ./events (the
// `closedloop dashboard` server), and each message's data is one JSON snapshot of the experiment
// (format "closedloop.dashboard_state"). Every snapshot is rendered in full: any field may be null or
// missing (no day yet, a half-written file, a finished day), which shows as "—", never as an error.
// The page is read-only: nothing is sent back. Tests read the ids and data attributes set here.
import uPlot from "uplot";

const STATE_FORMAT = "closedloop.dashboard_state";
const DASH = "—";
const RECONNECT_MS = 3000; // after the browser gives up on the stream (a non-2xx answer), open it again
const SITE_STRIP_WIDTH = 200;
const SITE_STRIP_HEIGHT = 14;
const LACKING_SHOWN = 60; // stimuli listed in "Still lacking"
const DAY_COLOURS = ["#1f5fae", "#d9480f", "#2b8a3e", "#7048e8", "#c2255c", "#0b7285", "#e67700", "#495057"];

// ----------------------------------------------------------------------------------------- formatting

function isNum(x) {
  return typeof x === "number" && Number.isFinite(x);
}

function fixed(x, digits) {
  return isNum(x) ? x.toFixed(digits) : DASH;
}

function integer(x) {
  return isNum(x) ? String(Math.round(x)) : DASH;
}

function percent(x) {
  return isNum(x) ? `${(100 * x).toFixed(1)}%` : DASH;
}

// 12 s, 3 min 5 s, 1 h 2 min
function duration(seconds) {
  if (!isNum(seconds)) return DASH;
  const total = Math.max(0, Math.round(seconds));
  if (total < 60) return `${total} s`;
  if (total < 3600) {
    const minutes = Math.floor(total / 60);
    const rest = total % 60;
    return rest ? `${minutes} min ${rest} s` : `${minutes} min`;
  }
  const hours = Math.floor(total / 3600);
  const minutes = Math.floor((total % 3600) / 60);
  return minutes ? `${hours} h ${minutes} min` : `${hours} h`;
}

function eta(seconds) {
  return isNum(seconds) ? `about ${duration(seconds)} left` : DASH;
}

function clock(date) {
  const pad = (n) => String(n).padStart(2, "0");
  return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

function obj(x) {
  return x !== null && typeof x === "object" && !Array.isArray(x) ? x : null;
}

function arr(x) {
  return Array.isArray(x) ? x : [];
}

function str(x) {
  return x === null || x === undefined ? DASH : String(x);
}

// ------------------------------------------------------------------------------------------ DOM helpers

function $(id) {
  return document.getElementById(id);
}

function setText(id, text) {
  const el = $(id);
  if (el && el.textContent !== text) el.textContent = text;
  return el;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// -------------------------------------------------------------------------------------------- sections

function renderHeader(state) {
  setText("experiment", str(state.experiment));
  const current = obj(state.current);
  const day = current && isNum(current.day) ? `day ${current.day}` : "no day yet";
  setText("day", day);
  const dayState = setText("day-state", current && current.state ? String(current.state) : DASH);
  dayState.dataset.state = current && current.state ? String(current.state) : "";
  setText("updated", `updated ${clock(new Date())}`);
}

function renderAlarms(state) {
  const box = $("alarms");
  const alarms = arr(state.alarms).filter((a) => obj(a));
  box.replaceChildren(
    ...alarms.map((alarm) => {
      const node = el("div", "alarm", str(alarm.message));
      node.dataset.kind = str(alarm.kind);
      if (alarm.since_utc) node.title = `since ${alarm.since_utc}`;
      return node;
    }),
  );
  box.hidden = alarms.length === 0;
  document.body.dataset.alarms = String(alarms.length);
}

function renderStages(state) {
  const current = obj(state.current);
  const list = $("stages");
  const stages = arr(current && current.stages).filter((s) => obj(s));
  if (stages.length === 0) {
    list.replaceChildren(el("li", "empty", current ? "no stage yet" : "no day yet"));
  } else {
    list.replaceChildren(
      ...stages.map((stage) => {
        const item = el("li", "stage");
        item.dataset.stage = str(stage.name);
        item.dataset.state = str(stage.state);
        item.append(
          el("span", "stage-mark"),
          el("span", "stage-name", str(stage.name)),
          el("span", "stage-state", str(stage.state)),
          el("span", "stage-time", duration(stage.seconds)),
        );
        return item;
      }),
    );
  }
  setText("eta", current && current.state === "finished" ? "day finished" : eta(current && current.eta_s));

  const days = $("days");
  const known = arr(state.days).filter((d) => obj(d));
  if (known.length === 0) {
    days.replaceChildren(document.createTextNode(DASH));
  } else {
    days.replaceChildren(
      ...known.map((d) => {
        const chip = el("span", "day-chip", `day ${str(d.day)}`);
        chip.dataset.day = str(d.day);
        chip.dataset.state = str(d.state);
        chip.title = str(d.state);
        return chip;
      }),
    );
  }
}

function renderPresent(state) {
  const present = obj(state.present);
  const p = present || {};
  setText("presentations", integer(p.presentations));
  setText("valid", present ? `${integer(p.valid)} / ${integer(p.target_valid)}` : DASH);
  const bar = $("valid-progress");
  const fraction = isNum(p.valid) && isNum(p.target_valid) && p.target_valid > 0 ? Math.min(1, p.valid / p.target_valid) : 0;
  bar.style.width = `${(100 * fraction).toFixed(1)}%`;
  setText("rate", isNum(p.presentations_per_min) ? `${p.presentations_per_min.toFixed(1)} /min` : DASH);
  setText("valid-fraction", percent(p.valid_fraction));
  setText("fixation-breaks", percent(p.fixation_break_rate));
  setText("present-eta", present && !p.live && !p.stale ? DASH : eta(p.eta_s));
  setText("present-window", isNum(p.window_s) ? `rates over the last ${duration(p.window_s)}` : "");

  let text;
  let kind;
  if (!present) {
    text = "not presenting";
    kind = "off";
  } else if (p.stale) {
    const ago = isNum(p.updated_s_ago) ? Math.round(p.updated_s_ago) : DASH;
    text = `stale: no update for ${ago} s (is fit-day running?)`;
    kind = "stale";
  } else if (p.live) {
    text = "live";
    kind = "live";
  } else {
    text = "not presenting";
    kind = "off";
  }
  setText("present-state", text).dataset.state = kind;

  const link = obj(p.link) || {};
  setText("heartbeat-age", isNum(link.heartbeat_age_s) ? `${link.heartbeat_age_s.toFixed(1)} s` : DASH);
  setText("queue-depth", integer(link.queue_depth));
  setText("reconnects", integer(link.reconnects));
  setText("requeued", integer(link.requeued));

  renderRatesChart(arr(p.history));
}

// One heat strip: one column per presentation, oldest left, white (0 Hz) to dark blue (max_hz).
function drawStrip(canvas, values, maxHz) {
  const ctx = canvas.getContext("2d");
  if (!ctx) return;
  const w = canvas.width;
  const h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  ctx.fillStyle = "#ffffff";
  ctx.fillRect(0, 0, w, h);
  const n = values.length;
  if (n === 0) return;
  const top = isNum(maxHz) && maxHz > 0 ? maxHz : Math.max(1e-9, ...values.filter(isNum));
  const column = w / n;
  for (let i = 0; i < n; i += 1) {
    const v = values[i];
    if (isNum(v)) {
      const t = Math.min(1, Math.max(0, v / top));
      // white -> #0b2e6b
      const r = Math.round(255 + (11 - 255) * t);
      const g = Math.round(255 + (46 - 255) * t);
      const b = Math.round(255 + (107 - 255) * t);
      ctx.fillStyle = `rgb(${r},${g},${b})`;
    } else {
      ctx.fillStyle = "#e9ecef";
    }
    // whole pixels where columns are wide; overlapping sub-pixel columns where there are more than w
    const x0 = column >= 1 ? Math.floor(i * column) : i * column;
    const x1 = column >= 1 ? Math.floor((i + 1) * column) : (i + 1) * column;
    ctx.fillRect(x0, 0, Math.max(x1 - x0, column >= 1 ? 1 : column), h);
  }
}

function renderSites(state) {
  const sites = obj(state.sites);
  const body = $("sites").tBodies[0];
  const scale = $("strip-scale");
  if (!sites) {
    const row = el("tr", "empty");
    const cell = el("td", "empty", "no live counts (the .nev has them)");
    cell.colSpan = 5;
    row.append(cell);
    body.replaceChildren(row);
    scale.textContent = "";
    return;
  }
  const labels = arr(sites.labels);
  const recent = arr(sites.recent_rate_hz);
  const reference = arr(sites.reference_rate_hz);
  const reliability = arr(sites.day0_reliability);
  const strip = obj(sites.strip) || {};
  const strips = arr(strip.rates_hz);
  const n = Math.max(labels.length, recent.length, reference.length, strips.length);
  const alarmed = new Set(
    arr(state.alarms)
      .filter((a) => obj(a) && a.site !== null && a.site !== undefined)
      .map((a) => Number(a.site)),
  );

  // reuse the rows (and their canvases) while the number of sites stays the same
  let rows = Array.from(body.rows).filter((r) => r.dataset.site !== undefined);
  if (rows.length !== n) {
    rows = [];
    for (let i = 0; i < n; i += 1) {
      const row = el("tr", "site");
      row.dataset.site = String(i);
      const canvas = el("canvas", "strip");
      canvas.width = SITE_STRIP_WIDTH;
      canvas.height = SITE_STRIP_HEIGHT;
      const stripCell = el("td", "strip-cell");
      stripCell.append(canvas);
      row.append(el("td", "site-label"), el("td", "num recent"), el("td", "num reference"), el("td", "num reliability"), stripCell);
      rows.push(row);
    }
    body.replaceChildren(...rows);
  }
  for (let i = 0; i < n; i += 1) {
    const row = rows[i];
    const cells = row.cells;
    const label = labels[i] === null || labels[i] === undefined ? `site ${i}` : String(labels[i]);
    if (cells[0].textContent !== label) cells[0].textContent = label;
    cells[1].textContent = fixed(recent[i], 1);
    cells[2].textContent = fixed(reference[i], 1);
    cells[3].textContent = fixed(reliability[i], 2);
    row.classList.toggle("alarmed", alarmed.has(i));
    row.classList.toggle("silent", isNum(recent[i]) && recent[i] === 0);
    const canvas = cells[4].firstChild;
    const values = arr(strips[i]);
    canvas.title = values.length ? `${values.length} presentations` : "no presentations";
    drawStrip(canvas, values, strip.max_hz);
  }
  scale.textContent = isNum(strip.max_hz) ? `strip: white 0 Hz … dark ${strip.max_hz.toFixed(0)} Hz; grey: no value` : "";
}

function renderLacking(state) {
  const box = $("lacking");
  const lacking = obj(state.lacking);
  if (!lacking) {
    box.replaceChildren(document.createTextNode(DASH));
    delete box.dataset.n;
    return;
  }
  const reps = isNum(lacking.repetitions) ? lacking.repetitions : DASH;
  const stimuli = arr(lacking.stimuli).filter((s) => obj(s));
  const n = isNum(lacking.n) ? lacking.n : Array.isArray(lacking.stimuli) ? stimuli.length : null;
  if (n === null) {
    box.replaceChildren(document.createTextNode(DASH));
    delete box.dataset.n;
    return;
  }
  const summary = el("p", "lacking-summary", `${n} stimuli still lack their ${reps} valid repetitions`);
  const list = el("ul", "lacking-list");
  for (const s of stimuli.slice(0, LACKING_SHOWN)) {
    const item = el("li", "", `${str(s.stimulus_id)} (${integer(s.n_valid)}/${reps})`);
    item.dataset.stimulus = str(s.stimulus_id);
    list.append(item);
  }
  const parts = [summary];
  if (stimuli.length) parts.push(list);
  if (n > Math.min(stimuli.length, LACKING_SHOWN) && stimuli.length) {
    parts.push(el("p", "note", `… and ${n - Math.min(stimuli.length, LACKING_SHOWN)} more`));
  }
  box.replaceChildren(...parts);
  box.dataset.n = String(n);
}

function renderWarnings(state) {
  const list = $("warnings");
  // the server sends them newest first; the files it could not read this time go on top
  const problems = arr(state.problems).map((p) => {
    const item = el("li", "warning problem");
    item.append(document.createTextNode(`cannot read ${str(p)}`));
    return item;
  });
  const warnings = arr(state.warnings).filter((w) => obj(w));
  list.replaceChildren(
    ...problems,
    ...warnings.map((w) => {
      const item = el("li", "warning");
      item.append(el("span", "warning-time", str(w.time_utc)), document.createTextNode(` day ${str(w.day)}: ${str(w.message)}`));
      return item;
    }),
  );
  list.dataset.count = String(warnings.length + problems.length);
}

// ---------------------------------------------------------------------------------------------- charts

const charts = { rates: null, history: null, historyKey: null };

function chartWidth(container) {
  return Math.max(240, Math.floor(container.clientWidth || 600));
}

function renderRatesChart(history) {
  const rows = history.filter((r) => Array.isArray(r) && isNum(r[0]));
  const col = (k) => rows.map((r) => (isNum(r[k]) ? r[k] : null));
  const data = [col(0), col(1), col(2), col(3)];
  if (charts.rates) {
    charts.rates.setData(data);
    return;
  }
  const container = $("rates-chart");
  const opts = {
    width: chartWidth(container),
    height: 220,
    legend: { live: true },
    cursor: { drag: { x: false, y: false } },
    scales: {
      x: { time: true },
      y: { range: (u, min, max) => [0, Math.max(10, isNum(max) ? max * 1.1 : 10)] },
      frac: { range: [0, 1] },
    },
    series: [
      {},
      { label: "presentations / min", scale: "y", stroke: "#1f5fae", width: 2, value: (u, v) => fixed(v, 1) },
      { label: "valid fraction", scale: "frac", stroke: "#2b8a3e", width: 1.5, value: (u, v) => percent(v) },
      { label: "fixation-break rate", scale: "frac", stroke: "#d9480f", width: 1.5, value: (u, v) => percent(v) },
    ],
    axes: [
      {},
      { scale: "y", label: "per min", size: 50 },
      { scale: "frac", side: 1, label: "fraction", size: 50, grid: { show: false }, values: (u, ticks) => ticks.map((t) => `${Math.round(t * 100)}%`) },
    ],
  };
  charts.rates = new uPlot(opts, data, container);
}

// finished days' curves on the sorted union of their budgets; null where a day lacks a budget
function historyData(days) {
  const xs = new Set();
  for (const d of days) for (const x of arr(d.eps_paper)) if (isNum(x)) xs.add(x);
  const x = Array.from(xs).sort((a, b) => a - b);
  const index = new Map(x.map((v, i) => [v, i]));
  const column = (d, field) => {
    const out = new Array(x.length).fill(null);
    const eps = arr(d.eps_paper);
    const ys = arr(d[field]);
    eps.forEach((e, i) => {
      if (isNum(e) && isNum(ys[i])) out[index.get(e)] = ys[i];
    });
    return out;
  };
  const data = [x];
  for (const d of days) data.push(column(d, "attack"));
  const last = days[days.length - 1];
  if (last) data.push(column(last, "gaussian"), column(last, "interpolation"));
  return data;
}

function renderHistory(state) {
  const days = arr(state.history)
    .filter((d) => obj(d) && d.day !== null && d.day !== undefined)
    .sort((a, b) => Number(a.day) - Number(b.day));
  setText("history-days", days.length ? `${days.length === 1 ? "day" : "days"} ${days.map((d) => d.day).join(", ")}` : "no finished day yet");
  const key = days.map((d) => String(d.day)).join(",");
  const data = historyData(days);
  if (charts.history && charts.historyKey === key) {
    charts.history.setData(data);
    return;
  }
  const container = $("history-chart");
  container.dataset.empty = days.length ? "0" : "1";
  if (charts.history) {
    charts.history.destroy();
    charts.history = null;
  }
  const last = days[days.length - 1];
  const series = [{ label: "eps (paper)", value: (u, v) => (isNum(v) ? String(v) : DASH) }];
  days.forEach((d, i) => {
    series.push({ label: `day ${d.day}`, stroke: DAY_COLOURS[i % DAY_COLOURS.length], width: 2, spanGaps: true, points: { show: true, size: 5 }, value: (u, v) => fixed(v, 2) });
  });
  if (last) {
    series.push({ label: `day ${last.day} gaussian`, stroke: "#868e96", width: 1.5, dash: [6, 4], spanGaps: true, value: (u, v) => fixed(v, 2) });
    series.push({ label: `day ${last.day} interpolation`, stroke: "#adb5bd", width: 1.5, dash: [2, 3], spanGaps: true, value: (u, v) => fixed(v, 2) });
  }
  const opts = {
    width: chartWidth(container),
    height: 260,
    cursor: { drag: { x: false, y: false } },
    scales: { x: { time: false } },
    series,
    axes: [
      { label: "ε (paper units)" },
      { label: "bound (sd)", size: 50 },
    ],
  };
  charts.history = new uPlot(opts, data, container);
  charts.historyKey = key;
}

function resizeCharts() {
  for (const [chart, id, height] of [[charts.rates, "rates-chart", 220], [charts.history, "history-chart", 260]]) {
    if (!chart) continue;
    const width = chartWidth($(id));
    if (width !== chart.width) chart.setSize({ width, height });
  }
}

// ---------------------------------------------------------------------------------------------- render

const SECTIONS = [renderHeader, renderAlarms, renderStages, renderPresent, renderSites, renderLacking, renderWarnings, renderHistory];

function render(state) {
  for (const section of SECTIONS) {
    try {
      section(state);
    } catch (error) {
      // one bad field must not blank the rest of the page
      console.error(`dashboard: ${section.name} failed`, error);
    }
  }
  document.body.dataset.ready = "1";
}

function onMessage(event) {
  let state;
  try {
    state = JSON.parse(event.data);
  } catch (error) {
    console.warn("dashboard: a message that is not JSON", error);
    return;
  }
  if (!obj(state)) return;
  if (state.format && state.format !== STATE_FORMAT) console.warn(`dashboard: unexpected format ${state.format}`);
  document.body.dataset.connection = "open";
  render(state);
}

function connect() {
  const source = new EventSource("events");
  source.onopen = () => {
    document.body.dataset.connection = "open";
  };
  source.onmessage = onMessage;
  source.onerror = () => {
    document.body.dataset.connection = "lost";
    // CONNECTING: the browser retries by itself; CLOSED (e.g. an error status): open a new one later
    if (source.readyState === EventSource.CLOSED) {
      source.close();
      setTimeout(connect, RECONNECT_MS);
    }
  };
}

function start() {
  let pending = 0;
  const onResize = () => {
    cancelAnimationFrame(pending);
    pending = requestAnimationFrame(resizeCharts);
  };
  if (typeof ResizeObserver === "function") {
    const observer = new ResizeObserver(onResize);
    observer.observe($("rates-chart"));
    observer.observe($("history-chart"));
  } else {
    window.addEventListener("resize", onResize);
  }
  connect();
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
else start();
