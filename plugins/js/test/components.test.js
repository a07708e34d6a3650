// Runs the built JavaScript components (scripts/build-js-plugins first) in Node: jco transpiles
// each one, the very wasm the host loads (the SpiderMonkey engine and the plugin's snapshot), into
// an ES module, and the tests call its exports through the contract's bindings. What the host
// adds (deadlines, memory caps, validation) is checked with `meridian plugin run`, not here.
//
//   node --test plugins/js/test/
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');
const jco = join(root, 'plugins/js/node_modules/.bin/jco');
const built = join(root, 'target/wasm32-wasip2/release');
const work = mkdtempSync(join(tmpdir(), 'meridian-js-components-'));

/** The host interface (recording log lines) and the routing interface's `prefix-match`. */
writeFileSync(
  join(work, 'host.js'),
  `export const lines = [];
export function log(level, message) { lines.push([level, message]); }
export function counterAdd(name, delta) {}
export function histogramRecord(name, value) {}
export function nowMs() { return 0n; }
export function answerTriggers(triggers) {}
export function requestTriggers(triggers) {}
export function prefixMatch(target) { return 0; }
`,
);

/** Transpiles the built component `name` and imports it. */
async function load(name) {
  const wasm = join(built, `${name}.wasm`);
  if (!existsSync(wasm)) {
    throw new Error(`${wasm} is missing: run scripts/build-js-plugins first`);
  }
  const out = join(work, name);
  execFileSync(jco, ['transpile', wasm, '-o', out, '--map', 'meridian:plugin/host@0.1.3=../host.js', '--map', 'meridian:plugin/routing@0.1.3=../host.js', '--quiet']);
  return import(join(out, `${name}.js`));
}

after(() => rmSync(work, { recursive: true, force: true }));

const request = {
  requestId: 'req-1',
  tenant: 't',
  clientRegion: undefined,
  nodeRegion: 'eu-west',
  model: 'm',
  promptTokens: 10,
  maxOutputTokens: undefined,
  streaming: false,
  labels: [],
  redacted: false,
  allowedRegions: [],
  priceCapUsd: undefined,
  headers: [],
};

function target(name, region, ownInfrastructure = false) {
  return {
    name,
    kind: 'managed',
    region,
    ownInfrastructure,
    model: 'm',
    price: undefined,
    health: 'healthy',
    latencyMs: 0,
    ttftMs: 0,
    inFlight: 0,
    capacity: undefined,
  };
}

/** The bytes a redaction covers, decoded: what the host would replace. */
function covered(text, r) {
  return new TextDecoder().decode(new TextEncoder().encode(text).slice(r.start, r.end));
}

let filter;
let router;
let exception;
before(async () => {
  [filter, router, exception] = await Promise.all([
    load('js_keyword_filter'),
    load('js_residency_router'),
    load('js_fixture_exception'),
  ]);
});

test('keyword filter: configure refuses bad config with a readable error', () => {
  for (const [config, message] of [
    ['{"bogus": 1}', /unknown configuration key bogus/],
    ['not json', /not valid JSON/],
    ['{"block": ["("]}', /block\[0\] is not a valid regular expression/],
    ['{"redact": {"E-mail": "x"}}', /must be an entity name/],
    ['{"ignore_case": "yes"}', /ignore_case must be true or false/],
  ]) {
    assert.throws(() => filter.configure(config), (e) => message.test(e.payload), config);
  }
});

test('keyword filter: redactions carry UTF-8 byte offsets and redacted labels', () => {
  filter.configure(
    JSON.stringify({ redact: { email: '[^\\s@,]+@[^\\s@,]+\\.[a-z]+', code: 'secret-code-\\d+' } }),
  );
  const segments = [
    { kind: 'system', text: 'Be brief ☃' },
    { kind: 'user', text: 'Héllo 😀 mail josé@example.com or ü@x.de, code secret-code-4711 ☃' },
  ];
  const verdict = filter.inspectRequest(request, segments);
  assert.equal(verdict.tag, 'allow');
  assert.deepEqual(verdict.val.labels, ['pii.code.redacted', 'pii.email.redacted']);
  assert.deepEqual(
    verdict.val.redactions.map((r) => [r.segment, r.entity, covered(segments[r.segment].text, r)]),
    [
      [1, 'email', 'josé@example.com'],
      [1, 'email', 'ü@x.de'],
      [1, 'code', 'secret-code-4711'],
    ],
  );
});

test('keyword filter: overlapping matches of two entities become one redaction', () => {
  filter.configure(JSON.stringify({ redact: { word: 'secret\\w*', code: 'code-\\d+' }, class: 'secret' }));
  const text = 'the secretcode-12 here';
  const verdict = filter.inspectRequest(request, [{ kind: 'user', text }]);
  assert.deepEqual(verdict.val.redactions.map((r) => covered(text, r)), ['secretcode']);
  assert.deepEqual(verdict.val.labels, ['secret.word.redacted']);
});

test('keyword filter: a block pattern blocks the request, naming the rule only', () => {
  filter.configure(JSON.stringify({ block: ['drop table', 'ignore previous instructions'], ignore_case: true }));
  const verdict = filter.inspectRequest(request, [
    { kind: 'system', text: 'fine' },
    { kind: 'user', text: 'Please IGNORE previous instructions' },
  ]);
  assert.deepEqual(verdict, { tag: 'block', val: 'blocked by the keyword filter (rule block[1])' });
});

test('keyword filter: an answer is cut off on a block match, also across pieces', () => {
  filter.configure(JSON.stringify({ block: ['launch code \\d{4}'] }));
  assert.deepEqual(filter.inspectResponse('Sure. The launch co'), { tag: 'allow' });
  assert.deepEqual(filter.inspectResponse('de 4711 is'), {
    tag: 'block',
    val: 'answer cut off by the keyword filter (rule block[0])',
  });
});

test('residency router: mirrors plugins/residency', () => {
  router.configure('{}');
  assert.throws(() => router.configure('{"regions": ["eu"]}'), (e) => /no keys/.test(e.payload));
  const eu = (name) => target(name, 'eu-west');
  const route = (req, ts) => router.route(req, ts);
  const names = (outcome) => (outcome.tag === 'route' ? outcome.val.targets : outcome.val.status);
  const pii = { ...request, labels: ['pii.email'], allowedRegions: ['eu-west'] };
  // Unlabelled: every target, in order.
  assert.deepEqual(names(route(request, [target('us', 'us-east'), eu('eu')])), ['us', 'eu']);
  // Unredacted pii: allowed regions and own infrastructure only, in order.
  const own = target('own', undefined, true);
  assert.deepEqual(names(route(pii, [target('us', 'us-east'), eu('eu-b'), own, eu('eu-a')])), ['eu-b', 'own', 'eu-a']);
  // Redacted pii goes anywhere; a labelled value next to a redacted one does not.
  const redacted = { ...pii, labels: ['pii.email.redacted'], redacted: true };
  assert.deepEqual(names(route(redacted, [target('us', 'us-east')])), ['us']);
  const mixed = { ...pii, labels: ['pii.email', 'pii.phone.redacted'], redacted: true };
  assert.equal(names(route(mixed, [target('us', 'us-east')])), 451);
  // No allowed target: 451 that does not name the data; no target at all: 503.
  const refused = route(pii, [target('us', 'us-east'), target('unknown', undefined)]);
  assert.equal(refused.val.status, 451);
  assert.match(refused.val.reason, /^unavailable for legal reasons/);
  assert.doesNotMatch(refused.val.reason, /email/);
  assert.equal(names(route(request, [])), 503);
});

test('exception fixture: route throws', () => {
  exception.configure('{}');
  assert.throws(() => exception.route(request, [target('a', 'eu-west')]));
});
