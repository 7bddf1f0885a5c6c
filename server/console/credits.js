// Admin: users and their balances, allocating credits (one idempotency key
// per form submission, so a double click or a retry allocates once), adding
// users (POST /api/users), and usage over time as a chart.

import { ApiError, describe, get, post } from "./api.js";
import { usageChart } from "./chart.js";
import { credits, fill, h, num, route, uuid, when } from "./dom.js";
import { learnUsers, userName } from "./users.js";

const PAGE = 10;

/** #/credits and #/credits/<userId>. */
export function renderCredits(main, [userId], ctx) {
  let disposed = false;
  const selected = h("section", { class: "card wide", id: "credit-user", "aria-labelledby": "credit-user-title" });
  const users = h("section", { class: "card", "aria-labelledby": "balances-title" });
  const create = h("section", { class: "card", "aria-labelledby": "create-title" });
  fill(main, h("div", { class: "stack" }, userId ? selected : null, h("div", { class: "columns" }, users, create)));

  const q = h("input", { id: "balance-q", type: "search", maxlength: 100, "aria-label": "Find a user" });
  const results = h("div", { id: "balances", "aria-live": "polite" });
  const searchForm = h(
    "form",
    { class: "row", method: "post", role: "search" },
    q,
    h("button", { type: "submit" }, "Find"),
  );
  let page = 1;
  searchForm.addEventListener("submit", (event) => {
    event.preventDefault();
    loadUsers(1);
  });
  fill(users, h("h2", { id: "balances-title" }, "Users and balances"), searchForm, results);

  async function loadUsers(p) {
    try {
      const r = await learnUsers(q.value.trim(), p, PAGE);
      if (disposed) return;
      page = p;
      const balances = await Promise.all(
        r.users.map((u) => get("/api/credits/balance", { userId: u.id }).catch(() => null)),
      );
      if (disposed) return;
      if (!r.users.length) {
        fill(results, h("p", { class: "empty" }, "No user matches."));
        return;
      }
      fill(
        results,
        h(
          "div",
          { class: "table-wrap" },
          h(
            "table",
            { class: "grid" },
            h(
              "thead",
              {},
              h("tr", {}, ["User", "Role", "Balance", "Available"].map((t) => h("th", { scope: "col" }, t))),
            ),
            h(
              "tbody",
              {},
              r.users.map((u, i) =>
                h(
                  "tr",
                  { dataset: { user: u.id }, "aria-current": u.id === userId ? "true" : null },
                  h("td", {}, h("a", { href: route("credits", u.id) }, u.username)),
                  h("td", {}, u.role),
                  h("td", { class: "num balance" }, balances[i] ? num(balances[i].balance) : "–"),
                  h("td", { class: "num available" }, balances[i] ? num(balances[i].available) : "–"),
                ),
              ),
            ),
          ),
        ),
        h(
          "div",
          { class: "pager" },
          h("button", { type: "button", disabled: p <= 1, onclick: () => loadUsers(p - 1) }, "Previous"),
          h("span", {}, `Page ${num(p)} of ${num(Math.max(1, r.pagination.totalPages))}`),
          h("button", { type: "button", disabled: !r.pagination.hasNext, onclick: () => loadUsers(p + 1) }, "Next"),
        ),
      );
    } catch (err) {
      if (!disposed) fill(results, h("p", { class: "error", role: "alert" }, describe(err)));
    }
  }

  renderCreate();
  loadUsers(1);
  if (userId) renderSelected();
  return () => {
    disposed = true;
  };

  function renderCreate() {
    const username = h("input", { id: "new-username", required: true, maxlength: 64, pattern: "[A-Za-z0-9._\\-]{1,64}", autocomplete: "off" });
    const password = h("input", { id: "new-password", type: "password", required: true, minlength: 8, autocomplete: "new-password" });
    const role = h(
      "select",
      { id: "new-role" },
      ["enduser", "supervisor", "admin"].map((r) => h("option", { value: r }, r)),
    );
    const email = h("input", { id: "new-email", type: "email", maxlength: 254, autocomplete: "off" });
    const note = h("p", { class: "note", role: "status", id: "create-note" });
    const submit = h("button", { type: "submit", class: "primary", id: "create-user" }, "Add user");
    const form = h(
      "form",
      { class: "fields", method: "post" },
      h("label", { for: "new-username" }, "Username"),
      username,
      h("label", { for: "new-password" }, "Password (8 characters or more)"),
      password,
      h("label", { for: "new-role" }, "Role"),
      role,
      h("label", { for: "new-email" }, "Email (optional)"),
      email,
      submit,
      note,
    );
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      if (submit.disabled) return;
      submit.disabled = true;
      note.dataset.kind = "";
      note.textContent = "Adding…";
      try {
        const u = await post("/api/users", {
          username: username.value.trim(),
          password: password.value,
          role: role.value,
          email: email.value.trim() || null,
        });
        note.dataset.kind = "ok";
        note.textContent = `Added ${u.username} (${u.role}).`;
        form.reset();
        loadUsers(page);
      } catch (err) {
        note.dataset.kind = "error";
        note.textContent = describe(err);
      } finally {
        submit.disabled = false;
      }
    });
    fill(create, h("h2", { id: "create-title" }, "Add a user"), form);
  }

  function renderSelected() {
    const title = h("h1", { id: "credit-user-title" }, `Credits of ${userName(userId)}`);
    const stats = h("dl", { class: "stats", id: "credit-stats" });
    const chart = h("div", { id: "usage" }, h("p", { class: "muted" }, "Loading usage…"));
    const entries = h("div", { id: "entries" });
    const amount = h("input", { id: "amount", type: "number", min: 1, step: 1, required: true, inputmode: "numeric" });
    const reason = h("input", { id: "alloc-reason", maxlength: 500 });
    const submit = h("button", { type: "submit", class: "primary", id: "allocate" }, "Allocate");
    const note = h("p", { class: "note", role: "status", id: "allocate-note" });
    const form = h(
      "form",
      { class: "row allocate", method: "post", "aria-label": "Allocate credits" },
      h("label", { for: "amount" }, "Credits"),
      amount,
      h("label", { for: "alloc-reason" }, "Reason"),
      reason,
      submit,
    );
    fill(
      selected,
      h("a", { href: "#/credits", class: "back-link" }, "← All users"),
      title,
      stats,
      form,
      note,
      h("h2", {}, "Usage over time"),
      chart,
      entries,
    );

    // One key per submission: a second click, or a retry after a lost answer,
    // sends the same key for the same amount, and the server allocates once.
    let pending = null;
    amount.addEventListener("input", () => {
      submit.disabled = false;
    });
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      if (submit.disabled) return;
      const value = Number(amount.value);
      if (!Number.isInteger(value) || value < 1) {
        note.dataset.kind = "error";
        note.textContent = "Enter a whole number of credits, 1 or more.";
        return;
      }
      const what = JSON.stringify([userId, value, reason.value.trim()]);
      if (!pending || pending.what !== what) pending = { what, key: uuid() };
      submit.disabled = true;
      note.dataset.kind = "";
      note.textContent = "Allocating…";
      let done = false;
      try {
        const r = await post("/api/credits/allocate", {
          userId,
          credits: value,
          reason: reason.value.trim() || null,
          idempotencyKey: pending.key,
        });
        done = true;
        pending = null;
        form.reset();
        note.dataset.kind = "ok";
        note.textContent = `Allocated ${credits(value)}. Balance now ${credits(r.balance)}.`;
        if (userId === ctx.user.id) ctx.refreshBalance();
        await refresh();
        loadUsers(page);
      } catch (err) {
        // A refusal is final (a new submission gets a new key); a lost answer keeps it.
        if (err instanceof ApiError && err.status < 500 && err.status !== 429) pending = null;
        note.dataset.kind = "error";
        note.textContent = describe(err);
      } finally {
        // After a success the button waits for a new amount: a double click allocates once.
        submit.disabled = done;
      }
    });

    async function refresh() {
      try {
        const [b, usage] = await Promise.all([
          get("/api/credits/balance", { userId }),
          get("/api/credits/usage", { userId, limit: 100 }),
        ]);
        if (disposed) return;
        title.textContent = `Credits of ${userName(userId)}`;
        fill(
          stats,
          h("div", {}, h("dt", {}, "Balance"), h("dd", { id: "stat-balance" }, num(b.balance))),
          h("div", {}, h("dt", {}, "Reserved"), h("dd", { id: "stat-reserved" }, num(b.reserved))),
          h("div", {}, h("dt", {}, "Available"), h("dd", { id: "stat-available" }, num(b.available))),
        );
        fill(chart, usageChart(usage.entries, b.balance, usage.pagination.total));
        const latest = usage.entries.slice(0, 10);
        fill(
          entries,
          latest.length
            ? h(
                "div",
                { class: "table-wrap" },
                h(
                  "table",
                  { class: "grid", id: "entries-table" },
                  h("caption", {}, "Latest entries"),
                  h("thead", {}, h("tr", {}, ["When", "Kind", "Credits", "Model", "Reason"].map((t) => h("th", { scope: "col" }, t)))),
                  h(
                    "tbody",
                    {},
                    latest.map((e) =>
                      h(
                        "tr",
                        {},
                        h("td", {}, when(e.createdAt)),
                        h("td", {}, e.kind),
                        h("td", { class: "num" }, `${e.amount > 0 ? "+" : ""}${num(e.amount)}`),
                        h("td", {}, e.modelId ?? ""),
                        h("td", {}, e.reason ?? ""),
                      ),
                    ),
                  ),
                ),
              )
            : null,
        );
      } catch (err) {
        if (!disposed) fill(chart, h("p", { class: "error", role: "alert" }, describe(err)));
      }
    }

    (async () => {
      if (userName(userId) === userId) await learnUsers("").catch(() => {});
      await refresh();
    })();
  }
}
