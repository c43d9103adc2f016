"""GPU sampling across vendors: NVIDIA (NVML) first, then AMD (amdsmi).

``GpuSampler`` asks each vendor backend for its visible devices once per process and samples
every vendor that has some. No GPU, no driver or no library is a ``status``, never an error.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

from flowcept.telemetry.amd import AmdSampler
from flowcept.telemetry.nvidia import NvidiaSampler


class GpuSampler:
    """All visible GPUs of this process; backends injectable for tests (``nvml=``, ``amdsmi=``)."""

    name = "gpu"

    def __init__(self, metrics: Optional[Iterable[str]] = None, nvml: Any = None, amdsmi: Any = None,
                 vendors: Iterable[str] = ("nvidia", "amd")):
        metrics = list(metrics) if metrics is not None else None
        self._candidates: List[Any] = []
        if "nvidia" in vendors:
            self._candidates.append(NvidiaSampler(nvml, metrics=metrics))
        if "amd" in vendors:
            self._candidates.append(AmdSampler(amdsmi, metrics=metrics))

    @property
    def samplers(self) -> List[Any]:
        """The vendor samplers that have at least one visible device."""
        return [s for s in self._candidates if s.status == "ok"]

    @property
    def status(self) -> Dict[str, str]:
        """Per vendor: ok, no_library, no_driver, no_devices or error."""
        return {s.vendor: s.status for s in self._candidates}

    def inventory(self) -> List[Dict[str, Any]]:
        """Model, memory and driver of every visible GPU."""
        out: List[Dict[str, Any]] = []
        for sampler in self.samplers:
            out.extend(sampler.inventory())
        return out

    def sample(self, pids: Optional[Iterable[int]] = None) -> List[Dict[str, Any]]:
        """One record per visible GPU of every vendor."""
        pids = None if pids is None else list(pids)
        out: List[Dict[str, Any]] = []
        for sampler in self.samplers:
            out.extend(sampler.sample(pids))
        return out

    def close(self) -> None:
        """Release the vendor libraries."""
        for sampler in self._candidates:
            sampler.close()
