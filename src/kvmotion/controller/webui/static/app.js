// The shell: the top bar (product, navigation, who is signed in), the sign-in page, and the guard that sends a
// page without a session to #/signin. Each page module registers its own routes with api.route.
import { dispatch, whoami, session, signIn, signOut, h, route, navigate, errorBox } from "./api.js";
import "./inventory.js";
import "./tasks.js";
import "./wizard.js";
import "./console.js";
import "./events.js";

const NAV = [
  ["inventory", "Inventory", ["#/inventory", "#/hosts/", "#/vms/", "#/migrate/"]],   // the wizard: a VM action
  ["tasks", "Tasks", ["#/tasks"]],
  ["events", "Events", ["#/events"]],
];

function active(prefixes) {
  const hash = location.hash || "#/inventory";
  return prefixes.some((p) => hash.startsWith(p));
}

// The top bar: rebuilt on sign-in, sign-out and every page change (the active tab follows the hash).
export function renderHeader() {
  const top = document.getElementById("top");
  const brand = h("a", { class: "brand", href: "#/inventory" }, h("span", { class: "brand-mark" }, "kv"), "kvmotion",
                  h("span", { class: "brand-sub" }, "Client"));
  if (!session.name) { top.replaceChildren(brand); return; }
  const nav = h("nav", { class: "nav" }, NAV.map(([id, label, prefixes]) =>
    h("a", { href: prefixes[0], "data-testid": "nav-" + id, class: active(prefixes) ? "active" : null }, label)));
  const user = h("div", { class: "user" },
    h("span", { class: "whoami", "data-testid": "whoami", title: "signed in as" }, `${session.name} (${session.role})`),
    h("button", { class: "btn btn-top", "data-testid": "signout", onclick: doSignOut }, "Sign out"));
  top.replaceChildren(brand, nav, user);
}

async function doSignOut() {
  try { await signOut(); } catch (_) { /* the session is forgotten here either way */ }
  renderHeader();
  navigate("#/signin");
}

// Sign-in errors name the problem and its fix; a network failure has no API body, so its remedy is given here.
function signinError(e) {
  if (e && e.code) return errorBox(e);
  return errorBox({ code: "UNREACHABLE", message: `the controller did not answer (${e && e.message || e})`,
                    remedy: "check that the controller runs and that this page was opened from its address" });
}

route("#/signin", async (_params, main) => {
  if (session.name) { navigate("#/inventory"); return; }
  const token = h("input", { type: "password", id: "signin-token", "data-testid": "signin-token",
                             autocomplete: "current-password", placeholder: "API token", required: true });
  const status = h("div", { class: "signin-status", "aria-live": "polite" });
  const submit = h("button", { type: "submit", class: "btn btn-primary", "data-testid": "signin-submit" }, "Sign in");
  const form = h("form", { class: "signin-card", onsubmit: async (ev) => {
    ev.preventDefault();
    submit.disabled = true;
    status.replaceChildren();
    try {
      await signIn(token.value.trim());
      token.value = "";
      renderHeader();
      navigate("#/inventory");
    } catch (e) {
      status.replaceChildren(signinError(e));
      token.select();
    } finally { submit.disabled = false; }
  } },
    h("h1", {}, "kvmotion"),
    h("p", { class: "muted" }, "Sign in with an API token (kvmotion token create NAME --role viewer|operator|admin)."),
    h("label", { for: "signin-token" }, "Token"), token, submit, status);
  main.replaceChildren(h("div", { class: "signin-page" }, form));
  token.focus();
});

// Every page but the sign-in page needs a session; the API enforces it, this only spares a page of 401s.
async function guardedDispatch() {
  const hash = location.hash || "#/inventory";
  if (!session.name && hash !== "#/signin") { location.hash = "#/signin"; return; }
  renderHeader();
  await dispatch();
}

window.addEventListener("hashchange", guardedDispatch);
window.addEventListener("DOMContentLoaded", async () => {
  try { await whoami(); }
  catch (e) {
    document.querySelector("main").replaceChildren(signinError(e));
    return;
  }
  guardedDispatch();
});
