// Home: create a room under a chosen name (checked while typing), or a random one.

import { ApiError, auth, request, roomPage, roomPath } from "../api.js";
import { tr } from "../i18n.js";
import { logoutTo } from "./auth.js";
import { $, clone, h, render } from "./dom.js";
import { busy, clearErrors, requireFields, showFormError } from "./forms.js";
import { INVITE_KEY } from "./invite.js";

const WORDS_A = ["sunny", "quiet", "brave", "lucky", "misty", "cosy", "merry", "swift", "bright", "gentle"];
const WORDS_B = ["otter", "lotus", "river", "panda", "maple", "heron", "comet", "bamboo", "lagoon", "falcon"];

// Lower-case base32 (RFC 4648's letters, lower-cased: slugs are case-folded).
const BASE32 = "abcdefghijklmnopqrstuvwxyz234567";
// 26 base32 characters = 130 bits from the browser's secure generator: a random room's
// name cannot be guessed (two words before it keep it readable; they add no secrecy).
const SUFFIX_CHARS = 26;

/** A random room name: two words and 130 secure random bits, at most 40 characters. */
export function randomSlug() {
  const bytes = crypto.getRandomValues(new Uint8Array(SUFFIX_CHARS));
  // 256 is a multiple of 32: each byte modulo 32 is uniform, 5 bits per character.
  const suffix = Array.from(bytes, (byte) => BASE32[byte % 32]).join("");
  const pick = (/** @type {string[]} */ words, /** @type {number} */ byte) => words[byte % words.length];
  const [a, b] = crypto.getRandomValues(new Uint8Array(2));
  return `${pick(WORDS_A, a)}-${pick(WORDS_B, b)}-${suffix}`;
}

export function showHome() {
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
