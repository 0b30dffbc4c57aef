// Sign up / log in: one view with two tabs, shown before home or before a room.

import { ApiError, auth, request } from "../api.js";
import { tr } from "../i18n.js";
import { $, clone, render, setupTabs } from "./dom.js";
import { busy, clearErrors, requireFields, showFormError } from "./forms.js";
import { setUser } from "./user.js";

/**
 * @param {() => void} next what to show once logged in
 * @param {{name: string} | null} [room] the room this is for, if any
 */
export function showAuth(next, room = null) {
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
    setUser(await auth.me());
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
      } catch (error) {
        showFormError(signup, error);
        return;
      }
      try {
        await auth.login(body.username, body.password);
      } catch (error) {
        // A sign-up with an email that already has an account answers like any other and
        // creates nothing (the server never says which emails are registered): its login
        // is what fails.
        const failed = error instanceof ApiError && error.code === "invalid_credentials";
        showFormError(signup, failed ? new ApiError(error.status, "signup_not_signed_in", error.message) : error);
        return;
      }
      await loggedIn();
    });
  });
  render(view);
}

/** The stored login no longer works: forget it and log in again, then go on to `next`. */
export function logoutTo(/** @type {() => void} */ next) {
  auth.forget();
  setUser(null);
  showAuth(next);
}
