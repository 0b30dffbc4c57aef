// The invite panel: the room's link, copy, QR code, the native share sheet.

import { roomPage, roomPath } from "../api.js";
import { t, tr } from "../i18n.js";
import { $, clone } from "./dom.js";

// Set by home to the room it just made, so that room opens with this panel: a new room is
// empty until its link is passed on.
export const INVITE_KEY = "sfumesh.invite";

/**
 * @param {any} room @param {HTMLElement} opener
 * @param {string} [key] the room's end-to-end key: it goes in the link's fragment, which
 *   browsers never send to a server (so the server-made QR code cannot carry it: hidden)
 */
export function openInvite(room, opener, key = "") {
  let dialog = /** @type {HTMLDialogElement | null} */ (document.querySelector("dialog.invite"));
  if (dialog === null) {
    document.body.append(clone("tpl-invite"));
    dialog = /** @type {HTMLDialogElement} */ (document.querySelector("dialog.invite"));
    const link = /** @type {HTMLInputElement} */ ($(dialog, "#invite-link"));
    const copied = /** @type {HTMLElement} */ ($(dialog, "#invite-copied"));
    $(dialog, "#invite-copy").addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(link.value);
      } catch {
        link.select();
        document.execCommand("copy");
      }
      tr(copied, "copied");
    });
    const share = /** @type {HTMLButtonElement} */ ($(dialog, "#invite-share"));
    share.hidden = typeof navigator.share !== "function";
    share.addEventListener("click", () => {
      navigator
        .share({ title: dialog?.dataset.title ?? "", text: t("share_text", { room: dialog?.dataset.title ?? "" }), url: link.value })
        .catch(() => {});
    });
    link.addEventListener("focus", () => link.select());
  }
  const link = /** @type {HTMLInputElement} */ ($(dialog, "#invite-link"));
  const base = room.url || new URL(roomPage(room.slug), location.origin).href;
  link.value = key ? `${base}#key=${encodeURIComponent(key)}` : base;
  let readable = base;
  try {
    readable = decodeURI(link.value);
  } catch {
    // shown encoded
  }
  $(dialog, "#invite-address").textContent = readable.replace(/^https?:\/\//, "");
  dialog.dataset.title = room.name;
  const qr = /** @type {HTMLImageElement} */ ($(dialog, "#invite-qr"));
  qr.hidden = key !== "";
  if (!key) qr.src = `${roomPath(room.slug)}/qr.svg`;
  const copied = $(dialog, "#invite-copied");
  copied.textContent = "";
  delete (/** @type {HTMLElement} */ (copied).dataset.i18n);
  dialog.addEventListener("close", () => opener.focus(), { once: true });
  dialog.showModal();
  /** @type {HTMLElement} */ ($(dialog, "#invite-copy")).focus();
}
