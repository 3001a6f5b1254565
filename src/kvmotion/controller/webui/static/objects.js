// The object pages: a host (#/hosts/:name: facts, datastores, port groups, its VMs; maintenance for an admin)
// and a VM (#/vms/:name: power, guest, disks, media, NICs; power, Migrate…, consoles and media for an operator).
// They re-read when a task about them changes (the tasks stream), and on Refresh.
import { get, getAll, post, h, route, can, stream, fmt } from "./api.js";
import { DASH, dash, badge, hostLink, vmLink, mib, mbps, table, props, section, actionButton,
         onTaskChange, link, maintenanceText, vmDatastores, guestIps, authed, showError } from "./ui.js";

const enc = encodeURIComponent;

function pageHead(kind, name, state, actions, errors, reload) {
  return [
    h("div", { class: "crumbs" }, link("#/inventory?" + kind + "s", kind === "host" ? "Hosts" : "VMs"), " / ", name),
    h("div", { class: "object-head" },
      h("h1", {}, h("span", { class: "object-kind" }, kind === "host" ? "Host" : "VM"), name, state),
      h("div", { class: "actions" }, actions,
        h("button", { class: "btn btn-small", onclick: reload, title: "read it again" }, "Refresh"))),
    errors,
  ];
}

// A page that re-renders itself on Refresh and when a task about it changes.
function livePage(render, wants) {
  return async (params, main) => {
    const redraw = async () => {
      try { main.replaceChildren(await render(params, redraw)); }
      catch (e) { showError(main, e); }
    };
    main.replaceChildren(await render(params, redraw));
    redraw.wants = (task) => wants(task, params);
    onTaskChange(stream, redraw);
  };
}

// Recent tasks about this object (newest first), each linking to its live page.
function recentTasks(tasks, about) {
  const mine = (tasks || []).filter(about).slice(0, 10);
  const t = table([
    { label: "Task", cell: (x) => link("#/tasks/" + enc(x.id), x.id.slice(0, 8)) },
    { label: "Kind", cell: (x) => x.kind }, { label: "VM", cell: (x) => vmLink(x.vm_name) },
    { label: "State", cell: (x) => badge(x.state) }, { label: "Phase", cell: (x) => dash(x.phase) },
    { label: "Route", cell: (x) => (x.destination && x.destination !== x.source ? `${x.source} → ${x.destination}`
                                                                                 : dash(x.source)) },
    { label: "Created", cell: (x) => fmt.datetime(x.created_at) },
  ], mine, { empty: "No tasks." });
  return section("Recent tasks", t.el);
}
const tasksOrNone = () => get("/tasks?limit=200&view=summary").catch(() => []);    // no phases or results needed

// -- host ---------------------------------------------------------------------------------------------------
function hostActions(host, errors, redraw) {
  if (!can("admin")) return [];
  const path = `/hosts/${enc(host.name)}/maintenance`;
  if (host.maintenance === 0) {
    return [actionButton("Enter maintenance mode", { "data-testid": "maintenance-enter", class: "btn btn-warn",
      title: "migrate its VMs away, then take it out of service" }, () => post(path, { enter: true }), errors, redraw)];
  }
  return [actionButton("Exit maintenance mode", { "data-testid": "maintenance-exit" },
                       () => post(path, { enter: false }), errors, redraw)];
}

function hostSummary(x) {
  const f = x.facts || {};
  const tls = f.tls ? (f.tls.supported ? "yes" : `no: ${f.tls.reason}`) : null;
  return props([
    ["State", badge(x.state), { "data-testid": "host-state" }],
    ["Maintenance", maintenanceText(x.maintenance), { "data-testid": "host-maintenance" }],
    x.last_error ? ["Last error", h("span", { class: "text-bad" }, x.last_error)] : null,
    ["Address", x.address], ["Cluster", x.cluster], ["Last seen", fmt.datetime(x.last_seen)],
    ["Agent", f.agent_version], ["QEMU", f.qemu_version],
    ["Accelerator", f.accelerator ? f.accelerator + (f.accelerator_reason ? ` (${f.accelerator_reason})` : "") : null],
    ["CPU", f.cpu_count ? `${f.cpu_count} × ${f.cpu_model}` : null],
    ["Memory", f.mem_total_mb ? `${mib(f.mem_free_mb)} free of ${mib(f.mem_total_mb)}` : null],
    ["Management", f.mgmt_address], ["Encrypted vMotion (TLS)", tls],
    ["Post-copy", f.postcopy === undefined ? null : f.postcopy ? "possible" : "not possible"],
  ]);
}

function hostTables(x, vms) {
  const f = x.facts || {};
  const ds = table([
    { label: "Datastore", cell: (d) => d.name, sort: (d) => d.name }, { label: "Kind", cell: (d) => d.kind },
    { label: "Shared", cell: (d) => (d.shared ? "yes" : "no") },
    { label: "Readable", cell: (d) => (d.readable ? "yes" : badge("error", { title: d.error || "" }, "no")) },
    { label: "Free", cls: "num", cell: (d) => mib(d.free_mb), sort: (d) => d.free_mb },
    { label: "Path", cell: (d) => d.export ? `${d.path} (${d.export})` : d.path },
  ], f.datastores || [], { empty: "No datastores reported." });
  const pgs = table([
    { label: "Port group", cell: (p) => p.name, sort: (p) => p.name }, { label: "Bridge", cell: (p) => p.bridge },
    { label: "VLAN", cell: (p) => (p.vlan == null ? "none" : p.vlan) },
    { label: "Problem", cell: (p) => (p.problem ? badge("error", {}, p.problem) : DASH) },
  ], f.portgroups || [], { empty: "No port groups reported." });
  const nics = table([
    { label: "Interface", cell: (i) => i.ifname }, { label: "Address", cell: (i) => dash(i.address) },
    { label: "Speed", cls: "num", cell: (i) => mbps(i.speed_mbps) }, { label: "Speed from", cell: (i) => i.speed_source },
    { label: "In use", cell: (i) => (i.enabled === false ? "no" : "yes") },
  ], f.migration_interfaces || [], { empty: "No migration interfaces reported." });
  const vmt = table([
    { label: "VM", cell: (v) => vmLink(v.name), sort: (v) => v.name },
    { label: "Power", cell: (v) => badge(v.power_state), sort: (v) => v.power_state },
    { label: "vCPUs", cls: "num", cell: (v) => v.spec.vcpus }, { label: "Memory", cls: "num", cell: (v) => mib(v.spec.memory_mb) },
  ], vms, { empty: "No VMs on this host." });
  return [section(`Virtual machines (${vms.length})`, vmt.el), section("Datastores", ds.el),
          section("Port groups", pgs.el), section("Migration network", nics.el)];
}

async function renderHost(params, redraw) {
  const [x, onHost, tasks] = await Promise.all([get("/hosts/" + enc(params.name)),
                                               getAll("/vms?host=" + enc(params.name)).catch(() => []), tasksOrNone()]);
  const vms = onHost.filter((v) => v.host === x.name).map((v) => ({ ...v, spec: v.spec || {} }));
  const errors = h("div", {});
  return h("div", { class: "page" },
    pageHead("host", x.name, badge(x.state), hostActions(x, errors, redraw), errors, redraw),
    h("div", { class: "columns" }, section("Summary", hostSummary(x)), ...hostTables(x, vms),
      recentTasks(tasks, (t) => t.source === x.name || t.destination === x.name)));
}

// -- VM -----------------------------------------------------------------------------------------------------
function vmActions(vm, errors, redraw) {
  if (!can("operator")) return [];
  const base = "/vms/" + enc(vm.name);
  const on = vm.power_state === "poweredOn";
  const out = [];
  if (!on) out.push(actionButton("Power on", { "data-testid": "vm-start", class: "btn btn-primary" },
                                 () => post(base + "/start"), errors, redraw));
  if (on) out.push(actionButton("Power off", { "data-testid": "vm-stop", title: "stop the VM (not a guest shutdown)" },
                                () => post(base + "/stop"), errors, redraw));
  out.push(h("a", { class: "btn", href: "#/migrate/" + enc(vm.name), "data-testid": "vm-migrate" }, "Migrate…"));
  if (on) {
    out.push(h("a", { class: "btn", href: `#/vms/${enc(vm.name)}/console/serial`, "data-testid": "vm-console-serial" },
               "Serial console"));
    out.push(h("a", { class: "btn", href: `#/vms/${enc(vm.name)}/console/vnc`, "data-testid": "vm-console-vnc" },
               "Graphical console"));
  }
  return out;
}

function guestPairs(rt) {
  const g = rt && rt.guest;
  if (!g) return [["Guest agent", null]];
  const ips = guestIps(rt);
  return [
    ["Guest agent", g.guest_agent === "answering" ? badge("answering") :
      h("span", {}, badge("not answering"), g.error ? h("span", { class: "muted" }, " " + g.error) : null,
        g.remedy ? h("div", { class: "muted" }, "Fix: " + g.remedy) : null)],
    ["Guest OS", g.os && (g.os.pretty_name || g.os.name)], ["Hostname", g.hostname],
    ["IP addresses", ips && ips.length ? ips.join(", ") : null],
  ];
}

function vmSummary(vm) {
  const s = vm.spec, rt = vm.runtime || {};
  const cpu = s.sockets ? `${s.vcpus} (${s.sockets} × ${s.cores} × ${s.threads})` : s.vcpus;
  return props([
    ["Power", badge(vm.power_state), { "data-testid": "vm-power" }],
    ["Host", hostLink(vm.host), { "data-testid": "vm-host" }],
    rt.error ? ["Runtime", h("span", { class: "text-bad" }, `${rt.error.message || rt.error.code} ` +
                                       (rt.error.remedy ? `— fix: ${rt.error.remedy}` : ""))] : null,
    ["QEMU", rt.state ? `${rt.state}${rt.qemu_status ? " / " + rt.qemu_status : ""}${rt.pid ? ", pid " + rt.pid : ""}` : null],
    ["Started", rt.started_at ? fmt.datetime(rt.started_at) : null],
    ...guestPairs(vm.runtime),
    ["Configured IP", s.guest_ip], ["vCPUs", cpu], ["Memory", mib(s.memory_mb)],
    ["CPU model", s.cpu_model], ["Machine", s.machine],
    ["Firmware", s.firmware ? s.firmware + (s.secure_boot ? " + Secure Boot" : "") : null], ["Boot", s.boot],
    ["Datastores", vmDatastores(s).join(", ")], ["Encrypted vMotion", s.encrypted_vmotion], ["UUID", vm.uuid],
  ]);
}

function diskTable(s) {
  return table([
    { label: "Disk", cell: (d) => d.id }, { label: "Kind", cell: (d) => d.kind },
    { label: "Datastore", cell: (d) => dash(d.datastore) },
    { label: "Path", cell: (d) => (d.kind === "rdm" ? dash(d.identity) : dash(d.path)) },
    { label: "Format", cell: (d) => d.format }, { label: "Size", cls: "num", cell: (d) => mib(d.size_mb) },
    { label: "Bus", cell: (d) => dash(d.bus) }, { label: "Cache", cell: (d) => d.cache || "auto" },
    { label: "Encrypted", cell: (d) => (d.encrypted ? "yes" : "no") },
  ], s.disks || [], { empty: "No disks." }).el;
}

function nicTable(vm) {
  const ifs = ((vm.runtime || {}).guest || {}).interfaces || [];
  const ipsOf = (mac) => (ifs.find((i) => i.mac && mac && i.mac.toLowerCase() === mac.toLowerCase()) || {}).addresses;
  return table([
    { label: "NIC", cell: (n) => n.id }, { label: "Port group", cell: (n) => n.portgroup },
    { label: "MAC", cell: (n) => n.mac }, { label: "Model", cell: (n) => n.model },
    { label: "Guest addresses", cell: (n) => (ipsOf(n.mac) || []).join(", ") || DASH },
  ], vm.spec.nics || [], { empty: "No NICs." }).el;
}

function mediaText(c) {
  if (c.media === "local") return `${c.datastore ? "[" + c.datastore + "] " : ""}${c.path || ""}`;
  if (c.media === "client") return dash(c.nbd);
  return "no media";
}

// CD/DVD: the drives and (operator) connect an ISO from a datastore, or disconnect.
function mediaSection(vm, redraw) {
  const drives = vm.spec.cdroms || [];
  const t = table([
    { label: "Drive", cell: (c) => c.id }, { label: "Media", cell: (c) => c.media },
    { label: "Image", cell: mediaText },
  ], drives, { empty: "No CD/DVD drive." }).el;
  if (!can("operator")) return section("CD/DVD", t);
  const errors = h("div", {});
  const drive = (drives[0] || {}).id || "cd0";
  const path = h("input", { type: "text", class: "input", "data-testid": "media-path", placeholder: "VM/media.iso",
                            title: "an ISO image, relative to the VM's datastore" });
  const dsList = vmDatastores(vm.spec);
  const ds = h("select", { class: "input", "data-testid": "media-datastore", title: "the ISO's datastore" },
               dsList.map((d) => h("option", { value: d }, d)));
  const cdrom = (body) => post(`/vms/${enc(vm.name)}/cdrom`, body);
  const connect = actionButton("Connect", { "data-testid": "media-connect" }, () => {
    if (!path.value.trim()) throw { code: "MEDIA_PATH_MISSING", message: "no ISO image given",
                                    remedy: "type its path relative to the datastore, e.g. VM/install.iso" };
    return cdrom({ drive, media: "local", path: path.value.trim(), datastore: ds.value || undefined });
  }, errors, redraw);
  const disconnect = actionButton("Disconnect", { "data-testid": "media-disconnect" },
                                  () => cdrom({ drive, media: "none" }), errors, redraw);
  return section("CD/DVD", t, h("div", { class: "form-row" }, h("label", {}, `Media for ${drive}: `), ds, path,
                                  connect, disconnect), errors);
}

async function renderVm(params, redraw) {
  const [raw, tasks] = await Promise.all([get("/vms/" + enc(params.name)), tasksOrNone()]);
  const vm = { ...raw, spec: raw.spec || {} };
  const errors = h("div", {});
  return h("div", { class: "page" },
    pageHead("vm", vm.name, badge(vm.power_state), vmActions(vm, errors, redraw), errors, redraw),
    h("div", { class: "columns" }, section("Summary", vmSummary(vm)), section("Disks", diskTable(vm.spec)),
      section("Network adapters", nicTable(vm)), mediaSection(vm, redraw),
      recentTasks(tasks, (t) => t.vm_uuid === vm.uuid || t.vm_name === vm.name)));
}

route("#/hosts/:name", authed(livePage(renderHost, (t, p) => t.source === p.name || t.destination === p.name)));
route("#/vms/:name", authed(livePage(renderVm, (t, p) => t.vm_name === p.name)));
