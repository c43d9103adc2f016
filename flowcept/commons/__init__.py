"""Compatibility paths of the reference package (``flowcept.commons.vocabulary.Status`` ...)."""
