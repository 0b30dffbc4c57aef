// Notices shown in place of a room (not found, full, replaced, ended), with their actions.

import { tr } from "../i18n.js";
import { $, clone, h, render } from "./dom.js";

/**
 * @param {string} titleKey @param {string} textKey @param {Record<string, string | number>} vars
 * @param {{key: string, action: () => void, primary?: boolean}[]} actions
 */
export function showNotice(titleKey, textKey, vars = {}, actions = []) {
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

export const goHome = () => location.assign("/");
