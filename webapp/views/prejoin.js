// Before joining (issue 17 item 4): the camera's preview, the microphone's level, the
// devices to use, joining with the microphone or camera off, and the room's end-to-end
// encryption key when the invite link did not carry one. "Skip this screen next time"
// is remembered; so are the devices chosen.

import { tr } from "../i18n.js";
import { devicePrefs, listDevices, micLevel, openLocalMedia, openTrack, saveDevicePrefs } from "../devices.js";
import { e2eeSupported, newKey } from "../e2ee.js";
import { $, clone, h, render, setTeardown } from "./dom.js";

/**
 * @typedef {{stream: MediaStream | null, problem: import("../devices.js").MediaProblem,
 *   micOff: boolean, cameraOff: boolean, key: string}} JoinChoice
 */

/** The problem's words, or nothing. */
export function showProblem(/** @type {HTMLElement} */ element, /** @type {string | null} */ problem) {
  element.hidden = problem === null;
  if (problem !== null) tr(element, problem === "denied" ? "media_denied" : "media_none");
}

/**
 * Fill a device <select> with `devices`, `current` selected.
 * @param {HTMLSelectElement} select @param {MediaDeviceInfo[]} devices @param {string | undefined} current
 */
export function fillDevices(select, devices, current) {
  select.replaceChildren(
    ...devices.map((device, i) => h("option", { value: device.deviceId }, device.label || `${device.kind} ${i + 1}`)),
  );
  if (current && devices.some((d) => d.deviceId === current)) select.value = current;
  select.disabled = devices.length === 0;
}

/**
 * Show the pre-join screen; resolves with what to join with when the person joins.
 * @param {{name: string}} room @param {string} key the encryption key from the link, if any
 * @returns {Promise<JoinChoice>}
 */
export async function preJoin(room, key) {
  const prefs = devicePrefs();
  const view = clone("tpl-prejoin");
  const section = /** @type {HTMLElement} */ ($(view, ".prejoin"));
  tr($(view, "#prejoin-title"), "prejoin_title", { room: room.name });
  const video = /** @type {HTMLVideoElement} */ ($(view, "#prejoin-video"));
  const off = /** @type {HTMLElement} */ ($(view, "#prejoin-off"));
  const level = /** @type {HTMLMeterElement} */ ($(view, "#prejoin-level"));
  const problemEl = /** @type {HTMLElement} */ ($(view, "#prejoin-problem"));
  const selects = {
    camera: /** @type {HTMLSelectElement} */ ($(view, "#prejoin-camera")),
    mic: /** @type {HTMLSelectElement} */ ($(view, "#prejoin-mic")),
    speaker: /** @type {HTMLSelectElement} */ ($(view, "#prejoin-speaker")),
  };
  const micOff = /** @type {HTMLInputElement} */ ($(view, "#prejoin-mic-off"));
  const camOff = /** @type {HTMLInputElement} */ ($(view, "#prejoin-cam-off"));
  const keyInput = /** @type {HTMLInputElement} */ ($(view, "#prejoin-key"));
  const skip = /** @type {HTMLInputElement} */ ($(view, "#prejoin-skip"));
  const join = /** @type {HTMLButtonElement} */ ($(view, "#prejoin-join"));
  micOff.checked = Boolean(prefs.micOff);
  camOff.checked = Boolean(prefs.cameraOff);
  keyInput.value = key;
  $(view, "#prejoin-new-key").addEventListener("click", () => {
    keyInput.value = newKey();
  });
  if (!e2eeSupported()) for (const el of [keyInput, $(view, "#prejoin-new-key")]) /** @type {HTMLInputElement} */ (el).disabled = true;
  render(view);

  const { stream, problem } = await openLocalMedia(prefs);
  showProblem(problemEl, problem);
  video.srcObject = stream;
  let stopLevel = micLevel(stream, (value) => (level.value = value));

  const refreshDevices = async () => {
    const { cameras, mics, speakers } = await listDevices();
    fillDevices(selects.camera, stream?.getVideoTracks().length ? cameras : [], stream?.getVideoTracks()[0]?.getSettings().deviceId);
    fillDevices(selects.mic, stream?.getAudioTracks().length ? mics : [], stream?.getAudioTracks()[0]?.getSettings().deviceId);
    fillDevices(selects.speaker, speakers, prefs.speaker);
    for (const el of section.querySelectorAll(".speaker-field")) /** @type {HTMLElement} */ (el).hidden = speakers.length === 0;
  };
  await refreshDevices();
  const showCamera = () => {
    off.hidden = !camOff.checked || !stream?.getVideoTracks().length;
    video.hidden = camOff.checked;
  };
  showCamera();
  camOff.addEventListener("change", showCamera);

  /** @param {"audio" | "video"} kind @param {HTMLSelectElement} select */
  const switchDevice = async (kind, select) => {
    if (stream === null) return;
    try {
      const track = await openTrack(kind, select.value);
      for (const old of kind === "video" ? stream.getVideoTracks() : stream.getAudioTracks()) {
        stream.removeTrack(old);
        old.stop();
      }
      stream.addTrack(track);
      saveDevicePrefs(kind === "video" ? { camera: select.value } : { mic: select.value });
      if (kind === "audio") {
        stopLevel();
        stopLevel = micLevel(stream, (value) => (level.value = value));
      }
    } catch (error) {
      console.warn("device", error);
    }
  };
  selects.camera.addEventListener("change", () => switchDevice("video", selects.camera));
  selects.mic.addEventListener("change", () => switchDevice("audio", selects.mic));
  selects.speaker.addEventListener("change", () => saveDevicePrefs({ speaker: selects.speaker.value }));

  let joined = false;
  setTeardown(() => {
    stopLevel();
    // Leaving the page without joining: the camera goes off.
    if (!joined) for (const track of stream?.getTracks() ?? []) track.stop();
  });
  return new Promise((resolve) => {
    join.addEventListener("click", () => {
      joined = true;
      saveDevicePrefs({ micOff: micOff.checked, cameraOff: camOff.checked, skipPrejoin: skip.checked });
      resolve({ stream, problem, micOff: micOff.checked, cameraOff: camOff.checked, key: keyInput.value.trim() });
    });
  });
}
