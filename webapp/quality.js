// Connection quality (issue 17 item 5) and who is speaking, from the peer connections'
// getStats: per remote participant (what this page receives of them) and for this page's
// own uplink (what the node reports receiving of it, in RTCP receiver reports).

/** @typedef {"good" | "poor" | "bad"} Quality */

// Thresholds as video calls commonly use them: a few percent loss or a few hundred ms of
// round trip is noticeable ("poor"); beyond these it is hard to follow ("bad").
const POOR = { loss: 0.03, rttMs: 300 };
const BAD = { loss: 0.1, rttMs: 800 };
// Received audio louder than this counts as speaking (audioLevel is 0..1, linear).
export const SPEAKING_LEVEL = 0.02;

/**
 * @param {{loss: number, rttMs: number | null, stalled?: boolean}} figures loss as a
 *   fraction of the packets of the last interval; `stalled`: video expected, none decoded
 * @returns {Quality}
 */
export function qualityOf({ loss, rttMs, stalled = false }) {
  const rtt = rttMs ?? 0;
  if (stalled || loss >= BAD.loss || rtt >= BAD.rttMs) return "bad";
  if (loss >= POOR.loss || rtt >= POOR.rttMs) return "poor";
  return "good";
}

/**
 * The audio level over the interval since the last reading: the root of the mean energy
 * (the spec's way: audioLevel alone is the last ~100 ms, so a short sound between two
 * readings, such as a syllable or the fake microphone's 20 ms beep every 500 ms read every
 * 500 ms, can be missed for as long as the two clocks stay in step), or audioLevel where
 * the counters are missing.
 * @param {{audioLevel?: number}} report
 * @param {{energy: number, duration: number}} before
 * @param {number} energy totalAudioEnergy now
 * @param {number} duration totalSamplesDuration now
 * @returns {number}
 */
export function audioLevelOver(report, before, energy, duration) {
  const instant = report.audioLevel ?? 0;
  const seconds = duration - before.duration;
  if (seconds <= 0) return instant;
  return Math.max(instant, Math.sqrt(Math.max(0, energy - before.energy) / seconds));
}

/**
 * Reads both connections every `periodMs` and reports, per remote track id, its quality
 * and audio level, and the page's own uplink quality.
 * @param {() => {publishPc: RTCPeerConnection | null, subscribePc: RTCPeerConnection | null} | null} media
 * @param {(report: {tracks: Map<string, {quality: Quality, level: number}>, own: Quality | null, ownLimited: boolean}) => void} onReport
 * @returns {() => void} stops it
 */
export function watchQuality(media, onReport, periodMs = 500) {
  /** @type {Map<string, {received: number, lost: number, decoded: number, energy: number, duration: number}>} */
  const last = new Map();
  let lastOwn = { sent: 0, lost: 0 };
  const timer = setInterval(async () => {
    const current = media();
    if (current === null) return;
    /** @type {Map<string, {quality: Quality, level: number}>} */
    const tracks = new Map();
    let own = /** @type {Quality | null} */ (null);
    let ownLimited = false;
    try {
      if (current.subscribePc) {
        const stats = await current.subscribePc.getStats();
        let rttMs = null;
        for (const report of stats.values()) {
          if (report.type === "candidate-pair" && report.nominated && report.currentRoundTripTime !== undefined) {
            rttMs = report.currentRoundTripTime * 1000;
          }
        }
        for (const report of stats.values()) {
          if (report.type !== "inbound-rtp" || !report.trackIdentifier) continue;
          const before = last.get(report.id) ?? { received: 0, lost: 0, decoded: 0, energy: 0, duration: 0 };
          const received = report.packetsReceived ?? 0;
          const lost = Math.max(0, report.packetsLost ?? 0);
          const decoded = report.framesDecoded ?? 0;
          const energy = report.totalAudioEnergy ?? 0;
          const duration = report.totalSamplesDuration ?? 0;
          last.set(report.id, { received, lost, decoded, energy, duration });
          const newPackets = received - before.received + (lost - before.lost);
          const loss = newPackets > 0 ? (lost - before.lost) / newPackets : 0;
          const stalled = report.kind === "video" && received > before.received && decoded === before.decoded;
          tracks.set(report.trackIdentifier, {
            quality: qualityOf({ loss, rttMs, stalled }),
            level: report.kind === "audio" ? audioLevelOver(report, before, energy, duration) : 0,
          });
        }
      }
      if (current.publishPc) {
        const stats = await current.publishPc.getStats();
        let sent = 0;
        let lost = 0;
        let rttMs = null;
        for (const report of stats.values()) {
          if (report.type === "outbound-rtp") {
            sent += report.packetsSent ?? 0;
            if (report.kind === "video" && report.qualityLimitationReason === "bandwidth") ownLimited = true;
          }
          if (report.type === "remote-inbound-rtp") {
            lost += Math.max(0, report.packetsLost ?? 0);
            if (report.roundTripTime !== undefined) rttMs = Math.max(rttMs ?? 0, report.roundTripTime * 1000);
          }
        }
        const newPackets = sent - lastOwn.sent;
        const loss = newPackets > 0 ? Math.max(0, lost - lastOwn.lost) / newPackets : 0;
        lastOwn = { sent, lost };
        // (qualityLimitationReason "bandwidth" is reported too, but not counted: the node
        // caps each track's bitrate on purpose, which says nothing about the uplink.)
        own = qualityOf({ loss, rttMs });
      }
    } catch (error) {
      console.warn("getStats", error);
      return;
    }
    onReport({ tracks, own, ownLimited });
  }, periodMs);
  return () => clearInterval(timer);
}
