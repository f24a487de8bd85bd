"""Pinned CPU numerics: what makes a training run bit-identical on another x86-64 machine, and its fingerprint.

Measured on this project's machines (docs/BENCHMARKS.md, tests/pipeline/test_numerics.py): the weights after a
few AdamW steps of a tiny Llama change with

- the ATen kernel dispatch (``ATEN_CPU_CAPABILITY``: avx512, avx2 and default each give other bits);
- MKL's code branch (``MKL_CBWR``). On a non-Intel CPU every branch but COMPATIBLE falls back to AUTO (oneMKL
  developer guide, "Getting Started with Conditional Numerical Reproducibility"; on this AMD EPYC AUTO, SSE4_2,
  AVX2 and AVX512 gave one result, COMPATIBLE another), so COMPATIBLE is the only branch that an Intel and an
  AMD box both run;
- and, by oneMKL's own reproducibility conditions, the number of threads.

``portable`` mode pins all of them (plus oneDNN, denormals and torch.compile, which did not move the bits in our
probe but would on other paths); ``native`` leaves the libraries to pick the fastest path for the CPU at hand.

The environment variables are read when torch and MKL load, so they must be set before ``import torch``: the
``ownllm`` command does it (``pin_environment``) before any sub-command runs, and re-executes itself when
something imported torch first. The stages then apply the runtime knobs (``apply``) and record a fingerprint
(``record``): the values that decide the bits under the mode's guarantee. In portable mode that excludes the CPU
model, so two x86-64 machines that must agree write the same record (and the same dvc.lock); in native mode the
CPU model and its flags are part of it. ``machine`` adds the full description (CPU model, flags, the BLAS build)
for the untracked reports.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import warnings
from functools import lru_cache
from importlib import metadata
from typing import Any

from pipeline.config import NumericsConfig

# oneDNN's ISA cap that matches each ATen dispatch level (the names oneDNN's ONEDNN_MAX_CPU_ISA accepts).
ONEDNN_ISA = {"default": "SSE41", "avx2": "AVX2", "avx512": "AVX512_CORE"}
# /proc/cpuinfo flags each ATen dispatch level needs (ATen's own cpuinfo checks).
CAPABILITY_FLAGS = {"default": set(), "avx2": {"avx2", "fma"}, "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"}}
# The flags worth recording: the SIMD levels that ATen, MKL and oneDNN dispatch on.
RECORDED_FLAGS = ("sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                  "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "avx_vnni")
# Variables the pinned numerics own; what torch and MKL saw is read back from these at record time.
PINNED_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_DYNAMIC",
              "ONEDNN_MAX_CPU_ISA", "TORCH_COMPILE_DISABLE")
VERSIONED = ("torch", "transformers", "mosaicml", "trl", "numpy")
REEXEC_MARK = "OWNLLM_NUMERICS_REEXEC"


class NumericsError(RuntimeError):
    """The pinned numerics cannot hold on this machine (e.g. the CPU lacks the pinned kernel dispatch)."""


def environment(cfg: NumericsConfig) -> dict[str, str]:
    """The environment variables that pin ``cfg`` (empty for native mode with nothing set explicitly)."""
    s = cfg.settings()
    env: dict[str, str] = {}
    if s["cpu_capability"]:
        env["ATEN_CPU_CAPABILITY"] = s["cpu_capability"]
        env["ONEDNN_MAX_CPU_ISA"] = ONEDNN_ISA[s["cpu_capability"]]
    if s["mkl_cbwr"]:
        env["MKL_CBWR"] = s["mkl_cbwr"]
    if s["intra_op_threads"]:
        # OpenMP and MKL size their pools from these at load; MKL_DYNAMIC=FALSE keeps MKL from using fewer
        # threads than asked (oneMKL's reproducibility conditions want a fixed number).
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(s["intra_op_threads"])
        env["MKL_DYNAMIC"] = "FALSE"
    if s["compile"] is False:
        env["TORCH_COMPILE_DISABLE"] = "1"
    return env


def cpu_flags() -> set[str]:
    return set(_cpuinfo().get("flags", "").split())


@lru_cache(maxsize=1)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                out[key.strip()] = value.strip()
    except OSError:
        pass
    return out


def check_supported(cfg: NumericsConfig) -> None:
    """Fail clearly when the CPU cannot run the pinned kernel dispatch (ATen would silently pick another)."""
    cap = cfg.settings()["cpu_capability"]
    flags = cpu_flags()
    if not cap or not flags or platform.machine() not in ("x86_64", "AMD64"):
        return
    missing = sorted(CAPABILITY_FLAGS[cap] - flags)
    if missing:
        raise NumericsError(f"numerics.cpu_capability is {cap!r} but this CPU lacks {', '.join(missing)}: set "
                            "numerics.cpu_capability: default (a different fingerprint: the bits will differ "
                            "from runs pinned to another dispatch)")


def pin_environment(cfg: NumericsConfig, reexec_argv: list[str] | None = None) -> None:
    """Set the pinning variables before torch loads.

    When torch is already imported the variables would come too late. With ``reexec_argv`` (the ``ownllm``
    console script's own arguments) the process replaces itself with a fresh one that has them; otherwise (a
    library caller, a test calling ``pipeline.cli.main`` in-process) the environment is left alone and a warning
    says the run is not pinned; its fingerprint records what was actually in use.
    """
    check_supported(cfg)
    env = environment(cfg)
    stale = {k: v for k, v in env.items() if os.environ.get(k) != v}
    if not stale:
        return
    if "torch" not in sys.modules:
        os.environ.update(env)
        return
    if reexec_argv is not None and not os.environ.get(REEXEC_MARK):
        new_env = {**os.environ, **env, REEXEC_MARK: "1"}
        sys.stdout.flush()
        sys.stderr.flush()
        code = "import sys; from pipeline.cli import main; sys.exit(main())"
        os.execve(sys.executable, [sys.executable, "-c", code, *reexec_argv], new_env)
    warnings.warn(f"numerics: torch was imported before {', '.join(sorted(stale))} could be set; this run is not "
                  "pinned (its fingerprint records what it used)", RuntimeWarning, stacklevel=2)


def apply(cfg: NumericsConfig) -> None:
    """The knobs torch takes at run time: thread pools, oneDNN, denormals, torch.compile."""
    import torch

    s = cfg.settings()
    if s["intra_op_threads"]:
        torch.set_num_threads(s["intra_op_threads"])
    if s["inter_op_threads"] and torch.get_num_interop_threads() != s["inter_op_threads"]:
        try:
            torch.set_num_interop_threads(s["inter_op_threads"])
        except RuntimeError:  # the inter-op pool already ran work in this process; the record says what it has
            pass
    if s["onednn"] is not None:
        torch.backends.mkldnn.enabled = s["onednn"]
    if s["flush_denormal"] is not None:
        torch.set_flush_denormal(s["flush_denormal"])
    if s["compile"] is False and "torch._dynamo" in sys.modules:  # else TORCH_COMPILE_DISABLE does it on import
        sys.modules["torch._dynamo"].config.disable = True


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _blas() -> dict[str, Any]:
    """BLAS / LAPACK / oneDNN of the torch build, from ``torch.__config__.show()``."""
    import torch

    shown = torch.__config__.show()
    info: dict[str, Any] = {"mkl": None, "onednn": None, "blas_info": None}
    for line in shown.splitlines():
        line = line.strip(" -")
        if "Math Kernel Library Version" in line:
            info["mkl"] = line.split("Version", 1)[1].split()[0]
        elif line.startswith("Intel(R) MKL-DNN") or line.startswith("oneDNN"):
            info["onednn"] = line.split()[2] if line.startswith("Intel") else line.split()[1]
        elif "BLAS_INFO=" in line:
            info["blas_info"] = line.split("BLAS_INFO=", 1)[1].split(",")[0]
    return info


def _device(device: str) -> dict[str, Any]:
    import torch

    if device != "gpu" or not torch.cuda.is_available():
        return {"kind": "cpu"}
    props = torch.cuda.get_device_properties(0)
    driver = None
    try:  # the driver version is NVML's; torch does not report it
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
    except Exception:  # noqa: BLE001 - NVML is optional; the record says the driver is unknown
        pass
    return {"kind": "gpu", "name": props.name, "capability": f"{props.major}.{props.minor}",
            "count": torch.cuda.device_count(), "driver": driver, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version()}


def record(cfg: NumericsConfig, device: str = "cpu") -> dict[str, Any]:
    """The numerics fingerprint a stage's tracked report carries: what decides its bits under ``cfg.mode``.

    ``id`` hashes the rest. Two runs with the same ``id`` must produce the same bits; ``ownllm repro check``
    calls a difference between them a determinism bug. Values are those in use (read back from torch and the
    environment), not those asked for; ``pinned`` is false when they disagree (see ``pin_environment``).
    """
    import torch

    s = cfg.settings()
    blas = _blas()
    actual_cap = torch.backends.cpu.get_cpu_capability().lower().replace("no avx", "default")
    rec: dict[str, Any] = {
        "mode": cfg.mode,
        "arch": platform.machine(),
        "aten_cpu_capability": actual_cap,
        "blas": blas["blas_info"], "mkl": blas["mkl"], "onednn_version": blas["onednn"],
        "mkl_cbwr": os.environ.get("MKL_CBWR") or "unset",
        "threads": {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads()},
        "onednn": bool(torch.backends.mkldnn.enabled),
        "flush_denormal": s["flush_denormal"],
        "compile_disabled": os.environ.get("TORCH_COMPILE_DISABLE") == "1",
        "versions": _versions(),
        "device": _device(device),
    }
    if cfg.mode == "native":  # the libraries chose their paths from this CPU, so it is part of the fingerprint
        rec["cpu"] = {"model": _cpuinfo().get("model name") or platform.processor(),
                      "flags": sorted(cpu_flags() & set(RECORDED_FLAGS))}
    wanted = {"aten_cpu_capability": s["cpu_capability"], "mkl_cbwr": s["mkl_cbwr"],
              "intra_op": s["intra_op_threads"], "inter_op": s["inter_op_threads"]}
    got = {"aten_cpu_capability": actual_cap, "mkl_cbwr": rec["mkl_cbwr"], **rec["threads"]}
    rec["mismatches"] = sorted(f"{k}: asked {v}, in use {got[k]}" for k, v in wanted.items()
                               if v is not None and str(v).lower() != str(got[k]).lower())
    rec["pinned"] = cfg.mode == "portable" and not rec["mismatches"]
    rec["id"] = fingerprint_id(rec)
    return rec


def fingerprint_id(rec: dict[str, Any]) -> str:
    body = {k: v for k, v in rec.items() if k != "id"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def machine() -> dict[str, Any]:
    """The machine in full, for untracked reports: CPU model and flags, the BLAS build as torch reports it."""
    import torch

    info = _cpuinfo()
    return {"cpu_model": info.get("model name") or platform.processor(), "cpu_vendor": info.get("vendor_id"),
            "cpu_flags": sorted(cpu_flags() & set(RECORDED_FLAGS)), "cores": os.cpu_count(),
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_config": [ln.strip(" -") for ln in torch.__config__.show().splitlines()
                             if any(s in ln for s in ("Math Kernel", "MKL-DNN", "oneDNN", "OpenMP", "CPU capability"))],
            "env": {k: os.environ.get(k) for k in PINNED_ENV}}
