// This page's own side of a call (issue 17 items 2-4): microphone, camera, hand, screen
// share and devices, kept as the participant state the room sees.
//
// Mute turns the microphone track off (`enabled = false`: silence, so unmuting is instant).
// Camera off sends no video at all: the sender's track is replaced by null (no black
// frames, nothing for the node to forward), and the local track is disabled (the browser
// may turn the camera's light off); others see the initials because the state says so.
// Switching a device replaces the sender's track in place (replaceTrack): no new offer.

import { t, tr } from "../i18n.js";
import { listDevices, openTrack, saveDevicePrefs } from "../devices.js";
import { $, clone } from "./dom.js";
import { fillDevices } from "./prejoin.js";

/**
 * @typedef {{mic_muted: boolean, camera_off: boolean, hand_raised: boolean,
 *   screen_sharing: boolean, screen_mid: string | null, e2ee: boolean}} OwnState
 */

/**
 * @param {{
 *   buttons: {mic: HTMLButtonElement, cam: HTMLButtonElement, hand: HTMLButtonElement,
 *     screen: HTMLButtonElement, devices: HTMLButtonElement},
 *   conn: import("../room.js").RoomConnection,
 *   localStream: MediaStream | null,
 *   state: OwnState,
 *   onChange: (state: OwnState) => void,
 *   onScreen: (track: MediaStreamTrack | null) => void,
 *   onSpeaker: (deviceId: string) => void,
 * }} options
 */
export function callControls({ buttons, conn, localStream, state, onChange, onScreen, onSpeaker }) {
  const audio = () => localStream?.getAudioTracks()[0] ?? null;
  const video = () => localStream?.getVideoTracks()[0] ?? null;
  buttons.mic.disabled = audio() === null;
  buttons.cam.disabled = video() === null;
  buttons.screen.hidden = !navigator.mediaDevices?.getDisplayMedia;
  /** @type {MediaStreamTrack | null} */
  let screen = null;

  /** Tell the room (when in it) and the page. @param {Partial<OwnState>} changes */
  const set = (changes) => {
    Object.assign(state, changes);
    sync();
    onChange(state);
    if (conn.state === "joined" || conn.state === "joining") conn.participantState(changes).catch((error) => console.warn("state", error));
  };

  const sync = () => {
    const track = audio();
    if (track) track.enabled = !state.mic_muted;
    const camera = video();
    if (camera) camera.enabled = !state.camera_off;
    press(buttons.mic, state.mic_muted || audio() === null, state.mic_muted ? "unmute" : "mute");
    press(buttons.cam, state.camera_off || video() === null, state.camera_off ? "camera_on" : "camera_off");
    press(buttons.hand, state.hand_raised, state.hand_raised ? "lower_hand" : "raise_hand");
    press(buttons.screen, state.screen_sharing, state.screen_sharing ? "stop_sharing" : "share_screen");
  };

  buttons.mic.addEventListener("click", () => set({ mic_muted: !state.mic_muted }));
  buttons.cam.addEventListener("click", async () => {
    const off = !state.camera_off;
    set({ camera_off: off });
    await conn.media?.replaceLocal("video", off ? null : video());
  });
  buttons.hand.addEventListener("click", () => set({ hand_raised: !state.hand_raised }));

  const stopSharing = async () => {
    if (screen === null) return;
    const track = screen;
    screen = null;
    track.stop();
    onScreen(null);
    // The state first: the node handles a connection's frames in order, and the new
    // offer (the share's m-line made inactive) takes it longer.
    set({ screen_sharing: false, screen_mid: null });
    await conn.media?.setScreen(null);
  };
  buttons.screen.addEventListener("click", async () => {
    if (screen !== null) return stopSharing();
    let stream;
    try {
      stream = await navigator.mediaDevices.getDisplayMedia({ video: true, audio: false });
    } catch (error) {
      console.warn("getDisplayMedia", error); // the person said no: nothing changes
      return;
    }
    const track = stream.getVideoTracks()[0];
    screen = track;
    // The browser's own "stop sharing" ends the track: the share ends for everyone.
    track.addEventListener("ended", () => stopSharing());
    onScreen(track);
    // Said at once; which m-line carries it is known once the new offer is made.
    set({ screen_sharing: true });
    const mid = (await conn.media?.setScreen(track)) ?? null;
    if (screen === track) set({ screen_mid: mid });
  });

  // A new RoomMedia (joined, or joined again after a reconnect): it sends the share too,
  // and the whole state goes to the room again (a new connection starts from defaults).
  conn.addEventListener("media", (event) => {
    const media = /** @type {CustomEvent} */ (event).detail.media;
    if (media === null) return;
    media.screenTrack = screen;
    media.addEventListener("published", (/** @type {any} */ published) => {
      const mid = published.detail.screenMid;
      if (screen !== null && mid !== state.screen_mid) set({ screen_mid: mid });
    });
  });
  conn.addEventListener("joined", () => {
    conn.participantState({ ...state }).catch((error) => console.warn("state", error));
  });

  // -- devices in the call ---------------------------------------------------------------
  buttons.devices.addEventListener("click", async () => {
    const view = clone("tpl-devices");
    const dialog = /** @type {HTMLDialogElement} */ ($(view, "dialog"));
    const camera = /** @type {HTMLSelectElement} */ ($(view, "#devices-camera"));
    const mic = /** @type {HTMLSelectElement} */ ($(view, "#devices-mic"));
    const speaker = /** @type {HTMLSelectElement} */ ($(view, "#devices-speaker"));
    const error = /** @type {HTMLElement} */ ($(view, "#devices-error"));
    const { cameras, mics, speakers } = await listDevices();
    fillDevices(camera, video() ? cameras : [], video()?.getSettings().deviceId);
    fillDevices(mic, audio() ? mics : [], audio()?.getSettings().deviceId);
    fillDevices(speaker, speakers, undefined);
    for (const el of dialog.querySelectorAll(".speaker-field")) /** @type {HTMLElement} */ (el).hidden = speakers.length === 0;
    /** @param {"audio" | "video"} kind @param {string} deviceId */
    const change = async (kind, deviceId) => {
      error.textContent = "";
      const old = kind === "video" ? video() : audio();
      if (localStream === null || old === null) return;
      try {
        const track = await openTrack(kind, deviceId);
        localStream.removeTrack(old);
        old.stop();
        localStream.addTrack(track);
        track.enabled = kind === "video" ? !state.camera_off : !state.mic_muted;
        const off = kind === "video" && state.camera_off;
        await conn.media?.replaceLocal(kind, off ? null : track);
        saveDevicePrefs(kind === "video" ? { camera: deviceId } : { mic: deviceId });
        onChange(state);
      } catch (failure) {
        console.warn("device", failure);
        error.textContent = t("device_failed");
      }
    };
    camera.addEventListener("change", () => change("video", camera.value));
    mic.addEventListener("change", () => change("audio", mic.value));
    speaker.addEventListener("change", () => {
      saveDevicePrefs({ speaker: speaker.value });
      onSpeaker(speaker.value);
    });
    dialog.addEventListener("close", () => {
      dialog.remove();
      buttons.devices.focus();
    });
    document.body.append(dialog);
    dialog.showModal();
  });

  sync();
  return {
    stop: () => {
      screen?.stop();
    },
  };
}

/** @param {HTMLButtonElement} button @param {boolean} pressed @param {string} label */
function press(button, pressed, label) {
  button.setAttribute("aria-pressed", String(pressed));
  tr($(button, ".label"), label);
}
