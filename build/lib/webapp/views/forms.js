// Forms and errors: required fields, the API's field errors under the fields they name,
// a readable message for any error, a busy submit button.

import { ApiError } from "../api.js";
import { t, tr } from "../i18n.js";
import { $ } from "./dom.js";

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
export function showErrorIn(element, error) {
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

export function clearErrors(/** @type {HTMLFormElement} */ form) {
  for (const element of form.querySelectorAll(".error")) {
    const el = /** @type {HTMLElement} */ (element);
    el.textContent = "";
    delete el.dataset.i18n;
  }
  for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
}

/** Put an API error under the fields it names, or at the form's foot. */
export function showFormError(/** @type {HTMLFormElement} */ form, /** @type {unknown} */ error) {
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
export function requireFields(/** @type {HTMLFormElement} */ form) {
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
export async function busy(/** @type {HTMLButtonElement} */ button, /** @type {() => Promise<void>} */ work) {
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  try {
    await work();
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
  }
}
