/**
 * A router that applies only the data-residency rule, as `plugins/residency` does in Rust: a
 * request with unredacted personal data (a `pii.*` label without the `.redacted` suffix) goes
 * only to the tenant's own infrastructure or to targets in the regions the tenant allows;
 * everything else keeps the order given. Takes no configuration (`{}`).
 */
import { carriesUnredactedPii, decide, parseConfig, reject, residencyAllows } from '../sdk/meridian.js';

/** Why a request was refused: it names the rule, not the data. */
const UNAVAILABLE =
  'unavailable for legal reasons: the request carries unredacted personal data and no target ' +
  'serving its model is in a region the tenant allows';

/** Accepts `{}` (or nothing) and refuses any key. */
export function configure(config) {
  parseConfig(config);
}

/** Keeps the targets the residency rule allows, in the order given. */
export function route(request, targets) {
  const allowed = targets.filter((t) => residencyAllows(request, t));
  if (allowed.length === 0 && carriesUnredactedPii(request)) {
    return reject(451, UNAVAILABLE);
  }
  // No target at all (and no personal data): decide() answers 503.
  return decide(allowed);
}
