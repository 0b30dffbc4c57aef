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
// user, was opened somewhere newer) ends it: it does not fight back.
//
// Failover (issue 17): a node that dies says nothing. Its socket closes without a
// `reconnect` (the page checks at once whether the node still answers a ping), or, when the
// path went silent, no answer comes to the `ping` sent every 5 s (nothing heard for 7.5 s).
// Either way the node is marked dead and the page goes at once, without a backoff, to the
// next closest live node: the ranking is measured again without the dead node (asked of
// any node that answers, cross-origin: the API allows the mesh's own origins), or, if no
// node answers that quickly, the next of the ranking it already had. The ticket and the
// HTTP join go to a node that answers too (this page's own node may be the dead one). The
// same session joins again there, and its seat was kept for it meanwhile (the seat grace).
//
// Events: "state" {state, attempt?, delay?}, "hello" {session_id, node, region},
// "joined" {participants, self}, "participant-joined" {participant}, "participant-left"
// {session_id}, "participant-state" {session_id, state}, "chat" {message}, "track"/"trackended" (RoomMedia's), "media" {media} (a
// new RoomMedia), "ended" {reason} (replaced, left, room_full, ...: no reconnect follows).

import { ApiError, request, roomPath } from "./api.js";
import { forgetPick, pickNode, rankedNodes, timePing } from "./closest.js";
import { RoomMedia } from "./media.js";

// A ping this often (the node's idle limit is 45 s), and a node not heard from for
// SILENT_MS counts as gone: the page fails over.
const PING_MS = 5_000;
const SILENT_MS = 7_500;
// How long a dead node's quick check may take (a refused connection answers at once).
const PROBE_TIMEOUT_MS = 1_500;
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
    /** @type {RTCIceServer[]} the TURN servers of the current socket's `hello` */
    this.iceServers = [];
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
    // Nodes this page found dead (names), never picked again by this connection.
    /** @type {Set<string>} */
    this.dead = new Set();
    // Where API calls go: "" (this page's node) until it stops answering.
    this.apiBase = "";
    this.lastHeard = 0;
    this.lastPing = 0;
    // Failovers done, and when the last began (performance.now(); tests read them).
    this.failovers = 0;
    this.failoverStarted = 0;
    // The last ranking (closest first), kept here too: a forgotten pick must not lose it.
    /** @type {import("./closest.js").NodeChoice[]} */
    this.known = [];
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
      this.remember();
    } catch (error) {
      console.warn("closest node: falling back to this page's node", error);
      this.node = null;
    }
    this.open();
  }

  /** Keep the ranking of the last pick. */
  remember() {
    const ranked = rankedNodes();
    if (ranked.length > 0) this.known = ranked;
  }

  /** The known live nodes, closest first, without those found dead. */
  liveNodes() {
    const ranked = rankedNodes(this.dead);
    const nodes = ranked.length > 0 ? ranked : this.known;
    return nodes.filter((node) => !this.dead.has(node.name));
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
      ticket = (await this.api("POST", "/api/sessions/ws-ticket", { token })).ticket;
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
      this.lastHeard = performance.now();
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
        // This connection's TURN credentials (time-limited, for this session only): used by
        // the media connections of this socket, beside any the page was given.
        this.iceServers = Array.isArray(message.ice_servers) ? message.ice_servers : [];
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
      case "participant-state":
        // mic, camera, hand, screen share (README "Web client")
        this.emit("participant-state", { session_id: message.session_id, state: message.state });
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
    const grant = await this.api("POST", `${roomPath(this.slug)}/join`, { token });
    const reply = await this.request({ type: "join", room_token: grant.room_token });
    if (reply.type !== "ack") throw new ApiError(409, reply.code, reply.message);
    this.attempt = 0;
    this.media?.close();
    const iceServers = [...(this.mediaOptions.iceServers ?? []), ...this.iceServers];
    this.media = new RoomMedia((message) => this.send(message), this.localStream, { ...this.mediaOptions, iceServers });
    for (const type of ["track", "trackended", "error", "speaker", "video-paused"]) {
      this.media.addEventListener(type, (event) =>
        this.emit(type === "error" ? "media-error" : type, /** @type {CustomEvent} */ (event).detail),
      );
    }
    this.emit("media", { media: this.media });
    this.watch();
    this.setState("joined", { node: this.hello?.node ?? "" });
    // (a "media" listener may have given it a screen share to send)
    if (this.localStream !== null || this.media.screenTrack !== null) await this.media.publish();
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

  /**
   * One API call, to this page's node or, once that stops answering, to the node of the
   * WebSocket or any other ranked node still alive (cross-origin: node/web/cors.py).
   * @param {string} method @param {string} path @param {{token?: string, body?: unknown}} options
   */
  async api(method, path, options) {
    const bases = [this.apiBase];
    for (const node of [this.node, ...this.liveNodes()]) {
      if (node && !this.dead.has(node.name)) bases.push(node.url.replace(/\/$/, ""));
    }
    if (this.apiBase !== "") bases.push("");
    let lastError = null;
    for (const base of new Set(bases)) {
      try {
        const reply = await request(method, `${base}${path}`, {
          ...options,
          signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
        });
        this.apiBase = base;
        return reply;
      } catch (error) {
        // Only a node that did not answer is passed over; its answers (errors) are final.
        if (error instanceof ApiError && error.status !== 0) throw error;
        lastError = error;
      }
    }
    throw lastError;
  }

  /** Pings, and the watch for a node gone silent (the socket may never close by itself). */
  watch() {
    clearInterval(this.pinger);
    this.lastHeard = this.lastPing = performance.now();
    const ws = this.ws;
    this.pinger = setInterval(() => {
      if (ws !== this.ws) return;
      const now = performance.now();
      if (now - this.lastHeard > SILENT_MS) {
        console.warn("node silent; failing over", this.hello?.node);
        this.ws = null;
        ws?.close();
        this.onClose(new CloseEvent("close", { code: 4999, reason: "silent" }), true);
        return;
      }
      if (now - this.lastPing >= PING_MS) {
        this.lastPing = now;
        this.send({ type: "ping" });
      }
    }, 500);
  }

  /**
   * @param {CloseEvent} event
   * @param {boolean} [silent] the node stopped answering (it is gone, not just the socket)
   */
  onClose(event, silent = false) {
    const wasJoined = this.hello !== null;
    this.stopMedia();
    if (this.ended) return;
    if (event.code === 4000) return this.end("replaced");
    if (!this.redirect && wasJoined) {
      // Closed without a `reconnect`: is the node still there at all?
      this.checkNode(silent);
      return;
    }
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

  /**
   * After a close without `reconnect`: a node that no longer answers a ping is dead, and
   * the page fails over at once; one that answers (a network blip, a restart) is tried
   * again with the usual backoff.
   * @param {boolean} silent
   */
  async checkNode(silent) {
    const node = this.node;
    const url = node?.url ?? location.origin;
    this.setState("reconnecting", { attempt: this.attempt + 1, delay: 0 });
    const alive = silent ? null : await timePing(url.replace(/\/$/, ""), 1, PROBE_TIMEOUT_MS);
    if (this.ended) return;
    if (alive !== null) {
      this.retry();
      return;
    }
    this.failover(node?.name ?? "");
  }

  /** The node in use is gone: on to the next closest live node, now. @param {string} deadName */
  async failover(deadName) {
    this.failovers += 1;
    this.failoverStarted = performance.now();
    if (deadName) this.dead.add(deadName);
    // This page's own node may be the one that died: then nothing more is asked of it.
    const deadUrl = (this.node?.url ?? location.origin).replace(/\/$/, "");
    const pageNodeDead = this.node === null || deadUrl === location.origin;
    const next = this.liveNodes();
    forgetPick();
    console.warn("node gone; failing over", deadName, "next:", next[0]?.name);
    const bases = next.map((n) => n.url.replace(/\/$/, ""));
    if (!pageNodeDead && this.apiBase === "") bases.unshift("");
    try {
      this.node = await pickNode({ fresh: true, exclude: this.dead, bases });
      this.remember();
    } catch {
      this.node = next[0] ?? null;
    }
    if (this.node !== null && this.dead.has(this.node.name)) this.node = next[0] ?? null;
    if (pageNodeDead && this.apiBase === "" && this.node !== null) {
      this.apiBase = this.node.url.replace(/\/$/, "");
    }
    this.attempt = 1;
    this.refused = 0;
    this.open();
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
        const bases = this.liveNodes().map((n) => n.url.replace(/\/$/, ""));
        this.node = await pickNode({ fresh: true, exclude: this.dead, bases: [this.apiBase, ...bases] });
        this.remember();
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

  /**
   * Set this participant's state (some of mic_muted, camera_off, hand_raised,
   * screen_sharing, screen_mid, e2ee); resolves to the node's ack (the whole state).
   * @param {Record<string, boolean | string | null>} state
   */
  async participantState(state) {
    const reply = await this.request({ type: "participant-state", state });
    if (reply.type === "error") throw new ApiError(0, reply.code, reply.message);
    return reply;
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
