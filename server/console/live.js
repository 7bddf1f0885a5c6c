// Supervision: the live streams (GET /api/chat/streams/active, polled every
// 2 s while the view is open and the tab visible) and the watch view, which
// joins one late (GET …/observe read with a fetch reader: the history at
// once, then live) and can stop it (POST /api/chat/streams/:id/cancel).

import { ApiError, describe, get, post, readEvents, send } from "./api.js";
import { ago, button, credits, fill, h, num, route } from "./dom.js";
import { messageItem } from "./chat.js";
import { userName, learnUsers } from "./users.js";

const POLL_MS = 2000;

/** Session titles seen by the live list, by session id: {title, at}; looked up again after 30 s. */
const titles = new Map();
const TITLE_TTL_MS = 30_000;

async function loadTitle(userId, sessionId) {
  let title = "(title unavailable)";
  try {
    const s = await get(
      `/api/chat/users/${encodeURIComponent(userId)}/sessions/${encodeURIComponent(sessionId)}`,
    );
    title = s.title;
  } catch {
    // keep the placeholder; tried again after the TTL
  }
  titles.set(sessionId, { title, at: Date.now() });
}

function staleTitle(sessionId) {
  const known = titles.get(sessionId);
  return !known || Date.now() - known.at > TITLE_TTL_MS;
}

export function renderLive(main) {
  let disposed = false;
  let timer = null;
  let lastNames = 0;
  const rows = new Map();

  const tbody = h("tbody");
  const table = h(
    "table",
    { class: "grid", id: "live-streams" },
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        ["User", "Chat", "Model", "Started", "Watching", ""].map((t) => h("th", { scope: "col" }, t)),
      ),
    ),
    tbody,
  );
  const empty = h("p", { class: "empty", id: "live-empty" }, "No answers are being written right now.");
  const updated = h("p", { class: "muted", id: "live-updated", role: "status" }, "Loading…");
  const error = h("p", { class: "error", role: "alert" });
  fill(
    main,
    h(
      "section",
      { class: "card wide", "aria-labelledby": "live-title" },
      h("h1", { id: "live-title" }, "Live streams"),
      h("p", { class: "muted" }, "Answers being written right now. The list updates by itself."),
      error,
      h("div", { class: "table-wrap" }, table),
      empty,
      updated,
    ),
  );

  function row(stream) {
    const cells = {
      user: h("td", { class: "user" }),
      title: h("td", { class: "title" }),
      model: h("td", {}, stream.modelId),
      started: h("td", {}),
      observers: h("td", { class: "num" }),
    };
    const tr = h(
      "tr",
      { dataset: { stream: stream.streamingSessionId } },
      cells.user,
      cells.title,
      cells.model,
      cells.started,
      cells.observers,
      h(
        "td",
        {},
        h("a", { class: "button", href: route("watch", stream.userId, stream.sessionId) }, "Watch"),
      ),
    );
    return { tr, cells };
  }

  function show(streams) {
    const seen = new Set();
    for (const stream of streams) {
      seen.add(stream.streamingSessionId);
      let r = rows.get(stream.streamingSessionId);
      if (!r) {
        r = row(stream);
        rows.set(stream.streamingSessionId, r);
        tbody.append(r.tr);
      }
      r.cells.user.textContent = userName(stream.userId);
      r.cells.title.textContent = titles.get(stream.sessionId)?.title ?? "…";
      r.cells.started.textContent = ago(stream.startedAt);
      r.cells.observers.textContent = num(stream.observers);
    }
    for (const [id, r] of rows) {
      if (!seen.has(id)) {
        r.tr.remove();
        rows.delete(id);
      }
    }
    table.hidden = rows.size === 0;
    empty.hidden = rows.size > 0;
  }

  async function poll() {
    let wait = POLL_MS;
    if (!document.hidden) {
      try {
        const { streams } = await get("/api/chat/streams/active");
        if (disposed) return;
        const unknown = streams.some((s) => userName(s.userId) === s.userId);
        if (unknown && Date.now() - lastNames > 10_000) {
          lastNames = Date.now();
          await learnUsers("");
        }
        // At most three title look-ups per round: the list itself stays cheap.
        const missing = streams.filter((s) => staleTitle(s.sessionId)).slice(0, 3);
        await Promise.all(missing.map((s) => loadTitle(s.userId, s.sessionId)));
        if (disposed) return;
        show(streams);
        error.textContent = "";
        updated.textContent = `Updated at ${new Date().toLocaleTimeString()} · refreshes every 2 seconds.`;
      } catch (err) {
        if (disposed) return;
        error.textContent = describe(err);
        if (err instanceof ApiError && err.retryAfter) wait = err.retryAfter * 1000;
      }
    }
    if (!disposed) timer = setTimeout(poll, wait);
  }

  poll();
  return () => {
    disposed = true;
    clearTimeout(timer);
  };
}

function finishWords(done, error) {
  switch (done.finishReason) {
    case "stop":
    case "length":
      return "The answer is complete.";
    case "cancelled":
      return error?.message ?? "This answer was stopped by a supervisor.";
    case "client_disconnected":
      return "The user's connection dropped, so the answer was cut short.";
    case "shutdown":
      return "The server restarted, so the answer was cut short.";
    default:
      return error?.message ? `The answer failed: ${error.message}` : "The answer failed.";
  }
}

/** #/watch/<userId>/<sessionId>: one session's live stream, joined late. */
export function renderWatch(main, [userId, sessionId]) {
  let disposed = false;
  let controller = null;
  let streamId = null;
  let streaming = false;

  const titleEl = h("h1", { id: "watch-title" }, "Watching a chat");
  const who = h("p", { class: "muted", id: "watch-user" });
  const status = h("p", { class: "status", id: "watch-status", role: "status" }, "Connecting…");
  const counts = h("p", { class: "muted", id: "watch-counts" });
  const earlier = h("ol", { class: "messages", id: "watch-messages", "aria-label": "Messages" });
  const history = h("span", { class: "from-history" });
  const liveText = h("span", { class: "from-live" });
  const answerMeta = h("p", { class: "meta" });
  const answer = h(
    "li",
    { class: "msg assistant", id: "watch-answer", hidden: true },
    h("p", { class: "who" }, "Assistant"),
    h("div", { class: "content" }, history, liveText),
    answerMeta,
  );
  earlier.append(answer);
  const reason = h("input", {
    id: "stop-reason",
    maxlength: 200,
    placeholder: "Why? (optional, kept with the message)",
    "aria-label": "Reason for stopping",
  });
  const stopButton = h("button", { type: "submit", class: "danger", id: "stop-stream", disabled: true }, "Stop this answer");
  const stopForm = h("form", { class: "stop-form", method: "post" }, reason, stopButton);
  const stopNote = h("p", { class: "muted", role: "status", id: "stop-note" });
  const again = h("div", { class: "actions" });

  fill(
    main,
    h(
      "section",
      { class: "card wide watch", "aria-labelledby": "watch-title" },
      h("a", { href: "#/live", class: "back-link" }, "← Live streams"),
      titleEl,
      who,
      status,
      counts,
      earlier,
      stopForm,
      stopNote,
      again,
    ),
  );

  function setStatus(state, text) {
    status.dataset.state = state;
    status.textContent = text;
  }

  stopForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!streamId || stopButton.disabled) return;
    stopButton.disabled = true;
    stopNote.textContent = "Stopping…";
    try {
      const r = await post(`/api/chat/streams/${encodeURIComponent(streamId)}/cancel`, {
        reason: reason.value.trim() || null,
      });
      stopNote.textContent =
        r.finishReason === "cancelled"
          ? "Stopped. The user was told the answer was stopped by a supervisor."
          : "The answer had already finished on its own.";
    } catch (err) {
      stopNote.textContent =
        err instanceof ApiError && err.code === "STREAM_NOT_FOUND"
          ? "This answer is no longer live."
          : describe(err);
      stopButton.disabled = !streaming;
    }
  });

  async function loadSession() {
    if (userName(userId) === userId) await learnUsers("").catch(() => {});
    try {
      const s = await get(
        `/api/chat/users/${encodeURIComponent(userId)}/sessions/${encodeURIComponent(sessionId)}`,
      );
      if (disposed) return;
      titleEl.textContent = `Watching: ${s.title}`;
      who.textContent = `${userName(userId)} · ${s.modelId}`;
      for (const m of s.messages) {
        if (m.status !== "streaming") earlier.insertBefore(messageItem(m), answer);
      }
    } catch (err) {
      if (!disposed) who.textContent = describe(err);
    }
  }

  async function join(wait = null) {
    controller?.abort();
    controller = new AbortController();
    const { signal } = controller;
    again.replaceChildren();
    history.textContent = "";
    liveText.textContent = "";
    answerMeta.textContent = "";
    counts.textContent = "";
    let inHistory = true;
    let replayed = 0;
    let fresh = 0;
    let lastError = null;
    let ended = false;
    setStatus("connecting", wait ? "Waiting for the next answer in this chat…" : "Connecting…");
    let response;
    try {
      response = await send("GET", `/api/chat/sessions/${encodeURIComponent(sessionId)}/observe`, {
        query: { wait },
        headers: { Accept: "text/event-stream" },
        signal,
      });
    } catch (err) {
      if (disposed || signal.aborted) return;
      if (err instanceof ApiError && err.code === "SESSION_NOT_ACTIVE") {
        setStatus("idle", "No answer is being written in this chat right now.");
      } else {
        setStatus("error", describe(err));
      }
      offerWait();
      return;
    }
    const countText = () =>
      `Replayed ${num(replayed)} earlier ${replayed === 1 ? "piece" : "pieces"} of the answer · ` +
      `${num(fresh)} new since you joined.`;
    try {
      ended = await readEvents(response, ({ event, data }) => {
        if (event === "observer") {
          if (data.status === "waiting") setStatus("waiting", "Waiting for the next answer in this chat…");
          else if (data.status === "timeout") setStatus("idle", "No answer started while waiting.");
          else if (data.status === "connected") {
            streamId = data.streamingSessionId;
            streaming = true;
            stopButton.disabled = false;
            answer.hidden = false;
            setStatus("history", "Joined. Replaying what was written so far…");
          }
          return data.status === "timeout";
        }
        if (event === "history-start") {
          setStatus("history", `Replaying ${num(data.count)} earlier events…`);
        } else if (event === "history-end") {
          inHistory = false;
          setStatus("live", "Live: new words appear as the model writes them.");
          counts.textContent = countText();
        } else if (event === "lagged") {
          counts.textContent = `Fell behind: ${num(data.skipped)} events were skipped.`;
        } else if (event === "chunk" || event === "token") {
          const text = String(data.text ?? "");
          if (inHistory) {
            replayed += 1;
            history.append(text);
          } else {
            fresh += 1;
            liveText.append(text);
            counts.textContent = countText();
          }
        } else if (event === "error") {
          lastError = data;
        } else if (event === "done") {
          const finish = data.finishReason ?? data.finish_reason;
          const words = finishWords({ finishReason: finish }, lastError);
          setStatus(finish === "cancelled" ? "cancelled" : "ended", `Ended. ${words}`);
          const parts = [];
          if (data.tokensUsed) parts.push(`${num(data.tokensUsed)} tokens`);
          if (data.creditsCharged !== undefined) parts.push(credits(data.creditsCharged));
          answerMeta.textContent = parts.join(" · ");
          return true;
        }
        return false;
      });
    } catch {
      ended = false;
    }
    streaming = false;
    stopButton.disabled = true;
    if (disposed || signal.aborted) return;
    if (!ended) setStatus("error", "The connection to the server was lost.");
    offerWait();
  }

  function offerWait() {
    fill(
      again,
      button("Join again", () => join(), { id: "rejoin" }),
      button("Wait for the next answer", () => join(300), { id: "wait-next" }),
    );
  }

  loadSession().then(() => {
    if (!disposed) join();
  });
  return () => {
    disposed = true;
    controller?.abort();
  };
}
