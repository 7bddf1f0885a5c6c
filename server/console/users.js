// Staff: find users (GET /api/chat/users/search), and read any user's
// sessions and messages (GET /api/chat/users/:id/sessions[/:sessionId]).

import { describe, get } from "./api.js";
import { fill, h, num, route, when } from "./dom.js";
import { messageItem } from "./chat.js";

/** Users seen in searches, by id: names for the live list and the watch view. */
const known = new Map();

export function userName(id) {
  return known.get(id)?.username ?? id;
}

export function knownUser(id) {
  return known.get(id) ?? null;
}

/** Search users (and remember them); the answer of GET /api/chat/users/search. */
export async function learnUsers(q, page = 1, limit = 100) {
  const r = await get("/api/chat/users/search", { q, page, limit });
  for (const u of r.users) known.set(u.id, u);
  return r;
}

function pager(pagination, go) {
  const { page, totalPages, total } = pagination;
  return h(
    "div",
    { class: "pager" },
    h("button", { type: "button", disabled: page <= 1, onclick: () => go(page - 1) }, "Previous"),
    h("span", {}, `Page ${num(page)} of ${num(Math.max(1, totalPages))} · ${num(total)} in all`),
    h("button", { type: "button", disabled: !pagination.hasNext, onclick: () => go(page + 1) }, "Next"),
  );
}

/** #/users, #/users/<userId>, #/users/<userId>/<sessionId>. */
export function renderUsers(main, [userId, sessionId]) {
  let disposed = false;
  const section = h("section", { class: "card wide", "aria-labelledby": "users-title" });
  fill(main, section);
  if (userId && sessionId) showSession(userId, sessionId);
  else if (userId) showSessions(userId, 1);
  else showSearch();
  return () => {
    disposed = true;
  };

  function showSearch() {
    const q = h("input", { id: "user-q", type: "search", maxlength: 100, "aria-label": "Username or email" });
    const results = h("div", { id: "user-results", "aria-live": "polite" });
    const form = h(
      "form",
      { class: "row", method: "post", role: "search" },
      q,
      h("button", { type: "submit", class: "primary" }, "Search"),
    );
    fill(
      section,
      h("h1", { id: "users-title" }, "Users"),
      h("p", { class: "muted" }, "Find a user by part of their username or email, then read their chats."),
      form,
      results,
    );
    async function search(page) {
      try {
        const r = await learnUsers(q.value.trim(), page, 20);
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
              h("thead", {}, h("tr", {}, ["User", "Email", "Role", "Chats"].map((t) => h("th", { scope: "col" }, t)))),
              h(
                "tbody",
                {},
                r.users.map((u) =>
                  h(
                    "tr",
                    {},
                    h("td", {}, h("a", { href: route("users", u.id) }, u.username)),
                    h("td", {}, u.email ?? ""),
                    h("td", {}, u.role),
                    h("td", { class: "num" }, num(u.sessionCount)),
                  ),
                ),
              ),
            ),
          ),
          pager(r.pagination, search),
        );
      } catch (err) {
        if (!disposed) fill(results, h("p", { class: "error", role: "alert" }, describe(err)));
      }
    }
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      search(1);
    });
    search(1);
    q.focus();
  }

  async function showSessions(id, page) {
    if (!knownUser(id)) await learnUsers("").catch(() => {});
    if (disposed) return;
    const list = h("div", { id: "user-sessions" }, h("p", { class: "muted" }, "Loading…"));
    fill(
      section,
      h("a", { href: "#/users", class: "back-link" }, "← Users"),
      h("h1", { id: "users-title" }, `Chats of ${userName(id)}`),
      list,
    );
    try {
      const r = await get(`/api/chat/users/${encodeURIComponent(id)}/sessions`, { page, limit: 20 });
      if (disposed) return;
      if (!r.sessions.length) {
        fill(list, h("p", { class: "empty" }, "No chats."));
        return;
      }
      fill(
        list,
        h(
          "ul",
          { class: "session-list plain" },
          r.sessions.map((s) =>
            h(
              "li",
              {},
              h(
                "a",
                { href: route("users", id, s.sessionId) },
                h("span", { class: "title" }, s.title),
                h("span", { class: "when" }, `${s.source} · ${when(s.updatedAt)}`),
              ),
            ),
          ),
        ),
        pager(r.pagination, (p) => showSessions(id, p)),
      );
    } catch (err) {
      if (!disposed) fill(list, h("p", { class: "error", role: "alert" }, describe(err)));
    }
  }

  async function showSession(id, sid) {
    if (!knownUser(id)) await learnUsers("").catch(() => {});
    if (disposed) return;
    const back = h("a", { href: route("users", id), class: "back-link" }, `← Chats of ${userName(id)}`);
    try {
      const s = await get(`/api/chat/users/${encodeURIComponent(id)}/sessions/${encodeURIComponent(sid)}`);
      if (disposed) return;
      const messages = h("ol", { class: "messages", id: "user-messages", "aria-label": "Messages" });
      for (const m of s.messages) {
        messages.append(
          messageItem(
            m,
            m.cancelReason ? h("p", { class: "meta" }, `Reason given for stopping: ${m.cancelReason}`) : null,
          ),
        );
      }
      if (!s.messages.length) messages.append(h("li", { class: "empty" }, "No messages."));
      fill(
        section,
        back,
        h("h1", { id: "users-title" }, s.title),
        h(
          "p",
          { class: "muted" },
          `${userName(id)} · ${s.modelId} · ${s.source} · started ${when(s.createdAt)} · `,
          h("a", { href: route("watch", id, sid) }, "Watch live"),
        ),
        messages,
      );
    } catch (err) {
      if (!disposed) fill(section, back, h("p", { class: "error", role: "alert" }, describe(err)));
    }
  }
}
