"""The SDK's helpers: config parsing, the residency rule, byte offsets and redactions."""

import unittest

from support import filtering as wit_filtering, request, target
from componentize_py_types import Err  # after support, which sets sys.path
import meridian_plugin
from meridian_plugin import filtering, routing


class ConfigTest(unittest.TestCase):
    def test_parse_config(self):
        self.assertEqual(meridian_plugin.parse_config(""), {})
        self.assertEqual(meridian_plugin.parse_config('{"a": 1}', allowed=["a"]), {"a": 1})
        for bad in ("[1]", "{", '{"b": 1}'):
            with self.assertRaises(Err, msg=bad):
                meridian_plugin.parse_config(bad, allowed=["a"])

    def test_expect_empty_config(self):
        meridian_plugin.expect_empty_config(" {} ")
        with self.assertRaises(Err) as e:
            meridian_plugin.expect_empty_config('{"regions": ["eu"]}')
        self.assertIn("no configuration keys", e.exception.value)


class ResidencyTest(unittest.TestCase):
    def test_labels_decide_not_the_flag(self):
        self.assertFalse(meridian_plugin.carries_unredacted_pii(request(labels=["pii.email.redacted"])))
        self.assertTrue(meridian_plugin.carries_unredacted_pii(request(labels=["pii.email"], redacted=True)))
        self.assertFalse(meridian_plugin.carries_unredacted_pii(request(labels=["secret.code"])))

    def test_residency_allows(self):
        pii = request(labels=["pii.email"], allowed_regions=["eu-west"])
        self.assertTrue(meridian_plugin.residency_allows(pii, target("eu", region="eu-west")))
        self.assertFalse(meridian_plugin.residency_allows(pii, target("us")))
        self.assertTrue(meridian_plugin.residency_allows(pii, target("own", region=None, own_infrastructure=True)))
        anywhere = request(labels=["pii.email"])
        self.assertTrue(meridian_plugin.residency_allows(anywhere, target("us")))
        self.assertFalse(meridian_plugin.residency_allows(anywhere, target("unknown", region=None)))


class RoutingTest(unittest.TestCase):
    def test_decide_and_reject(self):
        out = routing.decide([target("a"), target("b")])
        self.assertEqual(out.value.targets, ["a", "b"])
        self.assertEqual(routing.decide([]).value.status, 503)
        with self.assertRaises(ValueError):
            routing.reject(302, "moved")


class ByteOffsetTest(unittest.TestCase):
    def test_offsets_are_utf8_bytes(self):
        text = "né@x — 😀!"
        positions = range(len(text) + 1)
        offsets = filtering.byte_offsets(text, positions)
        for p in positions:
            self.assertEqual(offsets[p], len(text[:p].encode("utf-8")), p)
        self.assertEqual(filtering.byte_offsets("abc", [0, 3]), {0: 0, 3: 3})
        with self.assertRaises(IndexError):
            filtering.byte_offsets("né", [3])

    def test_redactor_converts_and_merges(self):
        import re

        text = "Zoë: zoë@exämple.de, 🙂 bob@example.com"
        r = filtering.Redactor()
        self.assertEqual(r.add_matches(1, text, re.compile(r"[\w.]+@[\w.]+\w"), "email"), 2)
        r.add_matches(1, text, re.compile(r"exämple"), "domain")  # inside the first e-mail
        r.add(0, "x", 0, 0, "email")  # empty: ignored
        found = r.redactions()
        encoded = text.encode("utf-8")
        self.assertEqual([encoded[x.start:x.end].decode() for x in found], ["zoë@exämple.de", "bob@example.com"])
        self.assertEqual([(x.segment, x.entity) for x in found], [(1, "email"), (1, "email")])
        self.assertEqual(r.labels(), ["pii.domain.redacted", "pii.email.redacted"])
        with self.assertRaises(ValueError):
            r.add(0, "x", 0, 1, "Email")

    def test_verdicts(self):
        v = filtering.allow(["b", "a", "b"], [])
        self.assertIsInstance(v, wit_filtering.RequestVerdict_Allow)
        self.assertEqual(v.value.labels, ["a", "b"])
        self.assertIsInstance(filtering.block("no"), wit_filtering.RequestVerdict_Block)


if __name__ == "__main__":
    unittest.main()
