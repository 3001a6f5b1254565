// The inventory (#/inventory?TAB): hosts, VMs, datastores, networks and clusters, as dense sortable tables.
// It re-reads when a task changes (the tasks stream) and every 15 s while visible (host state has no task).
// The host and VM pages are in objects.js.
import { get, getAll, h, route, onLeave, navigate, stream, fmt } from "./api.js";
import { DASH, dash, badge, hostLink, vmLink, mib, mbps, meter, table, onTaskChange, vmDatastores, guestIps,
         authed, showError } from "./ui.js";
import "./objects.js";

const TABS = [["hosts", "Hosts"], ["vms", "VMs"], ["datastores", "Datastores"], ["networks", "Networks"],
              ["clusters", "Clusters"]];
const REFRESH_MS = 15000;
const BIG_FLEET = 2000;
const GUEST_MAX = 25;          // VMs whose guest agent is asked for its addresses, per read
const GUEST_TTL_MS = 60000;
const guestCache = new Map();  // VM name -> {ips, at}
const tableState = {};         // tab -> {col, asc, filter}: kept across re-reads and tab changes

const rowLink = (testid, href) => ({ "data-testid": testid, class: "clickable",
  onclick: (ev) => { if (!ev.target.closest("a")) navigate(href); } });
const names = (list) => (list && list.length ? list.map((n, i) => [i ? ", " : "", hostLink(n)]) : DASH);

// -- hosts ------------------------------------------------------------------------------------------------
function migrationsByHost(tasks) {
  const by = {};
  for (const t of tasks || []) {
    if (t.state !== "running" && t.state !== "queued") continue;
    for (const host of new Set([t.source, t.destination].filter(Boolean))) {
      by[host] = by[host] || { running: 0, queued: 0 };
      by[host][t.state] += 1;
    }
  }
  return by;
}
function memPct(f) { return f.mem_total_mb ? 100 * (f.mem_total_mb - f.mem_free_mb) / f.mem_total_mb : null; }
function cpuPct(f) {
  const load = Array.isArray(f.loadavg) ? f.loadavg[0] : f.load1;    // when the agent reports a load average
  return load != null && f.cpu_count ? 100 * load / f.cpu_count : null;
}
function linkSpeed(f) {
  const speeds = (f.migration_interfaces || []).filter((i) => i.enabled !== false).map((i) => i.speed_mbps || 0);
  return speeds.length ? Math.max(...speeds) : null;
}

async function hostsTab() {
  const [hosts, tasks] = await Promise.all([getAll("/hosts"),
                                            get("/tasks?limit=500&view=summary").catch(() => null)]);
  const moves = migrationsByHost(tasks);
  const cols = [
    { label: "Name", cell: (x) => hostLink(x.name), sort: (x) => x.name },
    { label: "State", cell: (x) => badge(x.state, { title: x.last_error || "" }), sort: (x) => x.state },
    { label: "Maintenance", sort: (x) => x.maintenance,
      cell: (x) => (x.maintenance ? badge(x.maintenance === 1 ? "maintenance" : "entering") : "off") },
    { label: "Cluster", cell: (x) => dash(x.cluster), sort: (x) => x.cluster },
    { label: "CPUs", cls: "num", cell: (x) => dash(x.facts.cpu_count), sort: (x) => x.facts.cpu_count },
    { label: "CPU load", cell: (x) => meter(cpuPct(x.facts)), sort: (x) => cpuPct(x.facts) },
    { label: "Memory", cell: (x) => meter(memPct(x.facts), `${mib(x.facts.mem_total_mb - x.facts.mem_free_mb)} used of ` +
                                          mib(x.facts.mem_total_mb)), sort: (x) => memPct(x.facts) },
    { label: "Memory total", cls: "num", cell: (x) => mib(x.facts.mem_total_mb), sort: (x) => x.facts.mem_total_mb },
    { label: "VMs running", cls: "num", cell: (x) => (x.facts.vms ? x.facts.vms.length : DASH),
      sort: (x) => (x.facts.vms || []).length },
    { label: "Migrations", cls: "num", sort: (x) => (moves[x.name] || {}).running,
      cell: (x) => (tasks ? `${(moves[x.name] || {}).running || 0} running, ${(moves[x.name] || {}).queued || 0} queued`
                          : DASH) },
    { label: "Link", cls: "num", cell: (x) => mbps(linkSpeed(x.facts)), sort: (x) => linkSpeed(x.facts) },
    { label: "Last seen", cell: (x) => fmt.time(x.last_seen), sort: (x) => x.last_seen },
  ];
  return { cols, rows: hosts.map((x) => ({ ...x, facts: x.facts || {} })), empty: "No hosts: add one with `kvmotion host add`.",
           rowAttrs: (x) => rowLink("host-row-" + x.name, "#/hosts/" + encodeURIComponent(x.name)) };
}

// -- VMs --------------------------------------------------------------------------------------------------

// The guest agent's addresses of a few powered-on VMs (each `GET /vms/NAME` asks the host), cached a minute.
async function fillGuestIps(vms, redraw) {
  const now = Date.now();
  const want = vms.filter((v) => v.power_state === "poweredOn")
    .filter((v) => !guestCache.has(v.name) || now - guestCache.get(v.name).at > GUEST_TTL_MS).slice(0, GUEST_MAX);
  let left = false;
  for (let i = 0; i < want.length; i += 4) {
    const got = await Promise.all(want.slice(i, i + 4).map((v) => get("/vms/" + encodeURIComponent(v.name))
      .then((full) => [v.name, guestIps(full.runtime)]).catch(() => [v.name, null])));
    for (const [name, ips] of got) { guestCache.set(name, { ips, at: Date.now() }); left = true; }
  }
  if (left) redraw();
}
function ipCell(v) {
  const cached = v.power_state === "poweredOn" ? guestCache.get(v.name) : null;
  if (cached && cached.ips && cached.ips.length) return h("span", { title: "from the guest agent" }, cached.ips.join(", "));
  if (v.spec.guest_ip) return h("span", { class: "muted", title: "configured (no guest agent answer)" }, v.spec.guest_ip);
  return DASH;
}

async function vmsTab(redraw) {
  const vms = await getAll("/vms");
  fillGuestIps(vms, redraw).catch(() => {});
  const cols = [
    { label: "Name", cell: (v) => vmLink(v.name), sort: (v) => v.name },
    { label: "Power", cell: (v) => badge(v.power_state), sort: (v) => v.power_state },
    { label: "Host", cell: (v) => hostLink(v.host), sort: (v) => v.host },
    { label: "vCPUs", cls: "num", cell: (v) => dash(v.spec.vcpus), sort: (v) => v.spec.vcpus },
    { label: "Memory", cls: "num", cell: (v) => mib(v.spec.memory_mb), sort: (v) => v.spec.memory_mb },
    { label: "Datastores", cell: (v) => vmDatastores(v.spec).join(", ") || DASH, sort: (v) => vmDatastores(v.spec)[0] },
    { label: "Networks", cell: (v) => [...new Set((v.spec.nics || []).map((n) => n.portgroup))].join(", ") || DASH },
    { label: "IP addresses", cell: ipCell },
    { label: "Encrypted vMotion", cell: (v) => dash(v.spec.encrypted_vmotion) },
  ];
  return { cols, rows: vms.map((v) => ({ ...v, spec: v.spec || {} })), empty: "No VMs: create one with `kvmotion vm create`.",
           rowAttrs: (v) => rowLink("vm-row-" + v.name, "#/vms/" + encodeURIComponent(v.name)) };
}

// -- datastores, networks, clusters ------------------------------------------------------------------------
async function datastoresTab() {
  const list = await get("/datastores");
  const cap = (d) => d.capacity_mb ?? d.total_mb ?? null;
  const used = (d) => (cap(d) ? 100 * (cap(d) - d.free_mb) / cap(d) : null);
  const cols = [
    { label: "Name", cell: (d) => d.name, sort: (d) => d.name },
    { label: "Kind", cell: (d) => dash(d.kind), sort: (d) => d.kind },
    { label: "Shared", cell: (d) => (d.shared ? "yes" : "no"), sort: (d) => d.shared },
    { label: "Capacity", cls: "num", cell: (d) => mib(cap(d)), sort: cap },
    { label: "Free", cls: "num", cell: (d) => mib(d.free_mb), sort: (d) => d.free_mb },
    { label: "Used", cell: (d) => meter(used(d)), sort: used },
    { label: "Hosts that see it", cell: (d) => names(d.hosts), sort: (d) => (d.hosts || []).length },
  ];
  return { cols, rows: list, empty: "No datastores: a host reports its datastores when it is added.",
           rowAttrs: (d) => ({ "data-testid": "datastore-row-" + d.name }) };
}

async function networksTab() {
  const [nets, hosts, vms] = await Promise.all([get("/networks"), getAll("/hosts"), getAll("/vms").catch(() => [])]);
  const pgs = {};        // port group -> {vlans, bridges, problems}
  for (const host of hosts) {
    for (const pg of (host.facts && host.facts.portgroups) || []) {
      const p = pgs[pg.name] = pgs[pg.name] || { vlans: new Set(), bridges: new Set(), problems: [] };
      if (pg.vlan != null) p.vlans.add(pg.vlan);
      if (pg.bridge) p.bridges.add(pg.bridge);
      if (pg.problem) p.problems.push(`${host.name}: ${pg.problem}`);
    }
  }
  const vmCount = (name) => vms.filter((v) => ((v.spec || {}).nics || []).some((n) => n.portgroup === name)).length;
  const info = (n) => pgs[n.name] || { vlans: new Set(), bridges: new Set(), problems: [] };
  const cols = [
    { label: "Port group", cell: (n) => n.name, sort: (n) => n.name },
    { label: "VLAN", cell: (n) => [...info(n).vlans].join(", ") || "none" },
    { label: "Bridge", cell: (n) => [...info(n).bridges].join(", ") || DASH },
    { label: "Hosts", cell: (n) => names(n.hosts), sort: (n) => (n.hosts || []).length },
    { label: "VMs", cls: "num", cell: (n) => vmCount(n.name), sort: (n) => vmCount(n.name) },
    { label: "Problems", cell: (n) => (info(n).problems.length ? badge("error", {}, info(n).problems.join("; ")) : DASH) },
  ];
  return { cols, rows: nets, empty: "No networks: hosts report their port groups when they are added.",
           rowAttrs: (n) => ({ "data-testid": "network-row-" + n.name }) };
}

function policyText(p) {
  const parts = Object.entries(p || {}).filter(([, v]) => v !== null && v !== undefined).map(([k, v]) => `${k}=${v}`);
  return parts.length ? parts.join(", ") : "defaults";
}
async function clustersTab() {
  const list = await get("/clusters");
  const cols = [
    { label: "Name", cell: (c) => c.name, sort: (c) => c.name },
    { label: "EVC mode", cell: (c) => c.evc_mode || h("span", { class: "muted" }, "disabled"), sort: (c) => c.evc_mode },
    { label: "Hosts", cls: "num", cell: (c) => c.hosts.length, sort: (c) => c.hosts.length },
    { label: "Members", cell: (c) => names(c.hosts) },
    { label: "Migration policy", cell: (c) => policyText(c.migration_policy) },
  ];
  return { cols, rows: list, empty: "No clusters: create one with `kvmotion cluster create NAME`.",
           rowAttrs: (c) => ({ "data-testid": "cluster-row-" + c.name }) };
}

const LOADERS = { hosts: hostsTab, vms: vmsTab, datastores: datastoresTab, networks: networksTab, clusters: clustersTab };

// -- the page ------------------------------------------------------------------------------------------------
async function renderInventory(params, main) {
  const tab = LOADERS[params.tab] ? params.tab : "hosts";
  const state = tableState[tab] = tableState[tab] || { col: 0, asc: true, filter: "" };
  const tabs = h("div", { class: "tabs", role: "tablist" }, TABS.map(([id, label]) =>
    h("a", { href: "#/inventory?" + id, role: "tab", "data-testid": "tab-" + id,
             class: id === tab ? "tab active" : "tab", "aria-selected": id === tab ? "true" : "false" }, label)));
  const body = h("div", { class: "table-wrap" });
  const errors = h("div", {});
  const stamp = h("span", { class: "muted stamp" });
  let current = null;
  const filter = h("input", { type: "search", class: "filter", placeholder: "Filter", value: state.filter,
                              "data-testid": "inventory-filter", oninput: () => current && current.setFilter(filter.value) });
  let last = null;
  const draw = () => {
    current = table(last.cols, last.rows, { state, rowAttrs: last.rowAttrs, empty: last.empty });
    body.replaceChildren(current.el);
  };
  let busy = false;
  const load = async () => {
    if (busy) return;
    busy = true;
    try {
      last = await LOADERS[tab](() => last && draw());
      draw();
      errors.replaceChildren();
      stamp.textContent = "Updated " + new Date().toLocaleTimeString();
    } catch (e) { showError(errors, e); } finally { busy = false; }
  };
  const refresh = h("button", { class: "btn btn-small", onclick: load, title: "read the inventory again" }, "Refresh");
  await load();
  main.replaceChildren(h("div", { class: "page" }, h("h1", {}, "Inventory"), tabs,
    h("div", { class: "toolbar" }, filter, refresh, stamp), errors, body));
  // A big fleet (thousands of rows) is re-read at most once a minute by the timer, and 15 s apart on task changes.
  let tick = 0;
  const big = () => last && last.rows.length > BIG_FLEET;
  const timer = setInterval(() => { tick += 1; if (!document.hidden && (!big() || tick % 4 === 0)) load(); }, REFRESH_MS);
  onLeave(() => clearInterval(timer));
  onTaskChange(stream, load, () => (big() ? 15000 : 5000));
}

route("#/inventory", authed((params, main) => renderInventory({ tab: "hosts" }, main)));
route("#/inventory\\?:tab", authed(renderInventory));
