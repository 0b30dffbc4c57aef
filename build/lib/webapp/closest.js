// Pick the closest node before connecting (N4), as mesh/closest.py does for Python clients:
// time GET /api/ping on up to 3 nodes at random, ask POST /api/nodes/rank (Vivaldi places
// this browser among the nodes), time the nodes it suggests probing next, ask again, and
// take the first.
//
// The pings go to other origins. They are plain GETs sent with mode "no-cors": the answer is
// opaque but its timing is all that is needed, so nodes need no CORS headers for it. The
// ranking is asked of this page's own node; the WebSocket is not subject to CORS.

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
export async function timePing(/** @type {string} */ url, pings = PINGS_PER_NODE) {
  let best = null;
  for (let i = 0; i < pings; i++) {
    const started = performance.now();
    try {
      await fetch(`${url}/api/ping`, {
        mode: "no-cors",
        cache: "no-store",
        signal: AbortSignal.timeout(PING_TIMEOUT_MS),
      });
    } catch {
      continue;
    }
    const elapsed = performance.now() - started;
    best = best === null ? elapsed : Math.min(best, elapsed);
  }
  return best;
}

/** @param {Record<string, number>} samples */
function rank(samples) {
  const body = {
    samples: Object.entries(samples).map(([node, rtt]) => ({ node, rtt_ms: Math.max(rtt, 0.001) })),
  };
  return request("POST", "/api/nodes/rank", { body });
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

/**
 * The closest live node (a recent pick is reused unless `fresh`).
 * @param {{fresh?: boolean}} [options]
 * @returns {Promise<NodeChoice>}
 */
export async function pickNode(options = {}) {
  if (!options.fresh) {
    try {
      const cached = JSON.parse(sessionStorage.getItem(CACHE_KEY) ?? "null");
      if (cached && Date.now() - cached.at < CACHE_MS) return cached.node;
    } catch {
      // measure again
    }
  }
  const choice = await measureClosest();
  sessionStorage.setItem(CACHE_KEY, JSON.stringify({ node: choice, at: Date.now() }));
  return choice;
}

/** Forget the last pick (its node failed us). */
export function forgetPick() {
  sessionStorage.removeItem(CACHE_KEY);
}

/** @returns {Promise<NodeChoice>} */
async function measureClosest() {
  /** @type {{nodes: NodeChoice[]}} */
  const listed = await request("GET", "/api/nodes");
  if (listed.nodes.length === 0) return thisNode();
  if (listed.nodes.length === 1) return listed.nodes[0];
  /** @type {Record<string, NodeChoice>} */
  const nodes = Object.fromEntries(listed.nodes.map((node) => [node.name, node]));
  /** @type {Record<string, number>} */
  const samples = {};
  const first = shuffled(Object.keys(nodes)).slice(0, FIRST_PROBES);
  await measure(first, nodes, samples);
  if (Object.keys(samples).length === 0) return thisNode();
  let ranking = await rank(samples);
  const next = (ranking.probe_next ?? []).filter((n) => n in nodes && !(n in samples));
  if (next.length > 0) {
    await measure(next, nodes, samples);
    ranking = await rank(samples);
  }
  // A node that was pinged and never answered is unreachable from here, however near its
  // coordinate says it is.
  const probed = new Set([...first, ...next]);
  const reachable = ranking.nodes.filter(
    (/** @type {NodeChoice} */ node) => node.name in samples || !probed.has(node.name),
  );
  return reachable[0] ?? thisNode();
}
