// #/migrate/:vm: vSphere's Migrate wizard, one step at a time, with the step list on the left.
// The compatibility step asks the controller (POST /vms/{vm}/migrate/plan) with the request built so far;
// Finish sends that same request (POST /vms/{vm}/migrate) and opens the task.
import { get, getAll, post, can, h, route, navigate, errorBox, fmt } from "./api.js";

const STEPS = [
  ["type", "Select a migration type"], ["compute", "Select a compute resource"], ["storage", "Select storage"],
  ["network", "Select networks"], ["priority", "Select vMotion priority"], ["compatibility", "Compatibility"],
  ["review", "Ready to complete"],
];
const TYPES = [
  ["vmotion", "Change compute resource only", "Move the running VM to another host; its disks stay where they are."],
  ["storage", "Change storage only", "Move the VM's folder and disks to another datastore; it stays on its host."],
  ["both", "Change both compute resource and storage", "Move the VM to another host and its disks to another " +
           "datastore (shared-nothing vMotion when the datastore is not shared)."],
];

// Which steps this migration type uses (the others are shown as skipped).
function skipped(st, step) {
  if (step === "compute" || step === "network") return st.type === "storage";
  if (step === "storage") return st.type === "vmotion";
  return false;
}

export function buildRequest(st) {
  const req = { priority: st.priority };
  if (st.type !== "storage") req.host = st.host || undefined;
  if (st.type !== "vmotion") {
    req.datastore = st.datastore || undefined;
    if (st.format !== "same") req.disk_format = st.format;
  }
  if (st.type !== "storage" && st.controller) {
    req.controller = st.controller;
    req.networks = { ...st.netmap };
  }
  return req;
}

const portGroups = (vm) => [...new Set(((vm.spec && vm.spec.nics) || []).map((n) => n.portgroup))];

route("#/migrate/:vm", async ({ vm: ref }, main) => {
  if (!can("operator")) {
    main.replaceChildren(errorBox({ code: "FORBIDDEN", message: "Migrating a VM needs the operator role.",
                                    remedy: "sign in with an operator or admin token" }));
    return;
  }
  const here = location.hash;
  const [vm, hosts, datastores, networks] = await Promise.all([
    get(`/vms/${encodeURIComponent(ref)}`), getAll("/hosts"), get("/datastores"), get("/networks")]);
  let members = [];
  if (can("admin")) {     // cross-controller targets: the domain's members (admin only; none outside a domain)
    try { members = (await get("/domain/members")).filter((m) => m.state === "member"); } catch (_) { members = []; }
  }
  if (location.hash !== here) return;          // left while it loaded: the next page owns <main>
  const st = { vm, hosts, datastores, networks, members, type: "vmotion", host: "", controller: "", datastore: "",
               format: "same", priority: "normal", netmap: Object.fromEntries(portGroups(vm).map((p) => [p, p])),
               step: 0, plan: null, planError: null, checking: false, problem: "", finishing: false };
  const shell = h("div", { class: "wizard" });
  main.replaceChildren(shell);
  st.redraw = () => shell.replaceChildren(...wizardView(st));
  st.redraw();
});

function wizardView(st) {
  const cur = STEPS[st.step][0];
  const list = h("ol", { class: "wizard-steps" }, STEPS.map(([name, title], i) => {
    const cls = [i === st.step ? "current" : i < st.step ? "done" : "todo", skipped(st, name) ? "skipped" : ""];
    return h("li", { class: cls.join(" "), "data-testid": `wizard-step-${name}` },
      h("span", { class: "step-no" }, String(i + 1)), " ", title, skipped(st, name) ? h("em", {}, " (skipped)") : null);
  }));
  const body = h("section", { class: "wizard-body" },
    h("h2", {}, `${st.step + 1} ${STEPS[st.step][1]}`),
    STEP_VIEWS[cur](st),
    st.problem ? h("p", { class: "error", role: "alert", "data-testid": "wizard-problem" }, st.problem) : null,
    footer(st, cur));
  return [h("h1", {}, "Migrate ", h("a", { href: `#/vms/${encodeURIComponent(st.vm.name)}` }, st.vm.name),
            h("span", { class: "muted" }, ` on ${st.vm.host} (${st.vm.power_state})`)),
          h("div", { class: "wizard-layout" }, list, body)];
}

function footer(st, cur) {
  const blocked = cur === "compatibility" && (st.checking || !st.plan || hasErrors(st.plan));
  return h("div", { class: "wizard-footer" },
    h("a", { class: "btn", href: `#/vms/${encodeURIComponent(st.vm.name)}`, "data-testid": "wizard-cancel" }, "Cancel"),
    h("button", { class: "btn", "data-testid": "wizard-back", disabled: st.step === 0 || st.finishing,
                  onclick: () => move(st, -1) }, "Back"),
    cur === "review"
      ? h("button", { class: "btn btn-primary", "data-testid": "wizard-finish", disabled: st.finishing,
                      onclick: () => finish(st) }, st.finishing ? "Starting…" : "Finish")
      : h("button", { class: "btn btn-primary", "data-testid": "wizard-next", disabled: blocked,
                      onclick: () => move(st, 1) }, "Next"));
}

function stepProblem(st, cur) {
  if (cur === "compute" && !st.host) return "Select the destination host.";
  if (cur === "compute" && !st.controller && st.host === st.vm.host && st.type === "vmotion")
    return `The VM already runs on ${st.host}: select another host, or change storage only.`;
  if (cur === "storage" && !st.datastore) return "Select the destination datastore.";
  return "";
}

function move(st, dir) {
  const cur = STEPS[st.step][0];
  st.problem = dir > 0 ? stepProblem(st, cur) : "";
  if (st.problem) { st.redraw(); return; }
  let i = st.step + dir;
  while (i > 0 && i < STEPS.length - 1 && skipped(st, STEPS[i][0])) i += dir;
  st.step = Math.max(0, Math.min(STEPS.length - 1, i));
  if (STEPS[st.step][0] === "compatibility" && dir > 0) check(st);
  st.redraw();
}

async function check(st) {
  st.checking = true; st.plan = null; st.planError = null; st.redraw();
  try { st.plan = await post(`/vms/${encodeURIComponent(st.vm.name)}/migrate/plan`, buildRequest(st)); }
  catch (e) { st.planError = e; }
  st.checking = false; st.redraw();
}

async function finish(st) {
  st.finishing = true; st.finishError = null; st.redraw();
  try {
    const task = await post(`/vms/${encodeURIComponent(st.vm.name)}/migrate`, buildRequest(st));
    navigate(`#/tasks/${encodeURIComponent(task.id)}`);
  } catch (e) {
    st.finishing = false; st.finishError = e; st.redraw();
  }
}

const NUMERIC = new Set(["CPUs", "VMs", "Free", "Capacity"]);
const th = (c) => h("th", { class: NUMERIC.has(c) ? "num" : undefined }, c);
const hasErrors = (plan) => (plan.findings || []).some((f) => f.severity === "error");

function radio(name, value, checked, testid, onpick) {
  return h("input", { type: "radio", name, value, checked, "data-testid": testid,
                      onchange: (ev) => { if (ev.target.checked) onpick(value); } });
}

// ---- the steps ------------------------------------------------------------------------------------------
function typeStep(st) {
  const cold = st.vm.power_state === "poweredOff";
  return h("div", {},
    cold ? h("p", { class: "muted", "data-testid": "wizard-cold" },
      `${st.vm.name} is ${st.vm.power_state}: the move is a cold migration (its files are copied and verified).`)
      : null,
    h("div", { class: "choices" }, TYPES.map(([value, title, help]) =>
      h("label", { class: "choice" },
        radio("type", value, st.type === value, `wizard-type-${value}`,
              (v) => { st.type = v; st.plan = null; st.redraw(); }),
        h("span", {}, h("strong", {}, title), h("div", { class: "muted" }, help))))));
}

// CPU: the 1-minute load average per CPU; memory: the share in use.
function hostLoad(host) {
  const f = host.facts || {};
  const parts = [];
  if (f.loadavg && f.loadavg.length && f.cpu_count) {
    parts.push(`CPU ${fmt.pct(100 * f.loadavg[0] / f.cpu_count)} (load ${f.loadavg[0].toFixed(2)})`);
  }
  if (f.mem_total_mb) {
    parts.push(`memory ${fmt.pct(100 * (1 - f.mem_free_mb / f.mem_total_mb))} used, ` +
               `${(f.mem_free_mb / 1024).toFixed(1)} of ${(f.mem_total_mb / 1024).toFixed(1)} GiB free`);
  }
  return parts.join("; ") || "—";
}

function computeStep(st) {
  const rows = st.hosts.map((host) => {
    const f = host.facts || {};
    const note = host.name === st.vm.host ? "current host" : host.maintenance ? "maintenance" : "";
    return h("tr", { class: st.host === host.name ? "selected" : "" },
      h("td", {}, radio("host", host.name, st.host === host.name, `wizard-host-${host.name}`,
                        (v) => { st.host = v; st.problem = ""; st.redraw(); })),
      h("td", {}, host.name, note ? h("span", { class: "muted" }, ` (${note})`) : null),
      h("td", {}, h("span", { class: `badge badge-${host.state === "connected" ? "ok" : "bad"}` }, host.state)),
      h("td", {}, host.cluster || "—"),
      h("td", { class: "num" }, f.cpu_count != null ? String(f.cpu_count) : "—"),
      h("td", {}, hostLoad(host)),
      h("td", { class: "num" }, f.vms ? String(f.vms.length) : "—"));
  });
  return h("div", {}, controllerPicker(st),
    st.controller ? remoteHost(st) : h("table", { class: "grid hosts-pick" },
      h("thead", {}, h("tr", {}, ["", "Host", "State", "Cluster", "CPUs", "Load", "VMs"].map(th))),
      h("tbody", {}, rows)));
}

function controllerPicker(st) {
  if (!st.members.length) return null;
  return h("label", { class: "inline" }, "Controller: ",
    h("select", { "data-testid": "wizard-controller", onchange: (ev) => {
      st.controller = ev.target.value; st.host = ""; st.redraw(); } },
      h("option", { value: "", selected: !st.controller }, "this controller"),
      st.members.map((m) => h("option", { value: m.name, selected: st.controller === m.name }, m.name))));
}

function remoteHost(st) {
  return h("label", { class: "inline" }, `Host managed by ${st.controller}: `,
    h("input", { type: "text", value: st.host, "data-testid": "wizard-host-input", placeholder: "host name",
                 oninput: (ev) => { st.host = ev.target.value.trim(); } }));
}

function storageStep(st) {
  const cur = st.vm.spec && st.vm.spec.boot_datastore;
  const rows = st.datastores.map((ds) => h("tr", { class: st.datastore === ds.name ? "selected" : "" },
    h("td", {}, radio("datastore", ds.name, st.datastore === ds.name, `wizard-datastore-${ds.name}`,
                      (v) => { st.datastore = v; st.problem = ""; st.redraw(); })),
    h("td", {}, ds.name, ds.name === cur ? h("span", { class: "muted" }, " (current)") : null),
    h("td", {}, ds.kind || "—"), h("td", {}, ds.shared ? "shared" : "local"),
    h("td", { class: "num" }, ds.free_mb != null ? fmt.gb(ds.free_mb * 1048576) : "—"),
    h("td", { class: "num" }, ds.capacity_mb ? fmt.gb(ds.capacity_mb * 1048576) : "—"),
    h("td", {}, (ds.hosts || []).join(", ") || "—")));
  return h("div", {},
    h("table", { class: "grid datastores-pick" },
      h("thead", {}, h("tr", {}, ["", "Datastore", "Type", "Access", "Free", "Capacity", "Hosts"].map(th))),
      h("tbody", {}, rows)),
    h("label", { class: "inline" }, "Virtual disk format: ",
      h("select", { "data-testid": "wizard-format", onchange: (ev) => { st.format = ev.target.value; } },
        [["same", "Same format as source"], ["qcow2", "Thin provision (qcow2)"], ["raw", "Thick provision (raw)"]]
          .map(([v, t]) => h("option", { value: v, selected: st.format === v }, t)))));
}

function networkStep(st) {
  const srcs = portGroups(st.vm);
  if (!srcs.length) return h("p", { class: "muted" }, "The VM has no network adapter: nothing to map.");
  const names = [...new Set([...st.networks.map((n) => n.name), ...srcs])].sort();
  const note = st.controller ? `Choose the port group on ${st.controller}'s hosts for each of the VM's networks.`
    : "Within one controller a VM keeps its port groups: the destination host must have the same ones " +
      "(the compatibility check verifies it).";
  return h("div", {}, h("p", { class: "muted" }, note),
    h("table", { class: "grid networks-pick" },
      h("thead", {}, h("tr", {}, ["Source network", "Adapters", "Destination network"].map((c) => h("th", {}, c)))),
      h("tbody", {}, srcs.map((src) => h("tr", {},
        h("td", {}, src),
        h("td", {}, st.vm.spec.nics.filter((n) => n.portgroup === src).map((n) => `${n.id} (${n.mac})`).join(", ")),
        h("td", {}, h("select", { "data-testid": `wizard-network-${src}`, disabled: !st.controller,
                                  onchange: (ev) => { st.netmap[src] = ev.target.value; } },
          names.map((n) => h("option", { value: n, selected: st.netmap[src] === n }, n)))))))));
}

function priorityStep(st) {
  const opts = [["high", "Schedule vMotion with high priority (recommended)",
                 "Runs before normal-priority moves when the hosts' migration slots are full."],
                ["normal", "Schedule normal vMotion", "Waits behind high-priority moves for a free slot."]];
  return h("div", { class: "choices" }, opts.map(([value, title, help]) =>
    h("label", { class: "choice" },
      radio("priority", value, st.priority === value, `wizard-priority-${value}`, (v) => { st.priority = v; }),
      h("span", {}, h("strong", {}, title), h("div", { class: "muted" }, help)))));
}

const SEVERITIES = [["error", "Errors: the migration cannot start"], ["warning", "Warnings"],
                    ["info", "Information"]];

function compatibilityStep(st) {
  const recheck = h("button", { class: "btn", "data-testid": "wizard-recheck", disabled: st.checking,
                                onclick: () => check(st) }, "Check again");
  if (st.checking) return h("div", {}, h("p", { class: "loading" }, "Checking compatibility…"), recheck);
  if (st.planError) return h("div", {}, errorBox(st.planError), recheck);
  if (!st.plan) return h("div", {}, recheck);
  const fs = st.plan.findings || [];
  const groups = SEVERITIES.map(([sev, title]) => {
    const mine = fs.filter((f) => f.severity === sev);
    if (!mine.length) return null;
    return h("div", { class: `finding-group group-${sev}` }, h("h3", {}, `${title} (${mine.length})`),
      h("ul", { class: "findings" }, mine.map((f) =>
        h("li", { class: `sev-${sev}`, "data-testid": `finding-${f.code}` },
        h("strong", {}, f.code), " ", h("span", { class: "subject" }, f.subject), f.side ? ` [${f.side}]` : "",
        ": ", f.message, f.remedy ? h("div", { class: "remedy" }, "Fix: ", f.remedy) : null))));
  });
  return h("div", {},
    hasErrors(st.plan) ? h("p", { class: "error", "data-testid": "compat-blocked" },
      "Compatibility errors block this migration: fix them (or go Back and choose another destination), " +
      "then Check again.")
      : h("p", { class: "ok", "data-testid": "compat-ok" },
          fs.length ? "Compatibility checks passed with the notes below." : "Compatibility checks passed."),
    groups, recheck);
}

function reviewStep(st) {
  const req = buildRequest(st);
  const p = (st.plan && st.plan.prediction) || null;
  const enc = (st.plan && st.plan.encryption) || null;
  const type = TYPES.find((t) => t[0] === st.type)[1];
  const rows = [
    ["Virtual machine", st.vm.name], ["Migration type", type],
    st.plan && st.plan.kind ? ["Move (as the controller plans it)", st.plan.kind] : null,
    ["Source", `${st.plan ? st.plan.source : st.vm.host}`],
    ["Destination", st.plan ? st.plan.destination : (req.host || st.vm.host)],
    req.controller ? ["Controller", req.controller] : null,
    req.datastore ? ["Datastore", req.datastore] : null,
    req.datastore ? ["Disk format", st.format === "same" ? "same as source" : st.format] : null,
    req.networks ? ["Networks", Object.entries(req.networks).map(([a, b]) => `${a} → ${b}`).join(", ")] : null,
    ["vMotion priority", st.priority],
  ].filter(Boolean).map(([k, v]) => [k, null, v]);
  rows.push(["Predicted total time", "review-total",
             p && p.total_s != null ? fmt.secs(p.total_s) : p ? `does not converge (${p.strategy})` : "no prediction"],
            ["Predicted downtime", "review-downtime", p && p.downtime_ms != null ? `${p.downtime_ms} ms` : "—"],
            ["Encryption", "review-encryption", enc ? `${enc.mode}${enc.reason ? ` (${enc.reason})` : ""}` : "—"]);
  if (p && p.passes != null) rows.push(["Predicted passes", null, String(p.passes)]);
  return h("div", {},
    h("table", { class: "grid kv review" }, h("tbody", {}, rows.map(([k, id, v]) =>
      h("tr", {}, h("th", {}, k), h("td", { "data-testid": id || undefined }, v))))),
    p ? null : h("p", { class: "muted" }, "No prediction: the controller had no dirty-rate sample or link budget " +
                                          "(a storage-only move is not predicted)."),
    st.finishError ? errorBox(st.finishError) : null);
}

const STEP_VIEWS = { type: typeStep, compute: computeStep, storage: storageStep, network: networkStep,
                     priority: priorityStep, compatibility: compatibilityStep, review: reviewStep };
