// End-to-end encryption (issue 17 item 6): every frame this page sends is encrypted in the
// browser with AES-GCM under a key the node never sees, and every frame it receives is
// decrypted, in a worker (e2ee-worker.js) through the encoded transform API
// (RTCRtpScriptTransform; Chromium's createEncodedStreams where that is missing).
//
// The key: the invite link's fragment `#key=...` (a fragment is never sent to a server) or
// typed in before joining. The first bytes of each frame stay clear, so the node, which
// never decodes, still finds keyframes: VP8 keeps 10 bytes of a keyframe and 3 of a delta
// frame, Opus its TOC byte. A page without the key drops encrypted frames (and says
// "encrypted: key needed") rather than hand them to the decoder as garbage.

/** Whether this browser can transform encoded frames at all. */
export function e2eeSupported() {
  return typeof RTCRtpScriptTransform !== "undefined" || "createEncodedStreams" in RTCRtpSender.prototype;
}

/** The key in the page's fragment (`#key=...`), or "". */
export function keyFromFragment() {
  const match = /(?:^#|&)key=([^&]*)/.exec(location.hash);
  if (!match) return "";
  try {
    return decodeURIComponent(match[1]);
  } catch {
    return "";
  }
}

/** A fresh random key for an invite link: 128 bits, URL-safe. */
export function newKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/**
 * The transforms of one page. With a key it encrypts what it sends and decrypts what it
 * receives; without one it only watches what it receives (clear frames pass, encrypted
 * ones are dropped and reported).
 */
export class E2ee extends EventTarget {
  /** @param {string} key "" for none @param {string} salt the room, so one key differs per room */
  constructor(key, salt) {
    super();
    this.key = key;
    this.script = typeof RTCRtpScriptTransform !== "undefined";
    this.worker = new Worker("/static/e2ee-worker.js", { name: "e2ee" });
    this.worker.postMessage({ type: "key", key, salt });
    this.counter = 0;
    /** @type {Map<string, MediaStreamTrack>} */
    this.tracks = new Map();
    this.worker.addEventListener("message", (event) => {
      const { type, id, status } = event.data ?? {};
      if (type !== "status") return;
      this.dispatchEvent(new CustomEvent("status", { detail: { id, status, track: this.tracks.get(id) ?? null } }));
    });
  }

  /** Whether it encrypts what this page sends. */
  get sending() {
    return this.key !== "";
  }

  /**
   * Put the transform on a sender or receiver (RoomMedia's `transform` option).
   * @param {RTCRtpSender | RTCRtpReceiver} endpoint @param {string} kind @param {string} role
   */
  attach(endpoint, kind, role) {
    const encrypt = role === "publish";
    if (encrypt && !this.sending) return;
    const id = `${role}-${++this.counter}`;
    if (!encrypt) {
      const track = /** @type {RTCRtpReceiver} */ (endpoint).track;
      if (track) this.tracks.set(id, track);
    }
    const options = { operation: encrypt ? "encrypt" : "decrypt", kind, id };
    if (this.script) {
      /** @type {any} */ (endpoint).transform = new RTCRtpScriptTransform(this.worker, options);
    } else {
      const { readable, writable } = /** @type {any} */ (endpoint).createEncodedStreams();
      this.worker.postMessage({ type: "streams", readable, writable, ...options }, [readable, writable]);
    }
  }

  /** Whether the peer connections need Chromium's legacy flag. */
  get needsInsertableStreams() {
    return !this.script;
  }

  stop() {
    this.worker.terminate();
  }
}
