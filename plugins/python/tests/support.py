"""Test support: puts the binding stubs (written by scripts/build-python-plugins to
.meridian/py-bindings) and the SDK on sys.path, loads a plugin's app.py by path, and builds
requests and targets like the Rust SDK's ``testing`` module."""

import importlib.util
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
BINDINGS = os.path.join(ROOT, ".meridian", "py-bindings")
if not os.path.isdir(os.path.join(BINDINGS, "wit_world")):
    raise RuntimeError(f"no binding stubs in {BINDINGS}: run scripts/build-python-plugins first")
for path in (BINDINGS, os.path.join(ROOT, "plugins", "python", "sdk")):
    if path not in sys.path:
        sys.path.insert(0, path)

from wit_world.imports import filtering, routing, types  # noqa: E402


def load_app(plugin_dir: str, module_name: str):
    """Imports ``plugins/python/<plugin_dir>/app.py`` as ``module_name``."""
    path = os.path.join(ROOT, "plugins", "python", plugin_dir, "app.py")
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def request(**fields) -> "types.RequestSummary":
    """A 1000-prompt-token request of tenant ``acme`` in ``eu-west``, with no labels and no
    restrictions, with ``fields`` replaced."""
    base = dict(
        request_id="req-1",
        tenant="acme",
        client_region="eu-west",
        node_region="eu-west",
        model="llama",
        prompt_tokens=1000,
        max_output_tokens=None,
        streaming=False,
        labels=[],
        redacted=False,
        allowed_regions=[],
        price_cap_usd=None,
        headers=[],
    )
    base.update(fields)
    return types.RequestSummary(**base)


def target(name: str, **fields) -> "types.Target":
    """A healthy, unpriced managed target in ``us-east``, with ``fields`` replaced."""
    base = dict(
        name=name,
        kind=types.TargetKind.MANAGED,
        region="us-east",
        own_infrastructure=False,
        model="llama",
        price=None,
        health=types.Health.HEALTHY,
        latency_ms=0.0,
        ttft_ms=0.0,
        in_flight=0,
        capacity=None,
    )
    base.update(fields)
    return types.Target(**base)


def routed(outcome):
    """The target names of a route outcome, or None for a refusal."""
    return outcome.value.targets if isinstance(outcome, routing.Outcome_Route) else None


def rejected(outcome):
    """The status of a refusal, or None for a route."""
    return outcome.value.status if isinstance(outcome, routing.Outcome_Reject) else None


def segment(text: str, kind=None) -> "filtering.Segment":
    """A segment of ``kind`` (user by default)."""
    return filtering.Segment(kind or filtering.SegmentKind.USER, text)
