"""Fake GPU libraries (NVML, amdsmi) injected at the library boundary; see each module."""
