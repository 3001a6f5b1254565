// The consoles (#/vms/:name/console/:kind): the guest's serial line as a small terminal, or its screen through the
// project's own RFB client (rfb.js). Both go through the controller's websocket, which follows the VM when it
// moves: the page keeps its session and says what the relay says (serial: "attached", "moved", "end" events;
// VNC: RFB only, so a move is seen on the task stream and as the screen's refresh).
import { get, session, can, whoami, stream, h, route, onLeave, errorBox } from "./api.js";
import { RFBClient } from "./rfb.js";

const SCROLLBACK = 2000;          // lines kept on the serial screen
const TAB = 8;

// close codes of the relay (models/console.py): 4000 + an HTTP status, and two of its own
const CLOSES = {
  1000: ["the session ended", ""],
  1006: ["the connection dropped", "check the controller is up, then Reconnect"],
  4301: ["the VM moved and its screen size changed", "Reconnect to see the new screen"],
  4401: ["the controller did not accept the session", "sign in again, then Reconnect"],
  4403: ["this console needs the operator role", "sign in with an operator or admin token"],
  4404: ["the VM or its console is gone", "go back to the VM's page and check it exists"],
  4409: ["the VM is not powered on", "power it on first, then Reconnect"],
  4410: ["the VM powered off or its console went away", "power it on, then Reconnect"],
  4502: ["the VM's host agent did not open the console", "check the agent on the VM's host, then Reconnect"],
  4504: ["the VM's host agent did not answer in time", "check the agent on the VM's host, then Reconnect"],
};

export function consoleURL(name, kind) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  return `${scheme}://${location.host}/api/v1/vms/${encodeURIComponent(name)}/console/${kind}`;
}

// -- the status line ------------------------------------------------------------------------------------------
class Status {
  constructor() {
    this.el = h("div", { class: "console-status st-connecting", "data-testid": "console-status",
                         role: "status", "aria-live": "polite" }, "connecting…");
    this.detail = h("div", { class: "console-detail" });
  }
  set(state, text, detail) {
    this.state = state;
    this.el.className = `console-status st-${state}`;
    this.el.textContent = text;
    this.detail.textContent = detail || "";
  }
}

// -- the serial screen: CR, LF, BS, TAB, a few CSI sequences (erase line/screen), the rest dropped ------------
export class Terminal {
  constructor(pre) {
    this.pre = pre;
    this.lines = [""];
    this.col = 0;
    this.esc = "";                // "" | "esc" | "csi" | "osc": an escape sequence in progress (across chunks)
    this.params = "";
    this.decoder = new TextDecoder("utf-8");
    this.queued = false;
  }
  write(bytes) {
    const text = this.decoder.decode(bytes, { stream: true });
    for (const ch of text) this.put(ch);
    if (this.lines.length > SCROLLBACK) this.lines.splice(0, this.lines.length - SCROLLBACK);
    this.render();
  }
  put(ch) {
    if (this.esc) { this.escape(ch); return; }
    switch (ch) {
      case "\x1b": this.esc = "esc"; return;
      case "\r": this.col = 0; return;
      case "\n": this.lines.push(""); this.col = 0; return;
      case "\b": this.col = Math.max(0, this.col - 1); return;
      case "\t": this.type(" ".repeat(TAB - (this.col % TAB))); return;
      case "\x07": return;
      default:
        if (ch < " " || ch === "\x7f") return;       // other control characters: not shown
        this.type(ch);
    }
  }
  type(s) {
    const i = this.lines.length - 1;
    let line = this.lines[i];
    if (line.length < this.col) line = line.padEnd(this.col);
    this.lines[i] = line.slice(0, this.col) + s + line.slice(this.col + s.length);
    this.col += s.length;
  }
  escape(ch) {
    if (this.esc === "esc") {
      this.esc = ch === "[" ? "csi" : ch === "]" ? "osc" : "";
      this.params = "";
      return;
    }
    if (this.esc === "osc") {                          // ends with BEL or ESC \ (ST)
      if (ch === "\x07" || ch === "\\") this.esc = "";
      return;
    }
    if (ch >= "@" && ch <= "~") { this.esc = ""; this.csi(ch, this.params); return; }
    this.params += ch;
  }
  csi(cmd, params) {
    const n = parseInt(params, 10);
    const i = this.lines.length - 1;
    if (cmd === "K") {                                 // erase in line: 0 to the end, 1 to the start, 2 all
      const line = this.lines[i];
      if (!n) this.lines[i] = line.slice(0, this.col);
      else if (n === 2) this.lines[i] = "";
      else this.lines[i] = " ".repeat(this.col) + line.slice(this.col);
    } else if (cmd === "J" && (n === 2 || n === 3)) {  // clear the screen: start a fresh page
      this.lines.push(""); this.col = 0;
    } else if (cmd === "D") { this.col = Math.max(0, this.col - (n || 1)); }
    else if (cmd === "C") { this.col += n || 1; }
    else if (cmd === "G") { this.col = Math.max(0, (n || 1) - 1); }
  }
  render() {
    if (this.queued) return;
    this.queued = true;
    requestAnimationFrame(() => {
      this.queued = false;
      const box = this.pre;
      const atEnd = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
      box.textContent = this.lines.join("\n");
      if (atEnd) box.scrollTop = box.scrollHeight;
    });
  }
}

// a key as the bytes a serial terminal sends (VT100 / xterm); null: not ours (let the browser have it)
const SEQ = { Enter: "\r", Backspace: "\x7f", Tab: "\t", Escape: "\x1b", ArrowUp: "\x1b[A", ArrowDown: "\x1b[B",
              ArrowRight: "\x1b[C", ArrowLeft: "\x1b[D", Home: "\x1b[H", End: "\x1b[F", Delete: "\x1b[3~",
              Insert: "\x1b[2~", PageUp: "\x1b[5~", PageDown: "\x1b[6~" };
export function serialKey(e) {
  if (e.metaKey) return null;
  if (e.ctrlKey && e.shiftKey && (e.key === "V" || e.key === "C")) return null;   // the browser's copy/paste
  let s = SEQ[e.key];
  if (s === undefined && e.key.length === 1) {
    s = e.key;
    if (e.ctrlKey) {
      const c = e.key.toUpperCase().charCodeAt(0);
      if (c >= 0x40 && c <= 0x5f) s = String.fromCharCode(c & 0x1f);
      else if (e.key === " ") s = "\x00";
      else return null;
    }
  }
  if (s === undefined) return null;
  return new TextEncoder().encode(e.altKey ? "\x1b" + s : s);
}

// -- the page --------------------------------------------------------------------------------------------------
class ConsolePage {
  constructor(name, kind, main) {
    Object.assign(this, { name, kind, main, ws: null, vm: null, left: false, sessionId: "", moves: 0 });
    this.seenTasks = new Set();
    this.status = new Status();
    this.input = h("div", { class: `console-frame console-${kind}`, tabindex: "0", "data-testid": "console-input",
                            "aria-label": `${kind} console of ${name}: click to type` });
  }
  toolbar() {
    const other = this.kind === "serial" ? "vnc" : "serial";
    return h("div", { class: "console-bar" },
      h("a", { href: `#/vms/${encodeURIComponent(this.name)}`, class: "console-back", "data-testid": "console-back" },
        "← ", this.name),
      h("h1", {}, this.kind === "vnc" ? "Graphical console" : "Serial console", h("span", { class: "vm" }, this.name)),
      h("span", { class: "spacer" }),
      this.kind === "vnc" ? h("button", { type: "button", "data-testid": "console-cad",
                                          onclick: () => this.rfb && this.rfb.ctrlAltDel() }, "Send Ctrl-Alt-Del") : null,
      h("button", { type: "button", "data-testid": "console-reconnect", onclick: () => this.connect() }, "Reconnect"),
      h("button", { type: "button", "data-testid": "console-disconnect", onclick: () => this.disconnect() },
        "Disconnect"),
      h("a", { href: `#/vms/${encodeURIComponent(this.name)}/console/${other}`, class: "button",
               "data-testid": `console-switch-${other}` }, other === "vnc" ? "Graphical" : "Serial"));
  }
  async render() {
    onLeave(() => { this.left = true; this.disconnect(); });     // first: a page left while it loads stays closed
    if (!session.name) await whoami();
    if (this.left) return;
    if (!can("operator")) {
      const e = session.name
        ? { code: "FORBIDDEN", message: `a console needs the operator role; you are ${session.role}`,
            remedy: "sign in with an operator or admin token" }
        : { code: "UNAUTHORIZED", message: "not signed in", remedy: "sign in with an API token (operator or admin)" };
      this.main.replaceChildren(h("a", { href: `#/vms/${encodeURIComponent(this.name)}` }, "← ", this.name),
                                errorBox(e), session.name ? null : h("a", { href: "#/signin" }, "Sign in"));
      return;
    }
    try { this.vm = await get(`/vms/${encodeURIComponent(this.name)}`); }
    catch (e) {                    // a VM that is gone is final; a host that did not answer is not the console's
      if (e.status === 404 || e.status === 401 || e.status === 403) throw e;
      this.vm = { name: this.name, host: "", power_state: "unknown" };
    }
    if (this.left) return;
    this.screen = this.kind === "vnc"
      ? h("canvas", { class: "console-screen", "data-testid": "console-screen", width: 640, height: 400 })
      : h("pre", { class: "console-screen", "data-testid": "console-screen" });
    this.input.replaceChildren(this.screen);
    const hint = this.kind === "vnc"
      ? "Click the screen to type: keys and the mouse go to the guest. Ctrl-Alt-Del has its own button."
      : "Click the screen to type: keys go to the guest's serial line (Ctrl-Shift-V pastes).";
    this.main.replaceChildren(h("section", { class: "console-page" }, this.toolbar(), this.status.el,
                                this.status.detail, this.input, h("p", { class: "console-hint" }, hint)));
    this.bindInput();
    stream("/tasks/stream", (t) => this.onTask(t));
    this.connect();
    this.input.focus();
  }
  bindInput() {
    if (this.kind !== "serial") return;
    this.input.addEventListener("keydown", (e) => {
      const bytes = serialKey(e);
      if (!bytes) return;
      e.preventDefault();
      this.send(bytes);
    });
    this.input.addEventListener("paste", (e) => {
      const text = e.clipboardData ? e.clipboardData.getData("text") : "";
      if (text) { e.preventDefault(); this.send(new TextEncoder().encode(text.replace(/\r?\n/g, "\r"))); }
    });
  }
  connectedText() { return this.vm.host ? `connected to ${this.vm.host}` : "connected"; }
  send(bytes) { if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(bytes); }

  connect() {
    this.disconnect();
    Object.assign(this, { opened: false, lastError: null, record: null });
    this.status.set("connecting", `connecting to the ${this.kind} console of ${this.name}…`);
    const ws = new WebSocket(consoleURL(this.name, this.kind), ["binary"]);
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    if (this.kind === "vnc") {
      this.rfb = new RFBClient(ws, this.screen, this.input, {
        onReady: (init) => this.status.set("connected", this.connectedText(),
                                           `${init.name} · ${init.width}×${init.height}`),
        onResize: (w, hh) => { this.status.detail.textContent = `screen resized to ${w}×${hh}`; },
        onError: (msg) => { this.lastError = { message: msg, remedy: "Reconnect" }; },
      });
    } else {
      this.term = this.term || new Terminal(this.screen);         // the scrollback survives a Reconnect
      ws.onmessage = (ev) => this.onSerial(ev.data);
    }
    ws.addEventListener("open", () => { this.opened = true; });
    ws.addEventListener("close", (ev) => { if (this.ws === ws) this.onClose(ev); });
  }
  disconnect() {
    const ws = this.ws;
    this.ws = null;
    if (this.rfb) { this.rfb.detach(); this.rfb = null; }
    if (ws && ws.readyState <= WebSocket.OPEN) {
      try { if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ op: "end" })); } catch (_) { /* gone */ }
      ws.close(1000);
      if (!this.left) this.status.set("closed", "closed: you disconnected", "Reconnect opens a new session");
    }
  }

  onSerial(data) {
    if (typeof data !== "string") { this.term.write(new Uint8Array(data)); return; }
    let ev;
    try { ev = JSON.parse(data); } catch (_) { return; }
    if (ev.event === "attached") {
      this.sessionId = ev.session || "";
      this.vm.host = ev.host || this.vm.host;
      this.status.set("connected", this.connectedText(), `session ${this.sessionId}`);
    } else if (ev.event === "moved") {
      this.moves += 1;
      this.vm.host = ev.to_host;
      this.status.set("connected", `reconnected: on ${ev.to_host} (moved from ${ev.from_host})`,
        `output gap ${Math.round(ev.gap_ms)} ms · relay reconnect ${Math.round(ev.reconnect_ms)} ms` +
        (ev.replayed_bytes ? ` · ${ev.replayed_bytes} bytes replayed from the destination's log` : "") +
        (ev.uncertain_bytes ? ` · ${ev.uncertain_bytes} bytes may show twice` : ""));
    } else if (ev.event === "error" && ev.error) {
      this.lastError = ev.error;
    } else if (ev.event === "end" && ev.session) {
      this.record = ev.session;
    }
  }
  onTask(t) {
    // the task stream says when the VM moves (a VNC session gets no relay events; a serial one gets "moved" late)
    if (t.vm_name !== this.name || !this.ws || !t.destination || t.destination === t.source) return;
    if (t.state === "running") {
      this.seenTasks.add(t.id);
      if (this.status.state === "closed" || this.vm.host === t.destination) return;
      this.status.set("moving", `VM moving to ${t.destination}…`,
                      `${t.kind} ${t.phase || ""} ${Math.round(t.progress || 0)}% · the session stays open`);
      return;
    }
    if (t.state !== "success" && t.state !== "error") return;          // the journal's two final states
    if (!this.seenTasks.has(t.id) || this.status.state === "closed") return;
    this.seenTasks.delete(t.id);
    if (t.state === "success" && this.vm.host !== t.destination) {
      this.moves += 1;
      this.vm.host = t.destination;
      this.status.set("connected", `reconnected: on ${t.destination} (moved from ${t.source})`,
                      this.kind === "vnc" ? "the relay attached to the destination's display and asked for the whole screen"
                                          : "");
    } else if (t.state === "error") {
      const why = t.error && t.error.message ? `: ${t.error.message}` : "";
      this.status.set("connected", this.connectedText(), `the move failed${why}; the VM stays on ${t.source}`);
    }
  }
  async onClose(ev) {
    this.ws = null;
    if (this.rfb) { this.rfb.detach(); this.rfb = null; }
    if (!this.opened) { await this.explainRefusal(); return; }
    const [what, fix] = CLOSES[ev.code] || [`the session closed (code ${ev.code})`, "Reconnect"];
    const reason = (this.lastError && this.lastError.message) || ev.reason || what;
    const rec = this.record;
    const summary = rec ? `on ${rec.hosts.join(" → ")} · ${rec.moves.length} move(s) · ` +
                          `${rec.bytes_to_client} bytes out, ${rec.bytes_from_client} in` : "";
    const remedy = (this.lastError && this.lastError.remedy) || fix;
    this.status.set("closed", `closed: ${reason}`, [summary, remedy ? `Fix: ${remedy}` : ""].filter(Boolean).join(" · "));
  }
  async explainRefusal() {
    // a refused handshake shows the page no HTTP status: ask the API what is wrong
    try {
      const me = await whoami();
      if (!me) { this.status.set("closed", "closed: you are not signed in", "Fix: sign in again, then Reconnect"); return; }
      if (!can("operator")) {
        this.status.set("closed", `closed: a console needs the operator role; you are ${me.role}`,
                        "Fix: sign in with an operator or admin token"); return;
      }
      const vm = await get(`/vms/${encodeURIComponent(this.name)}`);
      if (vm.power_state !== "poweredOn") {
        this.status.set("closed", `closed: VM ${vm.name} is ${vm.power_state}: it has no console`,
                        `Fix: power it on first (Start on the VM's page), then Reconnect`); return;
      }
      this.status.set("closed", "closed: the controller refused the console",
                      "Fix: reload the page (the console accepts only the controller's own origin), then Reconnect");
    } catch (e) {
      this.status.set("closed", `closed: ${e.message}`, e.remedy ? `Fix: ${e.remedy}` : "Fix: Reconnect");
    }
  }
}

route("#/vms/:name/console/:kind", async ({ name, kind }, main) => {
  if (kind !== "serial" && kind !== "vnc") {
    main.replaceChildren(errorBox({ code: "INVALID_INPUT", message: `no console kind ${kind}`,
                                    remedy: "use serial or vnc" }));
    return;
  }
  await new ConsolePage(name, kind, main).render();
});
