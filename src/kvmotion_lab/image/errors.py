"""Errors raised while building the guest image."""

from __future__ import annotations


class ImageBuildError(Exception):
    """The guest image could not be built.

    The message always says what failed and how to fix it.
    """
