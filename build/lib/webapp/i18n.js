// Languages, loaded on demand: only the chosen language's bundle is fetched
// (/static/i18n/<lang>.json), and another only when the user switches to it.
//
// Elements say what they show with data attributes, so a switch re-translates the page in
// place, whatever state it is in:
// - data-i18n="key" (textContent), with data-i18n-vars='{"name": "..."}' for placeholders;
// - data-i18n-attr="aria-label:key;placeholder:key2" (attributes).

export const LANGUAGES = /** @type {const} */ ({ en: "English", vi: "Tiếng Việt" });
const STORAGE_KEY = "sfumesh.lang";

/** @type {Map<string, Record<string, string>>} */
const bundles = new Map();
/** @type {Record<string, string>} */
let strings = {};
let current = "en";

export const languageEvents = new EventTarget();

export function currentLanguage() {
  return current;
}

/** The stored choice, else the browser's first supported language, else English. */
export function preferredLanguage() {
  const stored = localStorage.getItem(STORAGE_KEY);
  if (stored !== null && stored in LANGUAGES) return stored;
  for (const tag of navigator.languages ?? [navigator.language]) {
    const base = tag.toLowerCase().split("-")[0];
    if (base in LANGUAGES) return base;
  }
  return "en";
}

/** Fetch the language's bundle (once), make it current and re-translate the page. */
export async function setLanguage(/** @type {string} */ lang) {
  if (!(lang in LANGUAGES)) lang = "en";
  let bundle = bundles.get(lang);
  if (bundle === undefined) {
    const reply = await fetch(`/static/i18n/${lang}.json`);
    if (!reply.ok) throw new Error(`language ${lang}: HTTP ${reply.status}`);
    bundle = /** @type {Record<string, string>} */ (await reply.json());
    bundles.set(lang, bundle);
  }
  strings = bundle;
  current = lang;
  localStorage.setItem(STORAGE_KEY, lang);
  document.documentElement.lang = lang;
  translate(document);
  languageEvents.dispatchEvent(new CustomEvent("change", { detail: { lang } }));
}

/**
 * The string for `key` with {placeholders} filled; the key itself if the bundle lacks it.
 * @param {string} key @param {Record<string, string | number>} [vars]
 */
export function t(key, vars = {}) {
  const text = strings[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (whole, name) => (name in vars ? String(vars[name]) : whole));
}

/**
 * Show `key` in `element` now and after every language switch.
 * @param {HTMLElement} element @param {string} key @param {Record<string, string | number>} [vars]
 */
export function tr(element, key, vars) {
  element.dataset.i18n = key;
  if (vars) element.dataset.i18nVars = JSON.stringify(vars);
  else delete element.dataset.i18nVars;
  element.textContent = t(key, vars);
  return element;
}

/**
 * Set a translated attribute now and after every language switch.
 * @param {HTMLElement} element @param {string} attribute @param {string} key
 */
export function trAttr(element, attribute, key) {
  const pairs = (element.dataset.i18nAttr ?? "")
    .split(";")
    .filter((pair) => pair && !pair.startsWith(`${attribute}:`));
  element.dataset.i18nAttr = [...pairs, `${attribute}:${key}`].join(";");
  element.setAttribute(attribute, t(key));
  return element;
}

/** Translate every marked element under `root`. */
export function translate(/** @type {ParentNode} */ root) {
  for (const element of root.querySelectorAll("[data-i18n]")) {
    const el = /** @type {HTMLElement} */ (element);
    let vars = {};
    try {
      vars = JSON.parse(el.dataset.i18nVars ?? "{}");
    } catch {
      // a malformed value shows the placeholders, which is still readable
    }
    el.textContent = t(el.dataset.i18n ?? "", vars);
  }
  for (const element of root.querySelectorAll("[data-i18n-attr]")) {
    const el = /** @type {HTMLElement} */ (element);
    for (const pair of (el.dataset.i18nAttr ?? "").split(";")) {
      const [attribute, key] = pair.split(":");
      if (attribute && key) el.setAttribute(attribute, t(key));
    }
  }
}
