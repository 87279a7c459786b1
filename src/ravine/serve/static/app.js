// The ravine lab page: training runs with live curves, and the landscape playground.
// Talks only to the server that served it (see docs/serve.md for the API).
"use strict";

const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
const PLOT_CONFIG = { responsive: true, displaylogo: false };
const state = { options: null, live: null, source: null, contours: {}, landscapeRequest: 0, landscapeTimer: null };

// ---------------------------------------------------------------------------------------
// small helpers

async function api(method, url, body) {
  let response;
  try {
    response = await fetch(url, {
      method,
      headers: body === undefined ? {} : { "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (error) {
    throw new Error("cannot reach the ravine server (is `ravine serve` still running?)");
  }
  let data = null;
  try { data = await response.json(); } catch (error) { data = null; }
  if (!response.ok) {
    throw new Error((data && data.error) || `the server answered ${response.status}`);
  }
  return data;
}

function $(id) { return document.getElementById(id); }

function showMessage(id, text, isError) {
  const element = $(id);
  element.textContent = text || "";
  element.classList.toggle("error", Boolean(isError && text));
}

function formatNumber(value, digits = 3) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "—";
  return Number(value.toPrecision(digits)).toString();
}

function formatMetric(value, metric) {
  if (value === null || value === undefined) return "—";
  return metric === "accuracy" ? `${(100 * value).toFixed(1)}%` : formatNumber(value, 4);
}

function parseSpec(spec) {
  const match = /^([\w-]+)\s*\(\s*lr\s*=\s*([0-9.eE+-]+)\s*\)$/.exec(spec);
  return match ? { name: match[1], lr: Number(match[2]) } : { name: spec, lr: null };
}

// A row per optimizer: checkbox, name, log-scale learning-rate slider and its value.
function optimizerRows(containerId, checked, lrFor, onChange) {
  const container = $(containerId);
  container.innerHTML = "";
  state.options.optimizers.forEach((optimizer) => {
    const row = document.createElement("div");
    row.className = "optimizer-row";
    row.dataset.name = optimizer.name;
    const lr = lrFor(optimizer);
    row.innerHTML = `<input type="checkbox" class="use" ${checked.includes(optimizer.name) ? "checked" : ""}
        aria-label="use ${optimizer.name}">
      <span>${optimizer.name}</span>
      <input type="range" class="lr" min="-5" max="1" step="0.05" value="${Math.log10(lr)}" aria-label="${optimizer.name} learning rate">
      <span class="lr-value">${formatNumber(lr)}</span>`;
    const slider = row.querySelector(".lr");
    slider.addEventListener("input", () => {
      row.querySelector(".lr-value").textContent = formatNumber(10 ** Number(slider.value));
      onChange();
    });
    row.querySelector(".use").addEventListener("change", onChange);
    container.appendChild(row);
  });
}

function chosenSpecs(containerId) {
  return Array.from($(containerId).querySelectorAll(".optimizer-row"))
    .filter((row) => row.querySelector(".use").checked)
    .map((row) => `${row.dataset.name}(lr=${formatNumber(10 ** Number(row.querySelector(".lr").value))})`);
}

// ---------------------------------------------------------------------------------------
// training

function readRunForm() {
  const number = (id) => ($(id).value.trim() === "" ? null : Number($(id).value));
  return {
    task: $("task").value,
    optimizers: chosenSpecs("run-optimizers"),
    batch_size: number("batch-size"),
    epochs: number("epochs"),
    schedule: $("schedule").value,
    clip_norm: number("clip-norm"),
    seed: number("seed") ?? 0,
  };
}

async function startRun(event) {
  event.preventDefault();
  showMessage("run-message", "");
  try {
    const run = await api("POST", "/api/runs", readRunForm());
    showMessage("run-message", `Started run ${run.id}.`);
    showRun(run);
    refreshRuns();
  } catch (error) {
    showMessage("run-message", error.message, true);
  }
}

async function stopRun() {
  if (!state.live) return;
  try {
    await api("POST", `/api/runs/${state.live.id}/stop`);
    showMessage("run-message", `Stopping run ${state.live.id} after its current step.`);
  } catch (error) {
    showMessage("run-message", error.message, true);
  }
}

// Start drawing a run (a snapshot from the server); follow its events while it runs.
function showRun(run) {
  if (state.source) { state.source.close(); state.source = null; }
  state.live = {
    id: run.id, status: run.status, settings: run.settings, metric: run.metric, report: run.report,
    optimizers: run.optimizers.map((curve) => ({
      label: curve.label, status: curve.status, total_steps: curve.total_steps,
      train_loss: curve.train_loss.slice(), eval_steps: curve.eval_steps.slice(),
      test_loss: curve.test_loss.slice(), test_metric: curve.test_metric.slice(),
    })),
  };
  drawLive();
  if (run.status === "running") {
    const source = new EventSource(`/api/runs/${run.id}/events`);
    state.source = source;
    source.addEventListener("update", (event) => applyUpdate(JSON.parse(event.data)));
    source.addEventListener("end", (event) => {
      source.close();
      if (state.source === source) state.source = null;
      const final = JSON.parse(event.data);
      if (state.live && state.live.id === final.id) showRun(final);
      refreshRuns();
    });
    source.onerror = () => {
      if (source.readyState === EventSource.CLOSED && state.source === source) {
        showMessage("run-message", "lost the connection to the server; the run's results stay on disk", true);
      }
    };
  }
}

function applyUpdate(message) {
  const live = state.live;
  if (!live || live.id !== message.id) return;
  live.status = message.status;
  live.report = message.report;
  message.optimizers.forEach((update, index) => {
    const curve = live.optimizers[index];
    curve.status = update.status;
    curve.total_steps = update.total_steps;
    curve.train_loss.length = update.train_start;  // the update carries everything after this
    curve.train_loss.push(...update.train_loss);
    curve.eval_steps.push(...update.eval_steps);
    curve.test_loss.push(...update.test_loss);
    curve.test_metric.push(...update.test_metric);
  });
  drawLive();
}

function movingAverage(values, window) {
  const out = [];
  let total = 0, count = 0;
  values.forEach((value, index) => {
    if (value !== null) { total += value; count += 1; }
    const old = index - window >= 0 ? values[index - window] : null;
    if (index - window >= 0 && old !== null) { total -= old; count -= 1; }
    out.push(count ? total / count : null);
  });
  return out;
}

function drawLive() {
  const live = state.live;
  const epochs = live.settings.epochs;
  const lossTraces = [], metricTraces = [];
  live.optimizers.forEach((curve, index) => {
    const color = COLORS[index % COLORS.length];
    const perEpoch = curve.total_steps ? curve.total_steps / epochs : 1;
    const xs = curve.train_loss.map((_, step) => (step + 1) / perEpoch);
    const window = Math.max(1, Math.round(perEpoch / 10));
    lossTraces.push({ x: xs, y: curve.train_loss.slice(), mode: "lines", line: { color, width: 1 }, opacity: 0.25,
      hoverinfo: "skip", showlegend: false, legendgroup: curve.label });
    lossTraces.push({ x: xs, y: movingAverage(curve.train_loss, window), mode: "lines", line: { color, width: 2 },
      name: `${curve.label} · ${curve.status}`, legendgroup: curve.label });
    const evalX = curve.eval_steps.map((step) => step / perEpoch);
    metricTraces.push({ x: evalX, y: curve.test_metric.map((v) => (v !== null && live.metric === "accuracy" ? 100 * v : v)),
      mode: "lines+markers", line: { color, width: 2 }, marker: { size: 5 }, name: curve.label });
  });
  const metricTitle = live.metric === "accuracy" ? "held-out accuracy (%)" : `held-out ${live.metric}`;
  Plotly.react("loss-chart", lossTraces, {
    title: { text: "Train loss (faint: every step; solid: running mean)", font: { size: 14 } },
    margin: { t: 40, r: 10, b: 40, l: 55 }, xaxis: { title: { text: "epoch" }, zeroline: false },
    yaxis: { title: { text: "train loss" } }, legend: { orientation: "h", y: -0.2 },
  }, PLOT_CONFIG);
  Plotly.react("metric-chart", metricTraces, {
    title: { text: `${metricTitle} after each epoch`, font: { size: 14 } },
    margin: { t: 40, r: 10, b: 40, l: 55 }, xaxis: { title: { text: "epoch" }, zeroline: false },
    yaxis: { title: { text: metricTitle } }, legend: { orientation: "h", y: -0.2 },
  }, PLOT_CONFIG);
  const s = live.settings;
  $("run-title").textContent = `Run ${live.id}: ${s.task}, batch ${s.batch_size}, ${s.epochs} epochs, ` +
    `schedule ${s.schedule}${s.clip_norm ? `, clip ${s.clip_norm}` : ""}`;
  const status = $("run-status");
  status.textContent = live.status;
  status.className = `status ${live.status}`;
  $("stop-run").disabled = live.status !== "running";
  const report = $("run-report");
  report.hidden = !live.report;
  report.href = `/api/runs/${live.id}/files/report.html`;
}

async function openRun(runId) {
  try {
    showRun(await api("GET", `/api/runs/${runId}`));
  } catch (error) {
    showMessage("run-message", error.message, true);
  }
}

async function refreshRuns() {
  let runs;
  try {
    runs = (await api("GET", "/api/runs")).runs;
  } catch (error) {
    showMessage("run-message", error.message, true);
    return;
  }
  const body = $("runs-table").querySelector("tbody");
  const ticked = new Set(Array.from(body.querySelectorAll("input:checked")).map((box) => box.value));
  body.innerHTML = "";
  runs.forEach((run) => {
    const row = document.createElement("tr");
    const s = run.settings || {};
    const metrics = run.optimizers.map((o) => `${o.label}: ${formatMetric(o.final_test_metric, run.metric)}`).join(", ");
    const files = [
      run.report ? `<a href="/api/runs/${run.id}/files/report.html" target="_blank">report</a>` : "",
      `<a href="/api/runs/${run.id}/files/run.json" target="_blank">json</a>`,
    ].filter(Boolean).join(" · ");
    row.innerHTML = `<td><input type="checkbox" value="${run.id}" ${ticked.has(run.id) ? "checked" : ""} aria-label="select ${run.id}"></td>
      <td>${run.id}</td><td>${s.task || ""}</td><td>${(s.optimizers || []).join(", ")}</td><td>${s.batch_size ?? ""}</td>
      <td>${s.epochs ?? ""}</td><td class="status ${run.status}">${run.status}</td><td>${metrics}</td><td>${files}</td>`;
    row.addEventListener("click", (event) => {
      if (event.target.tagName !== "INPUT" && event.target.tagName !== "A") openRun(run.id);
    });
    body.appendChild(row);
  });
}

async function compareRuns() {
  const ids = Array.from($("runs-table").querySelectorAll("tbody input:checked")).map((box) => box.value);
  if (ids.length < 1) {
    showMessage("run-message", "tick at least one run in the table to compare", true);
    return;
  }
  let runs;
  try {
    runs = await Promise.all(ids.map((id) => api("GET", `/api/runs/${id}`)));
  } catch (error) {
    showMessage("run-message", error.message, true);
    return;
  }
  const traces = [];
  let index = 0;
  runs.forEach((run) => {
    run.optimizers.forEach((curve) => {
      const color = COLORS[index++ % COLORS.length];
      const perEpoch = curve.total_steps ? curve.total_steps / run.settings.epochs : 1;
      const name = `${run.id.slice(-6)} ${curve.label} (batch ${run.settings.batch_size})`;
      const window = Math.max(1, Math.round(perEpoch));
      const smooth = movingAverage(curve.train_loss, window);
      traces.push({ x: smooth.map((_, step) => (step + 1) / perEpoch), y: smooth, mode: "lines", line: { color },
        name, legendgroup: name, xaxis: "x", yaxis: "y" });
      const scale = run.metric === "accuracy" ? 100 : 1;
      traces.push({ x: curve.eval_steps.map((step) => step / perEpoch), y: curve.test_metric.map((v) => (v === null ? null : scale * v)),
        mode: "lines+markers", line: { color }, name, legendgroup: name, showlegend: false, xaxis: "x2", yaxis: "y2" });
    });
  });
  const chart = $("compare-chart");
  chart.hidden = false;
  Plotly.react(chart, traces, {
    title: { text: "Compared runs: train loss (one-epoch running mean) and held-out metric", font: { size: 14 } },
    grid: { rows: 1, columns: 2, pattern: "independent" }, margin: { t: 40, r: 10, b: 40, l: 55 },
    xaxis: { title: { text: "epoch" }, zeroline: false }, yaxis: { title: { text: "train loss" } },
    xaxis2: { title: { text: "epoch" } }, yaxis2: { title: { text: "held-out metric" } },
  }, PLOT_CONFIG);
}

// ---------------------------------------------------------------------------------------
// landscape playground

function scheduleLandscape() {
  clearTimeout(state.landscapeTimer);
  state.landscapeTimer = setTimeout(drawLandscape, 60);
}

async function drawLandscape() {
  const name = $("function").value;
  const steps = Number($("steps").value);
  $("steps-value").textContent = steps;
  const request = ++state.landscapeRequest;
  const optimizers = chosenSpecs("landscape-optimizers");
  try {
    if (!state.contours[name]) state.contours[name] = await api("GET", `/api/landscape/${name}`);
    const contour = state.contours[name];
    const answer = optimizers.length
      ? await api("POST", "/api/landscape/paths", { function: name, optimizers, steps })
      : { paths: [] };
    if (request !== state.landscapeRequest) return;  // a newer request is on its way
    showMessage("landscape-message", optimizers.length ? "" : "tick an optimizer to draw its path");
    plotLandscape(contour, answer.paths);
  } catch (error) {
    if (request === state.landscapeRequest) showMessage("landscape-message", error.message, true);
  }
}

function plotLandscape(contour, paths) {
  const [xMin, xMax, yMin, yMax] = contour.window;
  const traces = [{
    type: "contour", x: contour.x, y: contour.y, z: contour.z, colorscale: "Blues", reversescale: true,
    ncontours: 30, showscale: false, opacity: 0.75, hoverinfo: "skip", line: { width: 0.5, color: "#555" },
  }];
  const rows = [];
  paths.forEach((path, index) => {
    const color = COLORS[index % COLORS.length];
    traces.push({ x: path.x, y: path.y, mode: "lines+markers", line: { color, width: 2 }, marker: { size: 3, color },
      name: `${path.spec}${path.diverged_at !== null ? " (diverged)" : ""}`,
      text: path.step.map((step, i) => `step ${step}, loss ${formatNumber(path.loss[i], 4)}`), hoverinfo: "text+name" });
    const end = path.final_position;
    rows.push(`<tr><td style="color:${color}">${path.label}</td><td>${formatNumber(path.lr)}</td>` +
      `<td>${path.diverged_at !== null ? `diverged at step ${path.diverged_at}` : formatNumber(path.final_loss, 4)}</td>` +
      `<td>(${formatNumber(end[0])}, ${formatNumber(end[1])})</td></tr>`);
  });
  traces.push({ x: [contour.start[0]], y: [contour.start[1]], mode: "markers", name: "start",
    marker: { size: 11, color: "black", line: { color: "white", width: 1.5 } } });
  if (contour.minima.length) {
    traces.push({ x: contour.minima.map((p) => p[0]), y: contour.minima.map((p) => p[1]), mode: "markers", name: "minimum",
      marker: { size: 15, symbol: "star", color: "gold", line: { color: "black", width: 1 } } });
  }
  Plotly.react("contour-chart", traces, {
    title: { text: `${contour.name}: f(x, y) = ${contour.formula}`, font: { size: 14 } },
    margin: { t: 40, r: 10, b: 40, l: 45 }, xaxis: { range: [xMin, xMax], title: { text: "x" }, zeroline: false },
    yaxis: { range: [yMin, yMax], title: { text: "y" }, zeroline: false }, legend: { orientation: "h", y: -0.12 },
  }, PLOT_CONFIG);
  $("landscape-table").querySelector("tbody").innerHTML = rows.join("");
}

// ---------------------------------------------------------------------------------------
// start

function switchTab(button) {
  document.querySelectorAll(".tab").forEach((tab) => tab.classList.toggle("active", tab === button));
  document.querySelectorAll(".panel").forEach((panel) => panel.classList.toggle("active", panel.id === button.dataset.panel));
  if (button.dataset.panel === "landscape-panel") scheduleLandscape();
  window.dispatchEvent(new Event("resize"));  // charts drawn while hidden take their size now
}

async function start() {
  try {
    state.options = await api("GET", "/api/options");
  } catch (error) {
    showMessage("run-message", error.message, true);
    return;
  }
  const options = state.options;
  const defaults = options.defaults;
  $("task").innerHTML = options.tasks.map((t) => `<option value="${t.name}">${t.name}</option>`).join("");
  $("task").value = defaults.task;
  const describe = () => {
    const task = options.tasks.find((t) => t.name === $("task").value);
    $("task-description").textContent = task ? `${task.description} (metric: ${task.metric})` : "";
  };
  $("task").addEventListener("change", describe);
  describe();
  $("schedule").innerHTML = options.schedules.map((s) => `<option>${s}</option>`).join("");
  $("schedule").value = defaults.schedule;
  $("batch-size").value = defaults.batch_size;
  $("epochs").value = defaults.epochs;
  $("epochs").max = defaults.max_epochs;
  const chosen = defaults.optimizers.map(parseSpec);
  optimizerRows("run-optimizers", chosen.map((c) => c.name),
    (o) => (chosen.find((c) => c.name === o.name) || {}).lr || o.lr, () => {});

  $("function").innerHTML = options.functions.map((f) => `<option value="${f.name}">${f.name}</option>`).join("");
  const setFunction = () => {
    const f = options.functions.find((item) => item.name === $("function").value);
    $("function-formula").textContent = `f(x, y) = ${f.formula}; start (${f.start.join(", ")})`;
    $("steps").value = f.steps;
  };
  $("function").addEventListener("change", () => { setFunction(); scheduleLandscape(); });
  setFunction();
  $("steps").addEventListener("input", scheduleLandscape);
  optimizerRows("landscape-optimizers", ["sgd", "momentum", "adam"], (o) => o.lr, scheduleLandscape);

  document.querySelectorAll(".tab").forEach((tab) => tab.addEventListener("click", () => switchTab(tab)));
  $("run-form").addEventListener("submit", startRun);
  $("stop-run").addEventListener("click", stopRun);
  $("refresh-runs").addEventListener("click", refreshRuns);
  $("compare-runs").addEventListener("click", compareRuns);
  refreshRuns();
}

start();
