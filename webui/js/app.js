// The shell: sign-in, navigation (only the pages the signed-in role may use), client-side routing under /ui/, and
// the end of a session. Each page is one module in ./pages/ exporting `render(container, ctx)`.
import { ApiError, api, append, can, clear, field, h, session, toast } from "./lib.js";

export const PAGES = [
  { path: "dashboard", title: "Dashboard", perms: ["metrics:read"] },
  { path: "playground", title: "Playground", perms: ["chat:use"] },
  { path: "models", title: "Models", perms: ["models:read"] },
  { path: "collections", title: "Collections", perms: ["rag:read"] },
  { path: "users", title: "Users", perms: ["users:manage"] },
  { path: "keys", title: "API keys", perms: ["keys:manage", "keys:own"] },
  { path: "usage", title: "Usage", perms: ["usage:read"] },
  { path: "policies", title: "Policies", perms: ["policies:manage", "privacy:read"] },
  { path: "privacy", title: "Privacy", perms: ["privacy:read"] },
  { path: "audit", title: "Audit", perms: ["audit:read"] },
  { path: "settings", title: "Settings", perms: ["settings:read"] },
];

const root = document.getElementById("app");
let current = null; // {controller}

const allowed = () => PAGES.filter((p) => p.perms.some(can));

function logo() {
  const svg = h("svg:svg", { viewBox: "0 0 24 24", class: "brand-mark", "aria-hidden": "true", focusable: "false" },
    h("svg:rect", { x: "2", y: "4", width: "20", height: "16", rx: "3", fill: "none", stroke: "currentColor",
      "stroke-width": "2" }),
    h("svg:path", { d: "M7 10h10M7 14h6", stroke: "currentColor", "stroke-width": "2", "stroke-linecap": "round" }));
  return svg;
}

// Why single sign-on sent the browser back here (`?signin_error=<code>` from /api/auth/oidc/callback); the audit log
// has the details.
const SSO_ERRORS = {
  oidc_state_mismatch: "The sign-in could not be completed: it was not started in this browser, or its answer was "
    + "changed on the way. Try again.",
  oidc_expired: "The sign-in took too long. Try again.",
  oidc_denied: "The identity provider ended the sign-in without signing you in.",
  oidc_invalid_token: "The identity provider's answer could not be verified. Try again, and tell an admin if it "
    + "happens again.",
  oidc_token_refused: "The identity provider refused this appliance's request. An admin should check the single "
    + "sign-on settings.",
  oidc_unavailable: "The identity provider did not answer. Try again later.",
  oidc_no_role: "Your account has no access to this appliance. Ask an admin for access.",
  oidc_name_taken: "A local user with your name already exists on this appliance. Ask an admin to sort it out.",
  oidc_no_username: "The identity provider sent no user name. Ask an admin.",
  user_disabled: "Your user is disabled on this appliance. Ask an admin.",
};

// What this appliance offers: {password: bool, sso: {name, url} | null}; password alone if the answer fails.
async function signInMethods() {
  try {
    return await api("/api/auth/methods");
  } catch {
    return { password: true, sso: null };
  }
}

// A message for the sign-in page from the address (an SSO refusal, or back from signing out at the provider), and
// the address cleaned of it.
function messageFromAddress() {
  const params = new URLSearchParams(location.search);
  const code = params.get("signin_error");
  let message = null;
  if (code) message = { text: SSO_ERRORS[code] || "Single sign-on failed. Try again.", kind: "bad" };
  else if (params.has("state")) message = { text: "You signed out.", kind: "info" };
  if (message) history.replaceState(null, "", "/ui/");
  return message;
}

async function signInView(message, kind = "info") {
  session.me = null;
  session.csrf = null;
  document.title = "Sign in · Appliance";
  const methods = await signInMethods();
  const status = h("div", { role: "alert", class: message ? `alert ${kind}` : "hidden" }, message || "");
  const parts = [status];
  let first = null;
  if (methods.sso) {
    const sso = h("button", { type: "button", class: "sso" }, `Sign in with ${methods.sso.name}`);
    sso.addEventListener("click", () => {
      sso.disabled = true;
      sso.textContent = `Opening ${methods.sso.name}…`;
      location.assign(methods.sso.url);
    });
    parts.push(sso);
    first = sso;
  }
  if (methods.password) {
    if (methods.sso) parts.push(h("p", { class: "divider" }, h("span", {}, "or with a local account")));
    parts.push(passwordForm(status));
    first = first || parts[parts.length - 1].querySelector("input");
  } else {
    parts.push(h("p", { class: "muted small-print" }, "Password sign-in is turned off on this appliance."));
  }
  clear(root, h("main", { class: "signin", id: "main" },
    h("div", { class: "panel" }, h("h1", {}, logo(), "Appliance"),
      h("p", { class: "muted" }, "Sign in to manage this appliance and chat with its models."), parts)));
  first?.focus();
}

function passwordForm(status) {
  const name = h("input", { type: "text", name: "username", autocomplete: "username", required: true,
    autocapitalize: "none", spellcheck: "false" });
  const password = h("input", { type: "password", name: "password", autocomplete: "current-password", required: true });
  const submit = h("button", { type: "submit" }, "Sign in");
  const form = h("form", { novalidate: true }, field("Username", name), field("Password", password), submit);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    status.className = "hidden";
    if (!name.value.trim() || !password.value) {
      status.className = "alert bad";
      status.textContent = "Enter your user name and password.";
      (name.value.trim() ? password : name).focus();
      return;
    }
    submit.disabled = true;
    try {
      const reply = await api("/api/auth/login", { method: "POST",
        body: { username: name.value.trim(), password: password.value } });
      session.csrf = reply.csrf_token;
      password.value = "";
      await start();
    } catch (err) {
      status.className = "alert bad";
      status.textContent = err.message;
      password.value = "";
      password.focus();
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}

function shell() {
  const pages = allowed();
  const nav = h("nav", { class: "sidenav", id: "sidenav", "aria-label": "Main" },
    h("ul", {}, pages.map((p) => h("li", {}, h("a", { href: `/ui/${p.path}`, "data-page": p.path }, p.title)))));
  const menu = h("button", { class: "secondary menu-button small", "aria-expanded": "false", "aria-controls": "sidenav" },
    "Menu");
  menu.addEventListener("click", () => {
    const open = nav.classList.toggle("open");
    menu.setAttribute("aria-expanded", String(open));
  });
  nav.addEventListener("click", (event) => {
    const link = event.target.closest("a[data-page]");
    if (!link || event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;
    event.preventDefault();
    nav.classList.remove("open");
    menu.setAttribute("aria-expanded", "false");
    navigate(link.getAttribute("href"));
  });
  const signOut = h("button", { class: "secondary small" }, "Sign out");
  signOut.addEventListener("click", async () => {
    let reply = null;
    try { reply = await api("/api/auth/logout", { method: "POST" }); } catch { /* ended already */ }
    if (reply?.end_session_url) {
      // the session began at the identity provider: sign out there too; it sends the browser back to /ui/
      location.assign(reply.end_session_url);
      return;
    }
    history.replaceState(null, "", "/ui/");
    signInView("You signed out.");
  });
  const main = h("main", { id: "main", tabindex: "-1" });
  clear(root,
    h("a", { class: "skip-link", href: "#main" }, "Skip to content"),
    h("header", { class: "topbar" }, menu, h("a", { class: "brand", href: "/ui/" }, logo(), "Appliance"),
      h("span", { class: "spacer" }),
      h("span", { class: "whoami" }, `${session.me.name} · ${session.me.role}`), signOut),
    h("div", { class: "layout" }, nav, main));
  return { nav, main };
}

let layout = null;

export function navigate(url, replace = false) {
  if (replace) history.replaceState(null, "", url);
  else history.pushState(null, "", url);
  route(!replace);
}

// `focus`: after a navigation the new page's heading takes the focus, so a screen reader announces it; on the first
// load the focus stays at the top of the document, where the skip link is.
async function route(focus = true) {
  const pages = allowed();
  if (!pages.length) {
    clear(layout.main, h("h1", {}, "Nothing to show"),
      h("p", {}, "Your role grants no page of this console. Ask an admin for a role that does."));
    return;
  }
  const name = location.pathname.replace(/^\/ui\/?/, "").split("/")[0];
  let page = pages.find((p) => p.path === name);
  if (!page) {
    const known = PAGES.find((p) => p.path === name);
    page = pages[0];
    history.replaceState(null, "", `/ui/${page.path}`);
    if (known) {
      // a page the role lacks: not shown, and said so
      toast(`Your role cannot open ${known.title}.`, "bad");
    }
  }
  for (const link of layout.nav.querySelectorAll("a[data-page]")) {
    if (link.dataset.page === page.path) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (current) current.controller.abort();
  const controller = new AbortController();
  current = { controller };
  document.title = `${page.title} · Appliance`;
  const heading = h("h1", { tabindex: "-1" }, page.title);
  const body = h("div", { class: "page" }, h("p", { class: "muted loading" }, "Loading…"));
  clear(layout.main, heading, body);
  layout.main.setAttribute("aria-busy", "true"); // until the page has its data (assistive tech waits; so do tests)
  if (focus) heading.focus();
  try {
    const module = await import(`./pages/${page.path}.js`);
    if (controller.signal.aborted) return;
    await module.render(body, { signal: controller.signal, params: new URLSearchParams(location.search), navigate });
  } catch (err) {
    if (err.name === "AbortError" || controller.signal.aborted) return;
    body.querySelector(".loading")?.remove();
    append(body, h("div", { class: "alert bad", role: "alert" },
      err instanceof ApiError ? err.message : `This page failed to load: ${err.message}`));
  }
  if (!controller.signal.aborted) layout.main.setAttribute("aria-busy", "false");
}

async function start() {
  try {
    session.me = await api("/api/me");
    session.csrf = session.me.csrf_token || session.csrf;
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      const message = messageFromAddress();
      signInView(message?.text || "", message?.kind);
      return;
    }
    clear(root, h("main", { class: "signin", id: "main" }, h("h1", {}, "Appliance"),
      h("div", { class: "alert bad", role: "alert" }, err.message)));
    return;
  }
  layout = shell();
  route(false);
}

document.addEventListener("session-ended", () => {
  if (!session.me) return;
  if (current) current.controller.abort();
  signInView("Your session has ended. Sign in again to continue.");
});
window.addEventListener("popstate", () => { if (layout && session.me) route(); });

start();
