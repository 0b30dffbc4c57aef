// The browser side of a node's media protocol (README "Live rooms", API.md).
//
// Two peer connections, each with one offerer, so renegotiation never collides:
// - publish: this page offers its sendonly audio + video, the node answers;
// - subscribe: the node offers the room's other tracks (again whenever they change),
//   this page answers.
// Candidates trickle both ways as `candidate {candidate, pc}`.
//
// The session WebSocket stays with the caller: RoomMedia gets a `send(message)` function
// for outgoing messages and is handed incoming ones through `handle(message)`.
//
// Events (RoomMedia is an EventTarget):
// - "track": detail {track, streams, mid, transceiver, owner}, a remote track on the
//   subscribe connection; `owner` is {session_id, user_id, kind, source_mid} from the offer's `tracks`
//   map (every remote track arrives in the same stream, so this is how to tell whose it is).
// - "trackended": detail {track, mid}, the node stopped sending it (its m-line became
//   inactive; the publisher left).
// - "error": detail {error, pc}, a step of the negotiation failed.
// - "published": detail {screenMid}, a publish offer went out (the screen share's mid, for
//   the participant state, may differ after a reconnect).
//
// Changing what is sent without a new offer (issue 17): `replaceLocal` swaps a camera or
// microphone in place (replaceTrack); camera off sends nothing at all (the sender's track is
// null: no black frames, no bandwidth). The screen share is a third m-line, added (or sent
// on again) and stopped (inactive) with a new publish offer.
// - "speaker": detail {session_id, user_id}, who speaks now (the node reads audio levels).
// - "video-paused": detail {mid, session_id, paused, reason}, the node stopped (or resumed)
//   sending that video: "bandwidth" (even its lowest layer does not fit), "hidden".
//
// Simulcast: the camera is sent as three encodings (quarter, half and full size, lowest
// first); the node sends each subscriber the one that fits its link and its tile, which
// `watchTile(mid, element)` reports (size and visibility, as `view` messages). An encoding
// nobody watches is switched off: the node sends `layers {mid, active: [rid, ...]}` and
// this page sets each encoding's `active` (RTCRtpSender.setParameters), so the browser
// neither encodes nor sends it until it is wanted again.

/**
 * @typedef {{type: string, pc?: string, sdp?: string, candidate?: unknown}} Message
 * @typedef {{
 *   iceServers?: RTCIceServer[],
 *   videoCodec?: string | null,
 *   simulcast?: boolean,
 *   screenTrack?: MediaStreamTrack | null,
 *   transform?: ((endpoint: RTCRtpSender | RTCRtpReceiver, kind: string, role: string) => void) | null,
 *   encodedInsertableStreams?: boolean,
 * }} RoomMediaOptions
 */

/** The camera's encodings when simulcast is on: rid, downscale, bit rate cap (lowest first). */
export const SIMULCAST_ENCODINGS = [
  { rid: "q", scaleResolutionDownBy: 4, maxBitrate: 150_000 },
  { rid: "h", scaleResolutionDownBy: 2, maxBitrate: 500_000 },
  { rid: "f", scaleResolutionDownBy: 1, maxBitrate: 1_500_000 },
];

/**
 * Temporal layers on each simulcast encoding (VP8 `L1T3`: a quarter, half and all of the
 * frames as layers 0, 1 and 2), so the node can also lower a subscriber's frame rate before
 * it has to pause its video. Asked for only: a browser that refuses the mode (an exception)
 * gets the plain encodings, one that ignores it sends no temporal layers; both work.
 */
export const TEMPORAL_MODE = "L1T3";

/**
 * @param {RTCPeerConnection} pc
 * @param {MediaStreamTrack} track
 * @param {RTCRtpTransceiverInit} init
 */
function addSimulcast(pc, track, init) {
  try {
    return pc.addTransceiver(track, {
      ...init,
      sendEncodings: SIMULCAST_ENCODINGS.map((e) => ({ ...e, scalabilityMode: TEMPORAL_MODE })),
    });
  } catch (error) {
    console.info("sfumesh: no temporal layers:", error);
    return pc.addTransceiver(track, { ...init, sendEncodings: SIMULCAST_ENCODINGS.map((e) => ({ ...e })) });
  }
}

export class RoomMedia extends EventTarget {
  /**
   * @param {(message: object) => void} send sends one JSON message on the session WebSocket
   * @param {MediaStream | null} localStream what to publish (null: only receive)
   * @param {RoomMediaOptions} [options] `iceServers` defaults to none, so nothing is
   *   contacted that the deployment did not name; `videoCodec` ("VP8", "H264", ...) is put
   *   first in the publish offer, and the node forwards whatever the publisher sends.
   */
  constructor(send, localStream, options = {}) {
    super();
    this.send = send;
    this.localStream = localStream;
    this.iceServers = options.iceServers ?? [];
    this.videoCodec = options.videoCodec ?? null;
    // on unless a codec is forced (a test of one codec's path)
    this.simulcast = options.simulcast ?? this.videoCodec === null;
    /** @type {Map<string, {width: number, height: number, visible: boolean}>} */
    this.tiles = new Map();
    /** @type {Map<string, () => void>} */
    this.tileWatchers = new Map();
    this.viewTimer = 0;
    /** @type {MediaStreamTrack | null} the screen share, sent on a third m-line */
    this.screenTrack = options.screenTrack ?? null;
    // End-to-end encryption (e2ee.js): called with every sender and receiver.
    this.transform = options.transform ?? null;
    this.encodedInsertableStreams = options.encodedInsertableStreams ?? false;
    /** @type {{audio?: RTCRtpTransceiver, video?: RTCRtpTransceiver, screen?: RTCRtpTransceiver}} */
    this.transceivers = {};
    // Publish offers go out one at a time, each after the previous one's answer.
    this.publishing = Promise.resolve();
    /** @type {RTCPeerConnection | null} */
    this.publishPc = null;
    /** @type {RTCPeerConnection | null} */
    this.subscribePc = null;
    this.closed = false;
    // Messages are handled one after another: a renegotiation offer must not start
    // while the previous one is still being answered.
    this.queue = Promise.resolve();
  }

  /** Offer the local stream's tracks to the node; resolves once the offer is sent. */
  async publish() {
    if (this.localStream === null && this.screenTrack === null) throw new Error("no local stream to publish");
    if (this.publishPc !== null) throw new Error("already publishing");
    const pc = (this.publishPc = this.newPc("publish"));
    for (const track of this.localStream?.getTracks() ?? []) {
      const kind = /** @type {"audio" | "video"} */ (track.kind);
      if (this.transceivers[kind]) continue;
      const init = {
        direction: /** @type {RTCRtpTransceiverDirection} */ ("sendonly"),
        streams: this.localStream ? [this.localStream] : [],
      };
      // simulcast: the camera as three encodings (the screen share stays one)
      const transceiver =
        this.simulcast && kind === "video" ? addSimulcast(pc, track, init) : pc.addTransceiver(track, init);
      this.transceivers[kind] = transceiver;
      this.transform?.(transceiver.sender, kind, "publish");
      if (kind === "video" && this.videoCodec) {
        preferCodec(transceiver, "video", this.videoCodec);
      }
      // A camera that is off sends nothing (not black frames) until it is on again.
      if (kind === "video" && !track.enabled) await transceiver.sender.replaceTrack(null);
    }
    if (this.screenTrack !== null) this.addScreen(pc, this.screenTrack);
    await this.offerPublish();
  }

  /** @param {RTCPeerConnection} pc @param {MediaStreamTrack} track */
  addScreen(pc, track) {
    const transceiver = pc.addTransceiver(track, { direction: "sendonly" });
    this.transceivers.screen = transceiver;
    this.transform?.(transceiver.sender, "video", "publish");
    if (this.videoCodec) preferCodec(transceiver, "video", this.videoCodec);
    return transceiver;
  }

  /**
   * Send the publish connection's offer, after any earlier one is answered; resolves once
   * this one is sent.
   */
  offerPublish() {
    const pc = this.publishPc;
    /** @type {() => void} */
    let sent = () => {};
    const done = new Promise((resolve) => (sent = () => resolve(undefined)));
    this.publishing = this.publishing
      .then(async () => {
        try {
          if (this.closed || pc === null) return;
          await pc.setLocalDescription();
          this.send({ type: "offer", pc: "publish", sdp: pc.localDescription.sdp });
          const screenMid = this.screenTrack !== null ? (this.transceivers.screen?.mid ?? null) : null;
          this.dispatchEvent(new CustomEvent("published", { detail: { screenMid } }));
        } finally {
          sent();
        }
        await stable(pc);
      })
      .catch((error) => this.fail(error, "publish"));
    return done;
  }

  /**
   * Send `track` as the screen share, or stop sharing (null). Resolves to the share's mid
   * on this page's publish connection (null when not sharing).
   * @param {MediaStreamTrack | null} track
   * @returns {Promise<string | null>}
   */
  async setScreen(track) {
    this.screenTrack = track;
    if (this.closed) return null;
    if (this.publishPc === null) {
      if (track === null) return null;
      await this.publish();
      return this.transceivers.screen?.mid ?? null;
    }
    const transceiver = this.transceivers.screen;
    if (track !== null) {
      if (transceiver) {
        transceiver.direction = "sendonly";
        await transceiver.sender.replaceTrack(track);
      } else {
        this.addScreen(this.publishPc, track);
      }
    } else if (transceiver) {
      await transceiver.sender.replaceTrack(null);
      transceiver.direction = "inactive";
    }
    await this.offerPublish();
    return track !== null ? (this.transceivers.screen?.mid ?? null) : null;
  }

  /**
   * Send `track` (null: nothing) in place of the camera or microphone, without a new offer.
   * @param {"audio" | "video"} kind @param {MediaStreamTrack | null} track
   */
  async replaceLocal(kind, track) {
    const transceiver = this.transceivers[kind];
    if (transceiver && !this.closed) await transceiver.sender.replaceTrack(track);
  }

  /**
   * Consume a message from the node if it is about media.
   * @param {Message} message
   * @returns {boolean} whether it was a media message
   */
  handle(message) {
    if (message.type === "speaker" || message.type === "video-paused") {
      const { type, ...detail } = message;
      this.dispatchEvent(new CustomEvent(type, { detail }));
      return true;
    }
    if (message.type === "layers") {
      this.queue = this.queue
        .then(() => this.setLayers(message))
        .catch((error) => this.fail(error, "publish"));
      return true;
    }
    const pc = message.pc;
    if (pc !== "publish" && pc !== "subscribe") return false;
    if (!["offer", "answer", "candidate"].includes(message.type)) return false;
    this.queue = this.queue
      .then(() => this.apply(message))
      .catch((error) => this.fail(error, pc));
    return true;
  }

  /** @param {Message} message */
  async apply(message) {
    if (this.closed) return;
    if (message.type === "answer" && message.pc === "publish") {
      await this.publishPc?.setRemoteDescription({ type: "answer", sdp: message.sdp });
    } else if (message.type === "offer" && message.pc === "subscribe") {
      /** @type {Record<string, {session_id: string, user_id: string, kind: string}>} */
      this.owners = { ...this.owners, ...(message.tracks ?? {}) };
      const pc = (this.subscribePc ??= this.newPc("subscribe"));
      await pc.setRemoteDescription({ type: "offer", sdp: message.sdp });
      await pc.setLocalDescription();
      this.send({ type: "answer", pc: "subscribe", sdp: pc.localDescription.sdp });
    } else if (message.type === "candidate") {
      const pc = message.pc === "publish" ? this.publishPc : this.subscribePc;
      if (pc !== null) await pc.addIceCandidate(toCandidate(message.candidate));
    }
  }

  /**
   * Switch the publish connection's encodings of m-line `mid` on or off, as the node asks
   * (`active`: the rids wanted).
   * @param {{mid?: string, active?: string[]}} message
   */
  async setLayers(message) {
    const transceiver = this.publishPc?.getTransceivers().find((t) => t.mid === message.mid);
    if (!transceiver || !Array.isArray(message.active)) return;
    const sender = transceiver.sender;
    const parameters = sender.getParameters();
    if (!parameters.encodings || parameters.encodings.length < 2) return;
    let changed = false;
    for (const encoding of parameters.encodings) {
      const active = message.active.includes(encoding.rid ?? "");
      if (encoding.active !== active) {
        encoding.active = active;
        changed = true;
      }
    }
    if (changed) await sender.setParameters(parameters);
  }

  /**
   * Tell the node how the remote video of m-line `mid` is shown in `element` (its size in
   * device pixels, whether it is on screen), now and whenever that changes.
   * @param {string} mid
   * @param {HTMLElement} element
   */
  watchTile(mid, element) {
    this.tileWatchers.get(mid)?.();
    let visible = true;
    const update = () => {
      const ratio = window.devicePixelRatio || 1;
      const shown = visible && element.isConnected && element.offsetParent !== null;
      this.tiles.set(mid, {
        width: Math.round(element.clientWidth * ratio),
        height: Math.round(element.clientHeight * ratio),
        visible: shown && element.clientHeight > 0,
      });
      this.sendView();
    };
    const resize = new ResizeObserver(update);
    resize.observe(element);
    const seen = new IntersectionObserver((entries) => {
      visible = entries.some((entry) => entry.isIntersecting);
      update();
    });
    seen.observe(element);
    this.tileWatchers.set(mid, () => {
      resize.disconnect();
      seen.disconnect();
      this.tiles.delete(mid);
    });
    update();
  }

  /** @param {string} mid */
  unwatchTile(mid) {
    this.tileWatchers.get(mid)?.();
    this.tileWatchers.delete(mid);
    this.sendView();
  }

  /** One `view` message for all tiles, at most every 300 ms. */
  sendView() {
    if (this.viewTimer) return;
    this.viewTimer = window.setTimeout(() => {
      this.viewTimer = 0;
      if (!this.closed) this.send({ type: "view", tiles: Object.fromEntries(this.tiles) });
    }, 300);
  }

  /** @param {"publish" | "subscribe"} role */
  newPc(role) {
    /** @type {any} */
    const config = { iceServers: this.iceServers };
    // Chromium without RTCRtpScriptTransform: encoded frames through createEncodedStreams.
    if (this.encodedInsertableStreams) config.encodedInsertableStreams = true;
    const pc = new RTCPeerConnection(config);
    pc.addEventListener("icecandidate", (event) => {
      if (this.closed) return;
      // null: this side has gathered all its candidates.
      this.send({ type: "candidate", pc: role, candidate: event.candidate?.toJSON() ?? null });
    });
    if (role === "subscribe") {
      pc.addEventListener("track", (event) => this.onTrack(event));
    }
    return pc;
  }

  /** @param {RTCTrackEvent} event */
  onTrack(event) {
    const { track, streams, transceiver } = event;
    const mid = transceiver.mid;
    // An inactive m-line takes the track out of its streams (it is muted, not ended).
    for (const stream of streams) {
      const onRemove = (/** @type {MediaStreamTrackEvent} */ removed) => {
        if (removed.track !== track) return;
        stream.removeEventListener("removetrack", onRemove);
        this.dispatchEvent(new CustomEvent("trackended", { detail: { track, mid } }));
      };
      stream.addEventListener("removetrack", onRemove);
    }
    const owner = (mid !== null && this.owners?.[mid]) || null;
    this.transform?.(transceiver.receiver, track.kind, "subscribe");
    this.dispatchEvent(
      new CustomEvent("track", { detail: { track, streams, mid, transceiver, owner } }),
    );
  }

  /** @param {unknown} error @param {string} pc */
  fail(error, pc) {
    if (this.closed) return;
    this.dispatchEvent(new CustomEvent("error", { detail: { error, pc } }));
  }

  /** Close both connections; the local stream's tracks stay with their owner. */
  close() {
    this.closed = true;
    for (const stop of this.tileWatchers.values()) stop();
    this.tileWatchers.clear();
    clearTimeout(this.viewTimer);
    this.publishPc?.close();
    this.subscribePc?.close();
  }
}

/**
 * Resolves once `pc` has no offer outstanding (or after `limitMs`, or when it closes).
 * @param {RTCPeerConnection} pc
 */
function stable(pc, limitMs = 15_000) {
  return new Promise((resolve) => {
    const check = () => {
      if (pc.signalingState !== "stable" && pc.signalingState !== "closed") return;
      pc.removeEventListener("signalingstatechange", check);
      clearTimeout(timer);
      resolve(undefined);
    };
    const timer = setTimeout(() => {
      pc.removeEventListener("signalingstatechange", check);
      resolve(undefined);
    }, limitMs);
    pc.addEventListener("signalingstatechange", check);
    check();
  });
}

/**
 * Put `codec` (e.g. "H264") first among the transceiver's codecs; the node answers with the
 * first codec of the offer that it knows.
 * @param {RTCRtpTransceiver} transceiver @param {string} kind @param {string} codec
 */
export function preferCodec(transceiver, kind, codec) {
  const all = RTCRtpReceiver.getCapabilities(kind)?.codecs ?? [];
  const wanted = `${kind}/${codec}`.toLowerCase();
  const chosen = all.filter((c) => c.mimeType.toLowerCase() === wanted);
  if (chosen.length === 0) throw new Error(`this browser cannot use ${codec}`);
  // H264 without packetization-mode=1 cannot carry frames larger than one packet.
  chosen.sort((a, b) => packetizationMode(b) - packetizationMode(a));
  transceiver.setCodecPreferences([...chosen, ...all.filter((c) => !chosen.includes(c))]);
}

/** @param {RTCRtpCodec} codec */
function packetizationMode(codec) {
  return /packetization-mode=1/.test(codec.sdpFmtpLine ?? "") ? 1 : 0;
}

/**
 * The protocol allows a bare candidate line or {candidate, sdpMid, sdpMLineIndex}.
 * @param {unknown} value
 * @returns {RTCIceCandidateInit | undefined}
 */
function toCandidate(value) {
  if (value === null || value === undefined || value === "") return undefined;
  if (typeof value === "string") return { candidate: value, sdpMLineIndex: 0 };
  return /** @type {RTCIceCandidateInit} */ (value);
}
