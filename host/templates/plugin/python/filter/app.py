"""{{name}}: a Meridian privacy filter, in Python, that redacts secret codes (``secret-code-`` and
digits, such as ``secret-code-1234``) from a request's text, and labels the request
``secret.code.redacted`` when it finds one (the contract's convention for a redacted finding).

The node replaces each redacted value with a placeholder (``[SECRET_CODE_1]``) before the request
leaves it, and puts the value back into the answer. Answers pass unchanged. Takes no
configuration (``{}``).

componentize-py imports this module once, at build time, and snapshots the interpreter: import
everything you need here at the top, never inside a function.
"""

import re

import wit_world
from meridian_plugin import expect_empty_config
from meridian_plugin import filtering

#: A secret code: the prefix and one or more ASCII digits (``\d`` would take any Unicode digit).
SECRET_CODE = re.compile(r"secret-code-[0-9]+")


class WitWorld(wit_world.WitWorld):
    """The ``privacy-filter`` world's exports."""

    def configure(self, config: str) -> None:
        # Raise `meridian_plugin.config_error("why")` to refuse a configuration.
        expect_empty_config(config)

    def inspect_request(self, request, segments):
        # The Redactor turns Python's code-point positions into the UTF-8 byte offsets the
        # contract wants, and merges overlapping matches.
        redactor = filtering.Redactor()
        for index, segment in enumerate(segments):
            redactor.add_matches(index, segment.text, SECRET_CODE, "secret_code")
        labels = ["secret.code.redacted"] if redactor.entities() else []
        return filtering.allow(labels, redactor.redactions())

    def inspect_response(self, text: str):
        return filtering.allow_response()
