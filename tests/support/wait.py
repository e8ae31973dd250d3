"""Tests poll with bench.wait.eventually."""

from bench.wait import eventually

__all__ = ["eventually"]
