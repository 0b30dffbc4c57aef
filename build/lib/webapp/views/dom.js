// The DOM helpers every view shares: cloning a view's <template>, swapping the main view,
// finding and making elements, and tabs.

import { translate } from "../i18n.js";

const main = /** @type {HTMLElement} */ (document.getElementById("main"));

/** @type {(() => void) | null} what to undo when the view changes */
let teardown = null;

/** @param {string} id */
export function clone(id) {
  const template = /** @type {HTMLTemplateElement} */ (document.getElementById(id));
  const fragment = /** @type {DocumentFragment} */ (template.content.cloneNode(true));
  translate(fragment);
  return fragment;
}

/** Replace the main view; focus its heading so screen readers and keyboards follow. */
export function render(/** @type {DocumentFragment} */ fragment) {
  teardown?.();
  teardown = null;
  main.replaceChildren(fragment);
  const heading = main.querySelector("h1");
  if (heading) {
    heading.tabIndex = -1;
    heading.focus({ preventScroll: true });
  }
}

/** What the current view leaves behind (observers, listeners), undone by the next render. */
export function setTeardown(/** @type {() => void} */ undo) {
  teardown = undo;
}

/**
 * @template {Element} T
 * @param {ParentNode} root @param {string} selector @returns {T}
 */
export function $(root, selector) {
  const found = root.querySelector(selector);
  if (found === null) throw new Error(`missing ${selector}`);
  return /** @type {T} */ (/** @type {unknown} */ (found));
}

/**
 * @param {string} tag @param {Record<string, string>} [attrs] @param {(Node | string)[]} children
 */
export function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) element.setAttribute(name, value);
  element.append(...children);
  return element;
}

/**
 * Tabs with the ARIA pattern: click or arrow keys select, only the selected tab is in the
 * tab order.
 * @param {{tab: HTMLElement, panel: HTMLElement}[]} tabs
 */
export function setupTabs(tabs) {
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
