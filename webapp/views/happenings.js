// The room's happenings: upcoming first, past below; plan or change one (date, time and
// zone, the browser's zone by default), answer going / maybe / not going, add to calendar.
// Live `happening` events from the room connection redraw one happening on every page.

import { ApiError, auth, request, roomPath } from "../api.js";
import { currentLanguage, languageEvents, t, tr } from "../i18n.js";
import { $, h } from "./dom.js";
import { showErrorIn } from "./forms.js";
import { currentUser } from "./user.js";

const ANSWERS = /** @type {const} */ (["going", "maybe", "not_going"]);

/** The browser's IANA zone ("UTC" when it will not say). */
export function browserZone() {
  try {
    return Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
  } catch {
    return "UTC";
  }
}

/** Every zone the browser knows, the given ones first if missing. @param {string[]} must */
function zones(must) {
  /** @type {string[]} */
  let all = [];
  try {
    all = /** @type {any} */ (Intl).supportedValuesOf("timeZone");
  } catch {
    all = [];
  }
  const set = new Set([...must, "UTC", ...all]);
  return [...set].sort();
}

/**
 * @param {ParentNode} root the room, holding the panel
 * @param {{slug: string, creator_id: string}} room
 */
export function happeningsPanel(root, room) {
  const panel = /** @type {HTMLElement} */ ($(root, "#panel-happenings"));
  const upcoming = /** @type {HTMLOListElement} */ ($(panel, "#happenings-upcoming"));
  const past = /** @type {HTMLOListElement} */ ($(panel, "#happenings-past"));
  const pastHeading = /** @type {HTMLElement} */ ($(panel, "#happenings-past-title"));
  const newButton = /** @type {HTMLButtonElement} */ ($(panel, "#happening-new"));
  const form = /** @type {HTMLFormElement} */ ($(panel, "#happening-form"));
  const errorBox = /** @type {HTMLElement} */ ($(panel, "#happening-error"));
  const count = /** @type {HTMLElement} */ ($(root, "#happenings-count"));
  const field = (/** @type {string} */ name) => /** @type {HTMLInputElement} */ (form.elements.namedItem(name));
  const zoneSelect = /** @type {HTMLSelectElement} */ (form.elements.namedItem("zone"));

  /** @type {Map<string, any>} */
  const known = new Map();
  /** @type {string | null} the happening being edited */
  let editing = null;

  const fillZones = (/** @type {string} */ selected) => {
    zoneSelect.replaceChildren(...zones([selected]).map((zone) => h("option", { value: zone }, zone)));
    zoneSelect.value = selected;
  };

  const when = (/** @type {any} */ item) => {
    const format = new Intl.DateTimeFormat(currentLanguage(), { dateStyle: "medium", timeStyle: "short" });
    let text = format.format(new Date(item.start));
    if (item.zone !== browserZone()) {
      const there = new Intl.DateTimeFormat(currentLanguage(), { timeStyle: "short", timeZone: item.zone });
      text += ` (${there.format(new Date(item.start))} ${item.zone})`;
    }
    return text;
  };

  const mayChange = (/** @type {any} */ item) => {
    const me = currentUser()?.id;
    return me !== undefined && (me === item.creator_id || me === room.creator_id);
  };

  /** @param {any} item */
  const card = (item) => {
    const me = currentUser()?.id;
    const mine = item.rsvps.find((/** @type {any} */ r) => r.user_id === me);
    const li = h("li", { class: item.cancelled ? "happening cancelled" : "happening", "data-id": item.id });
    const title = h("h3", {}, item.title);
    if (item.cancelled) title.append(" ", tr(h("span", { class: "tag" }), "happening_cancelled"));
    li.append(title, h("p", { class: "when" }, h("time", { datetime: item.start }, when(item))));
    if (item.place || item.place_url) {
      const place = h("p", { class: "place" }, item.place);
      if (item.place_url) place.append(" ", h("a", { href: item.place_url, rel: "noopener noreferrer", target: "_blank" }, item.place_url));
      li.append(place);
    }
    if (item.description) li.append(h("p", { class: "description" }, item.description));
    const counts = h("p", { class: "counts" });
    counts.append(tr(h("span", { class: "count-going" }), "happening_going_count", { n: item.counts.going }));
    if (item.capacity) counts.append(" ", tr(h("span", {}), "happening_of_capacity", { n: item.capacity }));
    if (item.counts.waitlisted) counts.append(" · ", tr(h("span", { class: "count-waitlisted" }), "happening_waitlisted_count", { n: item.counts.waitlisted }));
    counts.append(" · ", tr(h("span", { class: "count-maybe" }), "happening_maybe_count", { n: item.counts.maybe }));
    li.append(counts);
    const names = item.rsvps
      .filter((/** @type {any} */ r) => r.status !== "not_going")
      .map((/** @type {any} */ r) => h("li", { class: `rsvp ${r.status}` }, r.display_name, " ", tr(h("span", { class: "tag" }), `rsvp_${r.status}`)));
    if (names.length) li.append(h("ul", { class: "names" }, ...names));
    const actions = h("div", { class: "actions" });
    if (!item.cancelled) {
      for (const answer of ANSWERS) {
        const button = tr(h("button", { type: "button", class: `rsvp-${answer}`, "aria-pressed": String(mine?.answer === answer) }), `rsvp_${answer}`);
        button.addEventListener("click", () => answerWith(item.id, answer).catch((error) => showErrorIn(errorBox, error)));
        actions.append(button);
      }
    }
    const ics = tr(h("button", { type: "button", class: "link add-calendar" }), "add_to_calendar");
    ics.addEventListener("click", () => download(item.id).catch((error) => showErrorIn(errorBox, error)));
    actions.append(ics);
    if (mayChange(item) && !item.cancelled) {
      const edit = tr(h("button", { type: "button", class: "link edit" }), "edit");
      edit.addEventListener("click", () => openForm(item));
      const cancel = tr(h("button", { type: "button", class: "link danger cancel" }), "happening_cancel");
      cancel.addEventListener("click", () => cancelIt(item.id).catch((error) => showErrorIn(errorBox, error)));
      actions.append(edit, cancel);
    }
    li.append(actions);
    if (mine?.status === "waitlisted") li.append(tr(h("p", { class: "hint" }), "happening_your_place", { n: mine.position }));
    return li;
  };

  const draw = () => {
    const now = Date.now();
    const items = [...known.values()];
    const isPast = (/** @type {any} */ item) => new Date(item.end ?? item.start).getTime() < now;
    const ahead = items.filter((item) => !isPast(item)).sort((a, b) => a.start.localeCompare(b.start));
    const gone = items.filter(isPast).sort((a, b) => b.start.localeCompare(a.start));
    upcoming.replaceChildren(...ahead.map(card));
    past.replaceChildren(...gone.map(card));
    pastHeading.hidden = gone.length === 0;
    count.textContent = String(ahead.filter((item) => !item.cancelled).length);
  };

  const path = (/** @type {string} */ id) => `/api/happenings/${encodeURIComponent(id)}`;

  const load = async () => {
    const token = await auth.sessionToken();
    const list = await request("GET", `${roomPath(room.slug)}/happenings`, { token });
    known.clear();
    for (const item of list.happenings) known.set(item.id, item);
    draw();
  };

  /** @param {string} id @param {string} answer */
  const answerWith = async (id, answer) => {
    const token = await auth.sessionToken();
    const item = await request("PUT", `${path(id)}/rsvp`, { token, body: { answer } });
    known.set(item.id, item);
    draw();
  };

  const cancelIt = async (/** @type {string} */ id) => {
    if (!confirm(t("happening_cancel_confirm"))) return;
    const token = await auth.sessionToken();
    const item = await request("DELETE", path(id), { token });
    known.set(item.id, item);
    draw();
  };

  const download = async (/** @type {string} */ id) => {
    const token = await auth.sessionToken();
    const reply = await fetch(`${path(id)}/event.ics`, { headers: { authorization: `Bearer ${token}` } });
    if (!reply.ok) throw new ApiError(reply.status, "ics", reply.statusText);
    const url = URL.createObjectURL(await reply.blob());
    const link = h("a", { href: url, download: "happening.ics" });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  };

  /** @param {any} [item] the happening to change; none: a new one */
  const openForm = (item) => {
    editing = item?.id ?? null;
    form.hidden = false;
    newButton.hidden = true;
    errorBox.textContent = "";
    const zone = item?.zone ?? browserZone();
    fillZones(zone);
    const local = item?.start_local ?? "";
    field("title").value = item?.title ?? "";
    field("date").value = local.slice(0, 10);
    field("time").value = local.slice(11, 16) || "10:00";
    field("place").value = item?.place ?? "";
    field("place_url").value = item?.place_url ?? "";
    field("capacity").value = item?.capacity ? String(item.capacity) : "";
    field("description").value = item?.description ?? "";
    field("title").focus();
  };

  const closeForm = () => {
    form.hidden = true;
    newButton.hidden = false;
    editing = null;
    form.reset();
  };

  newButton.addEventListener("click", () => openForm());
  $(form, ".cancel-form").addEventListener("click", closeForm);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    errorBox.textContent = "";
    const capacity = field("capacity").value.trim();
    const placeUrl = field("place_url").value.trim();
    const body = {
      title: field("title").value,
      description: field("description").value,
      start: `${field("date").value}T${field("time").value}`,
      zone: zoneSelect.value,
      place: field("place").value,
      place_url: placeUrl === "" ? null : placeUrl,
      capacity: capacity === "" ? null : Number(capacity),
    };
    try {
      const token = await auth.sessionToken();
      const item = editing === null
        ? await request("POST", `${roomPath(room.slug)}/happenings`, { token, body })
        : await request("PATCH", path(editing), { token, body });
      known.set(item.id, item);
      draw();
      closeForm();
    } catch (error) {
      showErrorIn(errorBox, error);
    }
  });

  languageEvents.addEventListener("change", draw);
  const timer = setInterval(draw, 60_000); // upcoming becomes past

  return {
    load: () => load().catch((error) => showErrorIn(errorBox, error)),
    /** @param {any} event a `happening` message from the room connection */
    receive: (event) => {
      if (!event?.happening?.id) return;
      known.set(event.happening.id, event.happening);
      draw();
    },
    stop: () => {
      languageEvents.removeEventListener("change", draw);
      clearInterval(timer);
    },
  };
}
