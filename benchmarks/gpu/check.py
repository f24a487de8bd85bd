"""The GPU check: data → gpu-125m training → SIGKILL and resume → export → FIM completion → serving latency.

Run through benchmarks/gpu/run.sh (it installs the kit first); by hand, with the packages importable:

    python benchmarks/gpu/check.py OUT [--profile gpu|tiny] [--steps N] [--global-batch B] ...

Writes OUT/results.json (rewritten after every phase, so a run cut short still says how far it got) and the
logs of each phase under OUT. Every stage is the project's own: ``python -m pipeline.cli data ingest|clean|
dedup``, ``tokenizer train``, ``data shards``, ``export``; training is ``pipeline.train.trainer.train``
(benchmarks/gpu/train_logged.py adds a metrics file); the latency is the gateway's ``LocalBackend``.

Profiles (docs/TRAINING.md, "Proving the GPU path"):
- ``gpu``: docs/profiles/params-gpu-125m.yaml as it is (12 x 768 Llama, vocab 32768, seq 2048, bf16, SDPA,
  microbatch 16, 8 loader workers), except what makes it fit the box's clock and corpus: the Python standard
  library as the corpus, 200 steps of 32 sequences, a checkpoint at step 100, evaluation only at the end,
  16 canonical nodes, no decontam.
- ``tiny``: the same steps on the CPU with a small model and a slice of the stdlib (the CPU rehearsal).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
BASE_PROFILE = REPO / "docs" / "profiles" / "params-gpu-125m.yaml"
RESULTS_VERSION = 1

# Peaks for MFU. Composer's SpeedMonitor divides by the datasheet's dense bf16 figure for an H200
# (989.5 TFLOP/s, its GPU_AVAILABLE_FLOPS table); the box's own bf16 matmul measured about 790 TFLOP/s
# (the device tool's documentation), so both ratios are reported.
H200_MEASURED_BF16_FLOPS = 790e12
# llm-foundry's published MPT-125M throughput table: 44.8 % MFU on 8 x A100-80GB, seq 2048, bf16.
LLM_FOUNDRY_125M_MFU = 0.448
MFU_TARGET = 0.40

# What the check changes in the gpu-125m profile, per profile. Paths are filled in by build_params.
PROFILES: dict[str, dict[str, Any]] = {
    "gpu": {
        "check": {"steps": 200, "checkpoint_step": 100, "global_batch": 32, "microbatch": 16,
                  "latency_requests": 20, "deadline_s": 400},
        "params": {
            "data": {"sources": [{"name": "python-stdlib", "kind": "dir", "path": "{stdlib}", "include": ["**/*.py"],
                                  "exclude": ["site-packages/**", "test/**", "**/tests/**", "idlelib/idle_test/**"]}],
                     # Python only: the JavaScript/TypeScript parse check needs tree-sitter wheels, not on the box.
                     "clean": {"parse_check_languages": ["python"]}},
            "decontam": {"enabled": False},  # HumanEval overlap is beside the point of a throughput check
            # The CTranslate2 copy is the CPU engine's format (a 42 MB wheel, not in the kit); the GPU serves
            # the transformers weights through LocalBackend, which is what the latency phase measures.
            "export": {"ctranslate2": False},
            # 16 canonical nodes, not 128: the stdlib's ~90 validation samples would be repeated over 128.
            "train": {"eval_batches": 4, "log_every": 10, "save_num_checkpoints_to_keep": 1,
                      "num_canonical_nodes": 16},
        },
    },
    "tiny": {
        "check": {"steps": 24, "checkpoint_step": 12, "global_batch": 8, "microbatch": 4,
                  "latency_requests": 5, "deadline_s": 600},
        "params": {
            "data": {"sources": [{"name": "python-stdlib", "kind": "dir", "path": "{stdlib}",
                                  "include": ["[a-h]*.py"]}],
                     "clean": {"parse_check_languages": ["python"]}},
            "decontam": {"enabled": False},
            "export": {"ctranslate2": False},
            "tokenizer": {"vocab_size": 1024, "sample_docs": 2000},
            "shards": {"max_seq_len": 128},
            "model": {"n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 4, "intermediate_size": 176,
                      "max_seq_len": 128},
            "train": {"eval_batches": 2, "log_every": 4, "save_num_checkpoints_to_keep": 1, "num_workers": 0,
                      "device": "cpu", "precision": "fp32", "num_threads": 2, "lr": 0.003, "warmup": "4ba",
                      "num_canonical_nodes": 1},
        },
    },
}

DATA_STAGES = [("data", "ingest"), ("data", "clean"), ("data", "dedup"), ("tokenizer", "train"), ("data", "shards")]


class CheckFailed(Exception):
    """A phase failed; the message names it and the log to read."""


def deep_update(base: dict, over: dict) -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


def build_params(profile: str, work: Path, run: str, check: dict, data_dir: Path | None = None) -> dict:
    """The params of one training run (``a`` or ``b``): the gpu-125m profile plus the profile's changes.

    Runs a and b differ only in where they write (save_folder, reports, final model: fields outside the run
    fingerprint), so they train the same trajectory from the same shards and tokenizer.
    """
    import yaml

    params = yaml.safe_load(BASE_PROFILE.read_text(encoding="utf-8"))
    deep_update(params, json.loads(json.dumps(PROFILES[profile]["params"])))
    data = data_dir or work / "data"
    steps, ckpt = check["steps"], check["checkpoint_step"]
    deep_update(params, {
        "tracking": {"wandb_mode": "disabled", "reports_dir": str(work / run / "reports")},
        "data": {"ingest": {"out": str(data / "raw"), "rejected": str(data / "rejected/ingest")},
                 "clean": {"out": str(data / "clean"), "rejected": str(data / "rejected/clean")},
                 "dedup": {"input": str(data / "clean"), "out": str(data / "dedup"),
                           "rejected": str(data / "rejected/dedup")}},
        "decontam": {"rejected": str(data / "rejected/decontam")},
        "tokenizer": {"out": str(data / "tokenizer")},
        "shards": {"out": str(data / "shards"), "exclude_ids": str(data / "exclude_ids.txt"),
                   "cache_dir": str(work / "cache" / "shards")},
        "train": {"run_name": f"gpu-check-{run}", "save_folder": str(work / run / "checkpoints"),
                  "final_model": str(work / run / "final"), "reports_dir": str(work / run / "reports" / "train"),
                  "global_batch_size": check["global_batch"], "device_microbatch_size": check["microbatch"],
                  "max_duration": f"{steps}ba", "save_interval": f"{ckpt}ba", "eval_interval": f"{steps}ba"},
        "export": {"out": str(work / run / "export")},
    })
    return params


class Check:
    def __init__(self, out: Path, work: Path, profile: str, check: dict, data_dir: Path | None):
        self.out, self.work, self.profile, self.cfg = out, work, profile, check
        self.data_dir = data_dir
        self.started = time.monotonic()
        self.deadline = self.started + check["deadline_s"]
        self.results: dict[str, Any] = {
            "version": RESULTS_VERSION, "profile": profile, "ok": False, "failed": None, "check": dict(check),
            "phases": {}, "environment": environment(), "reference": {
                "h200_measured_bf16_flops": H200_MEASURED_BF16_FLOPS,
                "llm_foundry_125m_mfu_a100_80gb": LLM_FOUNDRY_125M_MFU, "mfu_target": MFU_TARGET}}
        import yaml

        self.params_files = {}
        for run in ("a", "b"):
            path = work / f"params-{run}.yaml"
            path.write_text(yaml.safe_dump(build_params(profile, work, run, check, data_dir), sort_keys=False))
            self.params_files[run] = path
        self.save()

    # -- bookkeeping -------------------------------------------------------------------------------
    def save(self) -> None:
        self.results["elapsed_s"] = round(time.monotonic() - self.started, 1)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, sort_keys=True) + "\n")

    def say(self, msg: str) -> None:
        line = f"[gpu-check {time.monotonic() - self.started:6.1f}s] {msg}"
        print(line, flush=True)
        with (self.out / "check.log").open("a") as f:
            f.write(line + "\n")

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise CheckFailed(f"out of time: the check's deadline of {self.cfg['deadline_s']} s has passed")
        return left

    def phase(self, name: str, fn) -> Any:
        self.say(f"{name} ...")
        t0 = time.monotonic()
        try:
            value = fn()
        except Exception as exc:
            self.results["phases"][name] = round(time.monotonic() - t0, 1)
            self.results["failed"] = f"{name}: {exc}"
            self.say(f"{name} FAILED after {time.monotonic() - t0:.1f} s: {exc}")
            self.save()
            raise
        self.results["phases"][name] = round(time.monotonic() - t0, 1)
        self.say(f"{name} done in {time.monotonic() - t0:.1f} s")
        self.save()
        return value

    def run(self, cmd: list[str], log: str, timeout: float | None = None) -> None:
        """A project command, its output appended to OUT/<log>; a failure names the log."""
        timeout = min(timeout or 1e9, self.remaining())
        with (self.out / log).open("a") as f:
            f.write(f"\n$ {' '.join(cmd)}\n")
            f.flush()
            try:
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=self.work,
                                    start_new_session=True).returncode
            except subprocess.TimeoutExpired:
                raise CheckFailed(f"{' '.join(cmd[-4:])} ran past {timeout:.0f} s (see {log})") from None
        if rc:
            raise CheckFailed(f"`{' '.join(cmd[2:6])} ...` exited {rc} (see {log}: {tail(self.out / log)})")

    # -- phases ------------------------------------------------------------------------------------
    def build_data(self) -> dict:
        data = self.work / "data"
        data.mkdir(parents=True, exist_ok=True)
        (data / "exclude_ids.txt").write_text("")  # nothing to exclude: bisect has not looked at this corpus
        for group, stage in DATA_STAGES:
            self.run([sys.executable, "-m", "pipeline.cli", group, stage, "--params", str(self.params_files["a"])],
                     "data.log")
        return self.data_summary()

    def data_summary(self) -> dict:
        data = self.data_dir or self.work / "data"
        shards = data / "shards"
        info: dict[str, Any] = {"source": "carried" if self.data_dir else "built on this machine"}
        for split in ("train", "val"):
            index = json.loads((shards / split / "index.json").read_text())
            info[f"{split}_samples"] = sum(s["samples"] for s in index["shards"])
            info[f"{split}_shard_bytes"] = sum((s.get("zip_data") or s["raw_data"])["bytes"] for s in index["shards"])
        seq = PROFILES[self.profile]["params"].get("shards", {}).get("max_seq_len", 2048)
        info["train_tokens"] = info["train_samples"] * seq
        info["tokenizer_bytes"] = sum(p.stat().st_size for p in (data / "tokenizer").iterdir() if p.is_file())
        return info

    def train_run(self, run: str) -> subprocess.Popen:
        cmd = [sys.executable, str(HERE / "train_logged.py"), "--params", str(self.params_files[run]),
               "--metrics", str(self.work / run / "metrics.jsonl")]
        log = (self.out / f"train-{run}.log").open("a")
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.work, start_new_session=True)

    def wait(self, proc: subprocess.Popen, run: str) -> None:
        try:
            rc = proc.wait(timeout=self.remaining())
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise CheckFailed(f"training run {run} ran past the deadline (see train-{run}.log)") from None
        if rc:
            raise CheckFailed(f"training run {run} exited {rc} (see train-{run}.log: {tail(self.out / f'train-{run}.log')})")

    def train_uninterrupted(self) -> dict:
        self.wait(self.train_run("a"), "a")
        return self.train_summary("a")

    def train_killed_and_resumed(self) -> dict:
        """Run b: SIGKILL (the whole process group: loader workers too) a few steps after the checkpoint, then
        the same command again, which resumes from it."""
        ckpt = self.cfg["checkpoint_step"]
        kill_after = ckpt + max(2, self.cfg["steps"] // 50)  # past the checkpoint: the save finished
        proc = self.train_run("b")
        loss_csv = self.work / "b" / "reports" / "train" / "loss.csv"
        while proc.poll() is None:
            if last_step(loss_csv) >= kill_after:
                break
            if time.monotonic() > self.deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise CheckFailed("run b never reached the kill point before the deadline (see train-b.log)")
            time.sleep(0.2)
        if proc.poll() is not None:
            raise CheckFailed(f"run b ended (exit {proc.returncode}) before it could be killed at step {kill_after} "
                              f"(see train-b.log: {tail(self.out / 'train-b.log')})")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_at = last_step(loss_csv)
        self.say(f"run b killed with SIGKILL after step {killed_at} (checkpoint at {ckpt}); resuming")
        with (self.out / "train-b.log").open("a") as f:
            f.write(f"\n### SIGKILL after step {killed_at}; the same command again resumes\n")
        self.wait(self.train_run("b"), "b")
        summary = self.train_summary("b")
        summary["killed_after_step"] = killed_at
        return summary

    def train_summary(self, run: str) -> dict:
        reports = self.work / run / "reports"
        train = json.loads((reports / "train.json").read_text())
        speed = json.loads((reports / "train" / "speed.json").read_text())
        metrics = read_metrics(self.work / run / "metrics.jsonl")
        return {"train": {k: train[k] for k in ("steps", "tokens_seen", "params", "final_train_loss", "val_loss",
                                                 "val_unigram_cross_entropy")},
                "speed": speed, "monitors": monitor_summary(metrics, self.cfg, self.profile)}

    def compare_losses(self) -> dict:
        a = read_losses(self.work / "a" / "reports" / "train" / "loss.csv")
        b = read_losses(self.work / "b" / "reports" / "train" / "loss.csv")
        resumed = int(self.results["train_b"]["speed"]["resumed_from_step"])
        if not 0 < resumed < self.cfg["steps"]:
            raise CheckFailed(f"run b resumed from step {resumed}, not from its checkpoint at "
                              f"{self.cfg['checkpoint_step']}: autoresume did not happen")
        if sorted(a) != sorted(b) or len(a) != self.cfg["steps"]:
            raise CheckFailed(f"loss.csv of runs a and b cover different steps ({len(a)} vs {len(b)})")
        return {"resumed_from_step": resumed,
                "two_runs": compare(a, b, [s for s in a if s < resumed]),
                "after_resume": compare(a, b, [s for s in a if s >= resumed]),
                "losses_a": [a[s] for s in sorted(a)], "losses_b": [b[s] for s in sorted(b)]}

    def export(self) -> dict:
        self.run([sys.executable, "-m", "pipeline.cli", "export", "--params", str(self.params_files["a"])],
                 "export.log")
        result = json.loads((self.work / "a" / "reports" / "export.json").read_text())
        if not result.get("params"):
            raise CheckFailed("export.json has no parameter count: the export did not load")
        return result

    def latency(self) -> dict:
        """Greedy 32-token completions of a FIM prompt through the gateway's in-process backend."""
        import torch

        from feedback.backends import GenRequest, LocalBackend

        device = "cuda" if self.profile == "gpu" else "cpu"
        backend = LocalBackend(self.work / "a" / "export", device=device)
        req = GenRequest(prompt="def read_lines(path):\n    with open(path) as f:\n        ",
                         suffix="\n    return lines\n", max_tokens=32, temperature=0.0)
        for _ in range(3):  # warm-up: kernels, allocator, cuBLAS handles
            backend.complete(req)
        times, tokens, text = [], [], ""
        for _ in range(self.cfg["latency_requests"]):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            gen = backend.complete(req)
            times.append(time.perf_counter() - t0)
            tokens.append(gen.choices[0].completion_tokens)
            text = gen.choices[0].text
        ms = sorted(t * 1000 for t in times)
        return {"device": device, "requests": len(times), "max_tokens": 32, "prompt_tokens": gen.prompt_tokens,
                "completion_tokens": statistics.median(tokens), "p50_ms": statistics.median(ms),
                "p90_ms": ms[min(len(ms) - 1, int(0.9 * len(ms)))], "mean_ms": statistics.fmean(ms),
                "ms_per_token": statistics.median(ms) / max(1, statistics.median(tokens)), "completion": text}


# ----------------------------------------------------------------------------------------------- helpers
def tail(path: Path, n: int = 3) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except FileNotFoundError:
        return "no log"
    return " | ".join(lines[-n:])[-600:]


def last_step(loss_csv: Path) -> int:
    try:
        lines = loss_csv.read_text().splitlines()
    except FileNotFoundError:
        return -1
    steps = [int(ln.split(",", 1)[0]) for ln in lines[1:] if ln.strip() and ln[0].isdigit()]
    return max(steps, default=-1)


def read_losses(loss_csv: Path) -> dict[int, str]:
    """step -> the loss exactly as written (repr of the float), so equality is bit equality."""
    import csv

    with loss_csv.open(newline="") as f:
        return {int(r["step"]): r["train_loss"] for r in csv.DictReader(f)}


def compare(a: dict[int, str], b: dict[int, str], steps: list[int]) -> dict:
    diffs = [abs(float(a[s]) - float(b[s])) for s in steps]
    return {"steps": len(steps), "bit_identical": all(a[s] == b[s] for s in steps),
            "max_abs_diff": max(diffs, default=0.0),
            "first_differing_step": next((s for s in sorted(steps) if a[s] != b[s]), None)}


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def monitor_summary(records: list[dict], cfg: dict, profile: str) -> dict:
    """Medians of SpeedMonitor / MemoryMonitor / step-time values over the steady state (the first windows
    hold start-up: kernel selection, loader warm-up), plus the peak memory."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for k, v in r["metrics"].items():
            series.setdefault(k, []).append((r.get("step") or 0, v))
    skip = max(2, cfg["steps"] // 10)

    def steady(key: str) -> float | None:
        vals = [v for s, v in series.get(key, []) if s > skip] or [v for _, v in series.get(key, [])]
        return statistics.median(vals) if vals else None

    out = {
        "tokens_per_s": steady("throughput/tokens_per_sec"),
        "device_tokens_per_s": steady("throughput/device/tokens_per_sec"),
        "device_flops_per_s": steady("throughput/device/flops_per_sec"),
        "mfu_composer": steady("throughput/device/mfu"),  # vs Composer's H200 datasheet peak (989.5 TFLOP/s)
        "step_data_s": steady("steptime/data_s"),
        "step_compute_s": steady("steptime/compute_s"),
        "peak_allocated_gb": max((v for _, v in series.get("memory/peak_allocated_mem", [])), default=None),
        "peak_reserved_gb": max((v for _, v in series.get("memory/peak_reserved_mem", [])), default=None),
    }
    flops = out["device_flops_per_s"]
    out["mfu_vs_measured_peak"] = flops / H200_MEASURED_BF16_FLOPS if flops and profile == "gpu" else None
    out["mfu_target_met"] = (out["mfu_vs_measured_peak"] >= MFU_TARGET) if out["mfu_vs_measured_peak"] else None
    return out


def environment() -> dict:
    env: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine(),
                           "cpus": os.cpu_count()}
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("torch", "mosaicml", "mosaicml-streaming", "transformers", "tokenizers", "huggingface_hub",
                 "numpy", "pyarrow", "pydantic"):
        try:
            env[dist] = version(dist)
        except PackageNotFoundError:
            env[dist] = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        env["gpu"] = smi.stdout.strip() or None
    except (FileNotFoundError, subprocess.TimeoutExpired):
        env["gpu"] = None
    return env


REQUIRED_KEYS = {
    "top": ["version", "profile", "ok", "failed", "check", "phases", "environment", "reference", "elapsed_s",
            "data", "train_a", "train_b", "resume", "export", "latency"],
    "train": ["train", "speed", "monitors"],
    "monitors": ["tokens_per_s", "device_flops_per_s", "mfu_composer", "mfu_vs_measured_peak", "peak_allocated_gb",
                 "step_data_s", "step_compute_s"],
    "resume": ["resumed_from_step", "two_runs", "after_resume", "losses_a", "losses_b"],
    "latency": ["device", "p50_ms", "completion_tokens", "ms_per_token"],
}


def validate_results(r: dict) -> list[str]:
    """What a finished results.json lacks (an empty list when complete): the contract of the file."""
    missing = [k for k in REQUIRED_KEYS["top"] if k not in r]
    for run in ("train_a", "train_b"):
        missing += [f"{run}.{k}" for k in REQUIRED_KEYS["train"] if k not in r.get(run, {})]
        missing += [f"{run}.monitors.{k}" for k in REQUIRED_KEYS["monitors"]
                    if k not in r.get(run, {}).get("monitors", {})]
    missing += [f"resume.{k}" for k in REQUIRED_KEYS["resume"] if k not in r.get("resume", {})]
    missing += [f"latency.{k}" for k in REQUIRED_KEYS["latency"] if k not in r.get("latency", {})]
    return missing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder for results.json and the logs")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="gpu")
    ap.add_argument("--work", type=Path, help="scratch folder (default: OUT/../gpu-check-work)")
    ap.add_argument("--data", type=Path, help="prebuilt data (tokenizer/ and shards/ inside): skip the data stages")
    ap.add_argument("--only-data", action="store_true",
                    help="build the data (WORK/data, reusable with --data) and stop: no training, no GPU needed")
    for key in ("steps", "checkpoint_step", "global_batch", "microbatch", "latency_requests", "deadline_s"):
        ap.add_argument(f"--{key.replace('_', '-')}", type=int, dest=key)
    args = ap.parse_args(argv)
    args.out = args.out.resolve()
    args.data = args.data.resolve() if args.data else None  # the stages run in the work folder

    cfg = dict(PROFILES[args.profile]["check"])
    cfg.update({k: getattr(args, k) for k in cfg if getattr(args, k, None) is not None})
    if not 0 < cfg["checkpoint_step"] < cfg["steps"] - max(2, cfg["steps"] // 50):
        ap.error(f"--checkpoint-step must be inside the run, well before --steps ({cfg['steps']})")
    if cfg["global_batch"] % cfg["microbatch"]:
        ap.error(f"--global-batch {cfg['global_batch']} is not a multiple of --microbatch {cfg['microbatch']}")
    if args.data and not ((args.data / "tokenizer").is_dir() and (args.data / "shards" / "train").is_dir()):
        ap.error(f"--data {args.data}: needs tokenizer/ and shards/train, shards/val inside")
    args.out.mkdir(parents=True, exist_ok=True)
    work = (args.work or args.out.parent / "gpu-check-work").resolve()
    work.mkdir(parents=True, exist_ok=True)

    check = Check(args.out, work, args.profile, cfg, args.data)
    r = check.results
    check.say(f"profile {args.profile}: {cfg['steps']} steps of {cfg['global_batch']} x seq, microbatch "
              f"{cfg['microbatch']}, checkpoint at {cfg['checkpoint_step']}; work in {work}")
    try:
        r["data"] = check.phase("data", check.data_summary if args.data else check.build_data)
        if args.only_data:
            check.say(f"data only: {json.dumps(r['data'], sort_keys=True)}")
            return 0
        r["train_a"] = check.phase("train_a", check.train_uninterrupted)
        # Export and latency need run a only: they come before run b, so that a run out of time still has them.
        r["export"] = check.phase("export", check.export)
        r["latency"] = check.phase("latency", check.latency)
        r["train_b"] = check.phase("train_b_kill_resume", check.train_killed_and_resumed)
        r["resume"] = check.phase("compare", check.compare_losses)
    except Exception:
        check.save()
        return 1
    missing = validate_results(r)
    r["ok"] = not missing and r["resume"]["after_resume"]["bit_identical"]
    if missing:
        r["failed"] = f"results.json lacks {missing}"
    elif not r["ok"]:
        r["failed"] = (f"losses after the resume differ from the uninterrupted run (max |diff| "
                       f"{r['resume']['after_resume']['max_abs_diff']:.3g})")
    check.save()
    m = r["train_a"]["monitors"]
    check.say(f"{'OK' if r['ok'] else 'FAILED: ' + str(r['failed'])}: "
              f"{fmt(m['tokens_per_s'], ',.0f')} tokens/s, MFU {fmt(m['mfu_composer'], '.1%')} (Composer) / "
              f"{fmt(m['mfu_vs_measured_peak'], '.1%')} (measured peak), peak memory "
              f"{fmt(m['peak_allocated_gb'], '.1f')} GB, resume bit-identical "
              f"{r['resume']['after_resume']['bit_identical']}, two runs bit-identical "
              f"{r['resume']['two_runs']['bit_identical']}, latency p50 {r['latency']['p50_ms']:.0f} ms "
              f"({r['latency']['completion_tokens']} tokens); {r['elapsed_s']:.0f} s")
    return 0 if r["ok"] else 1


def fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


if __name__ == "__main__":
    sys.exit(main())
