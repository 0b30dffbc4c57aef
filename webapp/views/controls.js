// The room's full-screen control (microphone, camera, hand, screen share: call.js).

import { tr } from "../i18n.js";
import { $ } from "./dom.js";

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
