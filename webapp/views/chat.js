// The room's chat: history paged in as the list scrolls up, live messages, sending.

import { ApiError, auth, request, roomPath } from "../api.js";
import { currentLanguage, languageEvents, tr } from "../i18n.js";
import { $, h } from "./dom.js";
import { showErrorIn } from "./forms.js";
import { currentUser } from "./user.js";

/** @typedef {{id: string, authorId: string, name: string, text: string, ts: string, file?: any}} ChatMessage */

const HISTORY_PAGE = 30;

/**
 * @param {ParentNode} root the room, holding the chat's list and form
 * @param {string} slug
 * @param {(text: string) => Promise<unknown>} send
 * @param {(file: any) => Node} [fileContent] what a message sharing a file shows (Memories)
 */
export function chatPanel(root, slug, send, fileContent) {
  const messages = /** @type {HTMLOListElement} */ ($(root, "#messages"));
  const chatForm = /** @type {HTMLFormElement} */ ($(root, "#chat-form"));
  const chatText = /** @type {HTMLTextAreaElement} */ ($(root, "#chat-text"));
  const chatError = /** @type {HTMLElement} */ ($(root, "#chat-error"));

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
      { class: message.authorId === currentUser()?.id ? "message mine" : "message", "data-id": message.id, "data-ts": message.ts },
      h("div", { class: "meta" }, h("strong", {}, message.name), " ", time),
      message.file && fileContent
        ? h("div", { class: "text file" }, fileContent(message.file))
        : h("div", { class: "text" }, message.text),
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
  const fromHistory = (m) => ({ id: m.id, authorId: m.author.id, name: m.author.display_name, text: m.text, ts: normalTs(m.ts), file: m.file ?? undefined });
  /** @param {any} m live item */
  const fromLive = (m) => ({ id: m.id, authorId: m.from.user_id, name: m.from.display_name, text: m.text, ts: normalTs(m.ts), file: m.file ?? undefined });

  /** @param {string | null} before */
  const fetchPage = async (before) => {
    const token = await auth.sessionToken();
    const query = new URLSearchParams({ before: before ?? "", limit: String(HISTORY_PAGE) });
    return request("GET", `${roomPath(slug)}/messages?${query}`, { token });
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
      await send(text);
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

  const relabel = () => {
    for (const li of messages.querySelectorAll("li.message time")) {
      const time = /** @type {HTMLTimeElement} */ (li);
      time.textContent = timeFormat().format(new Date(time.dateTime));
    }
  };
  languageEvents.addEventListener("change", relabel);

  return {
    catchUp: () => loadLatest().catch((error) => showErrorIn(chatError, error)),
    /** @param {any} live a message from the room connection */
    receive: (live) => {
      const message = fromLive(live);
      const stick = nearBottom() || message.authorId === currentUser()?.id;
      insertMessages([message]);
      if (stick) messages.scrollTop = messages.scrollHeight;
    },
    /** A message taken back (its shared file was deleted). @param {string} id */
    remove: (id) => messages.querySelector(`li.message[data-id="${CSS.escape(id)}"]`)?.remove(),
    stop: () => languageEvents.removeEventListener("change", relabel),
  };
}

/** Timestamps without a zone are the node's UTC. */
function normalTs(/** @type {string} */ ts) {
  const iso = /[zZ]|[+-]\d\d:?\d\d$/.test(ts) ? ts : `${ts}Z`;
  return new Date(iso).toISOString();
}
