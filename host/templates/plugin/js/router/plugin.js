/**
 * {{name}}: a Meridian router that sends each request to the fastest healthy target first.
 *
 * Targets that are degraded or down are left out, and so are targets the data-residency rule
 * refuses (unredacted personal data stays in the tenant's regions or on its own infrastructure).
 * Among the rest, the lowest measured latency comes first; targets not measured yet come last, in
 * the order given. Nothing left: 451 when personal data was the reason, 503 otherwise. Takes no
 * configuration (`{}`).
 *
 * The contract is the `router` world of wit/meridian-plugin.wit; ./meridian.js has the helpers.
 */
import { carriesUnredactedPii, decide, healthy, parseConfig, reject, residencyAllows } from './meridian.js';

/** Accepts `{}` and refuses any key (a typo would otherwise be ignored silently). */
export function configure(config) {
  parseConfig(config);
}

/** Orders the healthy targets the residency rule allows by latency. */
export function route(request, targets) {
  const allowed = healthy(targets).filter((t) => residencyAllows(request, t));
  if (allowed.length === 0 && carriesUnredactedPii(request)) {
    return reject(451, 'unavailable for legal reasons: no target in a region the tenant allows');
  }
  // Stable sort; a latency of 0 means "not measured yet".
  const latency = (t) => (t.latencyMs > 0 ? t.latencyMs : Infinity);
  allowed.sort((a, b) => latency(a) - latency(b));
  return decide(allowed);
}
