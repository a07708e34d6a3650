"""plugins/python/residency-router: the cases of plugins/residency's own tests."""

import unittest

from support import load_app, rejected, request, routed, target, types
from componentize_py_types import Err  # after support, which sets sys.path

app = load_app("residency-router", "py_residency_router_app")


def eu(name):
    return target(name, region="eu-west")


def pii_request(**fields):
    """A request whose e-mail address was only labelled, so it is still in the text."""
    base = dict(labels=["pii.email"], allowed_regions=["eu-west"])
    base.update(fields)
    return request(**base)


class ResidencyRouterTest(unittest.TestCase):
    def test_unlabelled_requests_keep_every_target_in_order(self):
        ts = [target("us"), eu("eu"), target("slow", health=types.Health.DEGRADED)]
        self.assertEqual(routed(app.route(request(), ts)), ["us", "eu", "slow"])

    def test_unredacted_pii_keeps_only_allowed_targets_in_order(self):
        own = target("own", region=None, own_infrastructure=True)
        ts = [target("us"), eu("eu-b"), own, eu("eu-a")]
        self.assertEqual(routed(app.route(pii_request(), ts)), ["eu-b", "own", "eu-a"])

    def test_redacted_pii_goes_anywhere(self):
        req = pii_request(labels=["pii.email.redacted", "pii.phone.redacted"], redacted=True)
        self.assertEqual(routed(app.route(req, [target("us")])), ["us"])

    def test_a_labelled_value_stays_in_allowed_regions_when_another_one_is_redacted(self):
        req = pii_request(labels=["pii.email", "pii.phone.redacted"], redacted=True)
        self.assertEqual(routed(app.route(req, [target("us"), eu("eu")])), ["eu"])
        self.assertEqual(rejected(app.route(req, [target("us")])), 451)

    def test_unredacted_pii_with_no_allowed_target_is_refused_451(self):
        out = app.route(pii_request(), [target("us"), target("unknown", region=None)])
        self.assertEqual(rejected(out), 451)
        self.assertTrue(out.value.reason.startswith("unavailable for legal reasons"))
        self.assertNotIn("email", out.value.reason)

    def test_no_targets_at_all_is_a_503_not_a_legal_refusal(self):
        self.assertEqual(rejected(app.route(request(), [])), 503)

    def test_configuration_must_be_empty(self):
        app.configure("{}")
        with self.assertRaises(Err):
            app.configure('{"regions": ["eu"]}')


if __name__ == "__main__":
    unittest.main()
