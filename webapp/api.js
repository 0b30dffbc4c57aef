// The HTTP side of the public contract (API.md), and where this browser keeps its tokens.
//
// Tokens: the user token (login) lives in localStorage, so every tab of this browser is
// logged in, and is renewed before it expires while a page is open; the session token lives in sessionStorage, one per tab, so a refresh keeps its
// session (and its seat in a full room: a refreshed session replaces itself, requirement R6)
// while a new tab gets a session of its own.

const USER_KEY = "sfumesh.user";
const SESSION_KEY = "sfumesh.session";
// Renew a session token this long before it expires.
const MARGIN_MS = 60_000;
// A user token is still used this close to its expiry (it is renewed well before).
const USER_MARGIN_MS = 5_000;
// The user token lives an hour (the node's tokens.user_ttl_s) and is renewed while this
// page is open (POST /api/auth/refresh): 5 minutes before it expires, or halfway through
// its remaining life when that is shorter, never sooner than 1 s apart.
const REFRESH_BEFORE_MS = 5 * 60_000;
const REFRESH_MIN_MS = 1_000;
// Timers cannot wait longer than 2^31 - 1 ms; a far expiry is looked at again after this.
const REFRESH_MAX_MS = 3_600_000;
const REFRESH_RETRY_MS = 30_000;
/** @type {ReturnType<typeof setTimeout> | undefined} */
let refreshTimer;

export class ApiError extends Error {
  /**
   * @param {number} status HTTP status (0: the request never got an answer)
   * @param {string} code the contract's error code
   * @param {string} message
   * @param {{field: string, problem: string}[]} [details] per-field problems (422)
   */
  constructor(status, code, message, details = []) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }

  /** The input field a detail is about ("body.username" and "username" name the same). */
  static fieldOf(/** @type {{field: string}} */ detail) {
    return String(detail.field ?? "").split(".").pop() ?? "";
  }
}

/**
 * One JSON request; the contract's error object becomes an ApiError.
 * @param {string} method @param {string} path
 * @param {{token?: string | null, body?: unknown, signal?: AbortSignal}} [options]
 */
export async function request(method, path, options = {}) {
  /** @type {Record<string, string>} */
  const headers = { accept: "application/json" };
  if (options.body !== undefined) headers["content-type"] = "application/json";
  if (options.token) headers.authorization = `Bearer ${options.token}`;
  let reply;
  try {
    reply = await fetch(path, {
      method,
      headers,
      body: options.body === undefined ? undefined : JSON.stringify(options.body),
      signal: options.signal,
    });
  } catch (error) {
    if (/** @type {Error} */ (error).name === "AbortError") throw error;
    throw new ApiError(0, "network", String(error));
  }
  const data = await reply.json().catch(() => null);
  if (!reply.ok) {
    const error = data?.error ?? {};
    throw new ApiError(
      reply.status,
      error.code ?? `http_${reply.status}`,
      error.message ?? reply.statusText,
      error.details ?? [],
    );
  }
  return data;
}

/** `/api/rooms/<slug>` with the slug safely in one path segment. */
export function roomPath(/** @type {string} */ slug) {
  return `/api/rooms/${encodeURIComponent(slug)}`;
}

/** The page of a room. */
export function roomPage(/** @type {string} */ slug) {
  return `/r/${encodeURIComponent(slug)}`;
}

function readJson(/** @type {Storage} */ storage, /** @type {string} */ key) {
  try {
    return JSON.parse(storage.getItem(key) ?? "null");
  } catch {
    return null;
  }
}

function fresh(/** @type {{expires_at?: string} | null} */ grant, margin = MARGIN_MS) {
  return grant !== null && Date.parse(grant.expires_at ?? "") - margin > Date.now();
}

export const auth = {
  /** @returns {string | null} the stored user token, if still valid */
  userToken() {
    const grant = readJson(localStorage, USER_KEY);
    return fresh(grant, USER_MARGIN_MS) ? grant.user_token : null;
  },

  /** @param {string} login @param {string} password */
  async login(login, password) {
    const grant = await request("POST", "/api/auth/login", { body: { login, password } });
    localStorage.setItem(USER_KEY, JSON.stringify(grant));
    sessionStorage.removeItem(SESSION_KEY);
    this.keepFresh();
    return grant;
  },

  /** Ends this login on the node (its tokens stop working everywhere), then forgets it. */
  async logout() {
    const grant = readJson(localStorage, USER_KEY);
    this.forget();
    if (grant?.user_token) {
      await request("POST", "/api/auth/logout", { token: grant.user_token }).catch((error) =>
        console.warn("logout", error),
      );
    }
  },

  /** Forgets the stored login (it no longer works, or was logged out). */
  forget() {
    clearTimeout(refreshTimer);
    localStorage.removeItem(USER_KEY);
    sessionStorage.removeItem(SESSION_KEY);
  },

  /**
   * Keeps renewing the user token while the page is open, so a long call still has a
   * valid one when it needs a new session or room.
   */
  keepFresh() {
    clearTimeout(refreshTimer);
    const grant = readJson(localStorage, USER_KEY);
    const left = Date.parse(grant?.expires_at ?? "") - Date.now();
    if (!(left > 0)) return; // none, or expired: only a login helps
    const wait = Math.max(REFRESH_MIN_MS, Math.max(left - REFRESH_BEFORE_MS, left / 2));
    refreshTimer = setTimeout(() => this.refresh(), Math.min(REFRESH_MAX_MS, wait));
  },

  /** One renewal of the stored user token; schedules the next. */
  async refresh() {
    clearTimeout(refreshTimer);
    const grant = readJson(localStorage, USER_KEY);
    if (!grant?.user_token) return;
    try {
      const next = await request("POST", "/api/auth/refresh", { token: grant.user_token });
      // Another tab may have logged out, or in as someone else, meanwhile.
      if (readJson(localStorage, USER_KEY)?.user_token === grant.user_token) {
        localStorage.setItem(USER_KEY, JSON.stringify(next));
      }
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) {
        // Logged out elsewhere, password changed, or the login is too old: log in again.
        if (readJson(localStorage, USER_KEY)?.user_token === grant.user_token) this.forget();
        return;
      }
      console.warn("token refresh; trying again", error);
      refreshTimer = setTimeout(() => this.refresh(), REFRESH_RETRY_MS);
      return;
    }
    this.keepFresh();
  },

  /** @returns {Promise<{id: string, username: string, display_name: string} | null>} */
  async me() {
    const token = this.userToken();
    if (token === null) return null;
    try {
      return await request("GET", "/api/users/me", { token });
    } catch (error) {
      if (error instanceof ApiError && error.status === 401) {
        this.forget();
        return null;
      }
      throw error;
    }
  },

  /**
   * This tab's session token: the stored one while it is valid, else a new session.
   * @param {boolean} [renew] drop the stored one first (it was refused, or replaced)
   * @returns {Promise<string>}
   */
  async sessionToken(renew = false) {
    const stored = readJson(sessionStorage, SESSION_KEY);
    if (!renew && fresh(stored)) return stored.session_token;
    const token = this.userToken();
    if (token === null) throw new ApiError(401, "unauthorized", "log in first");
    const grant = await request("POST", "/api/sessions", { token });
    sessionStorage.setItem(SESSION_KEY, JSON.stringify(grant));
    return grant.session_token;
  },
};
