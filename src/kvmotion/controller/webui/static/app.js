// The shell: sign-in, navigation, and the pages (each module registers its routes with api.route).
import { dispatch, whoami } from "./api.js";
import "./inventory.js";
import "./tasks.js";
import "./wizard.js";
import "./console.js";
import "./events.js";

window.addEventListener("hashchange", dispatch);
window.addEventListener("DOMContentLoaded", async () => {
  await whoami();
  dispatch();
});
