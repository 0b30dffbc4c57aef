// Pick the closest node before connecting (N4), as mesh/closest.py does for Python clients:
// time GET /api/ping on up to 3 nodes at random, ask POST /api/nodes/rank (Vivaldi places
// this browser among the nodes), time the nodes it suggests probing next, ask again, and
// take the first.
//
// The pings go to other origins. They are plain GETs sent with mode "no-cors": the answer is
// opaque but its timing is all that is needed, so nodes need no CORS headers for it. The
// ranking is asked of this page's own node, or, when that node is gone (failover), of
// another live node of the mesh (the API answers the mesh's own origins: node/web/cors.py);
// the WebSocket is not subject to CORS.
//
// Failover: the ranking is kept with the pick, so when the node in use dies the next one
// is known at once (`nextNode`); `pickNode({fresh, exclude, bases})` measures again without
// the dead node, asking whichever known node still answers.

import { request } from "./api.js";

const FIRST_PROBES = 3;
const PINGS_PER_NODE = 3;
const PING_TIMEOUT_MS = 3000;
const CACHE_KEY = "sfumesh.node";
// A refresh within this time reuses the last pick instead of measuring again.
const CACHE_MS = 10 * 60_000;

/**
 * @typedef {{name: string, region: string, url: string, ws_url: string,
 *   rtt_ms?: number | null, measured?: boolean}} NodeChoice
 */

/** Best round trip (ms) of a few pings to a node; null if it never answered. */
export async function timePing(/** @type {string} */ url, pings = PINGS_PER_NODE, timeoutMs = PING_TIMEOUT_MS) {
  let best = null;
  for (let i = 0; i < pings; i++) {
    const started = performance.now();
    try {
      await fetch(`${url}/api/ping`, {
        mode: "no-cors",
        cache: "no-store",
        signal: AbortSignal.timeout(timeoutMs),
      });
    } catch {
      continue;
    }
    const elapsed = performance.now() - started;
    best = best === null ? elapsed : Math.min(best, elapsed);
  }
  return best;
}

/** @param {Record<string, number>} samples @param {string} base */
function rank(samples, base) {
  const body = {
    samples: Object.entries(samples).map(([node, rtt]) => ({ node, rtt_ms: Math.max(rtt, 0.001) })),
  };
  return request("POST", `${base}/api/nodes/rank`, { body, signal: AbortSignal.timeout(PING_TIMEOUT_MS) });
}

/** @param {string[]} names @param {Record<string, NodeChoice>} nodes @param {Record<string, number>} samples */
async function measure(names, nodes, samples) {
  const rtts = await Promise.all(names.map((name) => timePing(nodes[name].url)));
  names.forEach((name, i) => {
    const rtt = rtts[i];
    if (rtt !== null) samples[name] = rtt;
  });
}

function shuffled(/** @type {string[]} */ items) {
  const out = [...items];
  for (let i = out.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [out[i], out[j]] = [out[j], out[i]];
  }
  return out;
}

/** This page's own node, as a fallback when no ranking can be had. */
export function thisNode() {
  return {
    name: "",
    region: "",
    url: location.origin,
    ws_url: `${location.origin.replace(/^http/, "ws")}/ws`,
  };
}

/** @returns {{node: NodeChoice, ranked?: NodeChoice[], at: number} | null} */
function cachedPick() {
  try {
    return JSON.parse(sessionStorage.getItem(CACHE_KEY) ?? "null");
  } catch {
    return null;
  }
}

/**
 * The closest live node (a recent pick is reused unless `fresh`). `exclude`: names of
 * nodes known dead; `bases`: node URLs to ask for the list and the ranking, in order,
 * when this page's own node may be gone ("" stands for this page's node).
 * @param {{fresh?: boolean, exclude?: Set<string>, bases?: string[]}} [options]
 * @returns {Promise<NodeChoice>}
 */
export async function pickNode(options = {}) {
  const exclude = options.exclude ?? new Set();
  if (!options.fresh) {
    const cached = cachedPick();
    if (cached && Date.now() - cached.at < CACHE_MS && !exclude.has(cached.node.name)) return cached.node;
  }
  let lastError = null;
  for (const base of options.bases ?? [""]) {
    try {
      const { choice, ranked } = await measureClosest(base, exclude);
      sessionStorage.setItem(CACHE_KEY, JSON.stringify({ node: choice, ranked, at: Date.now() }));
      return choice;
    } catch (error) {
      lastError = error; // that node did not answer: ask the next
    }
  }
  throw lastError ?? new Error("no node to ask");
}

/**
 * The nodes of the last ranking, closest first, without `exclude`: where to go at once
 * when the node in use died, and whom to ask for a fresh ranking.
 * @param {Set<string>} exclude @returns {NodeChoice[]}
 */
export function rankedNodes(exclude = new Set()) {
  const cached = cachedPick();
  const ranked = cached?.ranked ?? (cached ? [cached.node] : []);
  return ranked.filter((node) => node.name && !exclude.has(node.name));
}

/** Forget the last pick (its node failed us). */
export function forgetPick() {
  sessionStorage.removeItem(CACHE_KEY);
}

/**
 * @param {string} base the node to ask ("": this page's) @param {Set<string>} exclude
 * @returns {Promise<{choice: NodeChoice, ranked: NodeChoice[]}>}
 */
async function measureClosest(base, exclude) {
  /** @type {{nodes: NodeChoice[]}} */
  const listed = await request("GET", `${base}/api/nodes`, { signal: AbortSignal.timeout(PING_TIMEOUT_MS) });
  const live = listed.nodes.filter((node) => !exclude.has(node.name));
  const fallback = base ? live.find((node) => node.url.replace(/\/$/, "") === base) : undefined;
  const own = fallback ?? (base ? live[0] : thisNode()) ?? thisNode();
  if (live.length === 0) return { choice: own, ranked: [] };
  if (live.length === 1) return { choice: live[0], ranked: live };
  /** @type {Record<string, NodeChoice>} */
  const nodes = Object.fromEntries(live.map((node) => [node.name, node]));
  /** @type {Record<string, number>} */
  const samples = {};
  const first = shuffled(Object.keys(nodes)).slice(0, FIRST_PROBES);
  await measure(first, nodes, samples);
  if (Object.keys(samples).length === 0) return { choice: own, ranked: [] };
  let ranking = await rank(samples, base);
  const next = (ranking.probe_next ?? []).filter((n) => n in nodes && !(n in samples));
  if (next.length > 0) {
    await measure(next, nodes, samples);
    ranking = await rank(samples, base);
  }
  // A node that was pinged and never answered is unreachable from here, however near its
  // coordinate says it is.
  const probed = new Set([...first, ...next]);
  const reachable = ranking.nodes.filter(
    (/** @type {NodeChoice} */ node) =>
      !exclude.has(node.name) && (node.name in samples || !probed.has(node.name)),
  );
  return { choice: reachable[0] ?? own, ranked: reachable };
}
