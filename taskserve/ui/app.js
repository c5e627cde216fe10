// The taskserve dashboard: plain JavaScript over the server's JSON API, no framework, no build.
//
// Task data (arguments, messages, tracebacks, tags, results) is untrusted: it reaches the page
// only as text nodes and attribute values (textContent, setAttribute), never as markup.
"use strict";

const KEY_STORE = "taskserve.apiKey";
const POLL_MS = 1500;
const PAGE = 50;
const MAX_STRING = 400; // characters of one argument string shown before it is cut
const STATUS_WORDS = {
  pending: "pending",
  in_progress: "running",
  success: "succeeded",
  failure: "failed",
  cancelled: "cancelled",
};
// The API sits next to the page: /ui → /, and /prefix/ui → /prefix/ behind a proxy.
const BASE = new URL(".", document.baseURI);

const state = {
  filters: { route: "", status: "", tag: "" },
  shown: PAGE,
  tasks: [],
  nextCursor: null,
  tasksSeq: 0,
  queues: [],
  workers: [],
  paused: false,
  lastOk: 0,
  detail: null, // {id, status, args, argsError, result, resultFor, previewKey, previewUrl}
};

// -- DOM ---------------------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

/** An element with text children only: h("td", {className: "num"}, "12", someNode). */
function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "className") el.className = value;
    else if (key === "text") el.textContent = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function replaceRows(tbody, rows, emptyText, columns) {
  if (!rows.length) {
    rows = [h("tr", { className: "empty" }, h("td", { colspan: columns }, emptyText))];
  }
  tbody.replaceChildren(...rows);
}

function toast(message, kind = "info") {
  const el = h("div", { className: `toast toast-${kind}`, role: kind === "error" ? "alert" : "status" }, message);
  $("toasts").append(el);
  setTimeout(() => el.remove(), kind === "error" ? 8000 : 4000);
}

// -- formatting --------------------------------------------------------------------------------

function seconds(value) {
  if (value === null || value === undefined) return "";
  if (value < 1) return `${Math.round(value * 1000)} ms`;
  if (value < 60) return `${value.toFixed(value < 10 ? 2 : 1)} s`;
  if (value < 3600) return `${Math.floor(value / 60)}m ${String(Math.floor(value % 60)).padStart(2, "0")}s`;
  return `${Math.floor(value / 3600)}h ${String(Math.floor((value % 3600) / 60)).padStart(2, "0")}m`;
}

function ago(iso) {
  if (!iso) return "";
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 1) return "just now";
  if (s < 60) return `${Math.floor(s)}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function timeCell(iso) {
  return h("time", { datetime: iso, title: iso ? `${when(iso)} (${iso})` : null }, ago(iso));
}

function pill(status) {
  return h("span", { className: `pill s-${status}`, "data-status": status }, STATUS_WORDS[status] || status);
}

function bar(fraction, status) {
  if (fraction === null || fraction === undefined) return null;
  const pct = Math.max(0, Math.min(100, fraction * 100));
  const fill = h("span", { className: `bar-fill s-${status}` });
  fill.style.width = `${pct}%`; // a CSSOM property, which the style-src policy allows
  return h("span", { className: "bar", title: `${pct.toFixed(0)}%` }, fill);
}

/** What a pending task waits for: its time, when delayed, else its place in the queue. */
function waiting(t) {
  if (t.status !== "pending") return "";
  const due = t.run_at ? (Date.parse(t.run_at) - Date.now()) / 1000 : 0;
  if (due > 1) return `scheduled, due in ${seconds(due).replace(/\s*\d+s$/, "")}`;
  return t.attempts ? "waiting to run again" : "waiting for a worker";
}

function number(n) {
  return n === null || n === undefined ? "" : Number(n).toLocaleString("en-US");
}

/** Arguments as indented JSON, with long strings (base64 files, images) cut to a readable size. */
function shortJSON(value) {
  const cut = (v) => {
    if (typeof v === "string" && v.length > MAX_STRING) {
      return `${v.slice(0, 80)}… (${number(v.length)} characters)`;
    }
    if (Array.isArray(v)) return v.map(cut);
    if (v && typeof v === "object") return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, cut(x)]));
    return v;
  };
  return JSON.stringify(cut(value), null, 2);
}

// -- the API -----------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

let keyWanted = null; // the pending prompt for a key, shared by every request that got a 401

/** The form that asks for a key; every request waits on it, so nothing polls while it shows. */
function askForKey(refused) {
  if (!keyWanted) {
    setLive(false, "API key needed");
    keyWanted = new Promise((resolve) => {
      const dialog = $("key-dialog");
      const error = $("key-error");
      error.hidden = !refused;
      error.textContent = refused ? "The server refused that key: check it, or ask the server's operator for one." : "";
      $("key-input").value = "";
      $("key-form").onsubmit = (event) => {
        event.preventDefault();
        sessionStorage.setItem(KEY_STORE, $("key-input").value.trim());
        showKeyControl();
        dialog.close();
        keyWanted = null;
        resolve();
      };
      if (!dialog.open) dialog.showModal();
    });
  }
  return keyWanted;
}

/** "Forget key" shows only while this tab holds a key. */
function showKeyControl() {
  $("forget-key").hidden = !sessionStorage.getItem(KEY_STORE);
}

/** Drop the key and everything shown with it: a fresh page, which asks for a key again. */
function forgetKey() {
  sessionStorage.removeItem(KEY_STORE);
  location.replace(`${location.pathname}${location.search}`);
}

/** Every request of the page: adds the kept API key, asks for one on a 401 and tries again. */
async function api(path, options = {}) {
  for (;;) {
    const key = sessionStorage.getItem(KEY_STORE);
    const headers = new Headers(options.headers || {});
    if (key) headers.set("Authorization", `Bearer ${key}`);
    let response;
    try {
      response = await fetch(new URL(path, BASE), { ...options, headers, cache: "no-store" });
    } catch (err) {
      setLive(false, "server unreachable");
      throw new ApiError(0, "The server cannot be reached; retrying.");
    }
    if (response.status !== 401) {
      state.lastOk = Date.now();
      return response;
    }
    await askForKey(Boolean(key));
  }
}

async function apiJSON(path, options) {
  const response = await api(path, options);
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    throw new ApiError(response.status, (body && body.error) || `${response.status} ${response.statusText}`);
  }
  return body;
}

const routePath = (route) => route.replace(/^\//, "");
const taskQuery = (id) => `task_id=${encodeURIComponent(id)}`;

// -- live status -------------------------------------------------------------------------------

function setLive(ok, text) {
  $("live-dot").className = `live-dot ${state.paused ? "paused" : ok ? "ok" : "down"}`;
  $("live-text").textContent = text;
}

// -- queues, workers, totals -------------------------------------------------------------------

async function loadQueues() {
  state.queues = (await apiJSON("queues")).queues;
  renderQueues();
  renderTiles();
  fillRouteFilter();
}

function countCell(n, cls) {
  return h("td", { className: `num${n ? ` ${cls}` : " zero"}` }, number(n));
}

function renderQueues() {
  const rows = state.queues.map((q) => {
    const cap = [q.concurrency ?? "–", q.max_queue ?? "–"].join(" / ");
    const pick = () => setFilter({ route: state.filters.route === q.route ? "" : q.route });
    return h(
      "tr",
      { className: `clickable${state.filters.route === q.route ? " selected" : ""}`, onclick: pick, title: "Filter tasks by this route" },
      h("td", { className: "route" }, q.route),
      countCell(q.counts.pending, "c-pending"),
      countCell(q.running, "c-in_progress"),
      h("td", { className: `num${q.oldest_pending_age > 60 ? " warn" : ""}` }, seconds(q.oldest_pending_age)),
      h("td", { className: "num" }, number(q.finished_last_minute)),
      h(
        "td",
        { className: "num finished" },
        h("span", { className: q.counts.success ? "c-success" : "zero", title: "succeeded" }, number(q.counts.success)),
        h("span", { className: q.counts.failure ? "c-failure" : "zero", title: "failed" }, number(q.counts.failure)),
        h("span", { className: q.counts.cancelled ? "c-cancelled" : "zero", title: "cancelled" }, number(q.counts.cancelled)),
      ),
      h("td", { className: `num${q.workers ? "" : " warn"}` }, number(q.workers)),
      h("td", { className: "num muted" }, cap),
    );
  });
  replaceRows($("queues").tBodies[0], rows, "This service has no task routes.", 8);
}

function renderTiles() {
  const sum = (f) => state.queues.reduce((n, q) => n + (f(q) || 0), 0);
  const tiles = [
    ["Pending", sum((q) => q.counts.pending), "c-pending"],
    ["Running", sum((q) => q.running), "c-in_progress"],
    ["Finished / min", sum((q) => q.finished_last_minute), ""],
    ["Failed (stored)", sum((q) => q.counts.failure), "c-failure"],
    ["Workers", state.workers.length, ""],
  ];
  $("tiles").replaceChildren(
    ...tiles.map(([label, value, cls]) =>
      h("div", { className: "tile" }, h("div", { className: "tile-label" }, label), h("div", { className: `tile-value ${cls}` }, number(value))),
    ),
  );
}

function fillRouteFilter() {
  const select = $("f-route");
  const have = [...select.options].map((o) => o.value).slice(1).join("\n");
  const want = state.queues.map((q) => q.route);
  if (state.filters.route && !want.includes(state.filters.route)) want.push(state.filters.route);
  if (have === want.join("\n")) return;
  select.replaceChildren(h("option", { value: "" }, "all routes"), ...want.map((r) => h("option", { value: r }, r)));
  select.value = state.filters.route;
}

async function loadWorkers() {
  state.workers = (await apiJSON("workers")).workers;
  renderWorkers();
}

function renderWorkers() {
  const rows = state.workers.map((w) => {
    const routes = w.routes.length > 2 ? [...w.routes.slice(0, 2), `+${w.routes.length - 2}`] : w.routes;
    return h(
      "tr",
      {},
      h("td", { className: "mono" }, w.id),
      h("td", { className: "mono" }, `${w.host} · ${w.pid}`),
      h("td", {}, h("span", { className: `state st-${w.state}` }, w.state)),
      h("td", { className: "routes", title: w.routes.join(" ") }, routes.join(" ")),
      h(
        "td",
        { className: "running-ids" },
        w.running.length ? w.running.map((id) => h("a", { className: "mono", href: `#/task/${id}` }, id)) : h("span", { className: "muted" }, `0 / ${w.concurrency}`),
      ),
      h("td", { className: "mono" }, w.gpus.length ? w.gpus.join(",") : "–"),
      h(
        "td",
        { className: "num finished" },
        h("span", {}, number(w.done)),
        h("span", { className: w.failed ? "c-failure" : "zero" }, number(w.failed)),
      ),
      h("td", { className: "num" }, timeCell(w.last_seen)),
    );
  });
  replaceRows($("workers").tBodies[0], rows, "No live worker reports to this broker.", 8);
  $("workers-note").textContent = `${state.workers.length} live`;
}

// -- tasks -------------------------------------------------------------------------------------

function tasksQuery(extra) {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(state.filters)) if (value) params.set(key, value);
  for (const [key, value] of Object.entries(extra)) params.set(key, value);
  return `tasks?${params}`;
}

async function loadTasks() {
  const seq = ++state.tasksSeq;
  const body = await apiJSON(tasksQuery({ limit: Math.min(1000, Math.max(PAGE, state.shown)) }));
  if (seq !== state.tasksSeq) return; // the filters changed meanwhile
  state.tasks = body.tasks;
  state.nextCursor = body.next_cursor;
  renderTasks();
}

async function loadMore() {
  if (!state.nextCursor) return;
  const seq = ++state.tasksSeq;
  const body = await apiJSON(tasksQuery({ limit: PAGE, cursor: state.nextCursor }));
  if (seq !== state.tasksSeq) return;
  const seen = new Set(state.tasks.map((t) => t.task_id));
  state.tasks.push(...body.tasks.filter((t) => !seen.has(t.task_id)));
  state.shown = state.tasks.length;
  state.nextCursor = body.next_cursor;
  renderTasks();
}

function renderTasks() {
  const selected = state.detail && state.detail.id;
  const rows = state.tasks.map((t) => {
    const progress = t.progress || {};
    const fraction = t.status === "success" ? (t.progress ? 1 : null) : progress.fraction;
    const tags = Object.entries(t.tags || {}).map(([k, v]) => h("span", { className: "tag" }, `${k}:${v}`));
    const attempts = t.max_attempts > 1 ? `${t.attempts}/${t.max_attempts}` : String(t.attempts);
    return h(
      "tr",
      {
        className: `clickable${t.task_id === selected ? " selected" : ""}`,
        "data-task-id": t.task_id,
        onclick: (event) => {
          if (event.target.closest("a")) return;
          openTask(t.task_id);
        },
      },
      h("td", { className: "mono id" }, h("a", { href: `#/task/${t.task_id}` }, t.task_id)),
      h("td", { className: "route" }, t.route),
      h("td", {}, pill(t.status)),
      h(
        "td",
        { className: "progress-cell", title: progress.message || null },
        bar(fraction, t.status),
        t.status === "failure" && t.error ? h("span", { className: "error-inline" }, t.error) : h("span", { className: "muted" }, progress.message || waiting(t)),
      ),
      h("td", {}, timeCell(t.created_at)),
      h("td", { className: "num" }, seconds(t.queue_time)),
      h("td", { className: "num" }, seconds(t.run_time)),
      h("td", { className: `num${t.attempts > 1 ? " warn" : ""}` }, attempts),
      h("td", { className: "mono muted small" }, t.worker || ""),
      h("td", { className: "tags" }, tags),
    );
  });
  const filtered = Object.values(state.filters).some(Boolean);
  replaceRows($("tasks").tBodies[0], rows, filtered ? "No task matches these filters." : "No tasks yet.", 10);
  $("more").hidden = !state.nextCursor;
  $("tasks-note").textContent = `${number(state.tasks.length)} shown${state.nextCursor ? ", more below" : ""} · newest first`;
}

function setFilter(change) {
  Object.assign(state.filters, change);
  state.shown = PAGE;
  state.nextCursor = null;
  syncFilterControls();
  const params = new URLSearchParams(Object.entries(state.filters).filter(([, v]) => v));
  history.replaceState(null, "", `${location.pathname}${params.toString() ? `?${params}` : ""}${location.hash}`);
  renderQueues();
  loadTasks().catch(showError);
}

function syncFilterControls() {
  $("f-route").value = state.filters.route;
  $("f-tag").value = state.filters.tag;
  for (const b of $("f-status").querySelectorAll("button")) {
    b.classList.toggle("on", b.dataset.status === state.filters.status);
  }
}

// -- one task ----------------------------------------------------------------------------------

function openTask(id) {
  if (location.hash !== `#/task/${id}`) location.hash = `#/task/${id}`;
  else showTask(id);
}

function closeTask() {
  history.replaceState(null, "", `${location.pathname}${location.search}`);
  showTask(null);
}

function showTask(id) {
  if (state.detail && state.detail.previewUrl) URL.revokeObjectURL(state.detail.previewUrl);
  if (state.detail && state.detail.resultUrl) URL.revokeObjectURL(state.detail.resultUrl);
  state.detail = id ? { id } : null;
  $("drawer").hidden = !id;
  document.body.classList.toggle("with-drawer", Boolean(id));
  renderTasks();
  if (!id) return;
  $("d-id").textContent = id;
  $("d-status").replaceChildren();
  $("d-route").textContent = "";
  $("d-body").replaceChildren(h("p", { className: "muted" }, "Loading…"));
  refreshDetail().catch(showError);
}

async function refreshDetail() {
  const detail = state.detail;
  if (!detail) return;
  if (detail.status && detail.status.status !== "pending" && detail.status.status !== "in_progress" && detail.settled) return;
  let status;
  try {
    status = await apiJSON(`tasks/${encodeURIComponent(detail.id)}`);
  } catch (err) {
    if (state.detail !== detail) return;
    if (err.status === 404) {
      $("d-body").replaceChildren(h("div", { className: "callout callout-error" }, err.message));
      detail.settled = true;
      return;
    }
    throw err;
  }
  if (state.detail !== detail) return;
  const terminal = !["pending", "in_progress"].includes(status.status);
  // One more read after the end, so that the last progress and the result land.
  detail.settled = terminal && detail.status && detail.status.status === status.status;
  detail.status = status;
  const loads = [];
  if (detail.args === undefined) loads.push(loadArguments(detail));
  if (status.status === "success" && detail.result === undefined) loads.push(loadResult(detail));
  const progress = status.progress;
  if (progress && progress.preview && detail.previewKey !== progress.at) loads.push(loadPreview(detail, progress.at));
  await Promise.allSettled(loads);
  if (state.detail === detail) renderDetail();
}

async function loadArguments(detail) {
  try {
    detail.args = await apiJSON(`tasks/${encodeURIComponent(detail.id)}/arguments`);
  } catch (err) {
    detail.args = null;
    detail.argsError = err.message;
  }
}

async function loadResult(detail) {
  const response = await api(`${routePath(detail.status.route)}/get?${taskQuery(detail.id)}`);
  const type = (response.headers.get("content-type") || "").split(";")[0].trim();
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    detail.result = { error: body.error || `${response.status}` };
  } else if (type.startsWith("image/")) {
    const blob = await response.blob();
    detail.resultUrl = URL.createObjectURL(blob);
    detail.result = { image: detail.resultUrl, type, size: blob.size };
  } else if (type === "application/json") {
    detail.result = { json: await response.json() };
  } else if (type.startsWith("text/")) {
    detail.result = { text: await response.text(), type };
  } else {
    const blob = await response.blob();
    detail.resultUrl = URL.createObjectURL(blob);
    detail.result = { file: detail.resultUrl, type, size: blob.size };
  }
}

async function loadPreview(detail, at) {
  const response = await api(`${routePath(detail.status.route)}/preview?${taskQuery(detail.id)}`);
  if (!response.ok) return;
  const blob = await response.blob();
  if (detail.previewUrl) URL.revokeObjectURL(detail.previewUrl);
  detail.previewUrl = URL.createObjectURL(blob);
  detail.previewKey = at;
}

function fact(label, ...value) {
  const shown = value.filter((v) => v !== null && v !== undefined && v !== "");
  if (!shown.length) return null;
  return [h("dt", {}, label), h("dd", {}, shown)];
}

function section(title, ...content) {
  return h("section", { className: "d-section" }, h("h3", {}, title), content);
}

function renderDetail() {
  const { status: s, id } = state.detail;
  const live = s.status === "pending" || s.status === "in_progress";
  $("d-status").replaceChildren(pill(s.status));
  $("d-route").textContent = s.route;
  $("d-cancel").disabled = !live;
  $("d-retry").disabled = live;

  const stamp = (iso) => (iso ? [when(iso), h("span", { className: "muted" }, ` · ${ago(iso)}`)] : null);
  const tags = Object.entries(s.tags || {}).map(([k, v]) => h("span", { className: "tag" }, `${k}:${v}`));
  const facts = [
    fact("Created", stamp(s.created_at)),
    fact("Started", stamp(s.started_at)),
    fact("Completed", stamp(s.completed_at)),
    fact("Queue time", seconds(s.queue_time)),
    fact("Run time", seconds(s.run_time)),
    fact("Attempts", `${s.attempts} of ${s.max_attempts}`),
    fact("Worker", s.worker ? h("span", { className: "mono" }, s.worker) : null),
    fact("Position", s.position === null || s.position === undefined ? null : `${s.position} ahead in the queue`),
    fact("Priority", s.priority ? String(s.priority) : null),
    fact("Batch size", s.batch_size ? String(s.batch_size) : null),
    fact("Run at", s.run_at && s.status === "pending" ? stamp(s.run_at) : null),
    fact("Expires", stamp(s.expires_at)),
    fact("Deadline", stamp(s.deadline)),
    fact("Retry of", s.retry_of ? h("a", { className: "mono", href: `#/task/${s.retry_of}` }, s.retry_of) : null),
    fact("Tags", tags.length ? tags : null),
    fact("Webhook", s.webhook ? `${s.webhook.state}, ${s.webhook.attempts} tries${s.webhook.last_error ? ` (${s.webhook.last_error})` : ""}` : null),
  ];
  const parts = [];
  if (s.warning) parts.push(h("div", { className: "callout callout-warn" }, s.warning));
  if (s.status === "failure" && s.error) parts.push(h("div", { className: "callout callout-error", "data-role": "error" }, s.error));
  parts.push(h("dl", { className: "facts" }, facts));

  if (state.detail.args !== undefined) {
    parts.push(
      section(
        "Arguments",
        state.detail.args === null ? h("div", { className: "muted" }, state.detail.argsError) : h("pre", { className: "code", "data-role": "arguments" }, shortJSON(state.detail.args)),
      ),
    );
  }
  const p = s.progress;
  if (p) {
    const fraction = p.fraction === null || p.fraction === undefined ? null : p.fraction;
    parts.push(
      section(
        "Progress",
        h(
          "div",
          { className: "progress-line" },
          bar(fraction, s.status),
          fraction === null ? null : h("span", { className: "pct" }, `${Math.round(fraction * 100)}%`),
          h("span", {}, p.message || ""),
          h("span", { className: "muted" }, p.at ? ` · ${ago(p.at)}` : ""),
        ),
        state.detail.previewUrl ? h("img", { className: "picture preview", src: state.detail.previewUrl, alt: "Latest preview", "data-role": "preview" }) : null,
      ),
    );
  }

  const r = state.detail.result;
  if (s.status === "success" && r) {
    let shown;
    if (r.image) shown = [h("img", { className: "picture", src: r.image, alt: "Result image", "data-role": "result-image" }), h("div", { className: "muted small" }, `${r.type}, ${number(r.size)} bytes`)];
    else if (r.json !== undefined) shown = h("pre", { className: "code", "data-role": "result" }, JSON.stringify(r.json, null, 2));
    else if (r.text !== undefined) shown = h("pre", { className: "code", "data-role": "result" }, r.text);
    else if (r.file) shown = h("a", { href: r.file, download: `${id}`, className: "btn" }, `Download (${r.type}, ${number(r.size)} bytes)`);
    else shown = h("div", { className: "callout callout-warn" }, r.error);
    parts.push(section("Result", shown));
  }

  if (s.errors && s.errors.length) {
    const items = s.errors
      .slice()
      .reverse()
      .map((e, i) =>
        h(
          "div",
          { className: "attempt", "data-role": "attempt" },
          h(
            "div",
            { className: "attempt-head" },
            h("span", { className: "attempt-n" }, `Attempt ${e.attempt}`),
            h("span", { className: "error-type" }, e.type),
            h("span", { className: "error-message" }, e.message),
            h("span", { className: "muted small" }, when(e.at)),
          ),
          e.traceback ? h("details", { open: i === 0 }, h("summary", {}, "Traceback"), h("pre", { className: "code traceback", "data-role": "traceback" }, e.traceback)) : null,
        ),
      );
    parts.push(section(`Attempts and errors (${s.errors.length})`, items));
  }

  const body = $("d-body");
  const scroll = body.scrollTop;
  const open = [...body.querySelectorAll("details")].map((d) => d.open);
  body.replaceChildren(...parts);
  // Keep what the reader had opened or closed, and where they were, across refreshes.
  body.querySelectorAll("details").forEach((d, i) => {
    if (i < open.length) d.open = open[i];
  });
  body.scrollTop = scroll;
}

async function act(kind) {
  const detail = state.detail;
  if (!detail || !detail.status) return;
  const button = $(kind === "cancel" ? "d-cancel" : "d-retry");
  button.disabled = true;
  try {
    const body = await apiJSON(`${routePath(detail.status.route)}/${kind}?${taskQuery(detail.id)}`, { method: "POST" });
    if (kind === "cancel") {
      toast(`Cancelled ${detail.id}`);
      detail.settled = false;
      await refreshDetail();
    } else {
      toast(`Retried as ${body.task_id}`);
      openTask(body.task_id);
    }
    loadTasks().catch(showError);
  } catch (err) {
    showError(err);
    detail.settled = false;
    refreshDetail().catch(showError);
  }
}

// -- search ------------------------------------------------------------------------------------

async function goToTask(raw) {
  const id = raw.trim().replace(/^#\/task\//, "");
  if (!id) return;
  try {
    await apiJSON(`tasks/${encodeURIComponent(id)}`);
    $("search").value = "";
    openTask(id);
  } catch (err) {
    toast(err.status === 404 ? `No task ${id} on this server (it may have been purged).` : err.message, "error");
  }
}

// -- the loop ----------------------------------------------------------------------------------

function showError(err) {
  if (err && err.status === 0) return; // shown by the live indicator
  toast(err && err.message ? err.message : String(err), "error");
}

let refreshing = false;

async function refresh() {
  if (refreshing) return;
  refreshing = true;
  try {
    const results = await Promise.allSettled([loadWorkers(), loadQueues(), loadTasks(), refreshDetail()]);
    const failed = results.find((r) => r.status === "rejected");
    if (failed && failed.reason && failed.reason.status !== 0 && !state.shownError) {
      state.shownError = true; // once until things work again, not every poll
      showError(failed.reason);
    }
    if (!failed) state.shownError = false;
    if (!results.some((r) => r.status === "rejected" && r.reason && r.reason.status === 0)) {
      setLive(true, state.paused ? "paused" : `live · ${new Date().toLocaleTimeString()}`);
    }
  } finally {
    refreshing = false;
  }
}

function loop() {
  const run = !state.paused && !document.hidden ? refresh() : Promise.resolve();
  run.finally(() => setTimeout(loop, POLL_MS));
}

async function loadSchema() {
  try {
    const schema = await apiJSON("schema.json");
    $("service-name").textContent = `${schema.name} · v${schema.version}`;
    document.title = `${schema.name} · taskserve`;
  } catch (err) {
    showError(err);
  }
}

function route() {
  const match = location.hash.match(/^#\/task\/([^/?#]+)/);
  const id = match ? decodeURIComponent(match[1]) : null;
  if (id !== (state.detail && state.detail.id)) showTask(id);
}

function start() {
  const params = new URLSearchParams(location.search);
  for (const key of Object.keys(state.filters)) state.filters[key] = params.get(key) || "";
  syncFilterControls();

  $("f-route").addEventListener("change", (e) => setFilter({ route: e.target.value }));
  $("f-status").addEventListener("click", (e) => {
    const b = e.target.closest("button");
    if (b) setFilter({ status: b.dataset.status });
  });
  let typing;
  $("f-tag").addEventListener("input", (e) => {
    clearTimeout(typing);
    const value = e.target.value.trim();
    if (!value || value.includes(":")) typing = setTimeout(() => setFilter({ tag: value }), 300);
  });
  $("filters").addEventListener("submit", (e) => e.preventDefault());
  $("more").addEventListener("click", () => loadMore().catch(showError));
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    goToTask($("search").value);
  });
  $("search").addEventListener("paste", (e) => {
    const text = (e.clipboardData || window.clipboardData).getData("text");
    if (text && text.trim()) {
      e.preventDefault();
      $("search").value = text.trim();
      goToTask(text);
    }
  });
  $("d-close").addEventListener("click", closeTask);
  $("d-copy").addEventListener("click", () => {
    const id = state.detail && state.detail.id;
    if (id && navigator.clipboard) navigator.clipboard.writeText(id).then(() => toast("Task id copied"), () => {});
  });
  $("d-cancel").addEventListener("click", () => act("cancel"));
  $("d-retry").addEventListener("click", () => act("retry"));
  $("forget-key").addEventListener("click", forgetKey);
  // Escape would close the key form and leave every request waiting on it for good.
  $("key-dialog").addEventListener("cancel", (e) => e.preventDefault());
  showKeyControl();
  $("pause").addEventListener("click", () => {
    state.paused = !state.paused;
    $("pause").textContent = state.paused ? "Resume" : "Pause";
    setLive(true, state.paused ? "paused" : "live");
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.detail && !$("key-dialog").open) closeTask();
    if (e.key === "/" && document.activeElement.tagName !== "INPUT") {
      e.preventDefault();
      $("search").focus();
    }
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refresh();
  });
  window.addEventListener("hashchange", route);

  loadSchema();
  route();
  loop();
}

start();
