// The site header's controls: the language switch and log out.

import { auth } from "../api.js";
import { LANGUAGES, currentLanguage, languageEvents, setLanguage } from "../i18n.js";
import { h } from "./dom.js";
import { setUser } from "./user.js";

export function setupHeader() {
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
    await auth.logout();
    setUser(null);
    location.assign("/");
  });
}
