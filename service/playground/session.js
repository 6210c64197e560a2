// One session of one model version: opened over the WebSocket stream, stepped on it,
// generated, reset and exported over REST. Every operation runs through one queue, so the
// page never has two requests of its own in flight on the session.

import { ApiError, Stream, request } from "./api.js";

export class Session {
  constructor(model, version, card) {
    this.model = model;
    this.version = version;
    this.card = card;
    this.stream = null;
    this.info = null;
    this.ttlMs = 0;
    this.expiresAt = null;
    this.dead = false; // expired or gone: a new session is needed
    this.listeners = new Set();
    this.queue = Promise.resolve();
  }

  get id() {
    return this.info ? this.info.session_id : null;
  }

  get stepCount() {
    return this.info ? this.info.step_count : 0;
  }

  onChange(listener) {
    this.listeners.add(listener);
  }

  changed() {
    for (const listener of this.listeners) listener(this);
  }

  /** Runs ``task`` after every operation queued before it; resolves with its result. */
  exclusive(task) {
    const run = this.queue.then(task);
    this.queue = run.catch(() => undefined);
    return run;
  }

  adopt(info) {
    this.info = info;
    const lastUsed = Date.parse(info.last_used);
    const expires = Date.parse(info.expires_at);
    if (Number.isFinite(lastUsed) && Number.isFinite(expires)) this.ttlMs = expires - lastUsed;
    this.expiresAt = Number.isFinite(expires) ? expires : null;
    this.changed();
  }

  used(stepCount) {
    this.info = { ...this.info, step_count: stepCount };
    if (this.ttlMs > 0) this.expiresAt = Date.now() + this.ttlMs;
    this.changed();
  }

  fail(error) {
    if (error instanceof ApiError && ["session_expired", "session_not_found"].includes(error.code)) {
      this.dead = true;
      this.changed();
    }
    throw error;
  }

  /** Opens a new session on a new stream. */
  async open() {
    const path = `v1/models/${encodeURIComponent(this.model)}/versions/${this.version}/stream`;
    const [stream, info] = await Stream.open(path);
    this.stream = stream;
    this.adopt(info);
  }

  async connected() {
    if (this.stream && !this.stream.closed) return this.stream;
    if (this.dead) throw (this.stream && this.stream.failure) || new ApiError("session_expired", "the session is gone");
    // The stream dropped (e.g. the server restarted): resume the same session.
    try {
      const [stream, info] = await Stream.open(`v1/sessions/${encodeURIComponent(this.id)}/stream`);
      this.stream = stream;
      this.adopt(info);
      return stream;
    } catch (error) {
      return this.fail(error);
    }
  }

  /** One message of ``inputs`` (a list of time steps); ``seq`` makes a resend safe.
   * ``options`` adds message fields, e.g. ``{top_k: 5}``. */
  async step(inputs, options = {}) {
    const stream = await this.connected();
    let answer;
    try {
      answer = await stream.send({ ...options, inputs, seq: this.stepCount + inputs.length });
    } catch (error) {
      return this.fail(error);
    }
    this.used(answer.step_count);
    return answer;
  }

  async generate(body) {
    try {
      const answer = await request("POST", `v1/sessions/${encodeURIComponent(this.id)}/generate`, body);
      this.used(answer.step_count);
      return answer;
    } catch (error) {
      return this.fail(error);
    }
  }

  async reset() {
    try {
      this.adopt(await request("POST", `v1/sessions/${encodeURIComponent(this.id)}/reset`));
    } catch (error) {
      this.fail(error);
    }
  }

  async exportState() {
    try {
      const state = await request("GET", `v1/sessions/${encodeURIComponent(this.id)}/state`);
      this.used(state.step_count);
      return state;
    } catch (error) {
      return this.fail(error);
    }
  }

  /** Closes the stream and deletes the session on the server (unless it is already gone). */
  async close() {
    if (this.stream) this.stream.close();
    if (this.id && !this.dead) {
      try {
        await request("DELETE", `v1/sessions/${encodeURIComponent(this.id)}`);
      } catch {
        // Gone already: nothing to clean up.
      }
    }
  }
}
