// The web client (issue #7): sign up / log in, create or pick a random room, invite, and the
// room itself. Plain ES modules, no build step. Served by every node at `/` and `/r/<slug>`.
//
// Views are <template>s in index.html, cloned and wired here; every visible string comes
// from the language bundle (i18n.js). The room's networking lives in room.js, media in
// media.js. For tests and debugging the live room is on `window.sfumesh`.

import { ApiError, auth, request, roomPage, roomPath } from "./api.js";
import {
  LANGUAGES,
  currentLanguage,
  languageEvents,
  preferredLanguage,
  setLanguage,
  t,
  tr,
  translate,
} from "./i18n.js";
import { RoomConnection } from "./room.js";

const main = /** @type {HTMLElement} */ (document.getElementById("main"));
const INVITE_KEY = "sfumesh.invite";
const HISTORY_PAGE = 30;

/** @type {{id: string, username: string, display_name: string} | null} */
let me = null;
/** @type {(() => void) | null} what to undo when the view changes */
let teardown = null;

// ---------------------------------------------------------------------------------------
// small helpers

/** @param {string} id */
function clone(id) {
  const template = /** @type {HTMLTemplateElement} */ (document.getElementById(id));
  const fragment = /** @type {DocumentFragment} */ (template.content.cloneNode(true));
  translate(fragment);
  return fragment;
}

/** Replace the main view; focus its heading so screen readers and keyboards follow. */
function render(/** @type {DocumentFragment} */ fragment) {
  teardown?.();
  teardown = null;
  main.replaceChildren(fragment);
  const heading = main.querySelector("h1");
  if (heading) {
    heading.tabIndex = -1;
    heading.focus({ preventScroll: true });
  }
}

/**
 * @template {Element} T
 * @param {ParentNode} root @param {string} selector @returns {T}
 */
function $(root, selector) {
  const found = root.querySelector(selector);
  if (found === null) throw new Error(`missing ${selector}`);
  return /** @type {T} */ (/** @type {unknown} */ (found));
}

/**
 * @param {string} tag @param {Record<string, string>} [attrs] @param {(Node | string)[]} children
 */
function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) element.setAttribute(name, value);
  element.append(...children);
  return element;
}

/** A readable message for an error: a translated one for known codes, else the API's. */
function errorKey(/** @type {unknown} */ error) {
  if (error instanceof ApiError) {
    const key = `error_${error.code.replace(/-/g, "_")}`;
    if (t(key) !== key) return { key };
    if (error.status === 0) return { key: "error_network" };
    return { text: error.message };
  }
  return { text: String(error) };
}

/** @param {HTMLElement} element @param {unknown} error */
function showErrorIn(element, error) {
  const { key, text } = errorKey(error);
  if (key) tr(element, key);
  else {
    delete element.dataset.i18n;
    element.textContent = text ?? "";
  }
}

/** The API's field problem, without pydantic's "Value error, " prefix. */
function problemText(/** @type {string} */ problem) {
  return problem.replace(/^Value error, /, "");
}

function clearErrors(/** @type {HTMLFormElement} */ form) {
  for (const element of form.querySelectorAll(".error")) {
    const el = /** @type {HTMLElement} */ (element);
    el.textContent = "";
    delete el.dataset.i18n;
  }
  for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
}

/** Put an API error under the fields it names, or at the form's foot. */
function showFormError(/** @type {HTMLFormElement} */ form, /** @type {unknown} */ error) {
  const general = /** @type {HTMLElement} */ ($(form, ".form-error"));
  let placed = false;
  if (error instanceof ApiError && error.details.length > 0) {
    for (const detail of error.details) {
      const field = ApiError.fieldOf(detail);
      const target = form.querySelector(`.error[data-field="${CSS.escape(field)}"]`);
      const input = form.querySelector(`[name="${CSS.escape(field)}"]`);
      if (target === null) continue;
      target.textContent = problemText(detail.problem);
      input?.setAttribute("aria-invalid", "true");
      if (!placed) /** @type {HTMLElement | null} */ (input)?.focus();
      placed = true;
    }
  }
  if (!placed) showErrorIn(general, error);
}

/** A required field left empty: said under it, no request made. */
function requireFields(/** @type {HTMLFormElement} */ form) {
  let ok = true;
  for (const element of form.querySelectorAll("input[required]")) {
    const input = /** @type {HTMLInputElement} */ (element);
    if (input.value.trim() !== "") continue;
    const target = form.querySelector(`.error[data-field="${input.name}"]`);
    if (target) tr(/** @type {HTMLElement} */ (target), "error_required");
    input.setAttribute("aria-invalid", "true");
    if (ok) input.focus();
    ok = false;
  }
  return ok;
}

/** Run `work` with the button showing it is busy. */
async function busy(/** @type {HTMLButtonElement} */ button, /** @type {() => Promise<void>} */ work) {
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  try {
    await work();
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
  }
}

/**
 * Tabs with the ARIA pattern: click or arrow keys select, only the selected tab is in the
 * tab order.
 * @param {{tab: HTMLElement, panel: HTMLElement}[]} tabs
 */
function setupTabs(tabs) {
  const select = (/** @type {number} */ index, focus = false) => {
    tabs.forEach(({ tab, panel }, i) => {
      tab.setAttribute("aria-selected", String(i === index));
      tab.tabIndex = i === index ? 0 : -1;
      panel.hidden = i !== index;
    });
    if (focus) tabs[index].tab.focus();
  };
  tabs.forEach(({ tab }, i) => {
    tab.addEventListener("click", () => select(i));
    tab.addEventListener("keydown", (event) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (step === undefined) return;
      event.preventDefault();
      select((i + step + tabs.length) % tabs.length, true);
    });
  });
  select(0);
  return select;
}

// ---------------------------------------------------------------------------------------
// header: user, logout, language

function showUser() {
  const who = /** @type {HTMLElement} */ (document.getElementById("who"));
  const logout = /** @type {HTMLButtonElement} */ (document.getElementById("logout"));
  who.hidden = logout.hidden = me === null;
  who.textContent = me?.display_name ?? "";
}

function setupHeader() {
  const select = /** @type {HTMLSelectElement} */ (document.getElementById("lang"));
  for (const [code, name] of Object.entries(LANGUAGES)) {
    select.append(h("option", { value: code, lang: code }, name));
  }
  select.value = currentLanguage();
  select.addEventListener("change", () => {
    setLanguage(select.value).catch((error) => console.error("language", error));
  });
  languageEvents.addEventListener("change", () => {
    select.value = currentLanguage();
  });
  document.getElementById("logout")?.addEventListener("click", async () => {
    await window.sfumesh?.conn?.leave();
    auth.logout();
    me = null;
    showUser();
    location.assign("/");
  });
}

// ---------------------------------------------------------------------------------------
// sign up / log in

/**
 * @param {() => void} next what to show once logged in
 * @param {{name: string} | null} [room] the room this is for, if any
 */
function showAuth(next, room = null) {
  const view = clone("tpl-auth");
  if (room !== null) {
    tr($(view, "#auth-title"), "auth_title_room", { room: room.name });
  }
  const login = /** @type {HTMLFormElement} */ ($(view, "#form-login"));
  const signup = /** @type {HTMLFormElement} */ ($(view, "#form-signup"));
  setupTabs([
    { tab: $(view, "#tab-login"), panel: login },
    { tab: $(view, "#tab-signup"), panel: signup },
  ]);

  const loggedIn = async () => {
    me = await auth.me();
    showUser();
    next();
  };
  login.addEventListener("submit", (event) => {
    event.preventDefault();
    clearErrors(login);
    if (!requireFields(login)) return;
    const data = new FormData(login);
    busy($(login, "button[type=submit]"), async () => {
      try {
        await auth.login(String(data.get("login")).trim(), String(data.get("password")));
      } catch (error) {
        showFormError(login, error);
        return;
      }
      await loggedIn();
    });
  });
  signup.addEventListener("submit", (event) => {
    event.preventDefault();
    clearErrors(signup);
    if (!requireFields(signup)) return;
    const data = Object.fromEntries(new FormData(signup));
    const body = {
      username: String(data.username).trim(),
      display_name: String(data.display_name).trim(),
      email: String(data.email).trim(),
      password: String(data.password),
    };
    busy($(signup, "button[type=submit]"), async () => {
      try {
        await request("POST", "/api/users", { body });
        await auth.login(body.username, body.password);
      } catch (error) {
        showFormError(signup, error);
        return;
      }
      await loggedIn();
    });
  });
  render(view);
}

// ---------------------------------------------------------------------------------------
// home: create a room, or a random one

const WORDS_A = ["sunny", "quiet", "brave", "lucky", "misty", "cosy", "merry", "swift", "bright", "gentle"];
const WORDS_B = ["otter", "lotus", "river", "panda", "maple", "heron", "comet", "bamboo", "lagoon", "falcon"];

function randomSlug() {
  const pick = (/** @type {string[]} */ words) => words[Math.floor(Math.random() * words.length)];
  return `${pick(WORDS_A)}-${pick(WORDS_B)}-${Math.floor(100 + Math.random() * 900)}`;
}

function showHome() {
  const view = clone("tpl-home");
  const form = /** @type {HTMLFormElement} */ ($(view, "#form-create"));
  const slugInput = /** @type {HTMLInputElement} */ ($(view, "#create-slug"));
  const status = /** @type {HTMLElement} */ ($(view, "#create-slug-status"));
  $(view, ".prefix").textContent = "/r/";
  const preview = /** @type {HTMLElement} */ ($(view, "#create-slug-preview"));
  document.title = "sfumesh";

  /** @type {AbortController | null} */
  let checking = null;
  /** @type {ReturnType<typeof setTimeout> | undefined} */
  let timer;
  const setStatus = (/** @type {string} */ state, /** @type {string} */ key, vars = {}) => {
    status.dataset.state = state;
    if (key) tr(status, key, vars);
    else {
      status.textContent = "";
      delete status.dataset.i18n;
    }
  };
  const check = async () => {
    const slug = slugInput.value.trim();
    checking?.abort();
    if (slug === "") return setStatus("", "");
    const controller = (checking = new AbortController());
    setStatus("checking", "slug_checking");
    try {
      const room = await request("GET", roomPath(slug), { signal: controller.signal });
      if (checking !== controller) return;
      setStatus("taken", "slug_taken", { room: room.slug });
      const link = h("a", { href: roomPage(room.slug) });
      tr(link, "join_it");
      status.append(" ", link);
    } catch (error) {
      if (checking !== controller || !(error instanceof ApiError)) return;
      if (error.code === "room_not_found") setStatus("free", "slug_free");
      else if (error.status === 404) setStatus("bad", "slug_invalid");
      else if (error.status === 422) {
        setStatus("bad", "");
        status.textContent = error.message.replace(/^slug: /, "");
      } else setStatus("", "");
    }
  };
  slugInput.addEventListener("input", () => {
    const slug = slugInput.value.trim();
    preview.textContent = slug ? `${location.host}/r/${slug}` : "";
    clearTimeout(timer);
    timer = setTimeout(check, 250);
  });

  const go = (/** @type {string} */ slug) => {
    sessionStorage.setItem(INVITE_KEY, slug);
    location.assign(roomPage(slug));
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    clearErrors(form);
    if (!requireFields(form)) return;
    const name = /** @type {HTMLInputElement} */ ($(form, "#create-name")).value.trim();
    const body = { slug: slugInput.value.trim(), ...(name ? { name } : {}) };
    busy($(form, "button[type=submit]"), async () => {
      try {
        const room = await request("POST", "/api/rooms", { token: auth.userToken(), body });
        go(room.slug);
      } catch (error) {
        if (error instanceof ApiError && error.status === 401) return logoutTo(showHome);
        showFormError(form, error);
      }
    });
  });

  const random = /** @type {HTMLButtonElement} */ ($(view, "#random-room"));
  const randomStatus = /** @type {HTMLElement} */ ($(view, "#random-status"));
  random.addEventListener("click", async () => {
    clearErrors(form);
    // Loading until the room's page replaces this one: creating it and moving there take
    // a moment, and a second click must not start another.
    random.disabled = true;
    random.setAttribute("aria-busy", "true");
    random.classList.add("loading");
    tr(random, "random_room_busy");
    tr(randomStatus, "random_room_busy");
    try {
      for (let tries = 0; tries < 5; tries++) {
        try {
          const room = await request("POST", "/api/rooms", {
            token: auth.userToken(),
            body: { slug: randomSlug() },
          });
          return go(room.slug);
        } catch (error) {
          if (!(error instanceof ApiError && error.code === "room_exists")) throw error;
        }
      }
      throw new ApiError(409, "room_exists", "no free name found");
    } catch (error) {
      random.disabled = false;
      random.removeAttribute("aria-busy");
      random.classList.remove("loading");
      tr(random, "random_room");
      randomStatus.textContent = "";
      delete randomStatus.dataset.i18n;
      if (error instanceof ApiError && error.status === 401) return logoutTo(showHome);
      showFormError(form, error);
    }
  });
  render(view);
}

function logoutTo(/** @type {() => void} */ next) {
  auth.logout();
  me = null;
  showUser();
  showAuth(next);
}

// ---------------------------------------------------------------------------------------
// notices in place of a room

/**
 * @param {string} titleKey @param {string} textKey @param {Record<string, string | number>} vars
 * @param {{key: string, action: () => void, primary?: boolean}[]} actions
 */
function showNotice(titleKey, textKey, vars = {}, actions = []) {
  const view = clone("tpl-notice");
  tr($(view, "#notice-title"), titleKey, vars);
  tr($(view, ".notice-text"), textKey, vars);
  const row = $(view, ".actions");
  for (const { key, action, primary } of actions) {
    const button = tr(h("button", { type: "button", class: primary ? "primary" : "secondary" }), key);
    button.addEventListener("click", action);
    row.append(button);
  }
  render(view);
}

const home = () => location.assign("/");

// ---------------------------------------------------------------------------------------
// the room

/** @param {string} slug */
async function showRoom(slug) {
  let room;
  try {
    room = await request("GET", roomPath(slug));
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) {
      const actions = [{ key: "go_home", action: home, primary: true }];
      return showNotice("room_not_found_title", "room_not_found_text", { room: slug }, actions);
    }
    if (error instanceof ApiError && error.status === 422) {
      return showNotice("room_invalid_title", "room_invalid_text", { room: slug }, [
        { key: "go_home", action: home, primary: true },
      ]);
    }
    return showNotice("error_title", "error_network", {}, [
      { key: "retry", action: () => showRoom(slug), primary: true },
    ]);
  }
  document.title = `${room.name} · sfumesh`;
  if (me === null) return showAuth(() => showRoom(slug), room);
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

/**
 * @typedef {{li: HTMLLIElement, video: HTMLVideoElement, stream: MediaStream,
 *   name: HTMLElement, initials: HTMLElement, self: boolean}} Tile
 * @typedef {{id: string, authorId: string, name: string, text: string, ts: string}} ChatMessage
 */

/** @param {any} room */
async function enterRoom(room) {
  const view = clone("tpl-room");
  const section = /** @type {HTMLElement} */ ($(view, ".room"));
  $(view, "#room-title").textContent = room.name;
  const grid = /** @type {HTMLUListElement} */ ($(view, "#grid"));
  const connStatus = /** @type {HTMLElement} */ ($(view, "#conn"));
  const messages = /** @type {HTMLOListElement} */ ($(view, "#messages"));
  const peopleList = /** @type {HTMLUListElement} */ ($(view, "#people"));
  const peopleCount = /** @type {HTMLElement} */ ($(view, "#people-count"));
  const chatForm = /** @type {HTMLFormElement} */ ($(view, "#chat-form"));
  const chatText = /** @type {HTMLTextAreaElement} */ ($(view, "#chat-text"));
  const chatError = /** @type {HTMLElement} */ ($(view, "#chat-error"));
  const unmuteAudio = /** @type {HTMLButtonElement} */ ($(view, "#unmute-audio"));
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

  /** @type {Map<string, Tile>} */
  const tiles = new Map();
  /** @type {Map<string, {session_id: string, user_id: string, display_name: string, node: string}>} */
  const participants = new Map();
  let selfSession = "";

  // -- video grid ----------------------------------------------------------------------

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

  const initialsOf = (/** @type {string} */ name) =>
    name
      .split(/\s+/)
      .filter(Boolean)
      .slice(0, 2)
      .map((part) => [...part][0]?.toUpperCase() ?? "")
      .join("") || "?";

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

  unmuteAudio.addEventListener("click", () => {
    for (const tile of tiles.values()) tile.video.play().catch(() => {});
    unmuteAudio.hidden = true;
  });

  tileFor("self", me?.display_name ?? "", true);

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
    if (p.session_id !== selfSession) tileFor(p.session_id, p.display_name);
  };

  // -- chat ----------------------------------------------------------------------------

  const chat = { cursor: /** @type {string | null} */ (null), loading: false, started: false };
  /** @type {Set<string>} */
  const seen = new Set();
  const timeFormat = () =>
    new Intl.DateTimeFormat(currentLanguage(), { hour: "2-digit", minute: "2-digit" });
  const olderButton = tr(h("button", { type: "button", class: "link older" }), "load_older");
  olderButton.hidden = true;
  const olderItem = h("li", { class: "older-item" }, olderButton);
  messages.append(olderItem);

  const nearBottom = () => messages.scrollHeight - messages.scrollTop - messages.clientHeight < 60;

  /** @param {ChatMessage} message */
  const messageItem = (message) => {
    const time = h("time", { datetime: message.ts }, timeFormat().format(new Date(message.ts)));
    const li = h(
      "li",
      { class: message.authorId === me?.id ? "message mine" : "message", "data-id": message.id, "data-ts": message.ts },
      h("div", { class: "meta" }, h("strong", {}, message.name), " ", time),
      h("div", { class: "text" }, message.text),
    );
    return li;
  };

  /** Insert messages in (ts, id) order, each once. @param {ChatMessage[]} list */
  const insertMessages = (list) => {
    for (const message of list) {
      if (seen.has(message.id)) continue;
      seen.add(message.id);
      const li = messageItem(message);
      const key = `${message.ts}\u0000${message.id}`;
      let before = null;
      for (let node = messages.lastElementChild; node !== null && node !== olderItem; node = node.previousElementSibling) {
        const el = /** @type {HTMLElement} */ (node);
        if (`${el.dataset.ts}\u0000${el.dataset.id}` <= key) break;
        before = el;
      }
      messages.insertBefore(li, before);
    }
  };

  /** @param {any} m history item */
  const fromHistory = (m) => ({ id: m.id, authorId: m.author.id, name: m.author.display_name, text: m.text, ts: normalTs(m.ts) });
  /** @param {any} m live item */
  const fromLive = (m) => ({ id: m.id, authorId: m.from.user_id, name: m.from.display_name, text: m.text, ts: normalTs(m.ts) });

  /** @param {string | null} before */
  const fetchPage = async (before) => {
    const token = await auth.sessionToken();
    const query = new URLSearchParams({ before: before ?? "", limit: String(HISTORY_PAGE) });
    return request("GET", `${roomPath(room.slug)}/messages?${query}`, { token });
  };

  /** Newest page (on every (re)join: fills what was missed while away). */
  const loadLatest = async () => {
    const page = await fetchPage(null);
    const stick = nearBottom() || !chat.started;
    insertMessages(page.messages.map(fromHistory));
    if (!chat.started) {
      chat.started = true;
      chat.cursor = page.next_before;
      olderButton.hidden = chat.cursor === null;
    }
    if (stick) messages.scrollTop = messages.scrollHeight;
    await fillUp();
  };

  const loadOlder = async () => {
    if (chat.cursor === null || chat.loading) return;
    chat.loading = true;
    messages.setAttribute("aria-busy", "true");
    try {
      const page = await fetchPage(chat.cursor);
      const height = messages.scrollHeight;
      insertMessages(page.messages.map(fromHistory));
      messages.scrollTop += messages.scrollHeight - height;
      chat.cursor = page.next_before;
      olderButton.hidden = chat.cursor === null;
    } finally {
      chat.loading = false;
      messages.removeAttribute("aria-busy");
    }
  };

  /** While the list does not fill its box, no scroll can ask for more: ask now. */
  const fillUp = async () => {
    while (chat.cursor !== null && messages.scrollHeight <= messages.clientHeight + 10) {
      await loadOlder();
    }
  };

  messages.addEventListener("scroll", () => {
    if (messages.scrollTop < 80) loadOlder().catch((error) => console.warn("history", error));
  });
  olderButton.addEventListener("click", () => loadOlder().catch((error) => showErrorIn(chatError, error)));

  chatForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = chatText.value.trim();
    if (text === "") return;
    chatError.textContent = "";
    delete chatError.dataset.i18n;
    try {
      await conn.chat(text);
      chatText.value = "";
    } catch (error) {
      showErrorIn(chatError, error instanceof ApiError ? error : new ApiError(0, "not_connected", String(error)));
    }
  });
  chatText.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      chatForm.requestSubmit();
    }
  });

  // -- connection ----------------------------------------------------------------------

  const conn = new RoomConnection({
    slug: room.slug,
    sessionToken: (renew) => auth.sessionToken(renew),
    localStream,
  });
  window.sfumesh = { conn, room, tiles, participants };

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
    for (const key of [...tiles.keys()]) if (key !== "self") removeTile(key);
    selfSession = self?.session_id ?? selfSession;
    for (const p of list) addParticipant(p);
    if (self) participants.set(self.session_id, self);
    renderPeople();
    loadLatest().catch((error) => showErrorIn(chatError, error));
    if (sessionStorage.getItem(INVITE_KEY) === room.slug) {
      sessionStorage.removeItem(INVITE_KEY);
      openInvite(room, buttons.invite);
    }
  });
  conn.addEventListener("participant-joined", (event) => {
    addParticipant(/** @type {CustomEvent} */ (event).detail.participant);
    renderPeople();
  });
  conn.addEventListener("participant-left", (event) => {
    const sessionId = /** @type {CustomEvent} */ (event).detail.session_id;
    participants.delete(sessionId);
    removeTile(sessionId);
    renderPeople();
  });
  conn.addEventListener("chat", (event) => {
    const message = fromLive(/** @type {CustomEvent} */ (event).detail.message);
    const stick = nearBottom() || message.authorId === me?.id;
    insertMessages([message]);
    if (stick) messages.scrollTop = messages.scrollHeight;
  });
  conn.addEventListener("track", (event) => {
    const { track, owner, mid } = /** @type {CustomEvent} */ (event).detail;
    const key = owner?.session_id ?? `mid-${mid}`;
    const name = participants.get(key)?.display_name ?? "…";
    const tile = tileFor(key, name);
    for (const old of tile.stream.getTracks()) if (old.kind === track.kind) tile.stream.removeTrack(old);
    tile.stream.addTrack(track);
    track.addEventListener("unmute", () => updateTile(tile));
    track.addEventListener("mute", () => updateTile(tile));
    updateTile(tile);
  });
  conn.addEventListener("trackended", (event) => {
    const { track } = /** @type {CustomEvent} */ (event).detail;
    for (const tile of tiles.values()) {
      if (!tile.self && tile.stream.getTracks().includes(track)) {
        tile.stream.removeTrack(track);
        updateTile(tile);
      }
    }
  });
  conn.addEventListener("media", (event) => {
    if (/** @type {CustomEvent} */ (event).detail.media !== null) return;
    // The connection dropped: remote tracks come again with the next subscribe offer.
    for (const tile of tiles.values()) {
      if (tile.self) continue;
      for (const track of tile.stream.getTracks()) tile.stream.removeTrack(track);
      updateTile(tile);
    }
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
        { key: "go_home", action: home },
      ]);
    } else if (reason === "room-full") {
      showNotice("room_full_title", "room_full_text", { capacity: room.capacity, room: room.name }, [
        { key: "retry", primary: true, action: () => showRoom(room.slug) },
        { key: "go_home", action: home },
      ]);
    } else if (reason === "unauthorized") {
      logoutTo(() => showRoom(room.slug));
    } else {
      const text = message || reason;
      showNotice("error_title", "room_ended_text", { reason: text }, [
        { key: "retry", primary: true, action: () => showRoom(room.slug) },
        { key: "go_home", action: home },
      ]);
    }
  });

  // -- controls ------------------------------------------------------------------------

  const audioTracks = localStream?.getAudioTracks() ?? [];
  const videoTracks = localStream?.getVideoTracks() ?? [];
  buttons.mic.disabled = audioTracks.length === 0;
  buttons.cam.disabled = videoTracks.length === 0;
  const syncMic = () => {
    const muted = audioTracks.length === 0 || !audioTracks[0].enabled;
    buttons.mic.setAttribute("aria-pressed", String(muted));
    tr($(buttons.mic, ".label"), muted ? "unmute" : "mute");
  };
  const syncCam = () => {
    const off = videoTracks.length === 0 || !videoTracks[0].enabled;
    buttons.cam.setAttribute("aria-pressed", String(off));
    tr($(buttons.cam, ".label"), off ? "camera_on" : "camera_off");
    const self = tiles.get("self");
    if (self) updateTile(self);
  };
  buttons.mic.addEventListener("click", () => {
    for (const track of audioTracks) track.enabled = !track.enabled;
    syncMic();
  });
  buttons.cam.addEventListener("click", () => {
    for (const track of videoTracks) track.enabled = !track.enabled;
    syncCam();
  });
  syncMic();
  syncCam();

  buttons.invite.addEventListener("click", () => openInvite(room, buttons.invite));

  // Fullscreen: the button asks, the browser decides; the UI follows `fullscreenchange`
  // alone, so leaving by Esc (or any other way) keeps it right.
  const doc = /** @type {any} */ (document);
  const fullscreenElement = () => doc.fullscreenElement ?? doc.webkitFullscreenElement ?? null;
  const canFullscreen = Boolean(doc.fullscreenEnabled ?? doc.webkitFullscreenEnabled);
  buttons.fullscreen.hidden = !canFullscreen;
  const syncFullscreen = () => {
    const on = fullscreenElement() !== null;
    document.body.classList.toggle("fullscreen", on);
    buttons.fullscreen.setAttribute("aria-pressed", String(on));
    tr($(buttons.fullscreen, ".label"), on ? "exit_fullscreen" : "fullscreen");
    layout();
  };
  buttons.fullscreen.addEventListener("click", async () => {
    try {
      if (fullscreenElement() !== null) await (doc.exitFullscreen ?? doc.webkitExitFullscreen).call(doc);
      else {
        const target = /** @type {any} */ (section);
        await (target.requestFullscreen ?? target.webkitRequestFullscreen).call(target);
      }
    } catch (error) {
      console.warn("fullscreen", error);
    }
  });
  document.addEventListener("fullscreenchange", syncFullscreen);
  document.addEventListener("webkitfullscreenchange", syncFullscreen);
  syncFullscreen();

  const stopLocal = () => {
    for (const track of localStream?.getTracks() ?? []) track.stop();
  };
  buttons.leave.addEventListener("click", async () => {
    buttons.leave.disabled = true;
    await conn.leave();
    stopLocal();
    location.assign("/");
  });

  // -- tabs (chat / people) ------------------------------------------------------------
  setupTabs([
    { tab: $(section, "#tab-chat"), panel: /** @type {HTMLElement} */ ($(section, "#panel-chat")) },
    { tab: $(section, "#tab-people"), panel: /** @type {HTMLElement} */ ($(section, "#panel-people")) },
  ]);

  const relabel = () => {
    for (const li of messages.querySelectorAll("li.message time")) {
      const time = /** @type {HTMLTimeElement} */ (li);
      time.textContent = timeFormat().format(new Date(time.dateTime));
    }
  };
  languageEvents.addEventListener("change", relabel);

  teardown = () => {
    resize.disconnect();
    languageEvents.removeEventListener("change", relabel);
    document.removeEventListener("fullscreenchange", syncFullscreen);
    document.removeEventListener("webkitfullscreenchange", syncFullscreen);
    document.body.classList.remove("in-room", "fullscreen");
  };

  conn.start();
}

/** Timestamps without a zone are the node's UTC. */
function normalTs(/** @type {string} */ ts) {
  const iso = /[zZ]|[+-]\d\d:?\d\d$/.test(ts) ? ts : `${ts}Z`;
  return new Date(iso).toISOString();
}

// ---------------------------------------------------------------------------------------
// invite: link, copy, QR code, native share sheet

/** @param {any} room @param {HTMLElement} opener */
function openInvite(room, opener) {
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
  link.value = room.url || new URL(roomPage(room.slug), location.origin).href;
  let readable = link.value;
  try {
    readable = decodeURI(link.value);
  } catch {
    // shown encoded
  }
  $(dialog, "#invite-address").textContent = readable.replace(/^https?:\/\//, "");
  dialog.dataset.title = room.name;
  /** @type {HTMLImageElement} */ ($(dialog, "#invite-qr")).src = `${roomPath(room.slug)}/qr.svg`;
  const copied = $(dialog, "#invite-copied");
  copied.textContent = "";
  delete (/** @type {HTMLElement} */ (copied).dataset.i18n);
  dialog.addEventListener("close", () => opener.focus(), { once: true });
  dialog.showModal();
  /** @type {HTMLElement} */ ($(dialog, "#invite-copy")).focus();
}

// ---------------------------------------------------------------------------------------
// start

function route() {
  const match = location.pathname.match(/^\/r\/(.+)$/);
  if (match) {
    let slug = match[1];
    try {
      slug = decodeURIComponent(slug);
    } catch {
      // shown as typed; the API says what is wrong with it
    }
    return showRoom(slug);
  }
  if (me === null) return showAuth(showHome);
  return showHome();
}

async function boot() {
  try {
    await setLanguage(preferredLanguage());
  } catch (error) {
    console.error("language bundle", error);
    await setLanguage("en").catch(() => {});
  }
  setupHeader();
  try {
    me = await auth.me();
  } catch (error) {
    console.warn("profile", error);
  }
  showUser();
  document.body.classList.remove("loading");
  await route();
}

boot();
