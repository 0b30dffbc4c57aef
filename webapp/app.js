// The web client (issue #7): sign up / log in, create or pick a random room, invite, and the
// room itself. Plain ES modules, no build step. Served by every node at `/` and `/r/<slug>`.
//
// Views are <template>s in index.html, cloned and wired by the modules in views/; every
// visible string comes from the language bundle (i18n.js). The room's networking lives in
// room.js, media in media.js. This module starts the client and picks the view for the URL.

import { auth } from "./api.js";
import { preferredLanguage, setLanguage } from "./i18n.js";
import { showAuth } from "./views/auth.js";
import { setupHeader } from "./views/header.js";
import { showHome } from "./views/home.js";
import { showRoom } from "./views/room.js";
import { currentUser, setUser } from "./views/user.js";

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
  if (currentUser() === null) return showAuth(showHome);
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
  let user = null;
  try {
    auth.keepFresh();
    user = await auth.me();
  } catch (error) {
    console.warn("profile", error);
  }
  setUser(user);
  document.body.classList.remove("loading");
  await route();
}

boot();
