// The closest-node procedure (N4, issue 13 item 7) without I/O: mesh/closest.py's pure part,
// step by step, with the same constants (tests/mesh/test_closest.py checks both: the
// constants, and that a real Chromium makes the same rounds and pick as Python for the same
// inputs and random numbers). Why each step is what it is: mesh/closest.py's docstring.
//
// 1. With at most MAX_PROBES nodes, probe them all in one round.
// 2. Round 1, FIRST_PROBES nodes at once: landmarks spread over the mesh (a new client), or
//    the nodes the samples cached from the last pick say are nearest (a returning client).
// 3. Round 2, NEXT_PROBES nodes at once: the unmeasured nodes whose RTT profile to the
//    probed ones best matches the client's.
// 4. The pick: the node with the smallest measured RTT.
//
// Units: seconds, as in mesh/closest.py (closest.js converts at the edges).

export const FIRST_PROBES = 4;
export const NEXT_PROBES = 4;
export const MAX_PROBES = FIRST_PROBES + NEXT_PROBES;
export const PINGS_PER_NODE = 1;
export const MIN_RTT_S = 1.0e-6;
export const PROBE_TIMEOUT_MS = 3000;
export const PICK_CACHE_MS = 10 * 60_000;
export const SAMPLE_CACHE_MS = 7 * 24 * 3600_000;

/** @typedef {{vec: number[], error: number, adjustment: number, height: number}} Coordinate */
/** @typedef {Record<string, Record<string, number>>} Rtts */

const SECONDS_TO_NANOSECONDS = 1.0e9;

/** Sorted copy, by code point as Python's sorted() on str. */
function sortedNames(/** @type {Iterable<string>} */ names) {
  return [...names].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
}

/** Python's tuple ordering on (number, name). */
function byValueThenName(/** @type {[number, string]} */ a, /** @type {[number, string]} */ b) {
  if (a[0] !== b[0]) return a[0] < b[0] ? -1 : 1;
  return a[1] < b[1] ? -1 : a[1] > b[1] ? 1 : 0;
}

function finite(/** @type {number} */ x) {
  return typeof x === "number" && Number.isFinite(x);
}

/** @param {Coordinate | null | undefined} c */
function isValid(c) {
  return (
    !!c &&
    Array.isArray(c.vec) &&
    c.vec.length > 0 &&
    c.vec.every(finite) &&
    finite(c.error) &&
    finite(c.adjustment) &&
    finite(c.height)
  );
}

/** Serf's DistanceTo in seconds (mesh/vivaldi.py `Coordinate.distance_to`), nanoseconds truncated. */
export function estimateRtt(/** @type {Coordinate} */ a, /** @type {Coordinate} */ b) {
  let total = 0.0;
  for (let i = 0; i < a.vec.length; i++) {
    const d = a.vec[i] - b.vec[i];
    total += d * d;
  }
  let dist = Math.sqrt(total) + a.height + b.height;
  const adjusted = dist + a.adjustment + b.adjustment;
  if (adjusted > 0.0) dist = adjusted;
  const scaled = dist * SECONDS_TO_NANOSECONDS;
  if (!(-(2.0 ** 63) < scaled && scaled < 2.0 ** 63)) return dist;
  const nanoseconds = Math.trunc(scaled);
  const whole = Math.trunc(nanoseconds / 1_000_000_000);
  return whole + (nanoseconds - whole * 1_000_000_000) / 1e9;
}

/** @param {Record<string, Coordinate | null | undefined>} coordinates @returns {Rtts} */
export function estimatedRtts(coordinates) {
  /** @type {Record<string, Coordinate>} */
  const valid = {};
  for (const [name, c] of Object.entries(coordinates)) if (c && isValid(c)) valid[name] = c;
  /** @type {Map<number, number>} */
  const counts = new Map();
  for (const c of Object.values(valid)) counts.set(c.vec.length, (counts.get(c.vec.length) ?? 0) + 1);
  if (counts.size === 0) return {};
  let dims = -1;
  for (const [size, count] of counts) {
    const best = counts.get(dims) ?? -1;
    if (count > best || (count === best && size > dims)) dims = size;
  }
  /** @type {Rtts} */
  const rtts = {};
  const usable = Object.entries(valid).filter(([, c]) => c.vec.length === dims);
  for (const [a, ca] of usable) {
    rtts[a] = {};
    for (const [b, cb] of usable) rtts[a][b] = a === b ? 0.0 : estimateRtt(ca, cb);
  }
  return rtts;
}

/** One of `names` (sorted first), with one random(): as mesh/closest.py `draw`. */
export function draw(/** @type {string[]} */ names, /** @type {() => number} */ random) {
  const ordered = sortedNames(names);
  return ordered[Math.min(ordered.length - 1, Math.floor(random() * ordered.length))];
}

/** Landmarks: a node at random, then each time the one farthest from those chosen. */
export function spreadProbes(/** @type {Rtts} */ rtts, /** @type {number} */ count, /** @type {() => number} */ random) {
  const names = sortedNames(Object.keys(rtts));
  if (count <= 0 || names.length === 0) return [];
  const chosen = [draw(names, random)];
  while (chosen.length < Math.min(count, names.length)) {
    let bestName = "";
    let bestGap = -1.0;
    for (const name of names) {
      if (chosen.includes(name)) continue;
      const gap = Math.min(...chosen.map((other) => rtts[name][other]));
      if (gap > bestGap) {
        bestName = name;
        bestGap = gap;
      }
    }
    chosen.push(bestName);
  }
  return chosen;
}

/**
 * Every node, best match first: {cost, node, height} (mesh/closest.py `profile_costs`).
 * @param {Rtts} rtts @param {Record<string, number>} samples
 */
export function profileCosts(rtts, samples) {
  const usable = sortedNames(Object.keys(samples))
    .map((name) => /** @type {[string, number]} */ ([name, samples[name]]))
    .filter(([name, rtt]) => name in rtts && finite(rtt) && rtt > 0)
    .map(([name, rtt]) => /** @type {[string, number]} */ ([name, Math.max(rtt, MIN_RTT_S)]));
  if (usable.length === 0) return [];
  const profiles = [];
  for (const node of sortedNames(Object.keys(rtts))) {
    const row = rtts[node];
    let num = 0.0;
    let den = 0.0;
    for (const [probed, rtt] of usable) {
      const weight = 1.0 / (rtt * rtt);
      num += weight * (rtt - row[probed]);
      den += weight;
    }
    const height = Math.max(0.0, num / den);
    let cost = 0.0;
    for (const [probed, rtt] of usable) {
      const error = (row[probed] + height - rtt) / rtt;
      cost += error * error;
    }
    profiles.push({ cost, node, height });
  }
  profiles.sort((a, b) => byValueThenName([a.cost, a.node], [b.cost, b.node]));
  return profiles;
}

/** @param {Rtts} rtts @param {Record<string, number>} samples @param {number} count @param {string[]} exclude */
export function nextProbes(rtts, samples, count, exclude = []) {
  const skip = new Set([...Object.keys(samples), ...exclude]);
  return profileCosts(rtts, samples)
    .map((p) => p.node)
    .filter((node) => !skip.has(node))
    .slice(0, Math.max(0, count));
}

/** @param {Rtts} rtts @param {Record<string, number>} samples @returns {Record<string, number>} */
export function estimates(rtts, samples) {
  const profiles = profileCosts(rtts, samples);
  if (profiles.length === 0) return {};
  const best = profiles[0];
  /** @type {Record<string, number>} */
  const out = {};
  for (const [name, rtt] of Object.entries(rtts[best.node])) out[name] = rtt + best.height;
  return out;
}

/** The procedure as a state machine (mesh/closest.py `Procedure`). */
export class Procedure {
  /**
   * @param {Record<string, Coordinate | null | undefined>} coordinates every live node
   * @param {() => number} random
   * @param {Record<string, number> | null} cached samples (seconds) of a previous pick
   */
  constructor(coordinates, random = Math.random, cached = null, first = FIRST_PROBES, then = NEXT_PROBES) {
    this.coordinates = coordinates;
    this.random = random;
    this.cached = cached;
    this.first = first;
    this.then = then;
    /** @type {Record<string, number>} */
    this.samples = {};
    /** @type {Set<string>} */
    this.unreachable = new Set();
    this.rounds = 0;
    this.rtts = estimatedRtts(coordinates);
  }

  get probes() {
    return Object.keys(this.samples).length + this.unreachable.size;
  }

  /** @param {string[]} chosen @param {number} count */
  fill(chosen, count) {
    const taken = new Set([...Object.keys(this.samples), ...this.unreachable, ...chosen]);
    const left = sortedNames(Object.keys(this.coordinates).filter((n) => !taken.has(n)));
    while (chosen.length < count && left.length > 0) {
      const name = draw(left, this.random);
      left.splice(left.indexOf(name), 1);
      chosen.push(name);
    }
    return chosen;
  }

  /** The nodes to probe now, all at once; empty when done. @returns {string[]} */
  nextRound() {
    const names = sortedNames(Object.keys(this.coordinates));
    const budget = this.first + this.then;
    if (this.rounds === 0) {
      this.rounds = 1;
      if (names.length <= budget) return names;
      /** @type {Record<string, number>} */
      const cached = {};
      for (const [name, rtt] of Object.entries(this.cached ?? {})) if (name in this.rtts) cached[name] = rtt;
      const chosen =
        Object.keys(cached).length > 0
          ? profileCosts(this.rtts, cached).map((p) => p.node).slice(0, this.first)
          : spreadProbes(this.rtts, this.first, this.random);
      return this.fill(chosen, this.first);
    }
    if (this.rounds === 1 && names.length > budget) {
      this.rounds = 2;
      const chosen = nextProbes(this.rtts, this.samples, this.then, sortedNames(this.unreachable));
      return this.fill(chosen, this.then);
    }
    return [];
  }

  /** A probe's result: RTT in seconds, or null when it never answered. */
  record(/** @type {string} */ name, /** @type {number | null} */ rtt) {
    if (rtt === null || !finite(rtt) || rtt <= 0) {
      delete this.samples[name];
      this.unreachable.add(name);
    } else {
      this.unreachable.delete(name);
      this.samples[name] = rtt;
    }
  }

  /** Every node as [name, rtt seconds | null, measured], nearest first. */
  ranking() {
    const guess = estimates(this.rtts, this.samples);
    const measured = Object.entries(this.samples)
      .map(([n, rtt]) => /** @type {[number, string]} */ ([rtt, n]))
      .sort(byValueThenName);
    const rest = Object.keys(this.coordinates).filter((n) => !(n in this.samples) && !this.unreachable.has(n));
    const known = rest
      .filter((n) => n in guess)
      .map((n) => /** @type {[number, string]} */ ([guess[n], n]))
      .sort(byValueThenName);
    const unknown = sortedNames(rest.filter((n) => !(n in guess)));
    /** @type {[string, number | null, boolean][]} */
    const ranked = measured.map(([rtt, n]) => [n, rtt, true]);
    for (const [rtt, n] of known) ranked.push([n, rtt, false]);
    for (const n of [...unknown, ...sortedNames(this.unreachable)]) ranked.push([n, null, false]);
    return ranked;
  }
}
