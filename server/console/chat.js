// Chat: the caller's sessions (list, create, rename, delete) and a chat view
// whose answers stream in as they are produced (POST …/stream read with a
// fetch reader), with the connection's state, a Stop button (it disconnects:
// the server stores what was produced and charges only that), a resume after
// a dropped connection (GET …/stream + Last-Event-ID), and the balance after
// each answer.

import { ApiError, del, describe, get, patch, post, readEvents, send, sleep } from "./api.js";
import { button, credits, fill, h, num, route, when } from "./dom.js";

const LIVE = new Set(["connecting", "streaming", "reconnecting", "stopping"]);
const RESUME_ATTEMPTS = 5;
const RECEIVING = "Receiving the answer…";

/** Answers still being written, by chat session: they outlive the view that started them. */
const answers = new Map();

export function stopAllAnswers() {
  for (const answer of answers.values()) answer.stop();
}

const ROLE_NAMES = { user: "You", assistant: "Assistant", system: "System" };
const STATUS_NOTES = {
  interrupted: "Cut short: the connection ended before the answer did.",
  cancelled: "Stopped by a supervisor.",
  error: "The model failed on this answer.",
  streaming: "Still being written…",
};

function messageMeta(m) {
  const parts = [];
  if (STATUS_NOTES[m.status]) parts.push(STATUS_NOTES[m.status]);
  if (m.role === "assistant" && m.tokensUsed) parts.push(`${num(m.tokensUsed)} tokens`);
  if (m.role === "assistant" && m.creditsCharged !== null && m.creditsCharged !== undefined) {
    parts.push(credits(m.creditsCharged));
  }
  if (m.createdAt) parts.push(when(m.createdAt));
  return parts.join(" · ");
}

/** One stored message, as text. */
export function messageItem(m, extra = null) {
  return h(
    "li",
    { class: `msg ${m.role}`, dataset: { status: m.status ?? "complete" } },
    h("p", { class: "who" }, ROLE_NAMES[m.role] ?? m.role),
    h("div", { class: "content" }, m.content ?? ""),
    h("p", { class: "meta" }, messageMeta(m)),
    extra,
  );
}

/** An answer being streamed: its elements, its state, and who is listening. */
class Answer {
  constructor(sessionId, text) {
    this.sessionId = sessionId;
    this.text = text;
    this.controller = new AbortController();
    this.streamId = null;
    this.lastId = 0;
    this.state = "connecting";
    this.note = "Connecting…";
    this.error = null;
    this.listeners = new Set();
    this.userEl = messageItem({ role: "user", content: text, status: "complete" });
    this.body = h("div", { class: "content" });
    this.meta = h("p", { class: "meta" }, "Waiting for the first words…");
    this.el = h(
      "li",
      { class: "msg assistant", dataset: { status: "streaming" }, "aria-busy": "true" },
      h("p", { class: "who" }, "Assistant"),
      this.body,
      this.meta,
    );
  }

  get live() {
    return LIVE.has(this.state);
  }

  set(state, note) {
    this.state = state;
    this.note = note;
    this.el.dataset.state = state;
    if (!this.live) this.el.removeAttribute("aria-busy");
    for (const fn of this.listeners) fn(this);
  }

  stop() {
    if (this.live && !this.controller.signal.aborted) this.controller.abort();
  }
}

function streamPath(sessionId) {
  return `/api/chat/sessions/${encodeURIComponent(sessionId)}/stream`;
}

/** Read one response's events into the answer; true once `done` arrived. */
async function consume(answer, response) {
  try {
    return await readEvents(response, ({ event, id, data }) => {
      if (id !== null) {
        if (id <= answer.lastId) return false; // already shown (a resume overlaps)
        answer.lastId = id;
      }
      if (event === "chunk") {
        if (answer.note !== RECEIVING) answer.set("streaming", RECEIVING);
        if (!answer.body.textContent) answer.meta.textContent = "";
        answer.body.append(String(data.text ?? ""));
      } else if (event === "error") {
        answer.error = data;
      } else if (event === "done") {
        answer.done = data;
        return true;
      }
      return false;
    });
  } catch {
    return false; // a network error or our own abort: the caller looks at which
  }
}

function endNote(answer) {
  const done = answer.done;
  const error = answer.error?.message;
  switch (done.finishReason) {
    case "stop":
      return ["done", "Done."];
    case "length":
      return ["done", "Done (the answer reached its length limit)."];
    case "cancelled":
      return ["cancelled", error ?? "This answer was stopped by a supervisor."];
    case "client_disconnected":
      return ["cut", "The connection dropped, so the answer was cut short."];
    case "shutdown":
      return ["cut", error ?? "The server restarted, so the answer was cut short."];
    default:
      return ["error", error ?? "The model could not finish this answer."];
  }
}

/** After a Stop: the message as the server stored it (update-stream, SPEC §5.3). */
async function stored(answer) {
  if (!answer.streamId) return null;
  for (let i = 0; i < 20; i += 1) {
    try {
      const r = await post(`/api/chat/sessions/${encodeURIComponent(answer.sessionId)}/update-stream`, {
        streamingSessionId: answer.streamId,
      });
      return r.message;
    } catch (err) {
      if (!(err instanceof ApiError) || err.code !== "STREAM_IN_PROGRESS") return null;
      await sleep(150);
    }
  }
  return null;
}

async function run(answer, ctx) {
  const { signal } = answer.controller;
  let response;
  try {
    response = await send("POST", streamPath(answer.sessionId), {
      body: { message: answer.text },
      headers: { Accept: "text/event-stream" },
      signal,
    });
  } catch (err) {
    answer.set("failed", signal.aborted ? "Stopped before the answer started." : describe(err));
    return;
  }
  answer.streamId = response.headers.get("X-Streaming-Session-Id");
  answer.set("streaming", "Connected. Waiting for the first words…");
  let ended = await consume(answer, response);
  let attempt = 0;
  while (!ended && !signal.aborted) {
    // The connection dropped before `done`: resume after the last event we have.
    attempt += 1;
    if (attempt > RESUME_ATTEMPTS || !answer.streamId) {
      answer.set("lost", "The connection was lost and could not be restored.");
      break;
    }
    answer.set("reconnecting", `The connection dropped. Reconnecting (attempt ${attempt})…`);
    try {
      await sleep(Math.min(4000, 250 * 2 ** (attempt - 1)), signal);
      response = await send("GET", streamPath(answer.sessionId), {
        query: { streamingSessionId: answer.streamId },
        headers: { Accept: "text/event-stream", "Last-Event-ID": String(answer.lastId) },
        signal,
      });
    } catch (err) {
      if (signal.aborted) break;
      if (err instanceof ApiError && err.code === "STREAM_NOT_FOUND") {
        answer.set("lost", "The connection dropped and this answer can no longer be resumed.");
        break;
      }
      if (err instanceof ApiError && err.code !== "STREAM_ALREADY_ACTIVE" && err.status < 500) {
        answer.set("lost", describe(err));
        break;
      }
      continue;
    }
    answer.set("streaming", "Reconnected. Receiving the answer…");
    ended = await consume(answer, response);
  }
  let state;
  let note;
  let meta = null;
  if (ended) {
    [state, note] = endNote(answer);
    meta = answer.done;
  } else if (signal.aborted) {
    answer.set("stopping", "Stopping…");
    meta = await stored(answer);
    [state, note] = ["stopped", "Stopped. The answer so far is kept."];
  } else {
    [state, note] = [answer.state, answer.note];
  }
  if (meta) {
    const parts = [];
    if (meta.tokensUsed) parts.push(`${num(meta.tokensUsed)} tokens`);
    if (meta.creditsCharged !== undefined) parts.push(credits(meta.creditsCharged));
    answer.meta.textContent = parts.join(" · ");
  } else if (!answer.body.textContent) {
    answer.meta.textContent = "";
  }
  const balance = await ctx.refreshBalance();
  if (balance) note += ` Balance: ${credits(balance.available)}.`;
  answer.set(state, note);
}

/** The chat view: #/chat and #/chat/<sessionId>. */
export function renderChat(main, [sessionId], ctx) {
  let disposed = false;
  let unsubscribe = () => {};
  let page = 1;

  const list = h("ul", { class: "session-list", id: "sessions" });
  const more = h("button", { type: "button", class: "link", hidden: true }, "Show older chats");
  const listError = h("p", { class: "error", role: "alert" });
  const aside = h(
    "aside",
    { class: "sessions", "aria-label": "Your chats" },
    h(
      "div",
      { class: "row spread" },
      h("h2", {}, "Chats"),
      button("New chat", newChat, { class: "primary", id: "new-chat" }),
    ),
    listError,
    list,
    more,
  );
  const conversation = h("section", { class: "conversation", "aria-labelledby": "chat-title" });
  fill(main, h("div", { class: `chat${sessionId ? " has-session" : ""}` }, aside, conversation));

  more.addEventListener("click", () => loadSessions(page + 1));

  async function loadSessions(p = 1) {
    try {
      const r = await get("/api/chat/sessions", { page: p, limit: 50 });
      if (disposed) return;
      page = p;
      if (p === 1) list.replaceChildren();
      listError.textContent = "";
      for (const s of r.sessions) list.append(sessionItem(s));
      if (!r.sessions.length && p === 1) {
        list.append(h("li", { class: "empty" }, "No chats yet."));
      }
      more.hidden = !r.pagination.hasNext;
    } catch (err) {
      if (!disposed) listError.textContent = describe(err);
    }
  }

  function sessionItem(s) {
    return h(
      "li",
      { dataset: { id: s.sessionId } },
      h(
        "a",
        { href: route("chat", s.sessionId), "aria-current": s.sessionId === sessionId ? "page" : null },
        h("span", { class: "title" }, s.title),
        h("span", { class: "when" }, when(s.updatedAt)),
      ),
    );
  }

  function updateListTitle(id, title) {
    const item = list.querySelector(`li[data-id="${CSS.escape(id)}"] .title`);
    if (item) item.textContent = title;
  }

  async function newChat() {
    try {
      const s = await post("/api/chat/sessions", { source: "web" });
      location.hash = route("chat", s.sessionId);
    } catch (err) {
      listError.textContent = describe(err);
    }
  }

  loadSessions();
  if (!sessionId) {
    fill(
      conversation,
      h(
        "div",
        { class: "placeholder" },
        h("h1", { id: "chat-title" }, "Pick a chat, or start a new one"),
        h("p", {}, "Answers stream in as the model writes them. You can stop one at any time."),
      ),
    );
  } else {
    openSession(sessionId);
  }

  async function openSession(id) {
    fill(conversation, h("p", { class: "muted" }, "Loading…"));
    let session;
    try {
      session = await get(`/api/chat/sessions/${encodeURIComponent(id)}`);
    } catch (err) {
      if (disposed) return;
      fill(
        conversation,
        h("h1", { id: "chat-title" }, "Chat not available"),
        h("p", { class: "error", role: "alert" }, describe(err)),
        h("a", { href: "#/chat" }, "Back to your chats"),
      );
      return;
    }
    if (disposed) return;
    let title = session.title;
    const titleEl = h("h1", { id: "chat-title", tabindex: "-1" }, title);
    const headError = h("p", { class: "error", role: "alert" });
    const headActions = h("div", { class: "actions" });
    const head = h(
      "div",
      { class: "conv-head" },
      h("a", { href: "#/chat", class: "back" }, "← Chats"),
      titleEl,
      headActions,
    );

    const messages = h("ol", { class: "messages", id: "messages", "aria-label": "Messages" });
    const live = answers.get(id);
    let shown = session.messages.filter((m) => m.status !== "streaming");
    if (live) {
      const last = shown.at(-1);
      if (last && last.role === "user" && last.content === live.text) shown = shown.slice(0, -1);
    }
    for (const m of shown) messages.append(messageItem(m));
    if (live) messages.append(live.userEl, live.el);
    if (!messages.children.length) {
      messages.append(h("li", { class: "empty" }, "No messages yet. Say something below."));
    }

    const status = h("p", { class: "status", id: "chat-status", role: "status" });
    const textarea = h("textarea", {
      id: "message",
      name: "message",
      rows: 3,
      maxlength: 4000,
      required: true,
      placeholder: "Write a message…",
      "aria-describedby": "composer-hint",
    });
    const sendButton = h("button", { type: "submit", class: "primary", id: "send" }, "Send");
    const stopButton = h("button", { type: "button", id: "stop", disabled: true }, "Stop");
    const composer = h(
      "form",
      { class: "composer", id: "composer", method: "post" },
      h("label", { for: "message", class: "visually-hidden" }, "Message"),
      textarea,
      h("div", { class: "composer-actions" }, sendButton, stopButton),
      h("p", { class: "hint", id: "composer-hint" }, "Enter sends · Shift+Enter for a new line"),
    );

    fill(conversation, head, headError, messages, status, composer);
    showActions();
    messages.scrollTop = messages.scrollHeight;

    function showStatus(answer) {
      status.dataset.state = answer ? answer.state : "idle";
      status.textContent = answer ? answer.note : "Ready.";
      const busy = Boolean(answer && answer.live);
      sendButton.disabled = busy;
      stopButton.disabled = !busy;
      if (answer && answer.live) keepScrolled();
    }

    function keepScrolled() {
      const nearBottom = messages.scrollHeight - messages.scrollTop - messages.clientHeight < 120;
      if (nearBottom) messages.scrollTop = messages.scrollHeight;
    }

    function watch(answer) {
      unsubscribe();
      const listener = (a) => {
        if (!disposed) showStatus(a);
      };
      answer.listeners.add(listener);
      unsubscribe = () => answer.listeners.delete(listener);
      showStatus(answer);
    }

    if (live) watch(live);
    else showStatus(null);

    stopButton.addEventListener("click", () => answers.get(id)?.stop());
    textarea.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        composer.requestSubmit();
      }
    });
    composer.addEventListener("submit", (event) => {
      event.preventDefault();
      const text = textarea.value;
      if (!text.trim() || answers.get(id)?.live) return;
      const answer = new Answer(id, text);
      answers.set(id, answer);
      messages.querySelector(".empty")?.remove();
      messages.append(answer.userEl, answer.el);
      messages.scrollTop = messages.scrollHeight;
      textarea.value = "";
      watch(answer);
      if (title === "New chat" && !shown.length) {
        rename(text.trim().replace(/\s+/g, " ").slice(0, 50)).catch(() => {});
      }
      run(answer, ctx).finally(() => {
        answers.delete(id);
        if (answer.state === "failed") {
          // Nothing was streamed: say why, and give the text back to edit or resend.
          answer.el.remove();
          answer.userEl.querySelector(".meta").textContent = "Not sent.";
          if (!textarea.value) textarea.value = text;
        }
        if (!disposed) loadSessions();
      });
    });
    if (!live) textarea.focus();

    async function rename(newTitle) {
      const s = await patch(`/api/chat/sessions/${encodeURIComponent(id)}`, { title: newTitle });
      title = s.title;
      if (!disposed) {
        titleEl.textContent = title;
        updateListTitle(id, title);
      }
      return s;
    }

    function showActions() {
      fill(
        headActions,
        button("Rename", startRename, { id: "rename" }),
        button("Delete", confirmDelete, { id: "delete", class: "danger" }),
      );
    }

    function startRename() {
      const input = h("input", {
        id: "rename-title",
        value: title,
        maxlength: 200,
        required: true,
        "aria-label": "New title",
      });
      const form = h(
        "form",
        { class: "rename", method: "post" },
        input,
        h("button", { type: "submit", class: "primary" }, "Save"),
        h("button", { type: "button", onclick: cancel }, "Cancel"),
      );
      function cancel() {
        form.replaceWith(titleEl);
        showActions();
        titleEl.focus();
      }
      input.addEventListener("keydown", (event) => {
        if (event.key === "Escape") cancel();
      });
      form.addEventListener("submit", async (event) => {
        event.preventDefault();
        headError.textContent = "";
        if (!input.value.trim()) {
          headError.textContent = "A title needs at least one character.";
          return;
        }
        try {
          await rename(input.value);
          cancel();
        } catch (err) {
          headError.textContent = describe(err);
        }
      });
      titleEl.replaceWith(form);
      headActions.replaceChildren();
      input.select();
    }

    function confirmDelete() {
      fill(
        headActions,
        h("span", { class: "confirm" }, "Delete this chat and its messages?"),
        button(
          "Delete chat",
          async () => {
            try {
              answers.get(id)?.stop();
              await del(`/api/chat/sessions/${encodeURIComponent(id)}`);
              location.hash = "#/chat";
            } catch (err) {
              headError.textContent = describe(err);
            }
          },
          { class: "danger", id: "confirm-delete" },
        ),
        button("Cancel", showActions),
      );
      headActions.querySelector("#confirm-delete").focus();
    }
  }

  return () => {
    disposed = true;
    unsubscribe();
  };
}
