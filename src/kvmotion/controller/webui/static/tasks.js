// The task pages: #/tasks (every task, live) and #/tasks/:id (one task live, then its migration report).
import { get, post, can, stream, h, route, onLeave, errorBox, fmt } from "./api.js";

const FINISHED = new Set(["success", "error"]);
// app.css's badges (badge-ok, -warn, -bad, -off) and one of this page's own for a task that runs
const STATE_CLASS = { running: "badge-run", queued: "badge-off", success: "badge-ok", error: "badge-bad",
                      unknown: "badge-warn" };
const SVG = "http://www.w3.org/2000/svg";

const stateBadge = (state, testid) =>
  h("span", { class: `badge ${STATE_CLASS[state] || "badge-off"}`, "data-testid": testid }, state || "—");
const mib = (bytes) => bytes == null ? "—" : (bytes / 1048576).toFixed(1) + " MB";
const dur = (s) => {
  if (s == null || !isFinite(s) || s < 0) return "—";
  if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
  const m = Math.floor(s / 60);
  return m < 60 ? `${m} min ${Math.round(s % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
};
// The shown ETA: at zero while the task still runs, it is "any moment" (it never goes back up in a phase).
const etaText = (s) => s == null ? "—" : s < 0.5 ? "any moment" : dur(s);
const taskDuration = (t) => {
  const start = t.started_at || t.created_at;
  if (!start) return null;
  return (t.finished_at || Date.now() / 1000) - start;
};
const progressBar = (t, testid) =>
  h("span", { class: "progress" },
    h("progress", { max: 100, value: Math.max(0, Math.min(100, t.progress || 0)), "data-testid": testid }),
    h("span", { class: "progress-text" }, fmt.pct(t.progress)));

// A table's head; the columns of times and durations align right like their cells.
const NUMERIC = new Set(["Started", "Duration"]);
const heads = (names) =>
  h("thead", {}, h("tr", {}, names.map((c) => h("th", { class: NUMERIC.has(c) ? "num" : undefined }, c))));

// Run fn every second while the page is shown.
function everySecond(fn) {
  const timer = setInterval(fn, 1000);
  onLeave(() => clearInterval(timer));
}

// ---- #/tasks ----------------------------------------------------------------------------------------------
function taskRow(t) {
  const link = h("a", { href: `#/tasks/${encodeURIComponent(t.id)}` }, t.kind);
  const row = h("tr", { "data-testid": `task-row-${t.id}`, class: "task-row" },
    h("td", {}, link),
    h("td", {}, t.vm_name),
    h("td", { class: "route" }, t.source || "—", " → ", t.destination || "—"),
    h("td", {}, stateBadge(t.state)),
    h("td", {}, t.phase || "—"),
    h("td", {}, progressBar(t)),
    h("td", { class: "num" }, fmt.datetime(t.started_at || t.created_at)),
    h("td", { class: "num duration" }, dur(taskDuration(t))));
  row.addEventListener("click", (ev) => { if (ev.target.tagName !== "A") location.hash = link.getAttribute("href"); });
  row.task = t;
  return row;
}

route("#/tasks", async (_params, main) => {
  const here = location.hash;
  const tasks = await get("/tasks?limit=200");
  if (location.hash !== here) return;          // left while it loaded: the next page owns <main>
  const body = h("tbody", {}, tasks.map(taskRow));
  const empty = h("p", { class: "muted" }, "No tasks yet: a migration started from a VM's page appears here.");
  main.replaceChildren(h("div", { class: "task-list-page" },
    h("h1", {}, "Tasks"),
    h("table", { class: "grid tasks", "data-testid": "task-list" },
      heads(["Task", "VM", "Source → destination", "State", "Phase", "Progress", "Started", "Duration"]),
      body),
    tasks.length ? null : empty));
  const put = (t) => {
    const old = [...body.rows].find((r) => r.task && r.task.id === t.id);
    if (old && old.task.updated_at === t.updated_at) return;
    const row = taskRow(t);
    if (old) old.replaceWith(row); else { body.prepend(row); empty.remove(); }
  };
  const reread = () => get("/tasks?limit=200").then((ts) => ts.reverse().forEach(put)).catch(() => {});
  stream("/tasks/stream", put, null, reread);        // resync: the stream fell behind; read the list again
  let ticks = 0;
  everySecond(() => {
    // and every 30 s: a task another controller process changed reaches no stream of this one
    if (++ticks % 30 === 0) reread();
    for (const r of body.rows) {
      if (r.task && !FINISHED.has(r.task.state)) r.querySelector(".duration").textContent = dur(taskDuration(r.task));
    }
  });
});

// ---- #/tasks/:id ------------------------------------------------------------------------------------------
// The ETA never runs backwards on the page: within one phase the shown value only counts down (or drops to a
// lower new estimate); a new phase starts afresh.
// The live view is not cleared between phases: an estimate carried over unchanged into a new phase is stale
// (it belonged to the phase before) and is not shown until a new one comes.
function etaKeeper() {
  let shown = null, at = 0, phase = null, raw, stale;
  return {
    update(eta, ph) {
      const now = Date.now() / 1000;
      if (ph !== phase) stale = raw;
      raw = eta;
      if (eta == null || (eta === stale && ph !== null)) { shown = null; phase = ph; return; }
      const counted = shown == null ? null : Math.max(0, shown - (now - at));
      shown = (counted == null || ph !== phase) ? eta : Math.min(counted, eta);
      at = now; phase = ph;
    },
    now() { return shown == null ? null : Math.max(0, shown - (Date.now() / 1000 - at)); },
  };
}

function field(label, testid, value) {
  return h("div", { class: "field" }, h("span", { class: "label" }, label),
           h("span", { class: "value", "data-testid": testid }, value));
}

function summaryBlock(t) {
  return h("div", { class: "fields" },
    field("State", "task-state", stateBadge(t.state)),
    field("Phase", "task-phase", t.phase || "—"),
    field("Progress", "task-progress-box", progressBar(t, "task-progress")),
    field("Started", "task-started", fmt.datetime(t.started_at || t.created_at)),
    field("Duration", "task-duration", dur(taskDuration(t))));
}

// What remains and how fast, whatever the move copies: memory (pre-copy), disks (mirror, NBD streams), files.
function liveNumbers(lv) {
  const left = (total, done) => total != null && done != null ? Math.max(0, total - done) : null;
  return {
    remaining: lv.remaining ?? left(lv.bytes_total, lv.bytes_done) ?? left(lv.disk_bytes_total, lv.disk_bytes_done),
    mbps: lv.mbps ?? lv.disk_mbps ?? null,
  };
}

// Pre-copy watched for a few passes without getting closer (decisions.ProgressWatch): no ETA to give.
const notConverging = (t) => t.phase === "precopy" && t.live.converging === false && (t.live.pass || 0) >= 3;

function liveBlock(t, eta) {
  const lv = t.live || {};
  const { remaining, mbps } = liveNumbers(lv);
  const etaS = eta.now();
  return h("div", {},
    h("div", { class: "fields live" },
      field("Pass", "task-pass", lv.pass != null ? String(lv.pass) : "—"),
      field("Remaining", "task-remaining", remaining != null ? mib(remaining) : "—"),
      field("ETA", "task-eta", etaS == null && notConverging(t) ? "not converging" : etaText(etaS)),
      field("Rate", "task-rate", mbps != null ? `${Number(mbps).toFixed(0)} Mbit/s` : "—"),
      lv.dirty_pages_rate != null ? field("Dirty pages/s", "task-dirty", String(lv.dirty_pages_rate)) : null,
      lv.disk ? field("Disk", "task-disk", `${lv.disk} (${lv.disk_index} of ${lv.disks}, ${fmt.pct(lv.percent)})`)
        : null),
    lv.unknown ? h("div", { class: "error", role: "alert", "data-testid": "task-unknown" },
      h("strong", {}, "Outcome not known yet: "), lv.unknown.reason || "",
      h("div", { class: "remedy" }, "Fix: reconciliation completes or undoes the move once both hosts answer; " +
        "check that both agents are connected.")) : null,
    lv.children ? childTable(lv) : null);
}

// An evacuation's moves, one row per VM.
function childTable(lv) {
  const rows = Object.entries(lv.children).map(([vm, c]) => h("tr", {},
    h("td", {}, h("a", { href: `#/tasks/${encodeURIComponent(c.task)}` }, vm)), h("td", {}, stateBadge(c.state)),
    h("td", {}, c.phase || "—"), h("td", {}, c.destination || "—"),
    h("td", { class: "num" }, fmt.pct(c.progress))));
  const blocked = Object.entries(lv.blocked || {}).map(([vm, why]) => h("tr", { class: "blocked" },
    h("td", {}, vm), h("td", { colspan: 4 }, "blocked: ", typeof why === "string" ? why : JSON.stringify(why))));
  return h("table", { class: "grid children", "data-testid": "task-children" },
    h("thead", {}, h("tr", {}, ["VM", "State", "Phase", "Destination", "Progress"].map((c) => h("th", {}, c)))),
    h("tbody", {}, rows, blocked));
}

// One phase's detail in a line: codes for findings, times of day for timestamps, sizes of lists (the cell's
// tooltip has all of it).
function detailValue(k, v) {
  if (Array.isArray(v)) {
    const codes = v.map((x) => x && x.code).filter(Boolean);
    return codes.length ? codes.join(",") : `[${v.length}]`;
  }
  if (typeof v === "object") return `{${Object.keys(v).join(",")}}`;
  if (typeof v === "number" && k.endsWith("_at") && v > 1e9) return fmt.time(v);
  return String(v);
}

function detailText(detail) {
  const parts = [];
  for (const [k, v] of Object.entries(detail || {})) {
    if (v === null || v === undefined || v === "") continue;
    const s = detailValue(k, v);
    parts.push(`${k}=${s.length > 60 ? s.slice(0, 57) + "…" : s}`);
    if (parts.length >= 8) { parts.push("…"); break; }
  }
  return parts.join("  ");
}

function phaseTable(t) {
  const cls = { running: "phase-running", ok: "phase-ok", failed: "phase-error", skipped: "phase-skipped" };
  const rows = (t.phases || []).map((p) => h("tr", { "data-testid": `phase-${p.name}`,
                                                    class: cls[p.status] || "phase-other" },
    h("td", {}, p.name), h("td", {}, h("span", { class: "phase-status" }, p.status)),
    h("td", { class: "num" }, fmt.time(p.started_at)),
    h("td", { class: "num" }, dur((p.ended_at || (FINISHED.has(t.state) ? null : Date.now() / 1000)) - p.started_at)),
    h("td", { class: "detail", title: JSON.stringify(p.detail || {}) }, detailText(p.detail))));
  return h("table", { class: "grid phases", "data-testid": "task-phases" },
    heads(["Phase", "Status", "Started", "Duration", "Detail"]),
    h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No phase yet (queued)"))));
}

function taskError(err) {
  if (!err) return null;
  const box = errorBox(err);
  const rb = err.rollback;
  if (err.phase) box.append(h("div", {}, `Failed in phase ${err.phase}.`));
  if (rb && typeof rb === "object") {
    box.append(h("div", {}, "Rollback: ", rb.source_running ? "the VM runs on the source again."
      : rb.needs_reconcile ? "not complete: reconciliation decides where the VM runs." : detailText(rb)));
  }
  return box;
}

// Cancels asked for on this page: the button is redrawn with every update of the task, and stays disabled.
const cancelling = new Set();

function cancelButton(t, out) {
  if (!can("operator") || FINISHED.has(t.state) || t.state === "unknown") return null;
  const asked = cancelling.has(t.id);
  return h("button", { class: "btn btn-warn", "data-testid": "task-cancel", disabled: asked, onclick: async (ev) => {
    if (!confirm(`Cancel ${t.kind} of ${t.vm_name}? The VM stays on (or returns to) its source.`)) return;
    cancelling.add(t.id);
    ev.target.disabled = true;
    ev.target.textContent = "Cancelling…";
    out.replaceChildren();
    try { await post(`/tasks/${encodeURIComponent(t.id)}/cancel`); }
    catch (e) { cancelling.delete(t.id); out.replaceChildren(errorBox(e)); ev.target.disabled = false; }
  } }, asked ? "Cancelling…" : "Cancel task");
}

route("#/tasks/:id", async ({ id }, main) => {
  const path = `/tasks/${encodeURIComponent(id)}`;
  const eta = etaKeeper();
  const msg = h("div", { class: "messages" });
  const view = h("div", { class: "task-page" });
  const here = location.hash;
  let task = await get(path);
  if (location.hash !== here) return;          // left while it loaded: the next page owns <main>
  const render = () => view.replaceChildren(...taskPage(task, eta, msg).filter(Boolean));
  eta.update(task.live && task.live.eta_s, task.phase);
  render();
  main.replaceChildren(view);
  if (!FINISHED.has(task.state)) {
    stream(`${path}/stream`, (t) => { task = t; eta.update(t.live && t.live.eta_s, t.phase); render(); });
    everySecond(() => {
      if (FINISHED.has(task.state)) return;
      const e = view.querySelector('[data-testid="task-eta"]'), d = view.querySelector('[data-testid="task-duration"]');
      const s = eta.now();
      if (e && s != null) e.textContent = etaText(s);
      if (d) d.textContent = dur(taskDuration(task));
    });
  }
});

function taskPage(t, eta, msg) {
  const done = FINISHED.has(t.state);
  return [
    h("div", { class: "page-head" },
      h("h1", {}, `${t.kind}: `, subjectLink(t)),
      h("div", { class: "route" }, t.source || "—", " → ", t.destination || "—"),
      h("div", { class: "actions" }, cancelButton(t, msg))),
    msg,
    summaryBlock(t),
    done ? null : liveBlock(t, eta),
    done ? null : taskError(t.error),
    h("h2", {}, "Phases"),
    phaseTable(t),
    done ? report(t) : liveChart(t),
    h("p", { class: "muted" }, h("a", { href: "#/tasks" }, "← All tasks")),
  ];
}

function subjectLink(t) {
  if (t.kind === "maintenance") return h("a", { href: `#/hosts/${encodeURIComponent(t.source)}` }, t.vm_name);
  if (!t.vm_uuid) return t.vm_name;
  return h("a", { href: `#/vms/${encodeURIComponent(t.vm_name)}` }, t.vm_name);
}

function liveChart(t) {
  const passes = (t.live && t.live.passes) || [];
  if (!passes.length) return null;
  return h("section", { class: "chart-box" }, h("h2", {}, "Memory remaining to send, per pass"),
           remainingChart(passes, null, "the prediction is compared in the report when the move ends"));
}

// ---- the migration report ---------------------------------------------------------------------------------
const MOVE_KINDS = new Set(["vmotion", "svmotion", "xvmotion", "cold", "incoming"]);

function report(t) {
  if (!MOVE_KINDS.has(t.kind)) return otherReport(t);
  const r = t.result || {};
  const pva = r.predicted_vs_actual;
  const noPrediction = t.state !== "success" ? "A failed move's result keeps no prediction to compare with."
    : MEMORY_KINDS.has(t.kind) ? "No prediction was recorded for this move (no dirty-rate sample or link budget)."
    : "Only moves whose memory crosses hosts are predicted.";
  return h("section", { class: "report", "data-testid": "report" },
    h("h2", {}, t.state === "success" ? "Migration report" : "Migration report (failed)"),
    taskError(t.error),
    h("table", { class: "grid kv" }, h("tbody", {}, reportRows(t, r).map(([k, id, v, note]) =>
      h("tr", {}, h("th", {}, k), h("td", { "data-testid": id }, v), h("td", { class: "muted" }, note))))),
    pva ? predictedTable(pva) : h("p", { class: "muted", "data-testid": "report-no-prediction" }, noPrediction),
    reportFindings(r),
    (r.pass_log && r.pass_log.length)
      ? h("section", { class: "chart-box" }, h("h2", {}, "Memory remaining to send, per pass"),
          remainingChart(r.pass_log, r.prediction, null, r.bytes_sent))
      : null);
}

const MEMORY_KINDS = new Set(["vmotion", "xvmotion", "incoming"]);

// [label, test id, value, note] of the report's table. Memory moves: downtime and memory; storage moves (the VM
// never stops, or is off): the data copied and the pivot's write stall.
function reportRows(t, r) {
  const enc = r.encryption;
  const disk = [r.mirror, r.copy, r.disks].find((d) => d && d.bytes != null);   // r.disks is {} without disk streams
  const stall = ((t.phases || []).find((p) => p.name === "pivot") || {}).detail?.write_stall_ms;
  const memory = MEMORY_KINDS.has(t.kind);
  return [
    ["Downtime (QEMU)", "report-downtime", r.downtime_ms != null ? `${r.downtime_ms} ms` : memory ? "—" : "none",
     r.guest_pause_ms != null ? `guest paused ${r.guest_pause_ms} ms (switchover to resume on the destination)`
       : stall != null ? `the VM ran on; writes stalled ${stall} ms at the pivot`
       : t.kind === "cold" ? "the VM was off" : ""],
    ["Client-observed gap", "report-gap", clientGap(r), clientNote(r)],
    memory ? ["Memory sent", "report-bytes", r.bytes_sent != null ? mib(r.bytes_sent) : "—",
              r.ram_bytes ? `of ${mib(r.ram_bytes)} RAM (ratio ${r.sent_ratio ?? "—"})` : ""]
      : ["Disk data copied", "report-bytes", disk ? mib(disk.bytes) : "—", ""],
    memory && disk ? ["Disk data copied", "report-disk-bytes", mib(disk.bytes), ""] : null,
    ["Encryption", "report-encryption", enc ? enc.mode : "—",
     enc ? [enc.reason, enc.policy && `policy ${enc.policy}`, enc.disk_streams && `disk streams ${enc.disk_streams}`]
       .filter(Boolean).join("; ") : ""],
    ["Total time", "report-total", r.total_time_s != null ? dur(r.total_time_s) : dur(taskDuration(t)),
     r.qemu_total_time_ms != null ? `QEMU ${dur(r.qemu_total_time_ms / 1000)}` : ""],
    memory ? ["Passes", "report-passes", r.passes != null ? String(r.passes) : "—", passNote(r)] : null,
  ].filter(Boolean).map((row) => row[0] === "Disk data copied" && disk
    ? [row[0], row[1], row[2],
       `in ${dur(disk.seconds)} (${disk.throughput_mbps} Mbit/s)${disk.verified ? `; ${disk.verified}` : ""}`]
    : row);
}

// What a client of the guest saw, as the controller observes it (the CLI's summary says the same): the guest's
// pause from the source's stop to the destination's run, and whether the guest answered on its network after the
// move (the destination agent's ARP probes). A client's own pings are the lab bench's (kvmotion-lab bench).
function clientGap(r) {
  return r.guest_pause_ms != null ? `${r.guest_pause_ms} ms without the guest` : "not observed";
}
function clientNote(r) {
  const h = r.guest_health;
  if (!h) return r.guest_pause_ms != null ? "source stopped → destination running" : "";
  const nics = h.nics || [];
  const sent = nics.reduce((a, n) => a + (n.probes_sent || 0), 0);
  const answered = nics.reduce((a, n) => a + (n.probes_answered || 0), 0);
  return `then ${h.verdict} on ${h.host || "?"}` + (sent ? `: ${answered} of ${sent} network probes answered` : "") +
         ((h.reasons || []).length ? ` (${h.reasons.join("; ")})` : "");
}

// Not a move (an evacuation, an image import): what its result holds, one row per entry.
function otherReport(t) {
  const r = t.result || {};
  const rows = Object.entries(r).map(([k, v]) => h("tr", {}, h("th", {}, k),
    h("td", { class: "detail" }, v !== null && typeof v === "object"
      ? (v.task ? h("a", { href: `#/tasks/${encodeURIComponent(v.task)}` }, detailText(v)) : detailText(v))
      : String(v))));
  return h("section", { class: "report", "data-testid": "report" },
    h("h2", {}, t.state === "success" ? "Result" : "Result (failed)"), taskError(t.error),
    rows.length ? h("table", { class: "grid kv" }, h("tbody", {}, rows))
      : h("p", { class: "muted" }, "No result details."));
}

function passNote(r) {
  const syncs = Math.max(0, ...(r.pass_log || []).map((p) => p.pass_no));
  return [syncs > (r.passes || 0) ? `QEMU synced the dirty bitmap ${syncs} times (short passes are not sampled)` : "",
          r.max_cpu_throttle_pct ? `CPU throttled up to ${r.max_cpu_throttle_pct}%` : ""].filter(Boolean).join("; ");
}

function predictedTable(pva) {
  const cell = (v, f) => v == null ? "—" : f(v);
  const rows = [["Total time", pva.total_s, (v) => dur(v)], ["Downtime", pva.downtime_ms, (v) => `${v} ms`],
                ["Passes", pva.passes, String]];
  return h("table", { class: "grid pva", "data-testid": "report-predicted" },
    h("thead", {}, h("tr", {}, ["", "Predicted", "Actual"].map((c) => h("th", {}, c)))),
    h("tbody", {}, rows.map(([k, pair, f]) => h("tr", {}, h("th", {}, k),
      h("td", { class: "num" }, cell((pair || [])[0], f)), h("td", { class: "num" }, cell((pair || [])[1], f))))),
    pva.total_error_pct != null
      ? h("caption", {},
          `Total time off the prediction by ${pva.total_error_pct > 0 ? "+" : ""}${pva.total_error_pct}%`)
      : null);
}

function reportFindings(r) {
  const fs = r.findings || [];
  const warnings = (r.warnings || []).filter((w) => !fs.some((f) => w.startsWith(f.code + ":")));
  if (!fs.length && !warnings.length) return null;
  return h("div", { class: "report-findings" }, h("h3", {}, "Findings after the move"),
    h("ul", { class: "findings" },
      fs.map((f) => h("li", { class: `sev-${f.severity}`, "data-testid": `finding-${f.code}` },
        h("strong", {}, f.code), ` ${f.subject}: ${f.message}`,
        f.remedy ? h("div", { class: "remedy" }, "Fix: ", f.remedy) : null)),
      warnings.map((w) => h("li", { class: "sev-warning" }, w))));
}

// ---- the chart: remaining memory at the start of each pass, actual against the model ----------------------
// The model's pass sizes, as predict.predict computes them: pass 1 sends the touched RAM at the link's payload
// rate; each later pass sends what the guest dirtied during the one before.
export function predictedPasses(pred) {
  if (!pred || !pred.link_mbps || pred.touched_mb == null) return [];
  const rate = pred.link_mbps * 0.9 / 8;
  const n = pred.passes || 12;
  const out = [pred.touched_mb];
  let t = pred.touched_mb / rate + (pred.memory_mb - pred.touched_mb) / 4000;
  while (out.length < n) {
    const rem = Math.min(pred.dirty_mb_s * t, pred.touched_mb);
    out.push(rem);
    t = rem / rate;
  }
  return out;
}

// Per pass: the MB it sent, from QEMU's transferred counter (pass_log keeps one entry per pass, updated to its
// last sample). A pass too short to be sampled is counted in the next one; what the last pass still had to send
// when it was last sampled (sent at the switchover) is added to it when the total is known.
export function actualPasses(samples, totalSent) {
  const last = new Map();           // one entry per pass: its latest sample (the most transferred)
  for (const s of samples) {
    if (!last.has(s.pass_no) || s.transferred > last.get(s.pass_no).transferred) last.set(s.pass_no, s);
  }
  const byPass = [...last.values()].sort((a, b) => a.pass_no - b.pass_no);
  const out = [];
  let before = 0;
  for (const s of byPass) {
    out.push([s.pass_no, Math.max(0, s.transferred - before) / 1048576]);
    before = Math.max(before, s.transferred);
  }
  if (out.length && totalSent > before) out[out.length - 1][1] += (totalSent - before) / 1048576;
  return out;
}

function svg(tag, attrs, ...kids) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const k of kids) el.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return el;
}

function remainingChart(samples, pred, note, totalSent) {
  const actual = actualPasses(samples, totalSent);
  const model = predictedPasses(pred).map((mb, i) => [i + 1, mb]);
  const W = 560, H = 240, L = 56, R = 12, T = 12, B = 34;
  const maxX = Math.max(2, ...actual.map((p) => p[0]), ...model.map((p) => p[0]));
  const maxY = Math.max(1, ...actual.map((p) => p[1]), ...model.map((p) => p[1])) * 1.05;
  const x = (v) => L + (v - 1) / (maxX - 1) * (W - L - R), y = (v) => T + (1 - v / maxY) * (H - T - B);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "data-testid": "chart-remaining",
                            "aria-label": "remaining memory per pass" });
  for (let i = 0; i <= 4; i++) {
    const v = maxY * i / 4;
    root.append(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid-line" }),
                svg("text", { x: L - 6, y: y(v) + 4, class: "tick", "text-anchor": "end" }, v.toFixed(0)));
  }
  const step = Math.max(1, Math.ceil(maxX / 12));
  for (let p = 1; p <= maxX; p += step) {
    root.append(svg("text", { x: x(p), y: H - B + 16, class: "tick", "text-anchor": "middle" }, p));
  }
  root.append(svg("text", { x: (L + W - R) / 2, y: H - 4, class: "axis", "text-anchor": "middle" }, "pass"),
              svg("text", { x: 12, y: T + (H - T - B) / 2, class: "axis", "text-anchor": "middle",
                            transform: `rotate(-90 12 ${T + (H - T - B) / 2})` }, "MB to send"));
  const line = (pts, cls) => {
    if (!pts.length) return;
    root.append(svg("polyline", { points: pts.map(([a, b]) => `${x(a)},${y(b)}`).join(" "), class: cls }));
    for (const [a, b] of pts) root.append(svg("circle", { cx: x(a), cy: y(b), r: 3, class: cls + "-dot" },
                                              svg("title", {}, `pass ${a}: ${b.toFixed(1)} MB`)));
  };
  line(model, "series-predicted");
  line(actual, "series-actual");
  return h("figure", { class: "chart-figure" }, root, chartLegend(pred, model, note));
}

function chartLegend(pred, model, note) {
  let what;
  if (note) what = `Predicted: ${note}.`;
  else if (!pred) what = "Predicted: no prediction was recorded for this move, so only the actual passes are drawn.";
  else if (!model.length) what = "Predicted: the prediction has no pass sizes (no link budget), so no line.";
  else what = `Predicted: the MB the model expects each pass to send (${pred.strategy}; ` +
              `dirty ${pred.dirty_mb_s} MB/s, link ` +
              `${pred.link_mbps} Mbit/s${pred.converges ? "" : "; not converging: first passes only"}).`;
  return h("figcaption", {},
    h("span", { class: "key key-actual" },
      "Actual: MB each pass sent (QEMU's transferred counter; a pass too short to sample counts in the next)."), " ",
    h("span", { class: "key key-predicted" }, what));
}
