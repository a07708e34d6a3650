/**
 * Guest SDK for Meridian plugins written in JavaScript: routers and privacy filters built into
 * WebAssembly components with componentize-js (`scripts/build-js-plugins`), against the
 * `meridian:plugin@0.1.3` contract (`wit/meridian-plugin.wit`).
 *
 * How the contract looks from JavaScript (componentize-js bindings):
 *
 * - A world's exports are the module's named exports, in camelCase: `configure`, `route`,
 *   `inspectRequest`, `inspectResponse`. Record fields are camelCase too (`allowedRegions`,
 *   `ownInfrastructure`); enums are their WIT names as strings (`'healthy'`, `'tool-result'`);
 *   an absent `option` is `undefined`; a variant is `{ tag, val }` (`{ tag: 'gpu-second', val: 0.5 }`).
 * - `configure` returns nothing to accept its config. To refuse it, throw a string or a
 *   {@link ConfigError}: the binding passes it on as the `err` text. Any other `Error` thrown from
 *   `configure`, and anything thrown from a hook, traps the instance (the host then falls back for a
 *   router and blocks for a filter).
 * - Host imports come from `'meridian:plugin/host@0.1.3'`: `log(level, message)`,
 *   `counterAdd(name, delta)` (delta a BigInt), `histogramRecord(name, value)`, `nowMs()` (a BigInt),
 *   `answerTriggers(triggers)`: from `configure`, a filter's list of strings before one of which
 *   the host shows it nothing of an answer (`[]`: never; see the contract), and
 *   `requestTriggers(triggers)` (0.1.3): the strings one of which a request must contain for the
 *   host to call the filter on it. This module does not
 *   import them, so it also runs in Node for tests.
 * - The module's top level runs once, when the component is built (componentize-js snapshots the
 *   initialised engine with Wizer); every request gets a fresh copy of that snapshot, so state never
 *   carries over between requests and top-level code must not call the host.
 * - Components are built with every componentize-js feature disabled (no WASI imports): `Date.now()`
 *   then returns the build's time (use the host's `nowMs()`), `Math.random()` is deterministic, and
 *   an uncaught exception traps without a message (build with `"disable": ["random", "clocks",
 *   "http", "fetch-event"]` in the plugin's package.json to have it printed to the node's log while
 *   debugging; that imports wasi:cli, wasi:io, wasi:filesystem and wasi:clocks).
 * - The engine has no `Intl`, no `String.prototype.normalize` and no Unicode property escapes
 *   (`\p{L}`) in regular expressions.
 *
 * Text offsets: the contract's redaction offsets are UTF-8 byte offsets, while JavaScript strings
 * index UTF-16 code units. {@link redactMatches} and {@link utf8Offset} convert.
 *
 * @module meridian
 */

// ---- routers --------------------------------------------------------------------------------

/**
 * Routes to `targets` in the order given. An empty list is not a valid decision, so no targets at
 * all gives a 503 refusal instead.
 *
 * @param {Array<string | {name: string}>} targets Targets (or their names), first choice first.
 * @param {{modelRewrite?: string, cache?: 'default' | 'bypass' | 'force'}} [options]
 * @returns {{tag: 'route', val: object} | {tag: 'reject', val: object}} The router's outcome.
 */
export function decide(targets, options = {}) {
  const names = targets.map((t) => (typeof t === 'string' ? t : t.name));
  if (names.length === 0) {
    return reject(503, 'no target is available for this request');
  }
  const cache = options.cache ?? 'default';
  if (!['default', 'bypass', 'force'].includes(cache)) {
    throw new TypeError(`cache must be default, bypass or force, got ${String(cache)}`);
  }
  return { tag: 'route', val: { targets: names, modelRewrite: options.modelRewrite, cache } };
}

/**
 * Refuses the request with HTTP `status` and `reason`, which the client sees.
 *
 * @param {number} status An HTTP status, 400–599 (the host refuses others).
 * @param {string} reason Why, in words for the client; name the rule, not the data.
 * @returns {{tag: 'reject', val: {status: number, reason: string}}}
 */
export function reject(status, reason) {
  if (!Number.isInteger(status) || status < 400 || status > 599) {
    throw new RangeError(`a refusal's status must be 400–599, got ${status}`);
  }
  return { tag: 'reject', val: { status, reason: String(reason) } };
}

/**
 * Whether the request carries personal data that goes out as is: a label that starts with `pii.`
 * and does not end with `.redacted`. `request.redacted` plays no part: it says that something was
 * redacted, not that nothing personal is left.
 *
 * @param {{labels: string[]}} request The request summary.
 * @returns {boolean}
 */
export function carriesUnredactedPii(request) {
  return request.labels.some((l) => l.startsWith('pii.') && !l.endsWith('.redacted'));
}

/**
 * The shared data-residency rule (as the Rust SDK's `residency_allows`). A request with unredacted
 * personal data may only go to the tenant's own infrastructure or to a target whose region is one
 * of `request.allowedRegions` (empty allows any region, but a target of unknown region is still
 * refused: nobody can vouch for where it runs). Any other request may go anywhere.
 *
 * @param {{labels: string[], allowedRegions: string[]}} request The request summary.
 * @param {{ownInfrastructure: boolean, region?: string}} target A target.
 * @returns {boolean}
 */
export function residencyAllows(request, target) {
  if (!carriesUnredactedPii(request) || target.ownInfrastructure) {
    return true;
  }
  if (target.region === undefined) {
    return false;
  }
  return request.allowedRegions.length === 0 || request.allowedRegions.includes(target.region);
}

/**
 * The targets that are fully healthy (neither degraded nor down), in the order given.
 *
 * @template {{health: string}} T
 * @param {T[]} targets
 * @returns {T[]}
 */
export function healthy(targets) {
  return targets.filter((t) => t.health === 'healthy');
}

// ---- privacy filters ------------------------------------------------------------------------

/**
 * Lets a request through with `labels` and `redactions`. Labels are sorted and deduplicated.
 *
 * @param {string[]} [labels] Labels for routers (`pii.email`, `pii.email.redacted`).
 * @param {Array<{segment: number, start: number, end: number, entity: string}>} [redactions]
 * @returns {{tag: 'allow', val: {labels: string[], redactions: object[]}}}
 */
export function allow(labels = [], redactions = []) {
  return { tag: 'allow', val: { labels: [...new Set(labels)].sort(), redactions } };
}

/**
 * Blocks a request (from `inspectRequest`) or cuts an answer off (from `inspectResponse`).
 *
 * @param {string} reason Why, in words the client sees; name the rule, not the data.
 * @returns {{tag: 'block', val: string}}
 */
export function block(reason) {
  return { tag: 'block', val: String(reason) };
}

/**
 * `inspectResponse`'s answer for a piece of text that may pass.
 *
 * @returns {{tag: 'allow'}}
 */
export function pass() {
  return { tag: 'allow' };
}

/**
 * The label of a finding that a redaction removes from the text: `<class>.<entity>.redacted`.
 *
 * @param {string} cls The class, such as `pii` or `secret`.
 * @param {string} entity The entity type, such as `email`.
 * @returns {string}
 */
export function redactedLabel(cls, entity) {
  return `${cls}.${entity}.redacted`;
}

/** What an entity type may be: 1–32 of `[a-z0-9_]` (the contract's rule). */
const ENTITY = /^[a-z0-9_]{1,32}$/;

/**
 * Whether `entity` is a valid entity type for a redaction: 1–32 of `[a-z0-9_]`.
 *
 * @param {string} entity
 * @returns {boolean}
 */
export function validEntity(entity) {
  return ENTITY.test(entity);
}

/**
 * UTF-8 length in bytes of `text.slice(from, to)`. A surrogate pair (one character outside the
 * Basic Multilingual Plane) is 4 bytes; a lone surrogate, which valid input never has, counts as
 * the 3 bytes of the U+FFFD that replaces it.
 *
 * @param {string} text
 * @param {number} [from] UTF-16 index to start at (default 0).
 * @param {number} [to] UTF-16 index to stop before (default the end).
 * @returns {number}
 */
export function utf8Length(text, from = 0, to = text.length) {
  let bytes = 0;
  for (let i = from; i < to; i++) {
    const c = text.charCodeAt(i);
    if (c < 0x80) {
      bytes += 1;
    } else if (c < 0x800) {
      bytes += 2;
    } else if (c >= 0xd800 && c <= 0xdbff && i + 1 < to && isLowSurrogate(text.charCodeAt(i + 1))) {
      bytes += 4;
      i++;
    } else {
      bytes += 3;
    }
  }
  return bytes;
}

/**
 * The UTF-8 byte offset of UTF-16 index `index` in `text`.
 *
 * @param {string} text
 * @param {number} index A UTF-16 index, 0–`text.length`, not inside a surrogate pair.
 * @returns {number}
 */
export function utf8Offset(text, index) {
  if (index < 0 || index > text.length) {
    throw new RangeError(`index ${index} is outside a text of ${text.length} UTF-16 units`);
  }
  if (splitsPair(text, index)) {
    throw new RangeError(`index ${index} falls inside a surrogate pair (not a character boundary)`);
  }
  return utf8Length(text, 0, index);
}

/**
 * Redactions for every match of `pattern` in `text`, with UTF-8 byte offsets. The pattern runs
 * with the `g` and `u` flags (added when missing: `u` makes matches whole characters, so offsets
 * always fall on character boundaries); empty matches are skipped. Offsets are computed in one
 * pass over the text, whatever the number of matches.
 *
 * @param {string} text The segment's text.
 * @param {number} segment The segment's index in the list the filter was given.
 * @param {RegExp} pattern What to redact.
 * @param {string} entity The entity type (1–32 of `[a-z0-9_]`), which names the placeholder.
 * @returns {Array<{segment: number, start: number, end: number, entity: string}>}
 */
export function redactMatches(text, segment, pattern, entity) {
  if (!validEntity(entity)) {
    throw new TypeError(`entity must be 1–32 of [a-z0-9_], got ${JSON.stringify(entity)}`);
  }
  const re = withFlags(pattern, 'gu');
  const out = [];
  // Walks forward: the bytes up to `at` (UTF-16) are `bytes`, so each match costs only the text
  // since the previous one.
  let at = 0;
  let bytes = 0;
  for (const m of text.matchAll(re)) {
    if (m[0].length === 0) {
      continue;
    }
    const start = bytes + utf8Length(text, at, m.index);
    const end = start + utf8Length(text, m.index, m.index + m[0].length);
    out.push({ segment, start, end, entity });
    at = m.index + m[0].length;
    bytes = end;
  }
  return out;
}

/**
 * `redactions` without overlaps, which the host refuses (a filter answering them fails closed):
 * sorted by segment and start; where two overlap, the one that starts first wins, and of two that
 * start together, the longer one.
 *
 * @param {Array<{segment: number, start: number, end: number, entity: string}>} redactions
 * @returns {Array<{segment: number, start: number, end: number, entity: string}>}
 */
export function withoutOverlaps(redactions) {
  const sorted = [...redactions].sort((a, b) => a.segment - b.segment || a.start - b.start || b.end - a.end);
  const out = [];
  for (const r of sorted) {
    const last = out[out.length - 1];
    if (last && last.segment === r.segment && r.start < last.end) {
      continue;
    }
    out.push(r);
  }
  return out;
}

/**
 * `pattern` with `flags` added to its own (a new RegExp; the original's `lastIndex` is left alone).
 *
 * @param {RegExp} pattern
 * @param {string} flags Flags to add, such as `'gu'`.
 * @returns {RegExp}
 */
export function withFlags(pattern, flags) {
  const all = new Set([...pattern.flags, ...flags]);
  // `v` is a stricter `u`; both together is a syntax error.
  if (all.has('v')) {
    all.delete('u');
  }
  return new RegExp(pattern.source, [...all].join(''));
}

function isLowSurrogate(c) {
  return c >= 0xdc00 && c <= 0xdfff;
}

function splitsPair(text, index) {
  return (
    index > 0 &&
    index < text.length &&
    isLowSurrogate(text.charCodeAt(index)) &&
    text.charCodeAt(index - 1) >= 0xd800 &&
    text.charCodeAt(index - 1) <= 0xdbff
  );
}

// ---- configuration --------------------------------------------------------------------------

/**
 * A refused configuration. Throw it from `configure`: its message becomes the `err` text the host
 * reports (the binding reads its `payload`). Other errors thrown from `configure` trap instead.
 */
export class ConfigError extends Error {
  /** @param {string} message What is wrong, for the operator. */
  constructor(message) {
    super(message);
    this.name = 'ConfigError';
    /** The `err` text of `configure`'s result. */
    this.payload = message;
  }
}

/**
 * Parses the plugin's configuration: a JSON object whose keys must all be in `allowed` (a key the
 * plugin would silently ignore is almost always a typo). Empty text counts as `{}`.
 *
 * @param {string} json The text `configure` received.
 * @param {string[]} [allowed] The keys the plugin understands (default none).
 * @returns {Record<string, unknown>} The object.
 * @throws {ConfigError} When it is not JSON, not an object, or has another key.
 */
export function parseConfig(json, allowed = []) {
  const text = json.trim();
  if (text === '') {
    return {};
  }
  let value;
  try {
    value = JSON.parse(text);
  } catch (e) {
    throw new ConfigError(`configuration is not valid JSON: ${e.message}`);
  }
  if (value === null || typeof value !== 'object' || Array.isArray(value)) {
    throw new ConfigError(`configuration must be a JSON object, got ${text}`);
  }
  const unknown = Object.keys(value).filter((k) => !allowed.includes(k));
  if (unknown.length > 0) {
    const takes = allowed.length === 0 ? 'no keys' : `only ${allowed.join(', ')}`;
    throw new ConfigError(`unknown configuration key ${unknown.join(', ')}: this plugin takes ${takes}`);
  }
  return value;
}

/**
 * Compiles a regular expression from configuration, with the `u` flag (and `extraFlags`).
 *
 * @param {unknown} source The pattern's text.
 * @param {string} where Where it is in the configuration, for the error (`block[2]`).
 * @param {string} [extraFlags] More flags, such as `'i'`.
 * @returns {RegExp}
 * @throws {ConfigError} When it is not a string or not a valid pattern.
 */
export function configRegex(source, where, extraFlags = '') {
  if (typeof source !== 'string' || source === '') {
    throw new ConfigError(`${where} must be a non-empty string holding a regular expression`);
  }
  try {
    return new RegExp(source, `u${extraFlags}`);
  } catch (e) {
    throw new ConfigError(`${where} is not a valid regular expression: ${e.message}`);
  }
}
