/**
 * A keyword and regular-expression privacy filter. Its configuration:
 *
 *   {
 *     "block": ["regex", ...],            // a request or answer matching any of these is blocked
 *     "redact": {"entity": "regex", ...}, // matches are replaced by placeholders ([ENTITY_1])
 *     "class": "pii",                     // label class of redactions (default "pii")
 *     "ignore_case": false                // match without regard to case (default false)
 *   }
 *
 * All keys are optional; patterns are JavaScript regular expressions, run with the `u` flag.
 * `inspectRequest` blocks a request whose text matches a block pattern, and otherwise redacts
 * every match of a redact pattern, labelling each entity it redacted `<class>.<entity>.redacted`.
 * `inspectResponse` cuts off an answer whose text matches a block pattern; it keeps the last
 * CARRY characters of the answer so far, so a match split across streamed pieces is found as long
 * as it is no longer than that.
 */
import {
  allow,
  block,
  configRegex,
  ConfigError,
  parseConfig,
  pass,
  redactMatches,
  redactedLabel,
  validEntity,
  withoutOverlaps,
} from '../sdk/meridian.js';

/** UTF-16 units of earlier answer pieces kept to catch a block match split across pieces. */
const CARRY = 4096;

/** The compiled configuration (set by `configure` on each fresh instance). */
let blockRules = [];
let redactRules = [];
let labelClass = 'pii';

/** The end of the answer seen so far (one answer per instance). */
let answerTail = '';

/** Parses and compiles the configuration; refuses it with a ConfigError. */
export function configure(config) {
  const c = parseConfig(config, ['block', 'redact', 'class', 'ignore_case']);
  const ignoreCase = c.ignore_case ?? false;
  if (typeof ignoreCase !== 'boolean') {
    throw new ConfigError('ignore_case must be true or false');
  }
  const flags = ignoreCase ? 'i' : '';
  const blocks = c.block ?? [];
  if (!Array.isArray(blocks)) {
    throw new ConfigError('block must be a list of regular expressions');
  }
  const redacts = c.redact ?? {};
  if (redacts === null || typeof redacts !== 'object' || Array.isArray(redacts)) {
    throw new ConfigError('redact must be an object of entity name to regular expression');
  }
  labelClass = c.class ?? 'pii';
  if (typeof labelClass !== 'string' || !/^[a-z0-9_]{1,32}$/.test(labelClass)) {
    throw new ConfigError('class must be 1–32 of [a-z0-9_], such as "pii" or "secret"');
  }
  blockRules = blocks.map((source, i) => configRegex(source, `block[${i}]`, flags));
  redactRules = Object.entries(redacts).map(([entity, source]) => {
    if (!validEntity(entity)) {
      throw new ConfigError(`redact key ${JSON.stringify(entity)} must be an entity name: 1–32 of [a-z0-9_]`);
    }
    return { entity, pattern: configRegex(source, `redact.${entity}`, flags) };
  });
}

/** Blocks on a block match; otherwise redacts every redact match and labels what it redacted. */
export function inspectRequest(request, segments) {
  for (const segment of segments) {
    const rule = blockRules.findIndex((re) => re.test(segment.text));
    if (rule >= 0) {
      return block(`blocked by the keyword filter (rule block[${rule}])`);
    }
  }
  const found = [];
  segments.forEach((segment, i) => {
    for (const { entity, pattern } of redactRules) {
      found.push(...redactMatches(segment.text, i, pattern, entity));
    }
  });
  const redactions = withoutOverlaps(found);
  return allow(
    redactions.map((r) => redactedLabel(labelClass, r.entity)),
    redactions,
  );
}

/** Cuts the answer off when it matches a block pattern, across pieces (see CARRY). */
export function inspectResponse(text) {
  const window = answerTail + text;
  const rule = blockRules.findIndex((re) => re.test(window));
  if (rule >= 0) {
    return block(`answer cut off by the keyword filter (rule block[${rule}])`);
  }
  answerTail = window.slice(-CARRY);
  return pass();
}
