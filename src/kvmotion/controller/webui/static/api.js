// The web client's one door to the controller: JSON calls, the session, live streams, and a DOM builder.
// No secret ever reaches the page: the session cookie is HttpOnly; the page only knows its CSRF token.
// Untrusted text goes into the DOM as text nodes (h()), never as HTML.

export class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `HTTP ${status}`);
    this.status = status;
    this.code = e.code || "HTTP_" + status;
    this.remedy = e.remedy || "";
    this.details = e.details || null;
  }
}

export const session = { name: "", role: "", csrf: "" };
const RANK = { viewer: 1, operator: 2, admin: 3 };

// can("operator"): the signed-in role is at least that (the API enforces it; the UI only hides what it can't do)
export function can(role) { return (RANK[session.role] || 0) >= (RANK[role] || 99); }

export async function api(method, path, body) {
  return (await send(method, path, body)).data;
}

async function send(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && method !== "HEAD") headers["X-CSRF-Token"] = session.csrf;
  const url = path.startsWith("/ui/") ? path : "/api/v1" + path;
  const r = await fetch(url, { method, headers, credentials: "same-origin",
                               body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!r.ok) throw new ApiError(r.status, data);
  return { data, next: r.headers.get("X-Next-Cursor") };
}

export const get = (path) => api("GET", path);
// Every item of a paged list (GET /vms, /hosts, /tasks answer a page and name the next one in X-Next-Cursor):
// getAll("/vms?host=h1") reads the pages one after the other, up to the last.
export async function getAll(path) {
  const items = [];
  const sep = path.includes("?") ? "&" : "?";
  let page = await send("GET", path);
  for (;;) {
    items.push(...(page.data || []));
    if (!page.next) return items;
    page = await send("GET", `${path}${sep}cursor=${encodeURIComponent(page.next)}`);
  }
}
export const post = (path, body) => api("POST", path, body === undefined ? {} : body);

// signIn(token) -> session; signOut(); whoami() -> session or null (not signed in)
export async function signIn(token) {
  Object.assign(session, await api("POST", "/ui/session", { token }));
  return session;
}
export async function signOut() {
  try { await api("DELETE", "/ui/session"); } finally { Object.assign(session, { name: "", role: "", csrf: "" }); }
}
export async function whoami() {
  try { Object.assign(session, await api("GET", "/ui/session")); return session; }
  catch (e) { if (e.status === 401) return null; throw e; }
}

// A server-sent event stream (the browser reconnects by itself): stream("/tasks/ID/stream", task => ...).
// Returns a function that closes it. Pages close their streams when they are left (onLeave below).
// onResync: the stream fell behind the controller's history of changes; re-read what the page shows.
export function stream(path, onTask, onEnd, onResync) {
  const es = new EventSource("/api/v1" + path, { withCredentials: true });
  es.addEventListener("task", (ev) => onTask(JSON.parse(ev.data)));
  es.addEventListener("end", () => { es.close(); if (onEnd) onEnd(); });
  es.addEventListener("resync", () => { if (onResync) onResync(); });
  onLeave(() => es.close());
  return () => es.close();
}

// h("div", {class: "x", onclick: fn, "data-testid": "y"}, "text", child, [more children]) -> Element
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "value") el.value = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

// The router: route("#/vms/:name", async (params, main) => {...}) renders into <main>; navigate("#/tasks/ID").
const routes = [];
let leaving = [];
export function route(pattern, render) {
  const names = [];
  const re = new RegExp("^" + pattern.replace(/:[a-z_]+/g, (m) => { names.push(m.slice(1)); return "([^/]+)"; }) + "$");
  routes.push({ re, names, render });
}
export function onLeave(fn) { leaving.push(fn); }
export function navigate(hash) { if (location.hash === hash) dispatch(); else location.hash = hash; }
// Each page renders into a view of its own: a page left while it still loads draws into its detached view, never
// over the next page. A page that opens something after an await checks current() first (console.js does).
let shown = 0;
export function current() { const mine = shown; return () => mine === shown; }
export async function dispatch() {
  const mine = ++shown;
  for (const fn of leaving.splice(0)) { try { fn(); } catch (_) { /* a closed stream */ } }
  const hash = location.hash || "#/inventory";
  const view = h("div", { class: "view" });
  document.querySelector("main").replaceChildren(view);
  for (const r of routes) {
    const m = hash.match(r.re);
    if (!m) continue;
    const params = Object.fromEntries(r.names.map((n, i) => [n, decodeURIComponent(m[i + 1])]));
    view.replaceChildren(h("p", { class: "loading" }, "Loading…"));
    try { await r.render(params, view); }
    catch (e) { if (mine === shown) view.replaceChildren(errorBox(e)); }
    return;
  }
  view.replaceChildren(h("p", { class: "error" }, `No page ${hash}`));
}

// An API error as the admin should see it: what went wrong, and the fix.
export function errorBox(e) {
  return h("div", { class: "error", role: "alert", "data-testid": "error" },
           h("strong", {}, e.code ? `${e.code}: ` : ""), e.message || String(e),
           e.remedy ? h("div", { class: "remedy" }, "Fix: ", e.remedy) : null);
}

export const fmt = {
  time: (t) => t ? new Date(t * 1000).toLocaleTimeString() : "—",
  datetime: (t) => t ? new Date(t * 1000).toLocaleString() : "—",
  mb: (b) => b == null ? "—" : (b / 1048576).toFixed(1) + " MiB",
  gb: (b) => b == null ? "—" : (b / 1073741824).toFixed(1) + " GiB",
  pct: (p) => p == null ? "—" : Math.round(p) + "%",
  secs: (s) => s == null ? "—" : (s < 1 ? Math.round(s * 1000) + " ms" : s.toFixed(1) + " s"),
};
