"""hypothesis for the property-based tests, or stand-ins that skip just those tests where it is missing.

A machine without hypothesis (a GPU image may lack it, with no network to install it) still runs
every other test of a module: ``from _property import given, settings, st, HealthCheck`` instead of importing
hypothesis, and each ``@given`` test is reported as skipped there.
"""
from __future__ import annotations

import pytest

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    HAVE_HYPOTHESIS = True
except ImportError:
    HAVE_HYPOTHESIS = False

    class _Anything:
        """Absorbs what a test module does with strategies and settings at import time (attributes, calls,
        ``@st.composite``, ``HealthCheck.too_slow``): nothing of it is used, since the tests skip."""

        def __getattr__(self, name):
            return self

        def __call__(self, *args, **kwargs):
            return self

        def __iter__(self):
            return iter(())

    st = HealthCheck = _Anything()

    def settings(*args, **kwargs):
        return lambda test: test

    def given(*args, **kwargs):
        def skipped(test):
            # A fresh function without the test's parameters, so pytest looks for no fixtures of those names.
            def property_test():
                pytest.skip("property-based test: needs hypothesis (pip install hypothesis)")

            property_test.__name__ = test.__name__
            property_test.__qualname__ = test.__qualname__
            property_test.__doc__ = test.__doc__
            property_test.__module__ = test.__module__
            return property_test

        return skipped

__all__ = ["HAVE_HYPOTHESIS", "HealthCheck", "given", "settings", "st"]
