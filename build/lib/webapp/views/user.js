// Who is signed in: the one copy every view reads, and the header's name and log out
// button kept in step with it.

/** @typedef {{id: string, username: string, display_name: string}} User */

/** @type {User | null} */
let me = null;

export function currentUser() {
  return me;
}

/** @param {User | null} user */
export function setUser(user) {
  me = user;
  const who = /** @type {HTMLElement} */ (document.getElementById("who"));
  const logout = /** @type {HTMLButtonElement} */ (document.getElementById("logout"));
  who.hidden = logout.hidden = me === null;
  who.textContent = me?.display_name ?? "";
}
