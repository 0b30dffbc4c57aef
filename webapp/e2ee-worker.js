// The frame transforms of e2ee.js, off the main thread. Frame layout on the wire:
//   clear header | AES-GCM ciphertext and tag | 12-byte IV | 0xE2 0xEE
// The clear header (VP8: 10 bytes of a keyframe, 3 of a delta frame; Opus: the TOC byte)
// is what the node and the depacketiser need; it is also the cipher's additional data, so
// it cannot be changed unnoticed. The two trailer bytes mark an encrypted frame: a page
// without the key drops those and passes clear ones (a participant not encrypting).

const MAGIC = [0xe2, 0xee];
const IV_BYTES = 12;
/** @type {Promise<CryptoKey | null>} */
let keyPromise = Promise.resolve(null);

/** @param {string} key @param {string} salt */
function deriveKey(key, salt) {
  if (!key) return Promise.resolve(null);
  const encoder = new TextEncoder();
  // PBKDF2 so that a typed-in passphrase is not cheap to guess from captured frames.
  return crypto.subtle
    .importKey("raw", encoder.encode(key), "PBKDF2", false, ["deriveKey"])
    .then((material) =>
      crypto.subtle.deriveKey(
        { name: "PBKDF2", hash: "SHA-256", salt: encoder.encode(`sfumesh-e2ee:${salt}`), iterations: 100_000 },
        material,
        { name: "AES-GCM", length: 128 },
        false,
        ["encrypt", "decrypt"],
      ),
    );
}

/** @param {any} frame @param {string} kind */
function clearBytes(frame, kind) {
  if (kind === "audio") return 1;
  return frame.type === "key" ? 10 : 3;
}

function isEncrypted(/** @type {Uint8Array} */ data) {
  return data.length > IV_BYTES + 2 && data[data.length - 2] === MAGIC[0] && data[data.length - 1] === MAGIC[1];
}

/**
 * @param {ReadableStream} readable @param {WritableStream} writable
 * @param {{operation: string, kind: string, id: string}} options
 */
function run(readable, writable, { operation, kind, id }) {
  let status = "";
  const report = (/** @type {string} */ now) => {
    if (now === status) return;
    status = now;
    self.postMessage({ type: "status", id, status: now });
  };
  const transform = new TransformStream({
    async transform(frame, controller) {
      const key = await keyPromise;
      const data = new Uint8Array(frame.data);
      if (operation === "encrypt") {
        if (key === null) return; // never send in the clear what was meant to be encrypted
        const header = Math.min(clearBytes(frame, kind), data.length);
        const iv = crypto.getRandomValues(new Uint8Array(IV_BYTES));
        const sealed = new Uint8Array(
          await crypto.subtle.encrypt(
            { name: "AES-GCM", iv, additionalData: data.subarray(0, header) },
            key,
            data.subarray(header),
          ),
        );
        const out = new Uint8Array(header + sealed.length + IV_BYTES + 2);
        out.set(data.subarray(0, header), 0);
        out.set(sealed, header);
        out.set(iv, header + sealed.length);
        out.set(MAGIC, out.length - 2);
        frame.data = out.buffer;
        controller.enqueue(frame);
        return;
      }
      if (!isEncrypted(data)) {
        report("clear");
        controller.enqueue(frame);
        return;
      }
      if (key === null) {
        report("key-needed");
        return;
      }
      const header = Math.min(clearBytes(frame, kind), data.length - IV_BYTES - 2);
      const ivAt = data.length - 2 - IV_BYTES;
      try {
        const plain = new Uint8Array(
          await crypto.subtle.decrypt(
            { name: "AES-GCM", iv: data.subarray(ivAt, ivAt + IV_BYTES), additionalData: data.subarray(0, header) },
            key,
            data.subarray(header, ivAt),
          ),
        );
        const out = new Uint8Array(header + plain.length);
        out.set(data.subarray(0, header), 0);
        out.set(plain, header);
        frame.data = out.buffer;
        report("decrypted");
        controller.enqueue(frame);
      } catch {
        report("key-wrong"); // another key: dropped, never decoded as garbage
      }
    },
  });
  readable.pipeThrough(transform).pipeTo(writable).catch(() => {});
}

self.addEventListener("message", (event) => {
  const message = event.data ?? {};
  if (message.type === "key") keyPromise = deriveKey(String(message.key ?? ""), String(message.salt ?? ""));
  else if (message.type === "streams") run(message.readable, message.writable, message);
});

// RTCRtpScriptTransform hands the streams over as an event.
/** @type {any} */ (self).onrtctransform = (/** @type {any} */ event) => {
  const transformer = event.transformer;
  run(transformer.readable, transformer.writable, transformer.options);
};
