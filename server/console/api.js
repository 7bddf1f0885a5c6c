// The public API, as any other client speaks it: a bearer token from
// POST /api/auth/login, kept in this tab's sessionStorage (no cookie, never
// in a URL), JSON in and out, errors {message, errorCode} turned into words.

const KEY = "chinwag.console";

export const auth = {
  get() {
    try {
      const saved = JSON.parse(sessionStorage.getItem(KEY) ?? "null");
      return saved && typeof saved.token === "string" ? saved : null;
    } catch {
      return null;
    }
  },
  set(value) {
    sessionStorage.setItem(KEY, JSON.stringify(value));
  },
  clear() {
    sessionStorage.removeItem(KEY);
  },
};

/** Listeners told when the server says the token is no longer good (401). */
const expiredListeners = new Set();
export function onExpired(fn) {
  expiredListeners.add(fn);
}

export class ApiError extends Error {
  constructor(status, code, message, { retryAfter = null, details = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
    this.details = details;
  }
}

function seconds(n) {
  return `${n} ${n === 1 ? "second" : "seconds"}`;
}

/** What went wrong, in words a person can act on. */
export function describe(err) {
  if (!(err instanceof ApiError)) {
    if (err && err.name === "AbortError") return "Stopped.";
    return "Cannot reach the server. Check the connection and try again.";
  }
  const wait = err.retryAfter ? ` Try again in ${seconds(err.retryAfter)}.` : " Try again soon.";
  switch (err.code) {
    case "INVALID_CREDENTIALS":
      return "Wrong username or password.";
    case "UNAUTHORIZED":
      return "Your sign-in has expired. Please sign in again.";
    case "FORBIDDEN":
      return "Your role does not allow this.";
    case "INSUFFICIENT_CREDITS":
      return `Not enough credits for this answer. ${err.message} Ask an admin to add credits.`;
    case "RATE_LIMITED":
      return `Too many requests.${wait}`;
    case "TOO_MANY_STREAMS":
      return `You have too many answers in progress at once.${wait}`;
    case "STREAM_ALREADY_ACTIVE":
      return "An answer is already being written in this chat. Wait for it to finish.";
    case "SERVER_BUSY":
    case "SERVICE_UNAVAILABLE":
    case "UPSTREAM_UNAVAILABLE":
    case "MODEL_UNAVAILABLE":
      return `The service is busy or unavailable right now.${wait}`;
    case "USER_EXISTS":
      return "A user with this username already exists.";
    case "INTERNAL_ERROR":
      return "Something went wrong on the server. Please try again.";
    default:
      if (err.status === 429) return `Too many requests.${wait}`;
      if (err.status >= 500) return `The server could not do this right now.${wait}`;
      return err.message || `The request failed (${err.status}).`;
  }
}

async function errorOf(response) {
  let body = {};
  try {
    body = await response.json();
  } catch {
    // not JSON: a proxy's page, say
  }
  const retry = Number.parseInt(response.headers.get("Retry-After") ?? "", 10);
  return new ApiError(
    response.status,
    typeof body.errorCode === "string" ? body.errorCode : `HTTP_${response.status}`,
    typeof body.message === "string" ? body.message : "",
    { retryAfter: Number.isFinite(retry) ? retry : null, details: body.details ?? null },
  );
}

/** fetch() with the token; the raw Response when ok, else an ApiError. */
export async function send(method, path, { body, query, headers = {}, signal } = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(query ?? {})) {
    if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, String(v));
  }
  const saved = auth.get();
  const all = { Accept: "application/json", ...headers };
  if (saved) all.Authorization = `Bearer ${saved.token}`;
  if (body !== undefined) all["Content-Type"] = "application/json";
  const response = await fetch(url, {
    method,
    headers: all,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    cache: "no-store",
    credentials: "omit",
  });
  if (!response.ok) {
    const err = await errorOf(response);
    if (err.status === 401 && err.code === "UNAUTHORIZED" && saved) {
      for (const fn of expiredListeners) fn(err);
    }
    throw err;
  }
  return response;
}

/** The JSON answer of a request. */
export async function call(method, path, options) {
  const response = await send(method, path, options);
  return response.status === 204 ? null : response.json();
}

export const get = (path, query, options = {}) => call("GET", path, { ...options, query });
export const post = (path, body, options = {}) => call("POST", path, { ...options, body });
export const patch = (path, body) => call("PATCH", path, { body });
export const del = (path) => call("DELETE", path);

export async function login(username, password) {
  const answer = await call("POST", "/api/auth/login", { body: { username, password } });
  auth.set({ token: answer.accessToken, user: answer.user });
  return answer.user;
}

/**
 * Read a text/event-stream body, calling onEvent({event, id, data}) for each
 * event (data parsed as JSON) and onComment(text) for each comment. SSE pairs
 * each "event:" line with the "data:" lines after it, up to a blank line.
 * Returns true when onEvent returned true (the stream's own end: done), false
 * when the connection ended first (a drop). Throws on a network error, or an
 * AbortError when the caller's signal stopped it.
 */
export async function readEvents(response, onEvent, onComment) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return false;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      let id = null;
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) {
          onComment?.(line.slice(1).trim());
          continue;
        }
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let text = colon < 0 ? "" : line.slice(colon + 1);
        if (text.startsWith(" ")) text = text.slice(1);
        if (field === "event") event = text;
        else if (field === "data") data.push(text);
        else if (field === "id") id = text;
      }
      if (!data.length) continue;
      let payload = data.join("\n");
      try {
        payload = JSON.parse(payload);
      } catch {
        // keep the text
      }
      if (onEvent({ event, id: id === null ? null : Number(id), data: payload }) === true) {
        reader.cancel().catch(() => {});
        return true;
      }
    }
  }
}

export function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener(
      "abort",
      () => {
        clearTimeout(timer);
        reject(new DOMException("Stopped", "AbortError"));
      },
      { once: true },
    );
  });
}
