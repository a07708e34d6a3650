// Unit tests of the JavaScript SDK, in Node: `node --test plugins/js/sdk/` (no build needed).
import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  allow,
  carriesUnredactedPii,
  ConfigError,
  configRegex,
  decide,
  parseConfig,
  redactMatches,
  reject,
  residencyAllows,
  utf8Length,
  utf8Offset,
  withoutOverlaps,
} from './meridian.js';

/** The bytes a redaction covers, decoded: what the host would replace. */
function covered(text, r) {
  return new TextDecoder().decode(new TextEncoder().encode(text).slice(r.start, r.end));
}

test('utf8Length counts 1, 2, 3 and 4 byte characters', () => {
  assert.equal(utf8Length('a'), 1);
  assert.equal(utf8Length('é'), 2);
  assert.equal(utf8Length('☃'), 3);
  assert.equal(utf8Length('😀'), 4);
  const text = 'aé☃😀z';
  assert.equal(utf8Length(text), new TextEncoder().encode(text).length);
  assert.equal(utf8Offset(text, text.length - 1), 10);
});

test('utf8Offset refuses an index inside a surrogate pair', () => {
  assert.throws(() => utf8Offset('😀', 1), RangeError);
  assert.throws(() => utf8Offset('ab', 3), RangeError);
});

test('redactMatches gives UTF-8 byte offsets that cover exactly the match', () => {
  const text = 'Héllo 😀 josé@example.com, ü@x.de ☃ secret-code-4711';
  const email = redactMatches(text, 2, /[^\s@,]+@[^\s@,]+\.[a-z]+/, 'email');
  assert.deepEqual(
    email.map((r) => covered(text, r)),
    ['josé@example.com', 'ü@x.de'],
  );
  assert.equal(email[0].segment, 2);
  assert.equal(email[0].entity, 'email');
  // "Héllo " is 7 bytes, the emoji 4, the space 1.
  assert.equal(email[0].start, 12);
  const [code] = redactMatches(text, 0, /secret-code-\d+/, 'code');
  assert.equal(covered(text, code), 'secret-code-4711');
  assert.equal(code.end, new TextEncoder().encode(text).length);
});

test('redactMatches never splits a character, even for a pattern written without the u flag', () => {
  const text = 'x😀y';
  // Without `u`, `.` would match half of the emoji; the SDK adds the flag.
  const all = redactMatches(text, 0, /./, 'any');
  assert.deepEqual(all.map((r) => covered(text, r)), ['x', '😀', 'y']);
  assert.deepEqual(redactMatches(text, 0, /z*/, 'none'), [], 'empty matches are skipped');
});

test('redactMatches refuses an invalid entity name', () => {
  assert.throws(() => redactMatches('a', 0, /a/, 'Email'), TypeError);
  assert.throws(() => redactMatches('a', 0, /a/, 'x'.repeat(33)), TypeError);
});

test('withoutOverlaps keeps the earliest, then the longest, match', () => {
  const r = (segment, start, end, entity) => ({ segment, start, end, entity });
  const kept = withoutOverlaps([r(0, 5, 9, 'b'), r(0, 0, 4, 'a'), r(0, 5, 12, 'c'), r(1, 0, 3, 'd'), r(0, 11, 14, 'e')]);
  assert.deepEqual(kept.map((x) => x.entity), ['a', 'c', 'd']);
});

test('allow sorts and deduplicates labels', () => {
  assert.deepEqual(allow(['pii.b.redacted', 'pii.a.redacted', 'pii.b.redacted']).val.labels, [
    'pii.a.redacted',
    'pii.b.redacted',
  ]);
});

test('decide and reject build outcomes; no target is a 503', () => {
  assert.deepEqual(decide([{ name: 'a' }, 'b']), {
    tag: 'route',
    val: { targets: ['a', 'b'], modelRewrite: undefined, cache: 'default' },
  });
  assert.equal(decide([]).val.status, 503);
  assert.throws(() => reject(200, 'no'), RangeError);
  assert.throws(() => decide(['a'], { cache: 'sometimes' }), TypeError);
});

test('residency: unredacted pii stays in allowed regions or own infrastructure', () => {
  const pii = { labels: ['pii.email', 'pii.phone.redacted'], allowedRegions: ['eu-west'] };
  assert.ok(carriesUnredactedPii(pii));
  assert.ok(!carriesUnredactedPii({ labels: ['pii.email.redacted', 'secret.key'] }));
  assert.ok(residencyAllows(pii, { ownInfrastructure: false, region: 'eu-west' }));
  assert.ok(residencyAllows(pii, { ownInfrastructure: true, region: undefined }));
  assert.ok(!residencyAllows(pii, { ownInfrastructure: false, region: 'us-east' }));
  assert.ok(!residencyAllows({ ...pii, allowedRegions: [] }, { ownInfrastructure: false, region: undefined }));
  assert.ok(residencyAllows({ labels: [], allowedRegions: ['eu-west'] }, { ownInfrastructure: false, region: 'us-east' }));
});

test('parseConfig accepts known keys and refuses the rest with a ConfigError', () => {
  assert.deepEqual(parseConfig(''), {});
  assert.deepEqual(parseConfig(' {} '), {});
  assert.deepEqual(parseConfig('{"a": 1}', ['a']), { a: 1 });
  for (const [text, message] of [
    ['{"b": 1}', /unknown configuration key b/],
    ['[1]', /must be a JSON object/],
    ['{', /not valid JSON/],
  ]) {
    assert.throws(() => parseConfig(text, ['a']), (e) => e instanceof ConfigError && message.test(e.payload));
  }
});

test('configRegex compiles with the u flag and explains a bad pattern', () => {
  assert.ok(configRegex('a.b', 'block[0]').unicode);
  assert.ok(configRegex('a', 'x', 'i').ignoreCase);
  assert.throws(() => configRegex('(', 'block[3]'), (e) => e instanceof ConfigError && /block\[3\]/.test(e.message));
  assert.throws(() => configRegex(7, 'block[0]'), ConfigError);
});
