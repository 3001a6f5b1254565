// Small building blocks the inventory, object and event pages share: state badges, sortable filtered tables,
// property lists, and action buttons that show the API's error (message and fix) or follow a returned task.
import { h, navigate, errorBox, onLeave, session } from "./api.js";

export const DASH = "—";
export const dash = (v) => (v === undefined || v === null || v === "" ? DASH : v);

const GOOD = new Set(["connected", "poweredOn", "running", "answering", "ok", "success", "on", "info"]);
const OFF = new Set(["poweredOff", "stopped", "off", "none", "migrated", "not answering", "skipped"]);
const WARN = new Set(["maintenance", "entering", "queued", "incoming", "paused", "migrating-out", "warning",
                      "starting", "unknown", "suspended"]);

// A state as a coloured badge: green connected/poweredOn, grey off, orange maintenance, red anything failing.
export function stateClass(s) {
  if (GOOD.has(s)) return "ok";
  if (OFF.has(s)) return "off";
  if (WARN.has(s)) return "warn";
  return "bad";
}
export function badge(state, attrs = {}, label) {
  const s = state == null || state === "" ? "unknown" : String(state);
  return h("span", { ...attrs, class: "badge badge-" + stateClass(s) }, label || s);
}

export const link = (href, text, attrs = {}) => h("a", { ...attrs, href }, text);
export const hostLink = (name) => (name ? link("#/hosts/" + encodeURIComponent(name), name) : DASH);
export const vmLink = (name) => (name ? link("#/vms/" + encodeURIComponent(name), name) : DASH);

export function mib(mb) {
  if (mb === undefined || mb === null) return DASH;
  return mb >= 1024 ? (mb / 1024).toFixed(mb >= 10240 ? 0 : 1) + " GiB" : Math.round(mb) + " MiB";
}
export function mbps(speed) {
  if (!speed) return DASH;
  return speed >= 1000 ? (speed / 1000).toFixed(speed % 1000 ? 1 : 0) + " Gbit/s" : speed + " Mbit/s";
}
// A percentage as a small bar and its figure ("—" when unknown).
export function meter(pct, title) {
  if (pct === undefined || pct === null || !isFinite(pct)) return DASH;
  const p = Math.max(0, Math.min(100, Math.round(pct)));
  const level = p >= 90 ? "bad" : p >= 75 ? "warn" : "ok";
  return h("span", { class: "meter", title: title || "" },
           h("span", { class: "meter-bar" }, h("span", { class: `meter-fill meter-${level} w${Math.round(p / 5) * 5}` })),
           h("span", { class: "meter-text" }, p + "%"));
}

// table(columns, rows, {rowAttrs, empty, state, max}) -> {el, setFilter(text)}
// columns: [{label, cell: row => node|text, sort: row => comparable, cls}]; a header click sorts by it.
// opts.state ({col, asc, filter}) keeps the sort and filter across re-reads of the same table. Each row is built
// once; at most `max` rows are shown (a fleet of thousands: the filter narrows it).
export function table(columns, rows, opts = {}) {
  const st = opts.state || { col: 0, asc: true, filter: "" };
  const max = opts.max || 1000;
  let sortCol = st.col ?? 0, asc = st.asc ?? true, filter = st.filter || "";
  const built = rows.map((r) => {
    const tr = h("tr", opts.rowAttrs ? opts.rowAttrs(r) : {}, columns.map((c) => h("td", { class: c.cls || null }, c.cell(r))));
    return { r, tr, text: tr.textContent.toLowerCase() };
  });
  const tbody = h("tbody", {});
  const note = h("div", { class: "table-note muted" });
  const heads = columns.map((c, i) => h("th", {
    class: [c.cls, c.sort ? "sortable" : null].filter(Boolean).join(" ") || null,
    onclick: c.sort ? () => { asc = sortCol === i ? !asc : true; sortCol = i; Object.assign(st, { col: i, asc }); fill(); }
                    : null }, c.label));
  function fill() {
    const col = columns[sortCol];
    const list = col && col.sort ? [...built].sort((a, b) => cmp(col.sort(a.r), col.sort(b.r)) * (asc ? 1 : -1)) : built;
    const hits = filter ? list.filter((b) => b.text.includes(filter)) : list;
    heads.forEach((th, i) => { th.classList.toggle("sorted", i === sortCol && !!columns[i].sort); th.classList.toggle("desc", !asc); });
    tbody.replaceChildren(...(hits.length ? hits.slice(0, max).map((b) => b.tr) : [h("tr", { class: "empty" },
      h("td", { colspan: columns.length }, filter ? "Nothing matches the filter." : opts.empty || "None."))]));
    note.textContent = hits.length > max ? `Showing ${max} of ${hits.length}: filter to narrow.` : "";
  }
  fill();
  const el = h("div", { class: "grid-box" }, h("table", { class: "grid" }, h("thead", {}, h("tr", {}, heads)), tbody), note);
  return { el, setFilter: (t) => { filter = st.filter = t.trim().toLowerCase(); fill(); } };
}
function cmp(a, b) {
  if (a === b) return 0;
  if (a === undefined || a === null) return 1;
  if (b === undefined || b === null) return -1;
  return typeof a === "number" && typeof b === "number" ? a - b : String(a).localeCompare(String(b));
}

// A property list: [[label, value], ...] (value: text or node; "—" when absent).
export function props(pairs) {
  return h("dl", { class: "props" }, pairs.filter(Boolean).flatMap(([k, v, attrs]) =>
    [h("dt", {}, k), h("dd", attrs || {}, v === undefined || v === null || v === "" ? DASH : v)]));
}

export function section(title, ...content) {
  return h("section", { class: "panel" }, h("h2", {}, title), ...content);
}

// A 401 means the session ended (8 h idle, signed out elsewhere, controller restarted): back to the sign-in page.
export function signedOut(e) {
  if (!e || e.status !== 401) return false;
  Object.assign(session, { name: "", role: "", csrf: "" });
  navigate("#/signin");
  return true;
}
export function authed(render) {
  return async (params, main) => {
    try { return await render(params, main); }
    catch (e) { if (!signedOut(e)) throw e; }
  };
}
// An error where the page shows it: its message and fix (or, after a 401, the sign-in page).
export function showError(slot, e) { if (!signedOut(e)) slot.replaceChildren(errorBox(e)); }

const isTask = (r) => r && typeof r === "object" && typeof r.id === "string" && Array.isArray(r.phases);

// An action button: runs fn(); a task in the answer -> its page; otherwise done(answer). Errors land in errorSlot.
export function actionButton(label, attrs, fn, errorSlot, done) {
  const btn = h("button", { class: "btn", ...attrs, onclick: async () => {
    btn.disabled = true;
    errorSlot.replaceChildren();
    try {
      const out = await fn();
      if (isTask(out)) { navigate("#/tasks/" + encodeURIComponent(out.id)); return; }
      if (done) await done(out);
    } catch (e) {
      showError(errorSlot, e);
    } finally { btn.disabled = false; }
  } }, label);
  return btn;
}

// Re-read a page when a task changes (the tasks stream), at most once every `minMs` (ms, or a function giving it).
export function onTaskChange(stream, refresh, minMs = 5000) {
  let last = 0, timer = null;
  onLeave(() => { if (timer) clearTimeout(timer); timer = null; });
  try {
    stream("/tasks/stream", (task) => {
      if (refresh.wants && !refresh.wants(task)) return;
      const wait = Math.max(0, last + (typeof minMs === "function" ? minMs() : minMs) - Date.now());
      if (timer) return;
      timer = setTimeout(() => { timer = null; last = Date.now(); refresh(); }, wait);
    });
  } catch (_) { /* no EventSource: the page's own timer still refreshes it */ }
}

// -- what the pages read out of the API's objects ---------------------------------------------------------
export function maintenanceText(m) { return m === 1 ? "on" : m === 2 ? "entering" : "off"; }
export function vmDatastores(spec) {
  return [...new Set([spec.boot_datastore, ...(spec.disks || []).map((d) => d.datastore)].filter(Boolean))];
}
export function guestIps(runtime) {     // the guest agent's addresses, or null when it does not answer
  const g = runtime && runtime.guest;
  return g && g.guest_agent === "answering" ? (g.ip_addresses || []) : null;
}
