// The room's video grid: one tile per person (own camera first), sized to fill the stage.

import { tr } from "../i18n.js";
import { h } from "./dom.js";

/**
 * @typedef {{li: HTMLLIElement, video: HTMLVideoElement, stream: MediaStream,
 *   name: HTMLElement, initials: HTMLElement, self: boolean}} Tile
 */

const initialsOf = (/** @type {string} */ name) =>
  name
    .split(/\s+/)
    .filter(Boolean)
    .slice(0, 2)
    .map((part) => [...part][0]?.toUpperCase() ?? "")
    .join("") || "?";

/**
 * @param {HTMLUListElement} grid
 * @param {HTMLButtonElement} unmuteAudio shown when the browser will not play sound unasked
 * @param {MediaStream | null} localStream
 */
export function videoGrid(grid, unmuteAudio, localStream) {
  /** @type {Map<string, Tile>} */
  const tiles = new Map();

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
  const resize = new ResizeObserver(layout);
  resize.observe(grid);

  /** @param {string} key @param {string} name @param {boolean} self */
  const tileFor = (key, name, self = false) => {
    let tile = tiles.get(key);
    if (tile === undefined) {
      const video = /** @type {HTMLVideoElement} */ (
        h("video", { autoplay: "", playsinline: "", "aria-hidden": "true" })
      );
      video.muted = self;
      const nameEl = h("span", { class: "name" });
      const initials = h("span", { class: "initials", "aria-hidden": "true" });
      const li = /** @type {HTMLLIElement} */ (
        h("li", { class: self ? "tile self" : "tile", "data-session": key }, initials, video, nameEl)
      );
      const stream = self && localStream ? localStream : new MediaStream();
      tile = { li, video, stream, name: nameEl, initials, self };
      video.srcObject = stream;
      if (self) grid.prepend(li);
      else grid.append(li);
      tiles.set(key, tile);
      layout();
    }
    if (self) tr(tile.name, "you_name", { name });
    else tile.name.textContent = name;
    tile.initials.textContent = initialsOf(name);
    updateTile(tile);
    return tile;
  };

  /** @param {Tile} tile */
  const updateTile = (tile) => {
    const live = tile.stream.getVideoTracks().some((track) => track.enabled && track.readyState === "live");
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
    layout();
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
    stop: () => resize.disconnect(),
  };
}
