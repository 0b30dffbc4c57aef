// The room's own-media controls: microphone, camera, full screen.

import { tr } from "../i18n.js";
import { $ } from "./dom.js";

/**
 * Mute and camera off switch the local tracks off (they stay published), so turning them
 * back on needs no new offer.
 * @param {HTMLButtonElement} mic @param {HTMLButtonElement} cam
 * @param {MediaStream | null} localStream
 * @param {() => void} onCamera after the camera went on or off
 */
export function setupMicAndCamera(mic, cam, localStream, onCamera) {
  const audioTracks = localStream?.getAudioTracks() ?? [];
  const videoTracks = localStream?.getVideoTracks() ?? [];
  mic.disabled = audioTracks.length === 0;
  cam.disabled = videoTracks.length === 0;
  const syncMic = () => {
    const muted = audioTracks.length === 0 || !audioTracks[0].enabled;
    mic.setAttribute("aria-pressed", String(muted));
    tr($(mic, ".label"), muted ? "unmute" : "mute");
  };
  const syncCam = () => {
    const off = videoTracks.length === 0 || !videoTracks[0].enabled;
    cam.setAttribute("aria-pressed", String(off));
    tr($(cam, ".label"), off ? "camera_on" : "camera_off");
    onCamera();
  };
  mic.addEventListener("click", () => {
    for (const track of audioTracks) track.enabled = !track.enabled;
    syncMic();
  });
  cam.addEventListener("click", () => {
    for (const track of videoTracks) track.enabled = !track.enabled;
    syncCam();
  });
  syncMic();
  syncCam();
}

/**
 * Fullscreen: the button asks, the browser decides; the UI follows `fullscreenchange`
 * alone, so leaving by Esc (or any other way) keeps it right.
 * @param {HTMLButtonElement} button @param {HTMLElement} target what goes full screen
 * @param {() => void} onChange after entering or leaving
 * @returns {() => void} stops following
 */
export function setupFullscreen(button, target, onChange) {
  const doc = /** @type {any} */ (document);
  const fullscreenElement = () => doc.fullscreenElement ?? doc.webkitFullscreenElement ?? null;
  const canFullscreen = Boolean(doc.fullscreenEnabled ?? doc.webkitFullscreenEnabled);
  button.hidden = !canFullscreen;
  const syncFullscreen = () => {
    const on = fullscreenElement() !== null;
    document.body.classList.toggle("fullscreen", on);
    button.setAttribute("aria-pressed", String(on));
    tr($(button, ".label"), on ? "exit_fullscreen" : "fullscreen");
    onChange();
  };
  button.addEventListener("click", async () => {
    try {
      if (fullscreenElement() !== null) await (doc.exitFullscreen ?? doc.webkitExitFullscreen).call(doc);
      else {
        const element = /** @type {any} */ (target);
        await (element.requestFullscreen ?? element.webkitRequestFullscreen).call(element);
      }
    } catch (error) {
      console.warn("fullscreen", error);
    }
  });
  document.addEventListener("fullscreenchange", syncFullscreen);
  document.addEventListener("webkitfullscreenchange", syncFullscreen);
  syncFullscreen();
  return () => {
    document.removeEventListener("fullscreenchange", syncFullscreen);
    document.removeEventListener("webkitfullscreenchange", syncFullscreen);
  };
}
