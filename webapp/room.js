// One tab's presence in a room: the session WebSocket, the two-step join, the media, and
// staying connected (W3). No DOM here; the page listens to events.
//
// Joining (README "Live rooms"): open the WebSocket on the closest node with a ticket
// bought with this tab's session token, wait for `hello`, POST /api/rooms/{slug}/join (to this page's node: any
// node will do), send `join {room_token}` on the WebSocket, then publish and subscribe.
//
// Staying connected: a WebSocket that drops is opened again after a backoff with jitter
// (0.5 s doubling up to 15 s, each delay drawn from its upper half), and the join runs
// again on it: the same session token gives the same session, which replaces its older
// self in the room, so it never needs a second seat. `reconnect {node, url}` (the node is
// draining) moves to the named node at once. `session-replaced` (this session, or this
// user, was opened somewhere newer) ends it: it does not fight back. A `ping` goes out
// every 20 s, well inside the node's 45 s idle limit.
//
// Events: "state" {state, attempt?, delay?}, "hello" {session_id, node, region},
// "joined" {participants, self}, "participant-joined" {participant}, "participant-left"
// {session_id}, "chat" {message}, "track"/"trackended" (RoomMedia's), "media" {media} (a
// new RoomMedia), "ended" {reason} (replaced, left, room_full, ...: no reconnect follows).

import { ApiError, request, roomPath } from "./api.js";
import { forgetPick, pickNode } from "./closest.js";
import { RoomMedia } from "./media.js";

const PING_MS = 20_000;
const REQUEST_TIMEOUT_MS = 15_000;
const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 15_000;
// Join errors that no retry can fix.
const FINAL_JOIN_ERRORS = new Set(["room_full", "room_not_found", "already_joined", "invalid_slug", "removed_by_owner"]);

/** A delay for the n-th retry (n >= 1): exponential, capped, jittered ("equal jitter"). */
export function backoff(/** @type {number} */ attempt) {
  const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** (attempt - 1));
  return ceiling / 2 + Math.random() * (ceiling / 2);
}

/** The WebSocket URL of a node known by its HTTP URL. */
export function wsUrlOf(/** @type {string} */ url) {
  return `${url.replace(/^http/, "ws").replace(/\/$/, "")}/ws`;
}

export class RoomConnection extends EventTarget {
  /**
   * @param {{
   *   slug: string,
   *   sessionToken: (renew: boolean) => Promise<string>,
   *   localStream: MediaStream | null,
   *   mediaOptions?: import("./media.js").RoomMediaOptions,
   * }} options
   */
  constructor(options) {
    super();
    this.slug = options.slug;
    this.sessionToken = options.sessionToken;
    this.localStream = options.localStream;
    this.mediaOptions = options.mediaOptions ?? {};
    /** @type {WebSocket | null} */
    this.ws = null;
    /** @type {RoomMedia | null} */
    this.media = null;
    /** @type {import("./closest.js").NodeChoice | null} */
    this.node = null;
    /** @type {{session_id: string, node: string, region: string} | null} */
    this.hello = null;
    this.state = "idle";
    this.ended = false;
    this.attempt = 0;
    // Consecutive sockets that closed before saying hello (refused: bad token, node down).
    this.refused = 0;
    this.counter = 0;
    /** @type {Map<string, {resolve: (m: any) => void, reject: (e: Error) => void}>} */
    this.pending = new Map();
    /** @type {ReturnType<typeof setInterval> | undefined} */
    this.pinger = undefined;
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    this.retryTimer = undefined;
    // A draining node named another: go there without waiting.
    this.redirect = false;
    this.onOnline = () => {
      if (this.state === "waiting") this.retryNow();
    };
    addEventListener("online", this.onOnline);
  }

  /** Pick the closest node and connect. */
  async start() {
    this.setState("picking");
    try {
      this.node = await pickNode();
    } catch (error) {
      console.warn("closest node: falling back to this page's node", error);
      this.node = null;
    }
    this.open();
  }

  /** @param {string} state @param {Record<string, unknown>} [detail] */
  setState(state, detail = {}) {
    this.state = state;
    this.emit("state", { state, ...detail });
  }

  /** @param {string} type @param {unknown} detail */
  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  wsUrl() {
    if (this.node !== null) return this.node.ws_url;
    return wsUrlOf(location.origin);
  }

  async open() {
    if (this.ended) return;
    this.setState(this.attempt === 0 ? "connecting" : "reconnecting", { attempt: this.attempt });
    let token;
    let ticket;
    const renew = this.refused >= 2;
    try {
      token = await this.sessionToken(renew);
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) return this.end("unauthorized");
      return this.retry();
    }
    try {
      // The session token stays out of the URL: a ticket (single use, seconds long, good
      // on any node) stands in for it.
      ticket = (await request("POST", "/api/sessions/ws-ticket", { token })).ticket;
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) {
        // Even a new session is refused: logged out (or the password changed).
        if (renew) return this.end("unauthorized");
        // This session's token was refused (expired, revoked): the next try takes a new one.
        this.refused = 2;
      }
      return this.retry();
    }
    if (this.ended) return;
    const url = `${this.wsUrl()}?ticket=${encodeURIComponent(ticket)}`;
    this.redirect = false;
    const ws = new WebSocket(url);
    this.ws = ws;
    this.hello = null;
    ws.addEventListener("message", (event) => {
      if (ws !== this.ws) return;
      let message;
      try {
        message = JSON.parse(event.data);
      } catch {
        return;
      }
      this.onMessage(message);
    });
    ws.addEventListener("close", (event) => {
      if (ws === this.ws) this.onClose(event);
    });
  }

  /** @param {any} message */
  onMessage(message) {
    if (this.media?.handle(message)) return;
    if (message.id !== undefined && this.pending.has(String(message.id))) {
      const waiter = this.pending.get(String(message.id));
      this.pending.delete(String(message.id));
      waiter?.resolve(message);
      return;
    }
    switch (message.type) {
      case "hello":
        this.hello = { session_id: message.session_id, node: message.node, region: message.region };
        this.refused = 0;
        this.emit("hello", this.hello);
        this.join().catch((error) => this.joinFailed(error));
        break;
      case "joined":
        this.emit("joined", { participants: message.participants, self: message.self });
        break;
      case "participant-joined":
        this.emit("participant-joined", { participant: message.participant });
        break;
      case "participant-left":
      case "participant-replaced":
        this.emit("participant-left", { session_id: message.session_id });
        break;
      case "chat":
        this.emit("chat", { message });
        break;
      case "happening":
        this.emit("happening", { action: message.action, happening: message.happening });
        break;
      case "costs":
        // the room's books changed (split the bill): the Costs tab reloads them
        this.emit("costs", { message });
        break;
      case "chat-deleted":
        this.emit("chat-deleted", { id: message.id, file: message.file });
        break;
      case "session-replaced":
        this.end("replaced");
        break;
      case "left":
        // Taken out of the room by the node (an HTTP join elsewhere): not our own leave.
        this.end(message.reason === "moved" ? "moved" : "removed");
        break;
      case "reconnect":
        // The node is draining; it closes this socket next. Go where it says (or measure
        // again), and never back to it from a stale pick.
        forgetPick();
        if (typeof message.url === "string" && message.url) {
          this.node = { name: String(message.node ?? ""), region: "", url: message.url, ws_url: wsUrlOf(message.url) };
          this.redirect = true;
        } else {
          this.node = null;
        }
        break;
      case "error":
        console.warn("node error", message.code, message.message);
        break;
      default:
        break;
    }
  }

  async join() {
    this.setState("joining");
    const token = await this.sessionToken(false);
    const grant = await request("POST", `${roomPath(this.slug)}/join`, { token });
    const reply = await this.request({ type: "join", room_token: grant.room_token });
    if (reply.type !== "ack") throw new ApiError(409, reply.code, reply.message);
    this.attempt = 0;
    this.media?.close();
    this.media = new RoomMedia((message) => this.send(message), this.localStream, this.mediaOptions);
    for (const type of ["track", "trackended", "error", "speaker", "video-paused"]) {
      this.media.addEventListener(type, (event) =>
        this.emit(type === "error" ? "media-error" : type, /** @type {CustomEvent} */ (event).detail),
      );
    }
    this.emit("media", { media: this.media });
    clearInterval(this.pinger);
    this.pinger = setInterval(() => this.send({ type: "ping" }), PING_MS);
    this.setState("joined", { node: this.hello?.node ?? "" });
    if (this.localStream !== null) await this.media.publish();
  }

  /** @param {unknown} error */
  joinFailed(error) {
    if (this.ended) return;
    if (error instanceof ApiError && FINAL_JOIN_ERRORS.has(error.code)) {
      this.end(error.code, error.message);
      return;
    }
    if (error instanceof ApiError && error.status === 401) {
      // The session token is no longer good: the next socket takes a new session.
      this.refused = 2;
    }
    console.warn("join failed; retrying", error);
    this.ws?.close();
  }

  /** @param {CloseEvent} event */
  onClose(event) {
    this.stopMedia();
    if (this.ended) return;
    if (event.code === 4000) return this.end("replaced");
    if (this.hello === null) this.refused += 1;
    if (this.refused >= 3) forgetPick();
    if (this.redirect) {
      // Straight to the node we were sent to, after a short spread so a whole draining
      // node's clients do not arrive in one instant.
      this.attempt = 1;
      this.retryTimer = setTimeout(() => this.open(), Math.random() * 500);
      this.setState("reconnecting", { attempt: this.attempt, delay: 0 });
      return;
    }
    this.retry();
  }

  retry() {
    if (this.ended) return;
    this.attempt += 1;
    const delay = backoff(this.attempt);
    this.setState("waiting", { attempt: this.attempt, delay });
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this.reopen(), delay);
  }

  retryNow() {
    clearTimeout(this.retryTimer);
    this.reopen();
  }

  async reopen() {
    if (this.ended) return;
    if (this.refused >= 3 || this.node === null) {
      try {
        this.node = await pickNode({ fresh: true });
      } catch {
        this.node = null;
      }
      this.refused = Math.min(this.refused, 2);
    }
    this.open();
  }

  stopMedia() {
    clearInterval(this.pinger);
    this.pinger = undefined;
    for (const waiter of this.pending.values()) waiter.reject(new Error("websocket closed"));
    this.pending.clear();
    if (this.media !== null) {
      this.media.close();
      this.media = null;
      this.emit("media", { media: null });
    }
  }

  /** @param {object} message */
  send(message) {
    if (this.ws?.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify({ ...message, id: `c${++this.counter}` }));
    return true;
  }

  /**
   * Send and wait for the `ack` or `error` with the same id.
   * @param {object} message @returns {Promise<any>}
   */
  request(message) {
    const ws = this.ws;
    if (ws?.readyState !== WebSocket.OPEN) return Promise.reject(new Error("not connected"));
    const id = `r${++this.counter}`;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error("no answer"));
      }, REQUEST_TIMEOUT_MS);
      this.pending.set(id, {
        resolve: (m) => {
          clearTimeout(timer);
          resolve(m);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      });
      ws.send(JSON.stringify({ ...message, id }));
    });
  }

  /** Send a chat message; resolves to the node's ack, rejects with its error. */
  async chat(/** @type {string} */ text) {
    const reply = await this.request({ type: "chat", text });
    if (reply.type === "error") throw new ApiError(0, reply.code, reply.message);
    return reply;
  }

  /** Leave the room for good (the button, or the page going away). */
  async leave() {
    if (this.ended) return;
    const ws = this.ws;
    if (ws?.readyState === WebSocket.OPEN && this.state === "joined") {
      await Promise.race([
        this.request({ type: "leave" }).catch(() => null),
        new Promise((resolve) => setTimeout(resolve, 1000)),
      ]);
    }
    this.end("left");
  }

  /** @param {string} reason @param {string} [message] */
  end(reason, message = "") {
    if (this.ended) return;
    this.ended = true;
    clearTimeout(this.retryTimer);
    removeEventListener("online", this.onOnline);
    this.stopMedia();
    this.ws?.close();
    this.setState("ended", { reason });
    this.emit("ended", { reason, message });
  }
}
