// The public API as the page uses it: REST calls that carry the API key, and one
// WebSocket per session whose answers come back in the order of the messages.

const KEY_STORAGE = "rnnserve.apiKey";

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

/** An error answer of the server ({"error": {"code", "message"}}) or a lost connection. */
export class ApiError extends Error {
  constructor(code, message, status = null) {
    super(message);
    this.code = code;
    this.status = status;
  }
}

function errorFrom(body, fallbackCode, fallbackMessage, status = null) {
  const error = (body && body.error) || {};
  return new ApiError(error.code || fallbackCode, error.message || fallbackMessage, status);
}

/** A REST call relative to the page: resolves to the JSON answer, rejects with ApiError. */
export async function request(method, path, body) {
  const headers = {};
  const key = apiKey();
  if (key) headers["Authorization"] = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (exc) {
    throw new ApiError("connection_error", `the server could not be reached (${exc.message})`);
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    throw errorFrom(data, "http_error", `HTTP ${response.status}`, response.status);
  }
  return data;
}

function socketUrl(path) {
  const url = new URL(path, window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  const key = apiKey();
  if (key) url.searchParams.set("api_key", key); // browsers cannot set handshake headers
  return url.href;
}

/** One WebSocket stream of one session (docs/api.md, "WebSocket streaming"). */
export class Stream {
  constructor(socket) {
    this.socket = socket;
    this.pending = [];
    this.closed = false;
    this.failure = null; // why the stream closed
    this.lastError = null; // the latest error frame: the reason for a close that follows it
    socket.addEventListener("message", (event) => this.receive(event.data));
    socket.addEventListener("close", (event) => this.shut(event));
  }

  /** Opens ``path`` and resolves with [stream, session info] once the first frame arrives. */
  static open(path) {
    return new Promise((resolve, reject) => {
      const socket = new WebSocket(socketUrl(path));
      let settled = false;
      const first = (event) => {
        settled = true;
        socket.removeEventListener("message", first);
        socket.removeEventListener("close", early);
        const data = JSON.parse(event.data);
        if (data.error) {
          reject(errorFrom(data, "stream_error", "the stream could not be opened"));
          socket.close();
          return;
        }
        resolve([new Stream(socket), data]);
      };
      const early = (event) => {
        if (!settled) {
          reject(new ApiError("connection_error", `the stream closed (code ${event.code})`));
        }
      };
      socket.addEventListener("message", first);
      socket.addEventListener("close", early);
    });
  }

  /** Sends one JSON message; resolves with its answer or rejects with its error frame. */
  send(message) {
    if (this.closed) {
      return Promise.reject(this.failure || new ApiError("connection_closed", "the stream is closed"));
    }
    return new Promise((resolve, reject) => {
      this.pending.push({ resolve, reject });
      this.socket.send(JSON.stringify(message));
    });
  }

  receive(text) {
    const data = JSON.parse(text);
    const waiter = this.pending.shift();
    if (data.error) {
      const error = errorFrom(data, "stream_error", "error frame");
      this.lastError = error;
      if (waiter) waiter.reject(error);
      return;
    }
    this.lastError = null;
    if (waiter) waiter.resolve(data);
  }

  shut(event) {
    this.closed = true;
    const explained = event.code !== 1000 && event.code !== 1006 && this.lastError;
    const error = explained
      ? this.lastError
      : new ApiError("connection_closed", `the stream closed (code ${event.code})`);
    this.failure = error;
    for (const waiter of this.pending.splice(0)) waiter.reject(error);
  }

  close() {
    if (!this.closed) this.socket.close(1000);
    this.closed = true;
  }
}
