// The Substantial dashboard: a client of the JSON API (docs/reference/http.md).
// Every value from the API reaches the page through textContent, never as HTML.
"use strict";

const ROOT = document.body.dataset.root || "";
const TOKEN_COOKIE = "substantial_token";
const LIST_LIMIT = 50;
const HISTORY_LIMIT = 200;
const REFRESH_MS = 2000;
const TREE_DEPTH = 3;
const TREE_BUDGET = 50;
const TERMINAL = new Set(["COMPLETED", "FAILED", "CANCELLED", "REVERTED", "CONTINUED"]);
const RESUMABLE = new Set(["FAILED", "CANCELLED"]);

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function json(value) {
  return JSON.stringify(value, null, 2);
}

function notice(text) {
  $("notice").textContent = text || "";
}

// What an action on the run page did, next to its buttons (and, if it failed, in
// the header too): an error from the API is never silent.
function said(text, failed) {
  const line = $("action-message");
  line.textContent = text || "";
  line.className = failed ? "error" : "ok";
  if (failed) notice(text);
}

function unservedText(doc) {
  return `No live worker serves workflow '${doc.workflow}' on queue '${doc.queue}': ` +
    "this run waits until one does.";
}

// -- the token: asked once, kept in a cookie, sent as the Bearer header -----------

function token() {
  for (const part of document.cookie.split(";")) {
    const [key, ...rest] = part.trim().split("=");
    if (key === TOKEN_COOKIE) return decodeURIComponent(rest.join("="));
  }
  return null;
}

// Several calls may meet a 401 at once: they all wait on the one prompt.
let asking = null;

function askToken() {
  if (asking) return asking;
  asking = new Promise((resolve) => {
    const form = $("login");
    form.hidden = false;
    $("token").focus();
    form.onsubmit = (ev) => {
      ev.preventDefault();
      const value = encodeURIComponent($("token").value);
      document.cookie = `${TOKEN_COOKIE}=${value}; path=${ROOT || "/"}; SameSite=Strict`;
      form.hidden = true;
      asking = null;
      resolve();
    };
  });
  return asking;
}

async function api(path, options = {}) {
  for (;;) {
    const headers = Object.assign({}, options.headers || {});
    const t = token();
    if (t) headers.Authorization = `Bearer ${t}`;
    const response = await fetch(ROOT + path, Object.assign({}, options, { headers }));
    if (response.status === 401) {
      await askToken();
      continue;
    }
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const error = body && body.error ? body.error : {};
      const what = error.type ? `${response.status} ${error.type}` : String(response.status);
      throw new Error(`${what}: ${error.message || response.statusText}`);
    }
    return body;
  }
}

// -- the runs list ------------------------------------------------------------------

const list = { cursor: null, next: null, timer: null, asked: 0 };

function listQuery() {
  const q = new URLSearchParams({ limit: String(LIST_LIMIT) });
  if ($("f-workflow").value) q.set("workflow", $("f-workflow").value);
  if ($("f-status").value) q.append("status", $("f-status").value);
  const terms = [];
  for (const [id, op] of [["f-after", "gte"], ["f-before", "lt"]]) {
    const when = $(id).value ? new Date($(id).value) : null; // the browser's local time
    if (when && !Number.isNaN(when.getTime())) {
      terms.push({ started_at: { [op]: when.toISOString() } });
    }
  }
  if (terms.length) q.set("filter", JSON.stringify(terms.length > 1 ? { and: terms } : terms[0]));
  if (list.cursor) q.set("cursor", list.cursor);
  return q;
}

function drawCounts(workflows) {
  const body = $("counts").tBodies[0];
  const select = $("f-workflow");
  const chosen = select.value;
  body.replaceChildren();
  select.replaceChildren(el("option", "all"));
  select.options[0].value = "";
  for (const w of workflows) {
    const row = el("tr");
    row.dataset.workflow = w.name;
    row.append(el("td", w.name));
    const cell = el("td");
    for (const [status, n] of Object.entries(w.counts)) {
      if (!n) continue;
      const badge = el("span", `${status} ${n}`, `count status-${status}`);
      badge.dataset.status = status;
      cell.append(badge);
    }
    if (!cell.children.length) cell.append(el("span", "no runs", "empty"));
    row.append(cell);
    body.append(row);
    const option = el("option", w.name);
    option.value = w.name;
    select.append(option);
  }
  select.value = chosen;
}

function drawRuns(runs) {
  const body = $("runs").tBodies[0];
  body.replaceChildren();
  for (const r of runs) {
    const row = el("tr");
    row.dataset.runId = r.run_id;
    const link = el("a", r.run_id);
    link.href = `${ROOT}/runs/${encodeURIComponent(r.run_id)}`;
    const id = el("td");
    id.append(link);
    const status = el("td", r.status, `status status-${r.status}`);
    if (r.unserved) {
      const badge = el("span", "no worker", "badge unserved");
      badge.title = unservedText(r);
      status.append(badge);
    }
    row.append(id, el("td", r.workflow), status);
    row.append(el("td", r.started_at || ""), el("td", r.ended_at || ""));
    body.append(row);
  }
  if (!runs.length) {
    const row = el("tr");
    const cell = el("td", "no runs", "empty");
    cell.colSpan = 5;
    row.append(cell);
    body.append(row);
  }
}

async function loadList() {
  const asked = ++list.asked; // only the latest answer is drawn (filters may change meanwhile)
  try {
    const [workflows, page] = await Promise.all([
      api("/api/workflows"),
      api(`/api/runs?${listQuery()}`),
    ]);
    if (asked !== list.asked) return;
    drawCounts(workflows.workflows);
    drawRuns(page.runs);
    list.next = page.next_cursor;
    $("next").disabled = !list.next;
    $("first").disabled = !list.cursor;
    notice("");
  } catch (err) {
    notice(err.message);
  }
}

function showList() {
  $("list-view").hidden = false;
  const restart = () => {
    list.cursor = null;
    loadList();
  };
  $("f-workflow").onchange = restart;
  $("f-status").onchange = restart;
  $("f-after").onchange = restart;
  $("f-before").onchange = restart;
  $("first").onclick = restart;
  $("next").onclick = () => {
    list.cursor = list.next;
    loadList();
  };
  $("auto").onchange = () => {
    clearInterval(list.timer);
    list.timer = $("auto").checked ? setInterval(loadList, REFRESH_MS) : null;
  };
  loadList();
}

// -- a run --------------------------------------------------------------------------

const run = {
  id: null,
  status: null,
  unserved: false,
  cursor: null,
  span: null,
  timer: null,
  tree: 0, // which redraw the children tree belongs to
  loading: false, // a redraw is under way
  paging: false, // "More" is fetching
};

function term(dl, name, value, cls) {
  dl.append(el("dt", name));
  const dd = el("dd", value === null || value === undefined ? "—" : value, cls);
  dd.id = `s-${name.replace(/\s+/g, "-")}`;
  dl.append(dd);
}

function drawSummary(doc) {
  $("r-id").textContent = doc.run_id;
  const dl = $("summary");
  dl.replaceChildren();
  term(dl, "workflow", doc.workflow);
  term(dl, "status", doc.status, `status status-${doc.status}`);
  term(dl, "queue", doc.queue);
  term(dl, "started", doc.started_at);
  term(dl, "ended", doc.ended_at);
  if (doc.parent_id) {
    dl.append(el("dt", "parent"));
    const dd = el("dd");
    dd.append(runLink(doc.parent_id));
    dl.append(dd);
  }
  $("kwargs").textContent = json(doc.kwargs);
  const failed = doc.error !== null && doc.error !== undefined;
  $("outcome-title").textContent = failed ? `Error: ${doc.error_type || "error"}` : "Result";
  $("outcome").textContent = failed ? doc.error : json(doc.result);
  $("outcome").className = failed ? "error" : "";
  const children = $("children");
  children.replaceChildren();
  if (!(doc.children || []).length) children.append(el("li", "none", "empty"));
  run.tree += 1; // a tree still drawing for an earlier redraw stops adding
  drawTree(children, doc.children || [], { left: TREE_BUDGET, tree: run.tree }, 1);
  const waits = $("unserved");
  waits.hidden = !doc.unserved;
  waits.textContent = doc.unserved ? unservedText(doc) : "";
  const done = TERMINAL.has(doc.status);
  $("cancel").disabled = done;
  $("revert").disabled = done;
  $("resume").disabled = !RESUMABLE.has(doc.status);
  $("send").querySelector("button").disabled = done;
}

// The children as a tree: each child's workflow and status, and its own children,
// down to TREE_DEPTH levels and TREE_BUDGET runs (one API call each).
async function drawTree(list, ids, budget, depth) {
  for (const id of ids) {
    if (budget.tree !== run.tree) return;
    const item = el("li");
    item.dataset.runId = id;
    item.append(runLink(id));
    list.append(item);
    if (budget.left <= 0) continue;
    budget.left -= 1;
    try {
      const doc = await api(`/api/runs/${encodeURIComponent(id)}`);
      item.append(el("span", doc.workflow, "tree-workflow"));
      item.append(el("span", doc.status, `status status-${doc.status}`));
      if (depth < TREE_DEPTH && (doc.children || []).length) {
        const sub = el("ul");
        item.append(sub);
        await drawTree(sub, doc.children, budget, depth + 1);
      }
    } catch (err) {
      item.append(el("span", err.message, "error"));
    }
  }
}

function runLink(id) {
  const link = el("a", id);
  link.href = `${ROOT}/runs/${encodeURIComponent(id)}`;
  return link;
}

// The run's span: from its start to its end (or now), in epoch milliseconds.
function runSpan(doc) {
  const start = Date.parse(doc.started_at);
  const end = doc.ended_at ? Date.parse(doc.ended_at) : Date.now();
  return Number.isNaN(start) ? null : { start, end: Math.max(end, start + 1) };
}

function ms(value) {
  if (value === null || value === undefined) return "?";
  return value >= 1000 ? `${(value / 1000).toFixed(2)} s` : `${value.toFixed(1)} ms`;
}

function marksOf(entry) {
  const marks = [];
  if (entry.attempts > 1) marks.push(["retry", `↻${entry.attempts}`, `${entry.attempts} attempts`]);
  if (entry.kind === "sleep") marks.push(["timer", "◔", "timer"]);
  if (entry.kind === "event" || entry.kind === "receive") marks.push(["event", "✉", "event"]);
  return marks;
}

function drawEntry(entry) {
  const row = el("div", undefined, `entry kind-${entry.kind}`);
  row.dataset.kind = entry.kind;
  row.dataset.seq = entry.seq === null ? "" : String(entry.seq);
  const label = el("div", undefined, "label");
  // the step number that "Fork from step" takes (an event shows its receive's)
  const seq = entry.seq === null || entry.kind === "event" ? "" : `#${entry.seq}`;
  label.append(el("span", seq, "seq"), el("span", entry.kind, "kind"));
  label.append(el("span", entry.name || "", "name"));
  for (const [cls, text, title] of marksOf(entry)) {
    const mark = el("span", text, `mark ${cls}`);
    mark.title = title;
    label.append(mark);
  }
  const track = el("div", undefined, "track");
  const began = entry.started_at ? Date.parse(entry.started_at) : NaN;
  if (run.span && !Number.isNaN(began)) {
    const total = run.span.end - run.span.start;
    const left = Math.min(100, Math.max(0, ((began - run.span.start) / total) * 100));
    const width = Math.max(0.5, Math.min(100 - left, ((entry.duration_ms || 0) / total) * 100));
    const bar = el("div", undefined, entry.error ? "bar errored" : "bar");
    bar.style.left = `${left}%`;
    bar.style.width = `${width}%`;
    bar.title = `${entry.kind} ${entry.name || ""}: ${ms(entry.duration_ms)}`;
    track.append(bar);
  }
  const detail = el("div", undefined, "detail");
  if (entry.duration_ms !== null && entry.duration_ms !== undefined) {
    detail.append(el("span", ms(entry.duration_ms), "ms"));
  }
  if (entry.at) detail.append(el("span", entry.at, "at"));
  if (entry.error) detail.append(el("span", entry.error, "error"));
  row.append(label, track, detail);
  return row;
}

async function loadHistory(reset) {
  if (reset) {
    run.cursor = null;
    $("timeline").replaceChildren();
  }
  const q = new URLSearchParams({ limit: String(HISTORY_LIMIT) });
  if (run.cursor) q.set("cursor", run.cursor);
  const page = await api(`/api/runs/${encodeURIComponent(run.id)}/history?${q}`);
  for (const entry of page.entries) $("timeline").append(drawEntry(entry));
  run.cursor = page.next_cursor;
  $("more").hidden = !run.cursor;
}

async function loadLogs() {
  const doc = await api(`/api/runs/${encodeURIComponent(run.id)}/logs`);
  const logs = $("logs");
  logs.replaceChildren();
  for (const line of doc.logs) {
    const item = el("li", undefined, `log level-${line.level}`);
    const fields = Object.keys(line.fields || {}).length ? ` ${JSON.stringify(line.fields)}` : "";
    item.append(el("span", line.at || "", "at"), el("span", line.level, "level"));
    item.append(el("span", line.message + fields, "message"));
    logs.append(item);
  }
}

async function loadRun() {
  run.loading = true;
  try {
    const doc = await api(`/api/runs/${encodeURIComponent(run.id)}`);
    run.status = doc.status;
    run.unserved = Boolean(doc.unserved);
    run.span = runSpan(doc);
    drawSummary(doc);
    await Promise.all([loadHistory(true), loadLogs()]);
    notice("");
  } catch (err) {
    notice(err.message);
  } finally {
    run.loading = false;
  }
}

// While the run is live, watch its status and redraw the page when it changes.
async function watchRun() {
  // One redraw at a time: a slow one must not interleave with the next.
  if (run.loading || run.status === null || TERMINAL.has(run.status)) return;
  try {
    const doc = await api(`/api/runs/${encodeURIComponent(run.id)}`);
    if (doc.status !== run.status || Boolean(doc.unserved) !== run.unserved) await loadRun();
  } catch (err) {
    notice(err.message);
  }
}

// POST to one of the run's action routes; the page says what happened either way.
async function act(route, body, done) {
  try {
    const options = { method: "POST" };
    if (body !== undefined) {
      options.headers = { "Content-Type": "application/json" };
      options.body = JSON.stringify(body);
    }
    const answer = await api(`/api/runs/${encodeURIComponent(run.id)}/${route}`, options);
    said(done);
    return answer;
  } catch (err) {
    said(err.message, true);
    return null;
  }
}

async function sendEvent(ev) {
  ev.preventDefault();
  let payload;
  try {
    payload = JSON.parse($("e-payload").value || "null");
  } catch (err) {
    said(`the payload is not JSON: ${err.message}`, true);
    return;
  }
  const name = $("e-name").value;
  await act(`events/${encodeURIComponent(name)}`, payload, `event ${name} sent`);
}

async function cancelRun() {
  await act("cancel", undefined, "cancel requested");
}

async function revertRun() {
  await act("cancel", { revert: true }, "cancel with revert requested: compensating");
}

async function resumeRun() {
  if (await act("resume", undefined, "resumed: the run is PENDING again")) await loadRun();
}

async function forkRun(ev) {
  ev.preventDefault();
  const step = Number($("fork-step").value);
  const answer = await act("fork", { from_step: step }, `forked from step ${step}`);
  if (answer) location.assign(`${ROOT}/runs/${encodeURIComponent(answer.run_id)}`);
}

function showRun(id) {
  run.id = id;
  $("run-view").hidden = false;
  $("more").onclick = async () => {
    if (run.loading || run.paging) return;
    run.paging = true;
    try {
      await loadHistory(false);
    } catch (err) {
      notice(err.message);
    } finally {
      run.paging = false;
    }
  };
  $("send").onsubmit = sendEvent;
  $("cancel").onclick = cancelRun;
  $("revert").onclick = revertRun;
  $("resume").onclick = resumeRun;
  $("fork").onsubmit = forkRun;
  loadRun();
  run.timer = setInterval(watchRun, 1000);
}

function start() {
  const path = location.pathname.slice(ROOT.length);
  const match = /^\/runs\/([^/]+)$/.exec(path);
  if (match) showRun(decodeURIComponent(match[1]));
  else showList();
}

start();
