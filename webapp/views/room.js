// The room page: the room looked up (or a notice why not), then the grid, chat, people and
// controls wired to the room connection. The live room is on `window.sfumesh` for tests
// and debugging.

import { ApiError, auth, request, roomPath } from "../api.js";
import { tr } from "../i18n.js";
import { RoomConnection } from "../room.js";
import { logoutTo, showAuth } from "./auth.js";
import { chatPanel } from "./chat.js";
import { filesPanel } from "./files.js";
import { setupFullscreen, setupMicAndCamera } from "./controls.js";
import { costsPanel } from "./costs.js";
import { $, clone, h, render, setTeardown, setupTabs } from "./dom.js";
import { videoGrid } from "./grid.js";
import { happeningsPanel } from "./happenings.js";
import { INVITE_KEY, openInvite } from "./invite.js";
import { goHome, showNotice } from "./notice.js";
import { currentUser } from "./user.js";

/** @param {string} slug */
export async function showRoom(slug) {
  let room;
  try {
    room = await request("GET", roomPath(slug));
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) {
      const actions = [{ key: "go_home", action: goHome, primary: true }];
      return showNotice("room_not_found_title", "room_not_found_text", { room: slug }, actions);
    }
    if (error instanceof ApiError && error.status === 422) {
      return showNotice("room_invalid_title", "room_invalid_text", { room: slug }, [
        { key: "go_home", action: goHome, primary: true },
      ]);
    }
    return showNotice("error_title", "error_network", {}, [
      { key: "retry", action: () => showRoom(slug), primary: true },
    ]);
  }
  document.title = `${room.name} · sfumesh`;
  if (currentUser() === null) return showAuth(() => showRoom(slug), room);
  await enterRoom(room);
}

/** Camera and microphone if we may, microphone alone, or nothing (then we only watch). */
async function localMedia() {
  if (!navigator.mediaDevices?.getUserMedia) return null;
  const video = { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 24 } };
  for (const constraints of [{ audio: true, video }, { audio: true }, { video }]) {
    try {
      return await navigator.mediaDevices.getUserMedia(constraints);
    } catch (error) {
      console.warn("getUserMedia", constraints, error);
    }
  }
  return null;
}

/** @param {any} room */
async function enterRoom(room) {
  const view = clone("tpl-room");
  const section = /** @type {HTMLElement} */ ($(view, ".room"));
  $(view, "#room-title").textContent = room.name;
  const connStatus = /** @type {HTMLElement} */ ($(view, "#conn"));
  const peopleList = /** @type {HTMLUListElement} */ ($(view, "#people"));
  const peopleCount = /** @type {HTMLElement} */ ($(view, "#people-count"));
  const buttons = {
    mic: /** @type {HTMLButtonElement} */ ($(view, "#btn-mic")),
    cam: /** @type {HTMLButtonElement} */ ($(view, "#btn-cam")),
    invite: /** @type {HTMLButtonElement} */ ($(view, "#btn-invite")),
    fullscreen: /** @type {HTMLButtonElement} */ ($(view, "#btn-fullscreen")),
    leave: /** @type {HTMLButtonElement} */ ($(view, "#btn-leave")),
  };
  tr(connStatus, "camera_starting");
  render(view);
  document.body.classList.add("in-room");

  const localStream = await localMedia();

  const grid = videoGrid($(section, "#grid"), $(section, "#unmute-audio"), localStream);
  const { tiles } = grid;
  /** @type {Map<string, {session_id: string, user_id: string, display_name: string, node: string}>} */
  const participants = new Map();
  let selfSession = "";

  grid.tileFor("self", currentUser()?.display_name ?? "", true);

  // -- participants --------------------------------------------------------------------

  const renderPeople = () => {
    peopleCount.textContent = String(participants.size);
    const items = [...participants.values()]
      .sort((a, b) => a.display_name.localeCompare(b.display_name))
      .map((p) => {
        const li = h("li", {}, h("span", { class: "person" }, p.display_name));
        if (p.session_id === selfSession) li.append(" ", tr(h("span", { class: "tag" }), "you"));
        if (p.node) li.append(" ", h("span", { class: "node" }, p.node));
        return li;
      });
    peopleList.replaceChildren(...items);
  };

  /** @param {{session_id: string, user_id: string, display_name: string, node: string}} p */
  const addParticipant = (p) => {
    participants.set(p.session_id, p);
    if (p.session_id !== selfSession) grid.tileFor(p.session_id, p.display_name);
  };

  // -- connection ----------------------------------------------------------------------

  const conn = new RoomConnection({
    slug: room.slug,
    sessionToken: (renew) => auth.sessionToken(renew),
    localStream,
  });
  window.sfumesh = { conn, room, tiles, participants };

  const costs = costsPanel(section, room.slug);
  const files = filesPanel(section, room.slug, room);
  const chat = chatPanel(section, room.slug, (text) => conn.chat(text), files.chatContent);
  const happenings = happeningsPanel(section, room);

  conn.addEventListener("state", (event) => {
    const { state, delay, node } = /** @type {CustomEvent} */ (event).detail;
    section.dataset.state = state;
    const keys = /** @type {Record<string, string>} */ ({
      picking: "state_picking",
      connecting: "state_connecting",
      joining: "state_joining",
      reconnecting: "state_reconnecting",
      ended: "state_ended",
    });
    if (state === "joined") tr(connStatus, "state_joined", { node: nodeLabel(node) });
    else if (state === "waiting") tr(connStatus, "state_waiting", { seconds: Math.ceil(delay / 1000) });
    else if (keys[state]) tr(connStatus, keys[state]);
  });
  /** @type {{node: string, region: string} | null} */
  let hello = null;
  const nodeLabel = (/** @type {string} */ node) => (hello?.region ? `${node} (${hello.region})` : node);
  conn.addEventListener("hello", (event) => {
    hello = /** @type {CustomEvent} */ (event).detail;
    selfSession = /** @type {CustomEvent} */ (event).detail.session_id;
  });
  conn.addEventListener("joined", (event) => {
    const { participants: list, self } = /** @type {CustomEvent} */ (event).detail;
    participants.clear();
    for (const key of [...tiles.keys()]) if (key !== "self") grid.removeTile(key);
    selfSession = self?.session_id ?? selfSession;
    for (const p of list) addParticipant(p);
    if (self) participants.set(self.session_id, self);
    renderPeople();
    chat.catchUp();
    costs.refresh();
    happenings.load();
    if (sessionStorage.getItem(INVITE_KEY) === room.slug) {
      sessionStorage.removeItem(INVITE_KEY);
      openInvite(room, buttons.invite);
    }
  });
  conn.addEventListener("participant-joined", (event) => {
    addParticipant(/** @type {CustomEvent} */ (event).detail.participant);
    renderPeople();
    costs.changed(); // someone new may be among the room's people now
  });
  conn.addEventListener("participant-left", (event) => {
    const sessionId = /** @type {CustomEvent} */ (event).detail.session_id;
    participants.delete(sessionId);
    grid.removeTile(sessionId);
    renderPeople();
  });
  conn.addEventListener("chat", (event) => {
    chat.receive(/** @type {CustomEvent} */ (event).detail.message);
  });
  conn.addEventListener("happening", (event) => {
    happenings.receive(/** @type {CustomEvent} */ (event).detail);
  });
  conn.addEventListener("costs", () => costs.changed());
  conn.addEventListener("chat-deleted", (event) => {
    const { id, file } = /** @type {CustomEvent} */ (event).detail;
    if (id) chat.remove(id);
    if (file) files.forget(file);
  });
  conn.addEventListener("track", (event) => {
    const { track, owner, mid } = /** @type {CustomEvent} */ (event).detail;
    const key = owner?.session_id ?? `mid-${mid}`;
    grid.showTrack(key, participants.get(key)?.display_name ?? "…", track);
    // simulcast: the node sends the layer this tile needs (none while it is hidden)
    const tile = $(section, "#grid").querySelector(`li[data-session="${CSS.escape(key)}"] video`);
    if (track.kind === "video" && mid && tile) conn.media?.watchTile(mid, /** @type {HTMLElement} */ (tile));
  });
  conn.addEventListener("trackended", (event) => {
    const { track, mid } = /** @type {CustomEvent} */ (event).detail;
    grid.dropTrack(track);
    if (track.kind === "video" && mid) conn.media?.unwatchTile(mid);
  });
  conn.addEventListener("speaker", (event) => {
    const { session_id } = /** @type {CustomEvent} */ (event).detail;
    for (const li of $(section, "#grid").querySelectorAll("li[data-session]")) {
      li.classList.toggle("speaking", /** @type {HTMLElement} */ (li).dataset.session === session_id);
    }
  });
  conn.addEventListener("video-paused", (event) => {
    const { session_id, paused, reason } = /** @type {CustomEvent} */ (event).detail;
    const li = $(section, "#grid").querySelector(`li[data-session="${CSS.escape(session_id)}"]`);
    // hidden tiles need no notice; a link too weak for any layer does
    li?.classList.toggle("video-paused", paused && reason === "bandwidth");
  });
  conn.addEventListener("media", (event) => {
    if (/** @type {CustomEvent} */ (event).detail.media !== null) return;
    // The connection dropped: remote tracks come again with the next subscribe offer.
    grid.dropRemoteTracks();
  });
  conn.addEventListener("ended", (event) => {
    const { reason, message } = /** @type {CustomEvent} */ (event).detail;
    if (reason === "left") return;
    stopLocal();
    if (reason === "replaced") {
      showNotice("replaced_title", "replaced_text", {}, [
        {
          key: "use_here",
          primary: true,
          action: async () => {
            await auth.sessionToken(true);
            showRoom(room.slug);
          },
        },
        { key: "go_home", action: goHome },
      ]);
    } else if (reason === "room_full") {
      showNotice("room_full_title", "room_full_text", { capacity: room.capacity, room: room.name }, [
        { key: "retry", primary: true, action: () => showRoom(room.slug) },
        { key: "go_home", action: goHome },
      ]);
    } else if (reason === "unauthorized") {
      logoutTo(() => showRoom(room.slug));
    } else {
      const text = message || reason;
      showNotice("error_title", "room_ended_text", { reason: text }, [
        { key: "retry", primary: true, action: () => showRoom(room.slug) },
        { key: "go_home", action: goHome },
      ]);
    }
  });

  // -- controls ------------------------------------------------------------------------

  setupMicAndCamera(buttons.mic, buttons.cam, localStream, grid.updateSelf);
  buttons.invite.addEventListener("click", () => openInvite(room, buttons.invite));
  const stopFullscreen = setupFullscreen(buttons.fullscreen, section, grid.layout);

  const stopLocal = () => {
    for (const track of localStream?.getTracks() ?? []) track.stop();
  };
  buttons.leave.addEventListener("click", async () => {
    buttons.leave.disabled = true;
    await conn.leave();
    stopLocal();
    location.assign("/");
  });

  // -- tabs (chat / people / costs) ------------------------------------------------------
  setupTabs([
    { tab: $(section, "#tab-chat"), panel: /** @type {HTMLElement} */ ($(section, "#panel-chat")) },
    { tab: $(section, "#tab-people"), panel: /** @type {HTMLElement} */ ($(section, "#panel-people")) },
    { tab: $(section, "#tab-costs"), panel: /** @type {HTMLElement} */ ($(section, "#panel-costs")) },
    { tab: $(section, "#tab-memories"), panel: /** @type {HTMLElement} */ ($(section, "#panel-memories")) },
    { tab: $(section, "#tab-happenings"), panel: /** @type {HTMLElement} */ ($(section, "#panel-happenings")) },
  ]);
  $(section, "#tab-memories").addEventListener("click", () => files.showGallery());

  setTeardown(() => {
    grid.stop();
    chat.stop();
    happenings.stop();
    stopFullscreen();
    document.body.classList.remove("in-room", "fullscreen");
  });

  conn.start();
}
