// #/events: what happened (GET /events, newest first) and, for an admin, who called what (GET /audit).
// Each is a table with a text filter and selects; the events re-read when a task changes (the tasks stream)
// and every 15 s while the page is visible.
import { get, h, route, can, onLeave, stream, errorBox, fmt } from "./api.js";
import { DASH, dash, badge, hostLink, vmLink, table, section, onTaskChange, link, authed, showError } from "./ui.js";

const LIMIT = 500;
const REFRESH_MS = 15000;
const state = { events: { col: 0, asc: true, filter: "" }, audit: { col: 0, asc: true, filter: "" },
                level: "", kind: "", method: "", status: "" };

function subjectLink(subject) {
  const [kind, ...rest] = String(subject || "").split(":");
  const name = rest.join(":");
  if (kind === "vm" && name) return ["VM ", vmLink(name)];
  if (kind === "host" && name) return ["host ", hostLink(name)];
  if (kind === "image" && name) return ["image ", name];
  return dash(subject);
}

function select(testid, label, value, options, onchange) {
  const el = h("select", { class: "input", "data-testid": testid, title: label, onchange: () => onchange(el.value) },
               h("option", { value: "" }, `${label}: all`),
               options.map(([v, text]) => h("option", { value: v, selected: v === value ? true : null }, text)));
  return el;
}

// A filtered table: the text filter goes to the table, the selects narrow the rows before it.
function filteredTable(key, testids, cols, rows, selects, pick) {
  const body = h("div", { class: "table-wrap" });
  let t = null;
  const draw = () => {
    t = table(cols, rows.filter(pick), { state: state[key], empty: `No ${key} yet.`,
                                         rowAttrs: () => ({ "data-testid": testids.row }) });
    body.replaceChildren(t.el);
  };
  const filter = h("input", { type: "search", class: "filter", placeholder: "Filter", value: state[key].filter,
                              "data-testid": testids.filter, oninput: () => t.setFilter(filter.value) });
  draw();
  return { toolbar: [filter, ...selects(draw)], body, count: rows.length };
}

function eventsView(events) {
  const levels = [["info", "info"], ["warning", "warning"], ["error", "error"]];
  const kinds = [...new Set(events.map((e) => e.kind))].sort().map((k) => [k, k]);
  const cols = [
    { label: "Time", cell: (e) => fmt.datetime(e.at), sort: (e) => -e.at },
    { label: "Level", cell: (e) => badge(e.level === "info" ? "info" : e.level, {}, e.level), sort: (e) => e.level },
    { label: "Kind", cell: (e) => e.kind, sort: (e) => e.kind },
    { label: "Object", cell: (e) => subjectLink(e.subject), sort: (e) => e.subject },
    { label: "Message", cls: "wide", cell: (e) => [dash(e.message),
      e.remedy ? h("div", { class: "remedy muted" }, "Fix: ", e.remedy) : null] },
    { label: "Task", cell: (e) => (e.task_id ? link("#/tasks/" + encodeURIComponent(e.task_id), e.task_id.slice(0, 8))
                                             : DASH) },
  ];
  const pick = (e) => (!state.level || e.level === state.level) && (!state.kind || e.kind === state.kind);
  return filteredTable("events", { row: "event-row", filter: "events-filter" }, cols, events, (draw) => [
    select("events-level", "Level", state.level, levels, (v) => { state.level = v; draw(); }),
    select("events-kind", "Kind", state.kind, kinds, (v) => { state.kind = v; draw(); }),
  ], pick);
}

function auditView(audit) {
  const methods = [...new Set(audit.map((a) => a.method))].sort().map((m) => [m, m]);
  const statuses = [["ok", "succeeded (2xx/3xx)"], ["refused", "refused (4xx)"], ["failed", "failed (5xx)"]];
  const statusOf = (s) => (s >= 500 ? "failed" : s >= 400 ? "refused" : "ok");
  const cols = [
    { label: "Time", cell: (a) => fmt.datetime(a.at), sort: (a) => -a.at },
    { label: "Who", cell: (a) => a.who, sort: (a) => a.who }, { label: "Role", cell: (a) => a.role },
    { label: "Method", cell: (a) => a.method, sort: (a) => a.method },
    { label: "Path", cell: (a) => a.path, cls: "wide mono", sort: (a) => a.path },
    { label: "Status", cls: "num", sort: (a) => a.status,
      cell: (a) => badge(statusOf(a.status) === "ok" ? "ok" : statusOf(a.status) === "refused" ? "warning" : "error",
                         {}, String(a.status)) },
    { label: "Client", cell: (a) => dash(a.client), cls: "mono" },
  ];
  const pick = (a) => (!state.method || a.method === state.method) && (!state.status || statusOf(a.status) === state.status);
  return filteredTable("audit", { row: "audit-row", filter: "audit-filter" }, cols, audit, (draw) => [
    select("audit-method", "Method", state.method, methods, (v) => { state.method = v; draw(); }),
    select("audit-status", "Status", state.status, statuses, (v) => { state.status = v; draw(); }),
  ], pick);
}

function panel(title, view) {
  return section(`${title} (${view.count})`, h("div", { class: "toolbar" }, view.toolbar), view.body);
}

async function loadAll() {
  const [events, audit] = await Promise.all([
    get(`/events?limit=${LIMIT}`),
    can("admin") ? get(`/audit?limit=${LIMIT}`).catch((e) => e) : Promise.resolve(null),
  ]);
  return { events, audit };
}

route("#/events", authed(async (_params, main) => {
  const content = h("div", {});
  const stamp = h("span", { class: "muted stamp" });
  const draw = async () => {
    if (content.contains(document.activeElement) && document.activeElement.tagName !== "BUTTON") return;
    try {
      const { events, audit } = await loadAll();
      const parts = [panel("Events", eventsView(events))];
      if (audit instanceof Error) parts.push(section("Audit log", errorBox(audit)));
      else if (audit) parts.push(panel("Audit log", auditView(audit)));
      content.replaceChildren(...parts);
      stamp.textContent = "Updated " + new Date().toLocaleTimeString();
    } catch (e) { showError(content, e); }
  };
  await draw();
  main.replaceChildren(h("div", { class: "page" },
    h("div", { class: "object-head" }, h("h1", {}, can("admin") ? "Events and audit log" : "Events"),
      h("div", { class: "actions" }, stamp, h("button", { class: "btn btn-small", onclick: draw }, "Refresh"))),
    content));
  const timer = setInterval(() => { if (!document.hidden) draw(); }, REFRESH_MS);
  onLeave(() => clearInterval(timer));
  onTaskChange(stream, draw);
}));
