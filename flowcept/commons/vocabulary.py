"""Compatibility path: ``from flowcept.commons.vocabulary import Status``."""

from flowcept.records import Status

__all__ = ["Status"]
