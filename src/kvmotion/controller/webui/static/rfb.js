// A minimal RFB 3.8 client (the controller's relay speaks it: security type None, then the VM's ServerInit).
// Pixel format: 32 bpp true colour, little endian, red in the low byte: a pixel's bytes are R, G, B, x, as
// ImageData wants them. Encodings: Raw, CopyRect and the DesktopSize pseudo-encoding (all stateless, which the
// relay needs to switch servers between two messages when the VM moves). Keyboard as X keysyms, pointer with
// buttons and wheel. The websocket is the caller's; this reads and writes RFB on it.

const RAW = 0, COPYRECT = 1, DESKTOP_SIZE = -223;
const ENCODINGS = [COPYRECT, RAW, DESKTOP_SIZE];
const PIXEL_FORMAT = [32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 0, 8, 16, 0, 0, 0];  // bpp, depth, BE, true, maxes, shifts

// X keysyms of the keys that are not characters (KeyboardEvent.key -> keysym)
export const KEYSYMS = {
  Backspace: 0xff08, Tab: 0xff09, Enter: 0xff0d, Escape: 0xff1b, Insert: 0xff63, Delete: 0xffff,
  Home: 0xff50, End: 0xff57, PageUp: 0xff55, PageDown: 0xff56,
  ArrowLeft: 0xff51, ArrowUp: 0xff52, ArrowRight: 0xff53, ArrowDown: 0xff54,
  F1: 0xffbe, F2: 0xffbf, F3: 0xffc0, F4: 0xffc1, F5: 0xffc2, F6: 0xffc3,
  F7: 0xffc4, F8: 0xffc5, F9: 0xffc6, F10: 0xffc7, F11: 0xffc8, F12: 0xffc9,
  CapsLock: 0xffe5, NumLock: 0xff7f, ScrollLock: 0xff14, Pause: 0xff13, PrintScreen: 0xff61, ContextMenu: 0xff67,
};
const MODIFIERS = {           // KeyboardEvent.code -> keysym (left and right are distinct keys)
  ShiftLeft: 0xffe1, ShiftRight: 0xffe2, ControlLeft: 0xffe3, ControlRight: 0xffe4,
  AltLeft: 0xffe9, AltRight: 0xfe03, MetaLeft: 0xffeb, MetaRight: 0xffec,
};

// the keysym of a keydown, or 0: a character is its Latin-1 code, or 0x01000000 + its code point
export function keysymOf(e) {
  if (MODIFIERS[e.code]) return MODIFIERS[e.code];
  if (KEYSYMS[e.key]) return KEYSYMS[e.key];
  if ([...e.key].length !== 1) return 0;                 // "Dead", "Unidentified", ...
  const cp = e.key.codePointAt(0);
  return cp < 0x100 ? cp : 0x01000000 + cp;
}

// Bytes in, messages out: a queue that hands out n bytes once they are all there.
class Bytes {
  constructor() { this.buf = new Uint8Array(0); this.pos = 0; }
  push(data) {
    const d = new Uint8Array(data);
    if (this.pos >= this.buf.length) { this.buf = d; this.pos = 0; return; }
    const rest = this.buf.subarray(this.pos);
    const all = new Uint8Array(rest.length + d.length);
    all.set(rest); all.set(d, rest.length);
    this.buf = all; this.pos = 0;
  }
  has(n) { return this.buf.length - this.pos >= n; }
  take(n) { const v = this.buf.subarray(this.pos, this.pos + n); this.pos += n; return v; }
  view(n) { return new DataView(this.buf.buffer, this.buf.byteOffset + this.pos, n); }
}

export class RFBClient {
  // hooks: onReady({width, height, name}), onResize(w, h), onUpdate(), onError(message)
  constructor(ws, canvas, input, hooks) {
    Object.assign(this, { ws, canvas, input, hooks, width: 0, height: 0, name: "", rects: 0, rect: null });
    this.ctx = canvas.getContext("2d");
    this.bytes = new Bytes();
    this.step = this.version;
    this.buttons = 0;
    this.held = new Map();                                // KeyboardEvent.code -> keysym sent down
    this.listeners = [];
    ws.addEventListener("message", (ev) => { if (typeof ev.data !== "string") this.feed(ev.data); });
  }

  feed(data) {
    this.bytes.push(data);
    try {
      while (this.step && this.step.call(this)) { /* each step consumes one piece */ }
    } catch (e) {
      this.fail(e.message);
    }
  }
  fail(message) {
    this.step = null;
    if (this.hooks.onError) this.hooks.onError(message);
    if (this.ws.readyState === WebSocket.OPEN) this.ws.close(1000);
  }
  send(bytes) { if (this.ws.readyState === WebSocket.OPEN) this.ws.send(bytes); }

  // -- the handshake ------------------------------------------------------------------------------------------
  version() {
    if (!this.bytes.has(12)) return false;
    const v = new TextDecoder().decode(this.bytes.take(12));
    if (!v.startsWith("RFB 003.")) throw new Error(`not an RFB server (${JSON.stringify(v)})`);
    this.send(new TextEncoder().encode("RFB 003.008\n"));
    this.step = this.securityTypes;
    return true;
  }
  securityTypes() {
    if (!this.bytes.has(1)) return false;
    const n = this.bytes.buf[this.bytes.pos];
    if (n === 0) { this.step = this.failure; this.bytes.take(1); return true; }
    if (!this.bytes.has(1 + n)) return false;
    const types = Array.from(this.bytes.take(1 + n).subarray(1));
    if (!types.includes(1)) throw new Error(`the server offers no security type this client speaks (${types})`);
    this.send(new Uint8Array([1]));
    this.step = this.securityResult;
    return true;
  }
  securityResult() {
    if (!this.bytes.has(4)) return false;
    if (this.bytes.view(4).getUint32(0) !== 0) { this.bytes.take(4); this.step = this.failure; return true; }
    this.bytes.take(4);
    this.send(new Uint8Array([1]));                     // ClientInit: shared
    this.step = this.serverInit;
    return true;
  }
  failure() {
    if (!this.bytes.has(4)) return false;
    const n = this.bytes.view(4).getUint32(0);
    if (!this.bytes.has(4 + n)) return false;
    const reason = new TextDecoder().decode(this.bytes.take(4 + n).subarray(4));
    throw new Error(`the VNC server refused the session: ${reason}`);
  }
  serverInit() {
    if (!this.bytes.has(24)) return false;
    const d = this.bytes.view(24);
    const n = d.getUint32(20);
    if (!this.bytes.has(24 + n)) return false;
    this.resize(d.getUint16(0), d.getUint16(2));
    this.name = new TextDecoder().decode(this.bytes.take(24 + n).subarray(24));
    this.send(new Uint8Array([0, 0, 0, 0, ...PIXEL_FORMAT]));
    const enc = new DataView(new ArrayBuffer(4 + 4 * ENCODINGS.length));
    enc.setUint8(0, 2); enc.setUint16(2, ENCODINGS.length);
    ENCODINGS.forEach((e, i) => enc.setInt32(4 + 4 * i, e));
    this.send(enc.buffer);
    this.request(false);
    this.attach();
    this.step = this.message;
    if (this.hooks.onReady) this.hooks.onReady({ width: this.width, height: this.height, name: this.name });
    return true;
  }

  // -- server messages -----------------------------------------------------------------------------------------
  message() {
    if (!this.bytes.has(1)) return false;
    const type = this.bytes.buf[this.bytes.pos];
    if (type === 0) {                                   // FramebufferUpdate
      if (!this.bytes.has(4)) return false;
      this.rects = this.bytes.view(4).getUint16(2);
      this.bytes.take(4);
      this.step = this.rectangle;
      return true;
    }
    if (type === 1) return this.skipColourMap();
    if (type === 2) { this.bytes.take(1); return true; }           // Bell
    if (type === 3) return this.skipCutText();
    throw new Error(`the server sent RFB message type ${type}, which this client does not know`);
  }
  skipColourMap() {
    if (!this.bytes.has(6)) return false;
    const n = this.bytes.view(6).getUint16(4);
    if (!this.bytes.has(6 + 6 * n)) return false;
    this.bytes.take(6 + 6 * n);
    return true;
  }
  skipCutText() {
    if (!this.bytes.has(8)) return false;
    const n = this.bytes.view(8).getUint32(4);
    if (!this.bytes.has(8 + n)) return false;
    this.bytes.take(8 + n);
    return true;
  }
  rectangle() {
    if (this.rects === 0) {
      this.step = this.message;
      this.request(true);
      if (this.hooks.onUpdate) this.hooks.onUpdate();
      return true;
    }
    if (!this.bytes.has(12)) return false;
    const d = this.bytes.view(12);
    const r = { x: d.getUint16(0), y: d.getUint16(2), w: d.getUint16(4), h: d.getUint16(6), enc: d.getInt32(8) };
    const size = r.enc === RAW ? r.w * r.h * 4 : r.enc === COPYRECT ? 4 : r.enc === DESKTOP_SIZE ? 0 : -1;
    if (size < 0) throw new Error(`the server sent encoding ${r.enc}, which this client did not ask for`);
    if (!this.bytes.has(12 + size)) return false;
    this.bytes.take(12);
    const body = this.bytes.take(size);
    this.rects -= 1;
    if (r.enc === RAW) this.drawRaw(r, body);
    else if (r.enc === COPYRECT) {
      const s = new DataView(body.buffer, body.byteOffset, 4);
      this.ctx.drawImage(this.canvas, s.getUint16(0), s.getUint16(2), r.w, r.h, r.x, r.y, r.w, r.h);
    } else {
      this.resize(r.w, r.h);
      if (this.hooks.onResize) this.hooks.onResize(r.w, r.h);
    }
    return true;
  }
  drawRaw(r, body) {
    if (!r.w || !r.h) return;
    const img = new ImageData(r.w, r.h);
    img.data.set(body);
    for (let i = 3; i < img.data.length; i += 4) img.data[i] = 255;
    this.ctx.putImageData(img, r.x, r.y);
  }
  resize(w, h) {
    this.width = w; this.height = h;
    this.canvas.width = w; this.canvas.height = h;
  }
  request(incremental) {
    const d = new DataView(new ArrayBuffer(10));
    d.setUint8(0, 3); d.setUint8(1, incremental ? 1 : 0);
    d.setUint16(6, this.width); d.setUint16(8, this.height);
    this.send(d.buffer);
  }

  // -- input --------------------------------------------------------------------------------------------------
  key(keysym, down) {
    const d = new DataView(new ArrayBuffer(8));
    d.setUint8(0, 4); d.setUint8(1, down ? 1 : 0); d.setUint32(4, keysym);
    this.send(d.buffer);
  }
  ctrlAltDel() {
    for (const k of [0xffe3, 0xffe9, 0xffff]) this.key(k, true);
    for (const k of [0xffff, 0xffe9, 0xffe3]) this.key(k, false);
    this.input.focus();
  }
  pointer(x, y) {
    const d = new DataView(new ArrayBuffer(6));
    d.setUint8(0, 5); d.setUint8(1, this.buttons); d.setUint16(2, x); d.setUint16(4, y);
    this.send(d.buffer);
  }
  at(e) {               // the event's position in framebuffer pixels (the canvas may be scaled by CSS)
    const box = this.canvas.getBoundingClientRect();
    const x = Math.floor((e.clientX - box.left) * this.width / (box.width || 1));
    const y = Math.floor((e.clientY - box.top) * this.height / (box.height || 1));
    return [Math.max(0, Math.min(this.width - 1, x)), Math.max(0, Math.min(this.height - 1, y))];
  }
  on(el, type, fn, opts) { el.addEventListener(type, fn, opts); this.listeners.push([el, type, fn, opts]); }
  attach() {
    const mask = (b) => (b === 0 ? 1 : b === 1 ? 2 : b === 2 ? 4 : 0);
    this.on(this.input, "keydown", (e) => this.onKey(e, true));
    this.on(this.input, "keyup", (e) => this.onKey(e, false));
    this.on(this.input, "blur", () => this.releaseAll());
    this.on(this.canvas, "mousedown", (e) => { this.input.focus(); this.buttons |= mask(e.button);
                                               this.pointer(...this.at(e)); e.preventDefault(); });
    this.on(this.canvas, "mouseup", (e) => { this.buttons &= ~mask(e.button); this.pointer(...this.at(e)); });
    this.on(this.canvas, "mousemove", (e) => this.pointer(...this.at(e)));
    this.on(this.canvas, "contextmenu", (e) => e.preventDefault());
    this.on(this.canvas, "wheel", (e) => this.onWheel(e), { passive: false });
  }
  onWheel(e) {
    e.preventDefault();
    if (!e.deltaY) return;
    const bit = e.deltaY < 0 ? 8 : 16;
    const [x, y] = this.at(e);
    this.buttons |= bit; this.pointer(x, y);
    this.buttons &= ~bit; this.pointer(x, y);
  }
  onKey(e, down) {
    if (e.metaKey && !MODIFIERS[e.code]) return;          // leave the OS's shortcuts alone
    e.preventDefault();
    if (down) {
      const sym = keysymOf(e);
      if (!sym) return;
      this.held.set(e.code || e.key, sym);
      this.key(sym, true);
    } else {
      const sym = this.held.get(e.code || e.key);       // the keysym sent down (Shift may be up by now)
      if (sym === undefined) return;
      this.held.delete(e.code || e.key);
      this.key(sym, false);
    }
  }
  releaseAll() {
    for (const sym of this.held.values()) this.key(sym, false);
    this.held.clear();
    if (this.buttons) { this.buttons = 0; this.pointer(0, 0); }
  }
  detach() {
    this.releaseAll();
    for (const [el, type, fn, opts] of this.listeners.splice(0)) el.removeEventListener(type, fn, opts);
    this.step = null;
  }
}
