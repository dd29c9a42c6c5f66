"""Errors of the ``quantzoo`` CLI that carry a one-line message for the user."""

from __future__ import annotations


class RunConfigError(ValueError):
    """A recipe setting is wrong; the message names the setting and the fix."""
