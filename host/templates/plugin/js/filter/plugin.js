/**
 * {{name}}: a Meridian privacy filter that redacts secret codes (`secret-code-` and digits, such
 * as `secret-code-1234`) from a request's text, and labels the request `secret.code.redacted`
 * when it finds one (the contract's convention for a finding that was redacted).
 *
 * The node replaces each redacted value with a placeholder (`[SECRET_CODE_1]`) before the request
 * leaves it, and puts the value back into the answer. Answers pass unchanged. Takes no
 * configuration (`{}`).
 *
 * The contract is the `privacy-filter` world of wit/meridian-plugin.wit; ./meridian.js has the
 * helpers. Redaction offsets are UTF-8 bytes: redactMatches converts from JavaScript's indices.
 */
import { allow, parseConfig, pass, redactedLabel, redactMatches } from './meridian.js';

const SECRET_CODE = /secret-code-\d+/;

/** Accepts `{}` and refuses any key (a typo would otherwise be ignored silently). */
export function configure(config) {
  parseConfig(config);
}

/** Redacts every secret code, in every segment. */
export function inspectRequest(request, segments) {
  const redactions = segments.flatMap((s, i) => redactMatches(s.text, i, SECRET_CODE, 'secret_code'));
  const labels = redactions.length > 0 ? [redactedLabel('secret', 'code')] : [];
  return allow(labels, redactions);
}

/** Lets every piece of the answer through. */
export function inspectResponse(text) {
  return pass();
}
