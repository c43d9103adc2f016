"""Facts about the machine for the workflow record: OS, CPU, memory, GPUs, host, scheduler.

Environment variables are copied only from an allowlist (:data:`ENV_ALLOWLIST`, extended by
``telemetry_capture.env_allowlist``; an entry ending in ``*`` is a prefix). Even an allowed
name is dropped when it looks like a secret (token, secret, password, key, credential), so
nothing that authenticates ever reaches a provenance record. ``machine_info`` never raises.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import socket
from typing import Any, Dict, Iterable, List, Mapping, Optional

logger = logging.getLogger("flowcept.telemetry")

#: Variables copied by default: they describe the job, not the user.
ENV_ALLOWLIST = (
    "SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_JOB_PARTITION", "SLURM_JOB_NODELIST", "SLURM_JOB_NUM_NODES",
    "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_CPUS_PER_TASK", "SLURM_STEP_ID", "SLURM_CLUSTER_NAME",
    "SLURM_JOB_ACCOUNT", "SLURM_JOB_QOS", "SLURM_GPUS", "SLURM_GPUS_PER_NODE",
    "PBS_JOBID", "PBS_QUEUE", "LSB_JOBID", "LSB_QUEUE", "FLUX_JOB_ID",
    "OMP_NUM_THREADS", "OMP_PROC_BIND", "OMP_PLACES", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
    "NCCL_DEBUG", "LMOD_SYSTEM_NAME", "LOADEDMODULES", "CONDA_DEFAULT_ENV", "VIRTUAL_ENV",
    "PYTHONHASHSEED", "LANG", "TZ",
)

_SECRET = re.compile(r"TOKEN|SECRET|PASSW|PASSWD|PWD|KEY|CREDENTIAL|AUTH|COOKIE|SESSION|PRIVATE|CERT",
                     re.IGNORECASE)


def select_env(env: Mapping[str, str], extra: Iterable[str] = ()) -> Dict[str, str]:
    """The allowlisted variables of ``env``; names that look like secrets are never copied."""
    names = set(ENV_ALLOWLIST)
    prefixes = []
    for entry in extra or ():
        entry = str(entry).strip()
        if entry.endswith("*"):
            prefixes.append(entry[:-1])
        elif entry:
            names.add(entry)
    out = {}
    for name, value in env.items():
        if (name in names or any(name.startswith(p) for p in prefixes)) and not _SECRET.search(name):
            out[name] = value
    return dict(sorted(out.items()))


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith(("model name", "cpu model", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _slurm(env: Mapping[str, str]) -> Optional[Dict[str, Any]]:
    if "SLURM_JOB_ID" not in env:
        return None
    return {
        "job_id": env.get("SLURM_JOB_ID"),
        "job_name": env.get("SLURM_JOB_NAME"),
        "partition": env.get("SLURM_JOB_PARTITION"),
        "nodelist": env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST"),
        "num_nodes": env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES"),
        "ntasks": env.get("SLURM_NTASKS"),
        "step_id": env.get("SLURM_STEP_ID"),
        "cluster": env.get("SLURM_CLUSTER_NAME"),
    }


def _safe(section: str, function: Any, *args: Any) -> Any:
    try:
        return function(*args)
    except Exception as error:
        logger.info("machine info: %s unavailable (%s)", section, error)
        return None


def _cpu_info(ps: Any) -> Dict[str, Any]:
    freq = _safe("cpu frequency", ps.cpu_freq)
    return {
        "model": _cpu_model(),
        "architecture": platform.machine(),
        "count_logical": _safe("cpu count", ps.cpu_count),
        "count_physical": _safe("cpu count", ps.cpu_count, False),
        "frequency_max_mhz": getattr(freq, "max", None) or None,
        "affinity_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }


def _memory_info(ps: Any) -> Dict[str, Any]:
    vm = _safe("memory", ps.virtual_memory)
    sw = _safe("swap", ps.swap_memory)
    return {"total_bytes": getattr(vm, "total", None), "swap_total_bytes": getattr(sw, "total", None)}


def _gpu_info(nvml: Any = None, amdsmi: Any = None) -> Dict[str, Any]:
    from flowcept.telemetry.gpu import GpuSampler

    sampler = GpuSampler(nvml=nvml, amdsmi=amdsmi)
    try:
        return {"status": sampler.status, "devices": sampler.inventory()}
    finally:
        sampler.close()


def machine_info(settings: Any = None, env: Optional[Mapping[str, str]] = None, nvml: Any = None,
                 amdsmi: Any = None) -> Dict[str, Any]:
    """Describe this machine for the workflow record; never raises (a failing part is None)."""
    env = os.environ if env is None else env
    info: Dict[str, Any] = {}
    try:
        extra: List[str] = []
        if settings is not None:
            try:
                extra = list(settings["telemetry_capture.env_allowlist"] or [])
            except Exception:
                extra = []
        uname = platform.uname()
        info["hostname"] = socket.gethostname()
        info["os"] = {"system": uname.system, "release": uname.release, "version": uname.version,
                      "platform": platform.platform()}
        info["python"] = {"version": platform.python_version(), "implementation": platform.python_implementation()}
        try:
            import psutil

            info["cpu"] = _cpu_info(psutil)
            info["memory"] = _memory_info(psutil)
            info["boot_time"] = _safe("boot time", psutil.boot_time)
        except Exception as error:
            logger.info("machine info: psutil unavailable (%s)", error)
            info["cpu"] = {"model": _cpu_model(), "count_logical": os.cpu_count()}
        info["gpu"] = _safe("gpu", _gpu_info, nvml, amdsmi)
        info["slurm"] = _slurm(env)
        info["environment"] = select_env(env, extra)
    except Exception as error:  # never let the workflow record fail for machine facts
        logger.warning("machine info incomplete: %s", error)
    return info
