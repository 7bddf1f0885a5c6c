// The console's shell: sign-in, the header (who, balance, sign out), and a
// hash router (#/chat, #/live, #/watch, #/users, #/credits) whose views each
// render into <main> and return a cleanup function.

import { auth, describe, get, login, onExpired } from "./api.js";
import { stopAllAnswers, renderChat } from "./chat.js";
import { renderCredits } from "./credits.js";
import { credits, fill, h } from "./dom.js";
import { renderLive, renderWatch } from "./live.js";
import { renderUsers } from "./users.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const who = document.getElementById("who");

const STAFF = new Set(["supervisor", "admin"]);

const VIEWS = [
  { name: "chat", label: "Chat", roles: null, render: renderChat },
  { name: "live", label: "Live streams", roles: STAFF, render: renderLive },
  { name: "watch", label: null, roles: STAFF, render: renderWatch },
  { name: "users", label: "Users", roles: STAFF, render: renderUsers },
  { name: "credits", label: "Credits", roles: new Set(["admin"]), render: renderCredits },
];

let cleanup = null;
let balanceEl = null;

/** What views get: the signed-in user and a way to refresh the header's balance. */
const ctx = {
  user: null,
  async refreshBalance() {
    if (!balanceEl) return null;
    try {
      const b = await get("/api/credits/balance");
      fill(balanceEl, h("span", { class: "label" }, "Balance: "), credits(b.available));
      balanceEl.title = `Balance ${b.balance}, reserved ${b.reserved}, available ${b.available}`;
      return b;
    } catch (err) {
      balanceEl.textContent = "Balance: unavailable";
      balanceEl.title = describe(err);
      return null;
    }
  },
};

function teardown() {
  if (cleanup) {
    try {
      cleanup();
    } catch {
      // a view's cleanup must not block the next view
    }
    cleanup = null;
  }
}

function signOut(message) {
  teardown();
  stopAllAnswers();
  auth.clear();
  ctx.user = null;
  if (location.hash) history.replaceState(null, "", location.pathname);
  showSignIn(message);
}

function showSignIn(message = "") {
  document.body.classList.remove("signed-in", "fit");
  fill(nav);
  fill(who);
  balanceEl = null;
  const error = h("p", { class: "error", role: "alert", id: "signin-error" }, message);
  const username = h("input", {
    id: "username",
    name: "username",
    autocomplete: "username",
    required: true,
    maxlength: 100,
  });
  const password = h("input", {
    id: "password",
    name: "password",
    type: "password",
    autocomplete: "current-password",
    required: true,
    maxlength: 1000,
  });
  const submit = h("button", { type: "submit", class: "primary" }, "Sign in");
  const form = h(
    "form",
    { class: "card signin", method: "post", "aria-labelledby": "signin-title" },
    h("h1", { id: "signin-title" }, "Sign in to chinwag"),
    h("label", { for: "username" }, "Username"),
    username,
    h("label", { for: "password" }, "Password"),
    password,
    submit,
    error,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    submit.disabled = true;
    error.textContent = "";
    try {
      await login(username.value.trim(), password.value);
      password.value = "";
      start();
    } catch (err) {
      error.textContent = describe(err);
      password.select();
    } finally {
      submit.disabled = false;
    }
  });
  fill(main, form);
  username.focus();
}

function allowed(view) {
  return !view.roles || view.roles.has(ctx.user.role);
}

function renderHeader(current) {
  fill(
    nav,
    VIEWS.filter((v) => v.label && allowed(v)).map((v) =>
      h(
        "a",
        { href: `#/${v.name}`, "aria-current": v.name === current ? "page" : null },
        v.label,
      ),
    ),
  );
}

function route() {
  teardown();
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  const name = parts[0] || "chat";
  const view = VIEWS.find((v) => v.name === name) ?? VIEWS[0];
  renderHeader(view.name === "watch" ? "live" : view.name);
  document.body.classList.toggle("fit", view.name === "chat");
  main.replaceChildren();
  if (!allowed(view)) {
    fill(
      main,
      h(
        "section",
        { class: "card" },
        h("h1", {}, "Not available"),
        h("p", {}, "This view is for supervisors and admins."),
      ),
    );
    return;
  }
  try {
    cleanup = view.render(main, parts.slice(1), ctx) ?? null;
  } catch (err) {
    fill(main, h("p", { class: "error", role: "alert" }, describe(err)));
  }
}

function start() {
  const saved = auth.get();
  if (!saved) {
    showSignIn();
    return;
  }
  ctx.user = saved.user;
  document.body.classList.add("signed-in");
  balanceEl = h("span", { class: "balance", id: "balance" }, "Balance: …");
  fill(
    who,
    h(
      "span",
      { class: "user", id: "whoami" },
      saved.user.username,
      h("span", { class: "role" }, ` (${saved.user.role})`),
    ),
    balanceEl,
    h("button", { type: "button", id: "signout", onclick: () => signOut("You are signed out.") }, "Sign out"),
  );
  ctx.refreshBalance();
  route();
}

onExpired(() => signOut("Your sign-in has expired. Please sign in again."));
window.addEventListener("hashchange", () => {
  if (ctx.user) route();
});
// Nothing should escape the views' own handling; if it does, say so in words
// instead of failing silently.
let toastTimer = null;
window.addEventListener("unhandledrejection", (event) => {
  event.preventDefault();
  const note = document.getElementById("toast");
  if (!note) return;
  note.textContent = describe(event.reason);
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    note.textContent = "";
  }, 6000);
});

start();
