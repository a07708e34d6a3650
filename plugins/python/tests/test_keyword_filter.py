"""plugins/python/keyword-filter: configuration, blocking, redaction offsets, answers."""

import json
import os
import unittest

from support import ROOT, filtering, load_app, request, segment
from componentize_py_types import Err  # after support, which sets sys.path

app = load_app("keyword-filter", "py_keyword_filter_app")
EXAMPLE = open(os.path.join(ROOT, "plugins", "python", "keyword-filter", "config.json")).read()


def configured(config):
    """The app module, configured (its state is module-level, as in the component)."""
    app.configure(json.dumps(config) if isinstance(config, dict) else config)
    return app


class ConfigTest(unittest.TestCase):
    def test_example_config_loads(self):
        configured(EXAMPLE)

    def test_bad_configs_are_refused(self):
        for bad in (
            {},
            {"block": "x"},
            {"block": ["("]},
            {"redact": {"E-mail": "x"}},
            {"redact": {"email": ""}},
            {"redact": {"email": "x"}, "class": "PII"},
            {"blokc": ["x"]},
        ):
            with self.assertRaises(Err, msg=bad):
                configured(bad)


class RequestTest(unittest.TestCase):
    def test_block_names_the_rule_not_the_text(self):
        w = configured(EXAMPLE)
        v = w.inspect_request(request(), [segment("hi"), segment("use SECRET-CODE-4711 now")])
        self.assertIsInstance(v, filtering.RequestVerdict_Block)
        self.assertEqual(v.value, "blocked by the keyword filter's rule block[0]")

    def test_redactions_are_byte_offsets_with_labels(self):
        w = configured(EXAMPLE)
        texts = ["system text", "Zoë (zoë.müller@exämple.de), IBAN DE89 3704 0044 0532 0130 00; bob@example.com"]
        v = w.inspect_request(request(), [segment(t) for t in texts])
        self.assertIsInstance(v, filtering.RequestVerdict_Allow)
        self.assertEqual(v.value.labels, ["pii.email.redacted", "pii.iban.redacted"])
        encoded = texts[1].encode("utf-8")
        values = [(r.segment, r.entity, encoded[r.start:r.end].decode()) for r in v.value.redactions]
        self.assertEqual(
            values,
            [
                (1, "email", "zoë.müller@exämple.de"),
                (1, "iban", "DE89 3704 0044 0532 0130 00"),
                (1, "email", "bob@example.com"),
            ],
        )

    def test_nothing_found_is_a_plain_allow(self):
        v = configured(EXAMPLE).inspect_request(request(), [segment("nothing here")])
        self.assertEqual((v.value.labels, v.value.redactions), ([], []))

    def test_custom_class(self):
        v = configured({"redact": {"code": r"\d{4}"}, "class": "secret"}).inspect_request(request(), [segment("a 1234")])
        self.assertEqual(v.value.labels, ["secret.code.redacted"])


class ResponseTest(unittest.TestCase):
    def test_a_match_split_across_pieces_is_caught(self):
        w = configured(EXAMPLE)
        self.assertIsInstance(w.inspect_response("all fine, the code is secret-"), filtering.ResponseVerdict_Allow)
        v = w.inspect_response("code-99 as asked")
        self.assertIsInstance(v, filtering.ResponseVerdict_Block)
        self.assertIn("block[0]", v.value)

    def test_clean_answers_pass(self):
        w = configured(EXAMPLE)
        for piece in ("Hello", " world", "!" * 10000):
            self.assertIsInstance(w.inspect_response(piece), filtering.ResponseVerdict_Allow)


if __name__ == "__main__":
    unittest.main()
