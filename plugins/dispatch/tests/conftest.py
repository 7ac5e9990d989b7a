"""Fixtures shared by the dispatch tests."""

from test_dispatch import saved  # noqa: F401  (the saved-adapter fixture, for every module here)
