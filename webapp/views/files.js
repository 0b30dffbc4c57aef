// Memories (issue 15): share photos and files in the room's chat (pick, drag and drop,
// paste; a progress bar and cancel for each), see them in the chat, and the room's
// gallery tab (photos by date taken, paged; one opens large, the original downloads).
//
// An <img> cannot send an Authorization header, so the images' URLs carry a file token
// (`?t=`): short-lived, read only, bound to this room, bought with the session token at
// POST /api/rooms/{slug}/files/token and renewed before it expires.
//
// The room's creator alone sees a choice to keep photos' location and camera details (EXIF)
// from now on: PATCH /api/rooms/{slug} with the user token; everyone sees when it is on.

import { ApiError, auth, request, roomPath } from "../api.js";
import { tr } from "../i18n.js";
import { $, h } from "./dom.js";
import { showErrorIn } from "./forms.js";
import { currentUser } from "./user.js";

const TOKEN_MARGIN_MS = 30_000;
const GALLERY_PAGE = 40;

/**
 * @param {ParentNode} root the room section
 * @param {string} slug
 * @param {{creator_id?: string, keep_original_exif?: boolean}} [room] the room's info
 */
export function filesPanel(root, slug, room = {}) {
  const picker = /** @type {HTMLInputElement} */ ($(root, "#file-input"));
  const attach = /** @type {HTMLButtonElement} */ ($(root, "#btn-attach"));
  const uploads = /** @type {HTMLUListElement} */ ($(root, "#uploads"));
  const chatText = /** @type {HTMLTextAreaElement} */ ($(root, "#chat-text"));
  const chatError = /** @type {HTMLElement} */ ($(root, "#chat-error"));
  const gallery = /** @type {HTMLUListElement} */ ($(root, "#gallery"));
  const more = /** @type {HTMLButtonElement} */ ($(root, "#gallery-more"));
  const viewer = /** @type {HTMLDialogElement} */ ($(root, "#viewer"));
  const exifKept = /** @type {HTMLElement} */ ($(root, "#exif-kept"));
  const exifChoice = /** @type {HTMLElement} */ ($(root, "#exif-choice"));
  const exifKeep = /** @type {HTMLInputElement} */ ($(root, "#exif-keep"));
  const exifError = /** @type {HTMLElement} */ ($(root, "#exif-error"));

  const showExif = (/** @type {boolean} */ kept) => {
    exifKept.hidden = !kept;
    exifKeep.checked = kept;
  };
  showExif(Boolean(room.keep_original_exif));
  exifChoice.hidden = !room.creator_id || currentUser()?.id !== room.creator_id;
  exifKeep.addEventListener("change", async () => {
    const wanted = exifKeep.checked;
    exifKeep.disabled = true;
    exifError.textContent = "";
    try {
      const token = auth.userToken();
      if (token === null) throw new ApiError(401, "unauthorized", "sign in again");
      const reply = await request("PATCH", roomPath(slug), { token, body: { keep_original_exif: wanted } });
      showExif(Boolean(reply.keep_original_exif));
    } catch (error) {
      showExif(!wanted);
      showErrorIn(exifError, /** @type {Error} */ (error));
    } finally {
      exifKeep.disabled = false;
    }
  });

  /** @type {{token: string, expires: number} | null} */
  let grant = null;
  /** @type {Promise<string> | null} */
  let pending = null;
  const fileToken = async () => {
    if (grant && grant.expires - TOKEN_MARGIN_MS > Date.now()) return grant.token;
    pending ??= (async () => {
      const token = await auth.sessionToken();
      const reply = await request("POST", `${roomPath(slug)}/files/token`, { token });
      grant = { token: reply.file_token, expires: Date.parse(reply.expires_at) };
      return grant.token;
    })().finally(() => {
      pending = null;
    });
    return pending;
  };

  /** @param {string} id @param {string} variant "" (the original), "display" or "thumb" */
  const fileUrl = async (id, variant, download = false) => {
    const path = `/api/files/${encodeURIComponent(id)}${variant ? `/${variant}` : ""}`;
    const query = new URLSearchParams({ t: await fileToken() });
    if (download) query.set("download", "1");
    return `${path}?${query}`;
  };

  /** One upload: a row with a progress bar and a cancel button. @param {File} file */
  const upload = async (file) => {
    const bar = h("progress", { max: "100", value: "0" });
    const cancel = tr(h("button", { type: "button", class: "link" }), "cancel");
    const row = h("li", { class: "upload" }, h("span", { class: "name" }, file.name), " ", bar, " ", cancel);
    uploads.append(row);
    const xhr = new XMLHttpRequest();
    cancel.addEventListener("click", () => xhr.abort());
    try {
      const token = await auth.sessionToken();
      await new Promise((resolve, reject) => {
        xhr.open("POST", `${roomPath(slug)}/files?${new URLSearchParams({ name: file.name })}`);
        xhr.setRequestHeader("authorization", `Bearer ${token}`);
        xhr.setRequestHeader("content-type", "application/octet-stream");
        xhr.upload.addEventListener("progress", (event) => {
          if (event.lengthComputable) bar.value = Math.round((100 * event.loaded) / event.total);
        });
        xhr.addEventListener("load", () => {
          if (xhr.status < 300) return resolve(null);
          let error = {};
          try {
            error = JSON.parse(xhr.responseText).error ?? {};
          } catch {
            // not the contract's shape: say what the status says
          }
          reject(new ApiError(xhr.status, error.code ?? `http_${xhr.status}`, error.message ?? xhr.statusText));
        });
        xhr.addEventListener("error", () => reject(new ApiError(0, "network", "upload failed")));
        xhr.addEventListener("abort", () => resolve(null));
        xhr.send(file);
      });
    } catch (error) {
      showErrorIn(chatError, /** @type {Error} */ (error));
    } finally {
      row.remove();
    }
  };
  const uploadAll = (/** @type {Iterable<File>} */ files) => {
    for (const file of files) upload(file);
  };

  attach.addEventListener("click", () => picker.click());
  picker.addEventListener("change", () => {
    uploadAll([...(picker.files ?? [])]);
    picker.value = "";
  });
  const section = /** @type {HTMLElement} */ (root.querySelector(".room") ?? root);
  section.addEventListener("dragover", (event) => {
    if (event.dataTransfer?.types.includes("Files")) event.preventDefault();
  });
  section.addEventListener("drop", (event) => {
    if (!event.dataTransfer?.files.length) return;
    event.preventDefault();
    uploadAll([...event.dataTransfer.files]);
  });
  chatText.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData?.files ?? [])];
    if (files.length === 0) return;
    event.preventDefault();
    uploadAll(files);
  });

  /** The large view of one photo, with a link to its original. @param {any} file */
  const open = async (file) => {
    const img = h("img", { alt: file.name, class: "large" });
    const link = tr(h("a", { class: "button secondary", download: file.name }), "download_original");
    const close = tr(h("button", { type: "button", class: "secondary" }), "close");
    close.addEventListener("click", () => viewer.close());
    viewer.replaceChildren(img, h("div", { class: "actions" }, link, close));
    viewer.showModal();
    img.setAttribute("src", await fileUrl(file.id, "display"));
    link.setAttribute("href", await fileUrl(file.id, "", true));
  };

  /** What a chat message shows of its file. @param {any} file */
  const chatContent = (file) => {
    if (file.kind === "image") {
      const img = h("img", { class: "thumb", alt: file.name, loading: "lazy" });
      if (file.width && file.height) {
        const scale = Math.min(1, 240 / Math.max(file.width, file.height));
        img.setAttribute("width", String(Math.round(file.width * scale)));
        img.setAttribute("height", String(Math.round(file.height * scale)));
      }
      const button = h("button", { type: "button", class: "thumb-button" }, img);
      button.addEventListener("click", () => open(file));
      fileUrl(file.id, "thumb").then((url) => img.setAttribute("src", url), (error) => console.warn("thumb", error));
      return button;
    }
    const link = h("a", { class: "file-link", download: file.name }, `📎 ${file.name}`);
    fileUrl(file.id, "", true).then((url) => link.setAttribute("href", url), (error) => console.warn("file", error));
    return link;
  };

  // -- gallery -------------------------------------------------------------------------
  const state = { cursor: /** @type {string | null} */ (null), started: false, loading: false };
  const loadGallery = async () => {
    if (state.loading || (state.started && state.cursor === null)) return;
    state.loading = true;
    try {
      const token = await auth.sessionToken();
      const query = new URLSearchParams({ kind: "image", limit: String(GALLERY_PAGE), before: state.cursor ?? "" });
      const page = await request("GET", `${roomPath(slug)}/files?${query}`, { token });
      state.started = true;
      state.cursor = page.next_before;
      for (const file of page.files) {
        if (gallery.querySelector(`[data-id="${CSS.escape(file.id)}"]`)) continue;
        gallery.append(h("li", { "data-id": file.id }, chatContent(file)));
      }
      more.hidden = state.cursor === null;
    } finally {
      state.loading = false;
    }
  };
  more.addEventListener("click", () => loadGallery().catch((error) => console.warn("gallery", error)));

  return {
    chatContent,
    /** The gallery tab opened: fetch from the start again (new photos come first). */
    showGallery: () => {
      gallery.replaceChildren();
      state.cursor = null;
      state.started = false;
      loadGallery().catch((error) => console.warn("gallery", error));
    },
    /** @param {string} fileId */
    forget: (fileId) => gallery.querySelector(`[data-id="${CSS.escape(fileId)}"]`)?.remove(),
  };
}
