// Camera, microphone and speaker (issue 17 item 4): opening them (with the chosen device),
// why they could not be opened, the lists to choose from, a microphone level meter, and
// the choices remembered for the next call.

export const VIDEO = { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 24 } };
const PREFS_KEY = "sfumesh.devices";

/**
 * @typedef {{camera?: string, mic?: string, speaker?: string, skipPrejoin?: boolean,
 *   micOff?: boolean, cameraOff?: boolean}} DevicePrefs
 * @typedef {"denied" | "none" | "unsupported" | null} MediaProblem
 */

/** @returns {DevicePrefs} */
export function devicePrefs() {
  try {
    const prefs = JSON.parse(localStorage.getItem(PREFS_KEY) ?? "{}");
    return prefs && typeof prefs === "object" ? prefs : {};
  } catch {
    return {};
  }
}

/** @param {DevicePrefs} changes */
export function saveDevicePrefs(changes) {
  localStorage.setItem(PREFS_KEY, JSON.stringify({ ...devicePrefs(), ...changes }));
}

/**
 * Camera and microphone if we may, the microphone alone, the camera alone, or nothing
 * (then the page only listens), with why not.
 * @param {DevicePrefs} [prefs]
 * @returns {Promise<{stream: MediaStream | null, problem: MediaProblem}>}
 */
export async function openLocalMedia(prefs = devicePrefs()) {
  if (!navigator.mediaDevices?.getUserMedia) return { stream: null, problem: "unsupported" };
  const video = { ...VIDEO, ...(prefs.camera ? { deviceId: { ideal: prefs.camera } } : {}) };
  const audio = prefs.mic ? { deviceId: { ideal: prefs.mic } } : true;
  for (const constraints of [{ audio, video }, { audio }, { video }]) {
    try {
      return { stream: await navigator.mediaDevices.getUserMedia(constraints), problem: null };
    } catch (error) {
      console.warn("getUserMedia", constraints, error);
      const name = /** @type {any} */ (error)?.name;
      // Refused by the person or the browser: asking again for less is refused too.
      if (name === "NotAllowedError" || name === "SecurityError") return { stream: null, problem: "denied" };
    }
  }
  return { stream: null, problem: "none" };
}

/**
 * One new track from a chosen device.
 * @param {"audio" | "video"} kind @param {string} deviceId
 */
export async function openTrack(kind, deviceId) {
  const constraints =
    kind === "video"
      ? { video: { ...VIDEO, deviceId: { exact: deviceId } } }
      : { audio: { deviceId: { exact: deviceId } } };
  const stream = await navigator.mediaDevices.getUserMedia(constraints);
  return stream.getTracks()[0];
}

/** The devices to choose from (labels once a permission was given). */
export async function listDevices() {
  const all = (await navigator.mediaDevices?.enumerateDevices?.()) ?? [];
  const usable = all.filter((d) => d.deviceId);
  return {
    cameras: usable.filter((d) => d.kind === "videoinput"),
    mics: usable.filter((d) => d.kind === "audioinput"),
    // Only where audio can be sent to a chosen output.
    speakers: "setSinkId" in HTMLMediaElement.prototype ? usable.filter((d) => d.kind === "audiooutput") : [],
  };
}

/**
 * Calls `onLevel(0..1)` about ten times a second with the microphone's loudness.
 * @param {MediaStream | null} stream @param {(level: number) => void} onLevel
 * @returns {() => void} stops it
 */
export function micLevel(stream, onLevel) {
  const track = stream?.getAudioTracks()[0];
  if (!track || typeof AudioContext === "undefined") return () => {};
  const context = new AudioContext();
  const analyser = context.createAnalyser();
  analyser.fftSize = 512;
  context.createMediaStreamSource(new MediaStream([track])).connect(analyser);
  const data = new Float32Array(analyser.fftSize);
  // The browser may hold the context until the person interacts with the page.
  const resume = () => context.resume().catch(() => {});
  addEventListener("pointerdown", resume, { once: true });
  addEventListener("keydown", resume, { once: true });
  const timer = setInterval(() => {
    analyser.getFloatTimeDomainData(data);
    let sum = 0;
    for (const value of data) sum += value * value;
    onLevel(Math.min(1, Math.sqrt(sum / data.length) * 4));
  }, 100);
  return () => {
    clearInterval(timer);
    removeEventListener("pointerdown", resume);
    removeEventListener("keydown", resume);
    context.close().catch(() => {});
  };
}
