// Pick the closest node before connecting (N4) by the procedure of closest_core.js, which
// mirrors mesh/closest.py step by step: read the nodes and their coordinates from this page's
// node, probe up to FIRST_PROBES of them at once (landmarks spread over the mesh, or, for a
// returning browser, the nodes its cached samples say are nearest), then up to NEXT_PROBES
// whose RTT profile matches, and take the fastest measured.
//
// A probe is one GET /api/ping, sent with mode "no-cors": the answer is opaque but its timing
// is all that is needed, so nodes need no CORS headers for it. The node answers with
// Timing-Allow-Origin, so the Resource Timing entry gives the TCP connect and the request
// separately (one request is enough to measure a new connection); without it the request's
// whole duration counts. The WebSocket is not subject to CORS.
//
// Failover: the ranking is kept with the pick, so when the node in use dies the next one is
// known at once (`rankedNodes`); `pickNode({fresh, exclude, bases})` measures again without
// the dead node, asking whichever known node still answers for the list (the API answers
// the mesh's own origins: node/web/cors.py).

import { request } from "./api.js";
import {
  PICK_CACHE_MS,
  PINGS_PER_NODE,
  PROBE_TIMEOUT_MS,
  Procedure,
  SAMPLE_CACHE_MS,
} from "./closest_core.js";

const CACHE_KEY = "sfumesh.node";
// The samples of the last pick (ms), kept across visits: a returning browser probes first
// the nodes they say are nearest.
const SAMPLES_KEY = "sfumesh.samples";

/**
 * @typedef {{name: string, region: string, url: string, ws_url: string,
 *   rtt_ms?: number | null, measured?: boolean}} NodeChoice
 */

/**
 * This request's Resource Timing entry: it is queued when the response ends, which may be
 * a moment after fetch() resolves, so wait a little for it.
 * @returns {Promise<PerformanceResourceTiming | undefined>}
 */
async function timingOf(/** @type {string} */ url) {
  for (let tries = 0; tries < 5; tries++) {
    const entries = performance.getEntriesByName(url);
    if (entries.length > 0) return /** @type {PerformanceResourceTiming} */ (entries[entries.length - 1]);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  return undefined;
}

/** The RTT (ms) of one finished request: its TCP connect or the request itself, the smaller. */
async function probeRtt(/** @type {string} */ url, /** @type {number} */ elapsed) {
  const entry = await timingOf(url);
  if (!entry || entry.requestStart <= 0 || entry.responseStart <= 0) return elapsed;
  const parts = [entry.responseStart - entry.requestStart];
  if (entry.connectEnd > entry.connectStart && entry.connectStart > 0) {
    // With TLS, connectEnd includes its handshake; the TCP one ends at secureConnectionStart.
    const tcpEnd = entry.secureConnectionStart > 0 ? entry.secureConnectionStart : entry.connectEnd;
    parts.push(tcpEnd - entry.connectStart);
  }
  return Math.min(...parts);
}

/** Best round trip (ms) of `pings` GET /api/ping to a node; null if it never answered. */
export async function timePing(/** @type {string} */ url, pings = PINGS_PER_NODE, timeoutMs = PROBE_TIMEOUT_MS) {
  let best = null;
  for (let i = 0; i < Math.max(1, pings); i++) {
    // A unique URL: this request's timing entry, and never a cached answer.
    const target = `${url}/api/ping?probe=${Math.random().toString(36).slice(2)}`;
    const started = performance.now();
    try {
      await fetch(target, {
        mode: "no-cors",
        cache: "no-store",
        signal: AbortSignal.timeout(timeoutMs),
      });
    } catch {
      continue;
    }
    const rtt = await probeRtt(target, performance.now() - started);
    best = best === null ? rtt : Math.min(best, rtt);
  }
  return best;
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
 * nodes known dead; `bases`: node URLs to ask for the list, in order, when this page's own
 * node may be gone ("" stands for this page's node).
 * @param {{fresh?: boolean, exclude?: Set<string>, bases?: string[]}} [options]
 * @returns {Promise<NodeChoice>}
 */
export async function pickNode(options = {}) {
  const exclude = options.exclude ?? new Set();
  if (!options.fresh) {
    const cached = cachedPick();
    if (cached && Date.now() - cached.at < PICK_CACHE_MS && !exclude.has(cached.node.name)) return cached.node;
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

/** The samples (seconds) of a recent pick, or null. @returns {Record<string, number> | null} */
function cachedSamples() {
  try {
    const cached = JSON.parse(localStorage.getItem(SAMPLES_KEY) ?? "null");
    if (!cached || Date.now() - cached.at >= SAMPLE_CACHE_MS) return null;
    /** @type {Record<string, number>} */
    const samples = {};
    for (const [name, ms] of Object.entries(cached.samples_ms ?? {})) {
      if (typeof ms === "number" && ms > 0) samples[name] = ms / 1000;
    }
    return Object.keys(samples).length > 0 ? samples : null;
  } catch {
    return null;
  }
}

/**
 * @param {string} base the node to ask for the list ("": this page's) @param {Set<string>} exclude
 * @returns {Promise<{choice: NodeChoice, ranked: NodeChoice[]}>}
 */
async function measureClosest(base, exclude) {
  /** @type {{nodes: (NodeChoice & {coordinate?: any})[]}} */
  const listed = await request("GET", `${base}/api/nodes`, { signal: AbortSignal.timeout(PROBE_TIMEOUT_MS) });
  const live = listed.nodes.filter((node) => !exclude.has(node.name));
  const fallback = base ? live.find((node) => node.url.replace(/\/$/, "") === base) : undefined;
  const own = fallback ?? (base ? live[0] : thisNode()) ?? thisNode();
  if (live.length === 0) return { choice: own, ranked: [] };
  if (live.length === 1) return { choice: live[0], ranked: live };
  /** @type {Record<string, NodeChoice>} */
  const nodes = Object.fromEntries(live.map((node) => [node.name, node]));
  const procedure = new Procedure(
    Object.fromEntries(live.map((node) => [node.name, node.coordinate ?? null])),
    Math.random,
    cachedSamples(),
  );
  for (let probes = procedure.nextRound(); probes.length > 0; probes = procedure.nextRound()) {
    const rtts = await Promise.all(probes.map((name) => timePing(nodes[name].url)));
    probes.forEach((name, i) => {
      const rtt = rtts[i];
      procedure.record(name, rtt === null ? null : Math.max(rtt, 0.001) / 1000);
    });
  }
  const samplesMs = Object.fromEntries(
    Object.entries(procedure.samples).map(([name, rtt]) => [name, rtt * 1000]),
  );
  if (Object.keys(samplesMs).length === 0) return { choice: own, ranked: [] };
  localStorage.setItem(SAMPLES_KEY, JSON.stringify({ samples_ms: samplesMs, at: Date.now() }));
  const ranked = procedure
    .ranking()
    .map(([name, rtt, measured]) => ({ ...nodes[name], rtt_ms: rtt === null ? null : rtt * 1000, measured }));
  return { choice: ranked[0], ranked };
}
