// The room's video grid: one tile per person (own camera first), sized to fill the stage;
// a screen share gets a tile of its own. Each tile shows its person's state (muted, camera
// off: initials, hand raised, speaking, connection quality).
//
// One tile may be large, the others in a strip below it (issue 14 item 5). Which one, first
// match wins: the tile the person pinned (a click on it, or its pin button), a screen share
// (someone else's before one's own, the newest first), and in the speaker layout the one
// the node last named as speaking (its `speaker` events; never one's own tile, which nobody
// wants to watch large), else the first other person. The grid layout has no large tile but
// a pinned one or a screen share. A speaker change waits until the large tile has been large
// for HOLD_MS, so two people taking turns quickly do not make the layout flap (the node
// already names a speaker only after two rounds in front). Tiles change size with the
// layout, and RoomMedia's ResizeObserver tells the node, which sends the large tile a
// larger simulcast layer and the strip's tiles smaller ones.

import { t, tr, trAttr } from "../i18n.js";
import { h } from "./dom.js";

/** How long a tile stays large before a new speaker takes its place (ms). */
export const HOLD_MS = 2000;
/** Where the chosen layout is kept ("speaker" or "grid"). */
const LAYOUT_KEY = "sfumesh.layout";

/**
 * @typedef {{li: HTMLLIElement, video: HTMLVideoElement, stream: MediaStream,
 *   name: HTMLElement, initials: HTMLElement, self: boolean, badges: HTMLElement,
 *   cameraOff: boolean, notice: HTMLElement, state: Record<string, any>, screen: boolean,
 *   pin: HTMLButtonElement, added: number}} Tile
 * @typedef {"speaker" | "grid"} Layout
 */

/** The layout chosen last time on this browser (the speaker layout at first). */
export function savedLayout() {
  try {
    return localStorage.getItem(LAYOUT_KEY) === "grid" ? "grid" : "speaker";
  } catch {
    return "speaker";
  }
}

const initialsOf = (/** @type {string} */ name) =>
  name
    .split(/\s+/)
    .filter(Boolean)
    .slice(0, 2)
    .map((part) => [...part][0]?.toUpperCase() ?? "")
    .join("") || "?";

/** A state badge: an icon, with its words for screen readers (and as a tooltip). */
function badge(/** @type {string} */ key, /** @type {string} */ icon) {
  const span = h("span", { class: `badge badge-${key}`, role: "img" }, icon);
  span.setAttribute("aria-label", t(key));
  span.title = t(key);
  return span;
}

/**
 * @param {HTMLUListElement} grid
 * @param {HTMLButtonElement} unmuteAudio shown when the browser will not play sound unasked
 * @param {MediaStream | null} localStream
 */
export function videoGrid(grid, unmuteAudio, localStream) {
  /** @type {Map<string, Tile>} */
  const tiles = new Map();
  // the large tile (see the top of this file)
  let added = 0; // tiles made so far: the newest screen share wins
  /** @type {Layout} */
  let mode = savedLayout();
  /** @type {string | null} the tile the person pinned */
  let pinned = null;
  /** @type {string | null} the last other person the node named as speaking */
  let speaker = null;
  /** @type {string | null} the tile shown large now */
  let large = null;
  let largeSince = 0;
  let holdTimer = 0;

  /** Columns and a tile size for n tiles of 4:3, as large as the stage allows. */
  const layout = () => {
    const n = Math.max(grid.children.length, 1);
    const width = grid.clientWidth;
    const height = grid.clientHeight;
    grid.dataset.count = String(grid.children.length);
    if (width === 0 || height === 0) return;
    const gap = 8;
    let best = { cols: 1, tileWidth: 0 };
    for (let cols = 1; cols <= n; cols++) {
      const rows = Math.ceil(n / cols);
      const byWidth = (width - gap * (cols - 1)) / cols;
      const byHeight = ((height - gap * (rows - 1)) / rows) * (4 / 3);
      const tileWidth = Math.min(byWidth, byHeight);
      if (tileWidth > best.tileWidth) best = { cols, tileWidth };
    }
    grid.style.setProperty("--cols", String(best.cols));
    grid.style.setProperty("--tile-w", `${Math.floor(best.tileWidth)}px`);
    grid.style.setProperty("--tile-h", `${Math.floor((best.tileWidth * 3) / 4)}px`);
  };
  grid.dataset.layout = mode;
  const resize = new ResizeObserver(layout);
  resize.observe(grid);

  /** @param {string} key @param {string} name @param {boolean} self @param {boolean} screen */
  const tileFor = (key, name, self = false, screen = false) => {
    let tile = tiles.get(key);
    if (tile === undefined) {
      const video = /** @type {HTMLVideoElement} */ (
        h("video", { autoplay: "", playsinline: "", "aria-hidden": "true" })
      );
      // Own sound never plays back; a screen share carries no sound.
      video.muted = self || screen;
      const nameEl = h("span", { class: "name" });
      const initials = h("span", { class: "initials", "aria-hidden": "true" });
      const badges = h("span", { class: "badges" });
      const notice = h("span", { class: "tile-notice", role: "status", hidden: "" });
      const pin = /** @type {HTMLButtonElement} */ (
        h("button", { type: "button", class: "pin", "aria-pressed": "false" }, "📌")
      );
      const classes = ["tile", self ? "self" : "", screen ? "screen" : ""].filter(Boolean).join(" ");
      const li = /** @type {HTMLLIElement} */ (
        h("li", { class: classes, "data-session": key }, initials, video, notice, nameEl, badges, pin)
      );
      const stream = self && !screen && localStream ? localStream : new MediaStream();
      tile = {
        li, video, stream, name: nameEl, initials, self, badges, cameraOff: false, notice,
        state: {}, screen, pin, added: ++added,
      };
      video.srcObject = stream;
      if (screen) grid.prepend(li);
      else if (self) {
        const lastScreen = [...grid.querySelectorAll(".tile.screen")].pop();
        if (lastScreen) lastScreen.after(li);
        else grid.prepend(li);
      } else grid.append(li);
      tiles.set(key, tile);
      const tileKey = key;
      // The button for keyboards and screen readers; a click anywhere on the tile too.
      pin.addEventListener("click", (event) => {
        event.stopPropagation();
        togglePin(tileKey);
      });
      li.addEventListener("click", () => togglePin(tileKey));
      trAttr(pin, "aria-label", "pin_tile");
      trAttr(pin, "title", "pin_tile");
      grid.classList.toggle("sharing", grid.querySelector(".tile.screen") !== null);
      arrange();
      layout();
    }
    if (screen) tr(tile.name, "screen_of", { name });
    else if (self) tr(tile.name, "you_name", { name });
    else tile.name.textContent = name;
    tile.initials.textContent = initialsOf(name);
    updateTile(tile);
    return tile;
  };

  /** @param {Tile} tile */
  const updateTile = (tile) => {
    const live =
      !tile.cameraOff && tile.stream.getVideoTracks().some((track) => track.enabled && track.readyState === "live");
    tile.li.classList.toggle("no-video", !live);
    if (tile.stream.getTracks().length > 0) {
      tile.video.play().catch(() => {
        if (!tile.self) unmuteAudio.hidden = false;
      });
    }
  };

  const removeTile = (/** @type {string} */ key) => {
    const tile = tiles.get(key);
    if (tile === undefined) return;
    tile.li.remove();
    tiles.delete(key);
    if (pinned === key) pinned = null;
    if (speaker === key) speaker = null;
    grid.classList.toggle("sharing", grid.querySelector(".tile.screen") !== null);
    arrange();
    layout();
  };

  // -- the large tile ---------------------------------------------------------------------

  /** The tile that should be large now (see the top of this file), and whether it may wait. */
  const wanted = () => {
    if (pinned !== null && tiles.has(pinned)) return { key: pinned, urgent: true };
    const screens = [...tiles.entries()]
      .filter(([, tile]) => tile.screen)
      .sort(([, a], [, b]) => Number(a.self) - Number(b.self) || b.added - a.added);
    if (screens.length > 0) return { key: screens[0][0], urgent: true };
    if (mode !== "speaker") return { key: null, urgent: true };
    if (speaker !== null && tiles.has(speaker)) return { key: speaker, urgent: false };
    // no speaker yet, or they left: whoever is large stays; else the first other person
    if (large !== null && tiles.has(large) && !tiles.get(large)?.self) return { key: large, urgent: false };
    const other = [...tiles.entries()].find(([, tile]) => !tile.self);
    return { key: other ? other[0] : null, urgent: true };
  };

  /** Make the wanted tile large (a speaker change only once the current one had HOLD_MS). */
  const arrange = () => {
    clearTimeout(holdTimer);
    holdTimer = 0;
    const { key, urgent } = wanted();
    if (key === large) return;
    const held = performance.now() - largeSince;
    if (!urgent && large !== null && tiles.has(large) && held < HOLD_MS) {
      holdTimer = window.setTimeout(arrange, HOLD_MS - held);
      return;
    }
    if (large !== null) tiles.get(large)?.li.classList.remove("large");
    large = key;
    largeSince = performance.now();
    if (key !== null) tiles.get(key)?.li.classList.add("large");
    grid.classList.toggle("featured", key !== null);
    grid.dataset.large = key ?? "";
    layout();
  };

  /** Pin `key` large (over the speaker and screen shares), or unpin it. */
  const togglePin = (/** @type {string} */ key) => {
    pinned = pinned === key ? null : key;
    for (const [other, tile] of tiles) {
      tile.li.classList.toggle("pinned", other === pinned);
      tile.pin.setAttribute("aria-pressed", String(other === pinned));
      trAttr(tile.pin, "aria-label", other === pinned ? "unpin_tile" : "pin_tile");
      trAttr(tile.pin, "title", other === pinned ? "unpin_tile" : "pin_tile");
    }
    arrange();
  };

  /** The node's `speaker` event: `key` speaks now ("self" for this page's own person). */
  const setSpeaker = (/** @type {string} */ key) => {
    for (const [other, tile] of tiles) tile.li.classList.toggle("active-speaker", other === key);
    if (key === "self") return;
    speaker = key;
    arrange();
  };

  /** Switch between the speaker layout and the grid; the choice is kept. */
  const setLayout = (/** @type {Layout} */ next) => {
    mode = next;
    grid.dataset.layout = next;
    try {
      localStorage.setItem(LAYOUT_KEY, next);
    } catch {
      // private mode without storage: the choice lasts as long as the page
    }
    arrange();
  };

  /**
   * A person's state on their tile: initials for camera off, badges for muted, hand raised.
   * @param {string} key @param {Record<string, any>} state
   */
  const setState = (key, state) => {
    const tile = tiles.get(key);
    if (tile === undefined) return;
    tile.state = state;
    tile.cameraOff = Boolean(state.camera_off);
    tile.li.classList.toggle("mic-muted", Boolean(state.mic_muted));
    tile.li.classList.toggle("camera-off", tile.cameraOff);
    tile.li.classList.toggle("hand", Boolean(state.hand_raised));
    const badges = [];
    if (state.mic_muted) badges.push(badge("muted", "🔇"));
    if (state.hand_raised) badges.push(badge("hand_raised", "✋"));
    if (state.screen_sharing) badges.push(badge("sharing_screen", "🖥"));
    const quality = tile.li.dataset.quality;
    if (quality && quality !== "good") badges.push(badge(`quality_${quality}`, quality === "bad" ? "📶✖" : "📶"));
    tile.badges.replaceChildren(...badges);
    updateTile(tile);
  };

  /** @param {string} key @param {boolean} speaking */
  const setSpeaking = (key, speaking) => tiles.get(key)?.li.classList.toggle("speaking", speaking);

  /** @param {string} key @param {string} quality good / poor / bad */
  const setQuality = (key, quality) => {
    const tile = tiles.get(key);
    if (tile === undefined || tile.li.dataset.quality === quality) return;
    tile.li.dataset.quality = quality;
    setState(key, tile.state);
  };

  /** A notice over the tile in place of its picture (e.g. "encrypted: key needed"). */
  const setNotice = (/** @type {string} */ key, /** @type {string | null} */ textKey) => {
    const tile = tiles.get(key);
    if (tile === undefined) return;
    tile.notice.hidden = textKey === null;
    tile.li.classList.toggle("has-notice", textKey !== null);
    if (textKey !== null) tr(tile.notice, textKey);
  };

  /** @param {string} key @param {string} name @param {MediaStreamTrack} track a screen share */
  const showScreen = (key, name, track) => {
    const tile = tileFor(key, name, key === "screen:self", true);
    for (const old of tile.stream.getTracks()) if (old !== track) tile.stream.removeTrack(old);
    if (!tile.stream.getTracks().includes(track)) tile.stream.addTrack(track);
    updateTile(tile);
  };

  /** A remote track in its owner's tile, in place of one of its kind. */
  const showTrack = (/** @type {string} */ key, /** @type {string} */ name, /** @type {MediaStreamTrack} */ track) => {
    const tile = tileFor(key, name);
    for (const old of tile.stream.getTracks()) if (old.kind === track.kind) tile.stream.removeTrack(old);
    tile.stream.addTrack(track);
    track.addEventListener("unmute", () => updateTile(tile));
    track.addEventListener("mute", () => updateTile(tile));
    updateTile(tile);
  };

  const dropTrack = (/** @type {MediaStreamTrack} */ track) => {
    for (const tile of tiles.values()) {
      if (!tile.self && tile.stream.getTracks().includes(track)) {
        tile.stream.removeTrack(track);
        updateTile(tile);
      }
    }
  };

  const dropRemoteTracks = () => {
    for (const tile of tiles.values()) {
      if (tile.self) continue;
      for (const track of tile.stream.getTracks()) tile.stream.removeTrack(track);
      updateTile(tile);
    }
  };

  /** The own tile again, after the camera went on or off. */
  const updateSelf = () => {
    const self = tiles.get("self");
    if (self) updateTile(self);
  };

  unmuteAudio.addEventListener("click", () => {
    for (const tile of tiles.values()) tile.video.play().catch(() => {});
    unmuteAudio.hidden = true;
  });

  return {
    tiles,
    layout,
    tileFor,
    removeTile,
    showTrack,
    dropTrack,
    dropRemoteTracks,
    updateSelf,
    setState,
    setSpeaking,
    setQuality,
    setNotice,
    showScreen,
    setSpeaker,
    setLayout,
    togglePin,
    layoutMode: () => mode,
    largeTile: () => large,
    stop: () => {
      resize.disconnect();
      clearTimeout(holdTimer);
    },
  };
}
