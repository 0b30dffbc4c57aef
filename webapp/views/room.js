// The room page: the room looked up (or a notice why not), then the grid, chat, people and
// controls wired to the room connection. The live room is on `window.sfumesh` for tests
// and debugging.

import { ApiError, auth, request, roomPath } from "../api.js";
import { t, tr } from "../i18n.js";
import { RoomConnection } from "../room.js";
import { logoutTo, showAuth } from "./auth.js";
import { chatPanel } from "./chat.js";
import { filesPanel } from "./files.js";
import { setupFullscreen } from "./controls.js";
import { callControls } from "./call.js";
import { devicePrefs, micLevel, openLocalMedia } from "../devices.js";
import { E2ee, e2eeSupported, keyFromFragment } from "../e2ee.js";
import { SPEAKING_LEVEL, watchQuality } from "../quality.js";
import { preJoin, showProblem } from "./prejoin.js";
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
  const key = keyFromFragment();
  // The pre-join screen, unless the person asked to skip it.
  const choice = devicePrefs().skipPrejoin
    ? { ...(await openLocalMedia()), micOff: Boolean(devicePrefs().micOff), cameraOff: Boolean(devicePrefs().cameraOff), key }
    : await preJoin(room, key);
  await enterRoom(room, choice);
}

/** @param {any} room @param {import("./prejoin.js").JoinChoice} choice */
async function enterRoom(room, choice) {
  const view = clone("tpl-room");
  const section = /** @type {HTMLElement} */ ($(view, ".room"));
  $(view, "#room-title").textContent = room.name;
  const connStatus = /** @type {HTMLElement} */ ($(view, "#conn"));
  const peopleList = /** @type {HTMLUListElement} */ ($(view, "#people"));
  const peopleCount = /** @type {HTMLElement} */ ($(view, "#people-count"));
  const buttons = {
    mic: /** @type {HTMLButtonElement} */ ($(view, "#btn-mic")),
    cam: /** @type {HTMLButtonElement} */ ($(view, "#btn-cam")),
    hand: /** @type {HTMLButtonElement} */ ($(view, "#btn-hand")),
    screen: /** @type {HTMLButtonElement} */ ($(view, "#btn-screen")),
    devices: /** @type {HTMLButtonElement} */ ($(view, "#btn-devices")),
    invite: /** @type {HTMLButtonElement} */ ($(view, "#btn-invite")),
    fullscreen: /** @type {HTMLButtonElement} */ ($(view, "#btn-fullscreen")),
    layout: /** @type {HTMLButtonElement} */ ($(view, "#btn-layout")),
    leave: /** @type {HTMLButtonElement} */ ($(view, "#btn-leave")),
  };
  const lock = /** @type {HTMLElement} */ ($(view, "#e2ee-lock"));
  const ownQuality = /** @type {HTMLElement} */ ($(view, "#own-quality"));
  render(view);
  document.body.classList.add("in-room");

  const localStream = choice.stream;
  showProblem($(section, "#media-problem"), choice.problem);
  /** @type {import("./call.js").OwnState} */
  const me = {
    mic_muted: choice.micOff,
    camera_off: choice.cameraOff,
    hand_raised: false,
    screen_sharing: false,
    screen_mid: null,
    e2ee: false,
  };

  const grid = videoGrid($(section, "#grid"), $(section, "#unmute-audio"), localStream);
  const { tiles } = grid;
  /**
   * @typedef {{session_id: string, user_id: string, display_name: string, node: string,
   *   state?: Record<string, any>}} Participant
   * @type {Map<string, Participant>}
   */
  const participants = new Map();
  let selfSession = "";
  const myName = currentUser()?.display_name ?? "";

  grid.tileFor("self", myName, true);

  // -- end-to-end encryption -------------------------------------------------------------
  // Every page that can transform frames does (to tell encrypted frames it cannot read
  // from clear ones); only a page with the key encrypts what it sends.
  const e2ee = e2eeSupported() ? new E2ee(choice.key, room.slug) : null;
  me.e2ee = Boolean(e2ee?.sending);
  /** @type {Map<MediaStreamTrack, string>} */
  const e2eeStatus = new Map();
  e2ee?.addEventListener("status", (event) => {
    const { track, status } = /** @type {CustomEvent} */ (event).detail;
    if (track === null) return;
    e2eeStatus.set(track, status);
    const owner = trackOwner.get(track.id);
    if (owner) showKeyNotice(owner);
  });
  /** A person's video that arrives encrypted and cannot be read: say so, never garbage. */
  const showKeyNotice = (/** @type {string} */ sessionId) => {
    const cannot = [...trackOwner.entries()].some(
      ([id, owner]) => owner === sessionId && ["key-needed", "key-wrong"].includes(statusOf(id)),
    );
    grid.setNotice(sessionId, cannot ? "e2ee_key_needed" : null);
  };
  const statusOf = (/** @type {string} */ trackId) => {
    for (const [track, status] of e2eeStatus) if (track.id === trackId) return status;
    return "";
  };
  const updateLock = () => {
    const others = [...participants.values()].filter((p) => p.session_id !== selfSession);
    lock.hidden = !(me.e2ee && others.every((p) => p.state?.e2ee));
  };

  // -- remote tracks: camera or screen share ------------------------------------------------
  /** @type {Map<string, string>} remote track id -> its owner's session */
  const trackOwner = new Map();
  /** @type {Map<string, {track: MediaStreamTrack, sourceMid: string}[]>} */
  const remoteVideo = new Map();
  /** @type {Map<string, Set<string>>} mids each person has shared a screen on */
  const screenMids = new Map();
  /** Show a person's video tracks: the one on their screen share's m-line large. */
  const route = (/** @type {string} */ sessionId) => {
    const state = participants.get(sessionId)?.state ?? {};
    const name = participants.get(sessionId)?.display_name ?? "…";
    const videos = remoteVideo.get(sessionId) ?? [];
    const shared = screenMids.get(sessionId) ?? new Set();
    const screen = state.screen_sharing ? videos.find((v) => v.sourceMid === state.screen_mid) : undefined;
    const camera = videos.filter((v) => !shared.has(v.sourceMid)).pop();
    if (camera) grid.showTrack(sessionId, name, camera.track);
    if (screen) grid.showScreen(`screen:${sessionId}`, name, screen.track);
    else grid.removeTile(`screen:${sessionId}`);
  };
  /** @param {Participant} p */
  const applyState = (p) => {
    const state = p.state ?? {};
    if (state.screen_mid) {
      const mids = screenMids.get(p.session_id) ?? new Set();
      mids.add(String(state.screen_mid));
      screenMids.set(p.session_id, mids);
    }
    if (p.session_id !== selfSession) {
      grid.setState(p.session_id, state);
      route(p.session_id);
    }
    updateLock();
  };

  // -- participants --------------------------------------------------------------------

  const renderPeople = () => {
    peopleCount.textContent = String(participants.size);
    const items = [...participants.values()]
      .sort((a, b) => a.display_name.localeCompare(b.display_name))
      .map((p) => {
        const li = h("li", {}, h("span", { class: "person" }, p.display_name));
        if (p.session_id === selfSession) li.append(" ", tr(h("span", { class: "tag" }), "you"));
        const state = p.session_id === selfSession ? me : (p.state ?? {});
        /** @type {[string, string][]} */
        const marks = [];
        if (state.mic_muted) marks.push(["muted", "🔇"]);
        if (state.camera_off) marks.push(["camera_is_off", "📷"]);
        if (state.hand_raised) marks.push(["hand_raised", "✋"]);
        if (state.screen_sharing) marks.push(["sharing_screen", "🖥"]);
        for (const [key, icon] of marks) {
          const mark = h("span", { class: `mark mark-${key}`, role: "img", "aria-label": t(key), title: t(key) }, icon);
          li.append(" ", mark);
        }
        if (p.node) li.append(" ", h("span", { class: "node" }, p.node));
        return li;
      });
    peopleList.replaceChildren(...items);
  };

  /** @param {Participant} p */
  const addParticipant = (p) => {
    participants.set(p.session_id, p);
    if (p.session_id !== selfSession) grid.tileFor(p.session_id, p.display_name);
    applyState(p);
  };

  // -- connection ----------------------------------------------------------------------

  const conn = new RoomConnection({
    slug: room.slug,
    sessionToken: (renew) => auth.sessionToken(renew),
    localStream,
    mediaOptions: e2ee
      ? {
          transform: (endpoint, kind, role) => e2ee.attach(endpoint, kind, role),
          encodedInsertableStreams: e2ee.needsInsertableStreams,
        }
      : {},
  });
  window.sfumesh = { conn, room, tiles, participants, me, e2ee, e2eeStatus, grid };

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
    for (const key of [...tiles.keys()]) if (key !== "self" && key !== "screen:self") grid.removeTile(key);
    selfSession = self?.session_id ?? selfSession;
    if (self) participants.set(self.session_id, self);
    for (const p of list) addParticipant(p);
    renderPeople();
    chat.catchUp();
    costs.refresh();
    happenings.load();
    if (sessionStorage.getItem(INVITE_KEY) === room.slug) {
      sessionStorage.removeItem(INVITE_KEY);
      openInvite(room, buttons.invite, choice.key);
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
    grid.removeTile(`screen:${sessionId}`);
    remoteVideo.delete(sessionId);
    renderPeople();
    updateLock();
  });
  conn.addEventListener("participant-state", (event) => {
    const { session_id: sessionId, state } = /** @type {CustomEvent} */ (event).detail;
    const p = participants.get(sessionId);
    if (p === undefined) return;
    p.state = state;
    applyState(p);
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
    trackOwner.set(track.id, key);
    if (track.kind === "video" && owner) {
      const videos = remoteVideo.get(key) ?? [];
      videos.push({ track, sourceMid: String(owner.source_mid ?? "") });
      remoteVideo.set(key, videos);
      grid.tileFor(key, participants.get(key)?.display_name ?? "…");
      route(key);
      // simulcast: the node sends the layer the tile showing it needs (none while hidden)
      const shown = [...$(section, "#grid").querySelectorAll("video")].find((v) =>
        /** @type {MediaStream | null} */ (v.srcObject)?.getTracks().includes(track),
      );
      if (mid && shown) conn.media?.watchTile(mid, shown);
    } else {
      grid.showTrack(key, participants.get(key)?.display_name ?? "…", track);
    }
  });
  conn.addEventListener("trackended", (event) => {
    const { track, mid } = /** @type {CustomEvent} */ (event).detail;
    grid.dropTrack(track);
    if (track.kind === "video" && mid) conn.media?.unwatchTile(mid);
    const key = trackOwner.get(track.id);
    if (key === undefined) return;
    const videos = (remoteVideo.get(key) ?? []).filter((v) => v.track !== track);
    remoteVideo.set(key, videos);
    for (const tile of tiles.values()) if (tile.stream.getTracks().includes(track)) tile.stream.removeTrack(track);
    route(key);
  });
  // The node names who speaks (from audio levels, after two rounds in front): the speaker
  // layout gives them the large tile.
  conn.addEventListener("speaker", (event) => {
    const { session_id: sessionId } = /** @type {CustomEvent} */ (event).detail;
    grid.setSpeaker(sessionId === selfSession ? "self" : sessionId);
  });
  conn.addEventListener("video-paused", (event) => {
    const { session_id, paused, reason } = /** @type {CustomEvent} */ (event).detail;
    const li = $(section, "#grid").querySelector(`li[data-session="${CSS.escape(session_id)}"]`);
    // a hidden tile needs no notice; a link too weak for even the lowest layer does
    li?.classList.toggle("video-paused", paused && reason === "bandwidth");
  });
  conn.addEventListener("media", (event) => {
    if (/** @type {CustomEvent} */ (event).detail.media !== null) return;
    // The connection dropped: remote tracks come again with the next subscribe offer.
    grid.dropRemoteTracks();
    remoteVideo.clear();
    trackOwner.clear();
    for (const key of [...tiles.keys()]) if (key.startsWith("screen:") && key !== "screen:self") grid.removeTile(key);
  });

  // Who is speaking and how the connections are, from the peer connections' stats.
  // Own speaking, from the microphone itself (what is sent is the same sound).
  const stopMicLevel = micLevel(localStream, (level) => grid.setSpeaking("self", !me.mic_muted && level > 0.05));
  const stopQuality = watchQuality(
    () => conn.media,
    ({ tracks, own }) => {
      /** @type {Map<string, boolean>} */
      const speaking = new Map();
      for (const [trackId, { quality, level }] of tracks) {
        const key = trackOwner.get(trackId);
        if (key === undefined) continue;
        const isAudio = tiles.get(key)?.stream.getAudioTracks().some((a) => a.id === trackId);
        if (isAudio) {
          const muted = participants.get(key)?.state?.mic_muted;
          speaking.set(key, (speaking.get(key) ?? false) || (!muted && level > SPEAKING_LEVEL));
        } else if (!key.startsWith("screen:")) {
          grid.setQuality(key, quality);
        }
      }
      for (const [key, on] of speaking) grid.setSpeaking(key, on);
      if (own !== null) {
        grid.setQuality("self", own);
        ownQuality.hidden = own === "good";
        if (own !== "good") tr(ownQuality, own === "bad" ? "own_quality_bad" : "own_quality_poor");
      }
    },
  );
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

  const controls = callControls({
    buttons,
    conn,
    localStream,
    state: me,
    onChange: (state) => {
      grid.setState("self", state);
      grid.updateSelf();
      renderPeople();
      updateLock();
    },
    onScreen: (track) => {
      if (track) grid.showScreen("screen:self", myName, track);
      else grid.removeTile("screen:self");
    },
    onSpeaker: (deviceId) => {
      for (const tile of tiles.values()) /** @type {any} */ (tile.video).setSinkId?.(deviceId).catch(() => {});
    },
  });
  grid.setState("self", me);
  buttons.invite.addEventListener("click", () => openInvite(room, buttons.invite, choice.key));
  const stopFullscreen = setupFullscreen(buttons.fullscreen, section, grid.layout);
  // The layout button names the layout it switches to.
  const showLayout = () => tr($(buttons.layout, ".label"), grid.layoutMode() === "speaker" ? "layout_grid" : "layout_speaker");
  buttons.layout.addEventListener("click", () => {
    grid.setLayout(grid.layoutMode() === "speaker" ? "grid" : "speaker");
    showLayout();
  });
  showLayout();

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
    stopQuality();
    stopMicLevel();
    controls.stop();
    e2ee?.stop();
    grid.stop();
    chat.stop();
    happenings.stop();
    stopFullscreen();
    document.body.classList.remove("in-room", "fullscreen");
  });

  conn.start();
}
