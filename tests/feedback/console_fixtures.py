"""A store and report files for the console tests: real simulated traffic, real stage writers where cheap.

The store is filled by :func:`feedback.simulate.simulate` (held-out stdlib files through the real HTTP
gateway and the tiny model) while an A/B experiment runs, so every console table has rows. The report
files are written by the stages' own writers (``pipeline.data.stats``, ``pipeline.train.spike``,
``rlhf.loop``) from small inputs; only the training curves and the bisect report are written in their
files' format directly (producing them means training).
"""

from __future__ import annotations

import csv
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import yaml

from feedback import store
from feedback.db import session_factory, upgrade
from pipeline.config import SpikeConfig, StatsConfig, load_params
from pipeline.data.records import DOC_SCHEMA, make_doc, to_table, write_docs
from pipeline.tracking import write_json

REPO = Path(__file__).resolve().parents[2]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
PY_FILES = ["textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py", "colorsys.py", "string.py",
            "numbers.py", "reprlib.py", "copy.py", "queue.py", "base64.py", "calendar.py", "cmd.py", "code.py"]
JS_DIR = Path("/usr/lib/node_modules/npm/lib")  # Node's bundled npm: on every machine with Node


@dataclass
class ConsoleWorld:
    params_path: Path
    db_url: str
    keys: dict[str, str]  # "staff" (staff), "sim-user-0" (non-staff, has completions), "nobody" (non-staff, none)


def documents() -> list[dict]:
    docs = [make_doc("stdlib", n, "python", (STDLIB / n).read_text(encoding="utf-8")) for n in PY_FILES]
    if JS_DIR.is_dir():
        for p in sorted(JS_DIR.glob("*.js"))[:8]:
            docs.append(make_doc("npm", p.name, "javascript", p.read_text(encoding="utf-8")))
    return docs


def write_params(tmp: Path, model_dir: Path, db_url: str) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["dedup"]["out"] = str(tmp / "dedup")
    params["data"].setdefault("stats", {}).update(out=str(tmp / "reports" / "data"))
    params.setdefault("shards", {})["val_frac"] = 0.5
    params.setdefault("serve", {}).update(model_dir=str(model_dir), db_url=db_url)
    params.setdefault("feedback", {}).update(
        reports_dir=str(tmp / "reports" / "feedback"),
        # 8 users over 24 cursors: both A/B arms get several users with shown suggestions (with 4 users over 12
        # cursors the control arm held 1 user and 3 shown completions, and a tiny model that left those empty made
        # the arm's verdict "no decided completions" instead of a clustered test: a flake in CI).
        simulate={"users": 8, "files": 6, "cursors_per_file": 4, "max_tokens": 8, "bounties": 0, "seed": 3,
                  "choices": 1})
    params.setdefault("tracking", {})["reports_dir"] = str(tmp / "reports")
    params.setdefault("train", {})["reports_dir"] = str(tmp / "reports" / "train")
    params.setdefault("bisect", {})["out"] = str(tmp / "reports" / "bisect")
    params.setdefault("eval", {})["out"] = str(tmp / "reports" / "eval")
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def gate_result(params) -> dict:
    """A gate result as `ownllm rlhf gate` writes it, its paired tests computed by the gate's own code
    (rlhf.gate.paired_tests, decide) on a held-out replay of 48 cursors in 8 files where the tuned model
    accepts more; the non-regression rows are written out."""
    import random

    from rlhf.gate import GateResult, decide, paired_tests

    rng = random.Random(7)
    cost = params.rlhf.gate.reject_cost_chars
    parent, tuned = [], []
    for i in range(48):
        for rows, p_accept in ((parent, 0.2), (tuned, 0.45)):
            accepted = rng.random() < p_accept
            chars = rng.randint(6, 30) if accepted else 0
            rows.append({"key": f"f{i % 8}:{i}", "file": f"f{i % 8}.py", "accepted": int(accepted), "shown": 1,
                         "accepted_chars": chars, "utility": chars - (0 if accepted else cost)})
    paired = paired_tests(parent, tuned, params)
    passed, significant, reasons = decide(paired, [], params)
    u = paired["tests"]["utility"]
    rows = [{"metric": "heldout.utility_per_cursor", "parent": u["parent"], "tuned": u["tuned"], "delta": u["diff"],
             "tolerance": params.rlhf.gate.margin, "gated": True, "ok": passed, "status": "paired"},
            {"metric": "fim.infill_exact", "parent": 0.05, "tuned": 0.04, "delta": -0.01, "tolerance": 0.02,
             "gated": True, "ok": True, "status": "within"}]
    return GateResult(passed, rows, {"version": "base"}, {}, paired, significant,
                      params.rlhf.gate.promote_to if significant else "staff", reasons).to_json()


def write_reports(tmp: Path, params) -> None:
    from pipeline.data.stats import compute_stats
    from pipeline.train.spike import detect_spikes
    from rlhf.loop import loop_report

    stats, _ = compute_stats(StatsConfig(input=params.data.dedup.out, funnel={"dedup": params.data.dedup.out},
                                         rejected=[]))
    write_json(Path(params.data.stats.out) / "stats.json", stats)

    # A decaying loss with one spike at step 60, in the StepRecorder's columns.
    train_dir = Path(params.train.reports_dir)
    train_dir.mkdir(parents=True, exist_ok=True)
    losses = [7.0 * math.exp(-i / 40) + 3.0 + (4.0 if i == 60 else 0.0) for i in range(120)]
    with (train_dir / "loss.csv").open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["step", "train_loss", "lr", "skipped"])
        w.writerows([i, repr(x), "0.001", "0"] for i, x in enumerate(losses))
    with (train_dir / "val_loss.csv").open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["step", "val_loss"])
        w.writerows([i, repr(losses[i] + 0.2)] for i in range(19, 120, 20))
    spikes = [{**s, "sample_idx": [0, 1], "doc_ids": ["doc-aaaa", "doc-bbbb"]}
              for s in detect_spikes(losses, SpikeConfig(k=1.5, window=10, patience=1))]
    write_json(train_dir / "spikes.json", spikes)
    write_json(Path(params.bisect.out) / f"{params.train.run_name}-60.json", {
        "run": params.train.run_name, "step": 60, "window": {"start": 55, "steps": 6, "documents": 12},
        "original_loss": losses[60], "running_mean": 3.4, "threshold": 5.1, "reproduces": True,
        "documents": [{"id": "doc-aaaa", "source": "stdlib", "path": "textwrap.py", "lang": "python", "steps": [60],
                       "spike_step_loss": 9.1, "why": ["repetitive"], "snippet": "import re"}],
        "evidence": {"with_all": losses[60], "without_named": 3.4}, "search": {"replays": 5}})

    gate = gate_result(params)
    manifest = {"counts": {"sft": 12, "pairs": 9, "unpaired": 3}, "content_hash": "c0ffee" * 10}
    write_json(Path(params.tracking.reports_dir) / "loop.json", loop_report(params, gate, manifest))


def build_console_world(tmp: Path, model_dir: Path) -> ConsoleWorld:
    """Versions base (all) and ft-a (A/B at 50%, parent base, with a gate report), simulated traffic, reports."""
    from feedback.simulate import simulate

    write_docs(to_table(documents(), DOC_SCHEMA), tmp / "dedup")
    db_url = f"sqlite:///{tmp / 'feedback.db'}"
    params_path = write_params(tmp, model_dir, db_url)
    params = load_params(params_path)
    upgrade(db_url)
    factory = session_factory(db_url)
    with factory.begin() as s:
        store.register_model_version(s, "base", str(model_dir), git_rev="1" * 40, model_hash="b" * 64, state="all")
        gate = gate_result(params)
        store.register_model_version(s, "ft-a", str(model_dir), git_rev="2" * 40, dvc_lock_hash="d" * 64,
                                     snapshot_hash="5" * 64, model_hash="a" * 64, parent="base",
                                     eval_results={"gate": gate}, state="staff")
        store.promote(s, "ft-a", "ab:50")
    simulate(params, db_url)
    with factory.begin() as s:
        keys = {"staff": store.create_key(s, "console-staff", staff=True),
                "sim-user-0": store.create_key(s, "sim-user-0"), "nobody": store.create_key(s, "nobody")}
    write_reports(tmp, params)
    return ConsoleWorld(params_path, db_url, keys)
