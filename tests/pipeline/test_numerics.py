"""Pinned numerics: portable mode gives the same weights on every machine this CPU can pretend to be.

Each "machine" is a fresh `ownllm repro probe` process whose environment says what a different CPU would do by
default: another ATen kernel dispatch (ATEN_CPU_CAPABILITY: avx512, avx2, default, as far as this CPU supports
them), another thread count (1 or 2 cores), another MKL instruction cap. The variables are read when torch loads,
hence the subprocesses. Native mode must show the differences (else the test could not fail); portable mode must
erase them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from pipeline import numerics
from pipeline.config import PORTABLE_NUMERICS, NumericsConfig, ParamsError, parse_params

REPO = Path(__file__).resolve().parents[2]
STEPS = 6
SUPPORTED = [cap for cap in ("avx512", "avx2", "default") if numerics.CAPABILITY_FLAGS[cap] <= numerics.cpu_flags()]
# The machines: (kernel dispatch it would pick, cores, MKL instruction cap).
MACHINES = {f"{cap}-{threads}t": {"ATEN_CPU_CAPABILITY": cap, "OMP_NUM_THREADS": str(threads),
                                   "MKL_ENABLE_INSTRUCTIONS": {"avx512": "AVX512", "avx2": "AVX2"}.get(cap, "SSE4_2")}
            for cap, threads in zip(SUPPORTED, [2, 1, 2])}
if SUPPORTED:
    MACHINES[f"{SUPPORTED[0]}-1t"] = {**MACHINES[f"{SUPPORTED[0]}-2t"], "OMP_NUM_THREADS": "1"}


def write_params(tmp: Path, name: str, numerics_section: dict) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"seed": 1234, "data": {"sources": [{"name": "s", "kind": "dir", "path": "."}]},
                                    "numerics": numerics_section}), encoding="utf-8")
    return path


def probe(params: Path, machine_env: dict[str, str], preload_torch: bool = False) -> dict:
    """`ownllm repro probe` as the console script runs it, on an emulated machine."""
    env = {k: v for k, v in os.environ.items() if k not in numerics.PINNED_ENV and k != numerics.REEXEC_MARK}
    env.update(machine_env, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    # preload_torch: something imported torch before the CLI could pin it, so the CLI must re-execute itself.
    code = ("import sys; " + ("import torch; torch.ones(2).sum(); " if preload_torch else "")
            + "from pipeline.cli import main; sys.argv[0] = 'ownllm'; sys.exit(main())")
    out = subprocess.run([sys.executable, "-c", code, "repro", "probe", "--params", str(params), "--steps", str(STEPS)],
                         env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def probe_all(params: Path) -> dict[str, dict]:
    with ThreadPoolExecutor(max_workers=2) as pool:  # two at a time: CI has two cores
        runs = {name: pool.submit(probe, params, env) for name, env in MACHINES.items()}
        return {name: f.result() for name, f in runs.items()}


@pytest.mark.slow
@pytest.mark.skipif(len(SUPPORTED) < 2, reason="this CPU offers one kernel dispatch only: nothing to emulate")
def test_portable_weights_identical_on_every_emulated_machine_native_differ(tmp_path):
    portable = probe_all(write_params(tmp_path, "portable", {"mode": "portable"}))
    native = probe_all(write_params(tmp_path, "native", {"mode": "native"}))

    # Native: the emulated machines really differ in their kernels, and so in the weights.
    caps_in_use = {name: r["numerics"]["aten_cpu_capability"] for name, r in native.items()}
    assert {caps_in_use[f"{cap}-{t}t"] for cap, t in zip(SUPPORTED, [2, 1, 2])} == set(SUPPORTED)
    by_cap = {r["numerics"]["aten_cpu_capability"]: r["weights_sha256"] for r in native.values()}
    assert len(set(by_cap.values())) == len(SUPPORTED), f"native weights per dispatch: {by_cap}"
    assert len({r["numerics"]["id"] for r in native.values()}) == len(native)  # every machine its own fingerprint

    # Portable: one set of weights, one fingerprint, the pinned values in use everywhere.
    hashes = {name: r["weights_sha256"] for name, r in portable.items()}
    assert len(set(hashes.values())) == 1, f"portable weights differ between emulated machines: {hashes}"
    assert len({r["numerics"]["id"] for r in portable.values()}) == 1
    rec = next(iter(portable.values()))["numerics"]
    assert rec["pinned"] and rec["mismatches"] == []
    assert rec["aten_cpu_capability"] == PORTABLE_NUMERICS["cpu_capability"]
    assert rec["mkl_cbwr"] == PORTABLE_NUMERICS["mkl_cbwr"]
    assert rec["threads"] == {"intra_op": PORTABLE_NUMERICS["intra_op_threads"],
                              "inter_op": PORTABLE_NUMERICS["inter_op_threads"]}
    assert "cpu" not in rec  # the CPU model is not part of a portable fingerprint
    # ... and the portable weights are none of the native ones: the pins changed the kernels, not only the record.
    assert set(hashes.values()).isdisjoint(by_cap.values())

    # The same portable run again: bit-identical (plain determinism).
    again = probe(write_params(tmp_path, "portable", {"mode": "portable"}), MACHINES[f"{SUPPORTED[0]}-2t"])
    assert again["weights_sha256"] == next(iter(hashes.values()))


@pytest.mark.slow
def test_cli_reexecutes_when_torch_was_imported_first(tmp_path):
    """The console script pins the environment even when torch was loaded before it could: it re-executes itself."""
    params = write_params(tmp_path, "portable", {"mode": "portable"})
    machine = {"ATEN_CPU_CAPABILITY": SUPPORTED[0], "OMP_NUM_THREADS": "1"}
    run = probe(params, machine, preload_torch=True)
    assert run["numerics"]["pinned"], run["numerics"]["mismatches"]
    assert run["numerics"]["aten_cpu_capability"] == PORTABLE_NUMERICS["cpu_capability"]
    assert run["machine"]["env"]["ATEN_CPU_CAPABILITY"] == PORTABLE_NUMERICS["cpu_capability"]


def test_environment_of_each_mode():
    portable = NumericsConfig(mode="portable")
    env = numerics.environment(portable)
    assert env["ATEN_CPU_CAPABILITY"] == "default" and env["MKL_CBWR"] == "COMPATIBLE"
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "2" and env["MKL_DYNAMIC"] == "FALSE"
    assert env["TORCH_COMPILE_DISABLE"] == "1" and env["ONEDNN_MAX_CPU_ISA"] == "SSE41"
    # native leaves the libraries alone, except for what is set explicitly
    assert numerics.environment(NumericsConfig(mode="native")) == {}
    assert numerics.environment(NumericsConfig(mode="native", mkl_cbwr="AVX2")) == {"MKL_CBWR": "AVX2"}
    # explicit knobs win over portable's pins
    assert numerics.environment(NumericsConfig(mode="portable", intra_op_threads=4))["OMP_NUM_THREADS"] == "4"


def test_params_reject_bad_numerics():
    base = {"data": {"sources": [{"name": "s", "kind": "dir", "path": "."}]}}
    for bad, needle in [({"mode": "fast"}, "numerics.mode"), ({"mkl_cbwr": "AVX3"}, "numerics.mkl_cbwr"),
                        ({"cpu_capability": "sse"}, "numerics.cpu_capability"),
                        ({"intra_op_threads": 0}, "numerics.intra_op_threads"),
                        ({"threads": 2}, "numerics.threads: unknown key")]:
        with pytest.raises(ParamsError, match=needle.replace(".", r"\.").replace("<", ".").replace(">", ".")):
            parse_params({**base, "numerics": bad})
    with pytest.raises(ParamsError, match="must be '<report path>:<metric>'"):
        parse_params({**base, "repro": {"tolerances": {"val_loss": 0.1}}})
    # the embedded default is portable
    assert yaml.safe_load((REPO / "params.yaml").read_text())["numerics"]["mode"] == "portable"


def test_unsupported_dispatch_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(numerics, "cpu_flags", lambda: {"sse2", "sse4_2"})  # a CPU without AVX2
    monkeypatch.setattr(numerics.platform, "machine", lambda: "x86_64")
    with pytest.raises(numerics.NumericsError, match="lacks avx2, fma"):
        numerics.check_supported(NumericsConfig(mode="portable", cpu_capability="avx2"))
    numerics.check_supported(NumericsConfig(mode="portable"))  # default runs anywhere


def test_record_says_when_a_run_is_not_pinned(monkeypatch):
    """In-process, after torch loaded with other values, the record must not claim the pins held."""
    import torch

    monkeypatch.delenv("MKL_CBWR", raising=False)
    rec = numerics.record(NumericsConfig(mode="portable", cpu_capability="default"))
    if torch.backends.cpu.get_cpu_capability() != "NO AVX":
        assert not rec["pinned"]
        assert any(m.startswith("aten_cpu_capability: asked default") for m in rec["mismatches"])
    assert any(m.startswith("mkl_cbwr: asked COMPATIBLE, in use unset") for m in rec["mismatches"])
    assert rec["id"] == numerics.fingerprint_id(rec)
    native = numerics.record(NumericsConfig(mode="native"))
    assert native["cpu"]["model"] and native["mismatches"] == [] and not native["pinned"]


def test_training_records_its_fingerprint(trained_run):
    """`ownllm train` writes the fingerprint DVC tracks and the full machine beside the timings."""
    reports = trained_run["dir"] / "reports/train"
    rec = json.loads((reports / "numerics.json").read_text())
    assert rec["id"] == numerics.fingerprint_id(rec) and rec["mode"] == "native"  # tiny_params has no section
    assert rec["device"] == {"kind": "cpu"} and rec["versions"]["torch"] and rec["versions"]["mosaicml"]
    assert rec["threads"]["intra_op"] == trained_run["params"].train.num_threads
    assert rec["cpu"]["model"]  # native: the CPU is part of the fingerprint
    machine = json.loads((reports / "speed.json").read_text())["machine"]
    assert machine["cpu_model"] == rec["cpu"]["model"] and machine["aten_cpu_capability"]
