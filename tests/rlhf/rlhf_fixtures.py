"""Helpers for the RLHF tests: params pointed at tmp dirs and a small snapshot cut from real stdlib code."""

from __future__ import annotations

import json
from pathlib import Path

import sysconfig

from pipeline.config import Params, parse_params

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def rlhf_params(tmp: Path, model_dir: Path, decontam: bool = True, **rlhf) -> Params:
    cfg = {
        "snapshot_dir": str(tmp / "data/feedback"),
        "base_model": str(model_dir),
        "sft_out": str(tmp / "models/sft"),
        "tuned_out": str(tmp / "models/tuned"),
        "work_dir": str(tmp / "checkpoints/rlhf"),
        "registry_dir": str(tmp / "models/registry"),
        "lock_file": str(tmp / "var/rlhf.lock"),
        "state_file": str(tmp / "var/rlhf/last_refresh.json"),
        "device": "cpu",
        "batch_size": 2,
        "sft_max_steps": 2,
        "dpo_max_steps": 2,
        "max_length": 96,
        "min_pairs": 2,
        "refresh_runner": "direct",
        **rlhf,
    }
    data = {
        "data": {"sources": [{"name": "t", "kind": "dir", "path": str(tmp)}]},
        "tracking": {"reports_dir": str(tmp / "reports"), "wandb_mode": "disabled"},
        "eval": {"out": str(tmp / "reports/eval")},  # never the working folder's reports (a real run's filter)
        "rlhf": cfg,
        "decontam": {"enabled": decontam},
    }
    return parse_params(data, "test-params")


def code_chunks(n: int) -> list[tuple[str, str]]:
    """(prefix, true continuation) pairs cut from real stdlib code."""
    src = "".join((STDLIB / n).read_text(encoding="utf-8") for n in ("textwrap.py", "shlex.py"))
    lines = src.splitlines(keepends=True)
    out = []
    for i in range(n):
        at = 40 + i * 23
        out.append(("".join(lines[at - 8:at]), "".join(lines[at:at + 2])))
    return out


def write_snapshot(snap: Path, n_sft: int = 4, n_pairs: int = 4) -> None:
    snap.mkdir(parents=True, exist_ok=True)
    chunks = code_chunks(n_sft + n_pairs)
    sft = [{"id": f"s{i}", "prompt": f"# Task: continue the code\n{p}", "completion": c}
           for i, (p, c) in enumerate(chunks[:n_sft])]
    pairs = [{"id": f"p{i}", "prompt": p, "chosen": c, "rejected": "pass\n"}
             for i, (p, c) in enumerate(chunks[n_sft:])]
    unpaired = [{"id": f"u{i}", "prompt": r["prompt"], "completion": r[k], "label": k == "chosen"}
                for i, r in enumerate(pairs) for k in ("chosen", "rejected")]
    for name, rows in (("sft.jsonl", sft), ("pairs.jsonl", pairs), ("unpaired.jsonl", unpaired)):
        (snap / name).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")


def make_store(tmp: Path, base_dir: Path, decisions: list[tuple[str, str, str, bool]],
               bounties: list[tuple[str, str, str]] = (), db_name: str = "feedback.db") -> str:
    """A real SQLite feedback store at head with a production 'base' version, served completions and
    their accept/reject decisions ``(prefix, suffix, completion, accepted)``, and bounties
    ``(title, instruction, solution)``. Returns the DB URL."""
    from feedback.db import session_factory, upgrade
    from feedback.models import Completion, FeedbackKind
    from feedback.store import (FeedbackInput, add_bounty, get_or_create_user, record_feedback,
                                register_model_version, sha256)

    url = f"sqlite:///{tmp / db_name}"
    upgrade(url)
    factory = session_factory(url)
    with factory.begin() as s:
        mv = register_model_version(s, "base", str(base_dir), state="all")
        user = get_or_create_user(s, "alice")
        add_store_rows(s, user, mv, decisions, bounties)
    return url


def add_store_rows(s, user, mv, decisions, bounties=(), start: int = 0) -> None:
    from feedback.models import Completion, FeedbackKind
    from feedback.store import FeedbackInput, add_bounty, record_feedback, sha256

    events = []
    for i, (prefix, suffix, completion, accepted) in enumerate(decisions, start):
        rid = f"req-{i}"
        s.add(Completion(request_id=rid, choice_index=0, user_id=user.id, model_version_id=mv.id, language="python",
                         prompt=prefix, suffix=suffix or None, completion=completion, prompt_hash=sha256(prefix),
                         suffix_hash=sha256(suffix) if suffix else None, finish_reason="stop", prompt_tokens=1,
                         completion_tokens=1, latency_ms=1.0))
        events.append(FeedbackInput(rid, FeedbackKind.accepted if accepted else FeedbackKind.rejected))
    s.flush()
    record_feedback(s, user, events)
    for title, instruction, solution in bounties:
        add_bounty(s, title=title, instruction=instruction, language="python", solution=solution, source="derived")


def sample_decisions(n_contexts: int = 6) -> list[tuple[str, str, str, bool]]:
    """Per context: the true continuation accepted, two wrong ones rejected (like the simulated user)."""
    out = []
    for prefix, truth in code_chunks(n_contexts):
        out.append((prefix, "", truth, True))
        out.append((prefix, "", "    pass\n", False))
        out.append((prefix, "", "    return None\n", False))
    return out


def sample_bounties(n: int = 3) -> list[tuple[str, str, str]]:
    return [(f"task {i}", f"Continue this code:\n{p[-200:]}", t) for i, (p, t) in enumerate(code_chunks(n))]


HELDOUT_FILES = ["calendar.py", "difflib.py", "pprint.py", "tokenize.py", "gettext.py", "csv.py"]


def write_dedup_docs(out: Path) -> None:
    """A data/dedup dataset of real stdlib files (the held-out files the gate replays on)."""
    from pipeline.data.records import CLEAN_SCHEMA, make_doc, to_table, write_docs

    docs = [{**make_doc("stdlib", n, "python", (STDLIB / n).read_text(encoding="utf-8")),
             "pii_redactions": {"email": 0, "ip_address": 0, "key": 0}} for n in HELDOUT_FILES]
    write_docs(to_table(docs, CLEAN_SCHEMA), out)


def e2e_params(tmp: Path, model_dir: Path, **rlhf) -> Params:
    """rlhf_params plus tiny evaluation settings: 2 HumanEval problems, a few FIM/replay cursors."""
    base = rlhf_params(tmp, model_dir, **rlhf)
    data = base.model_dump(mode="json", exclude={"source_file"})
    data["data"]["dedup"]["out"] = str(tmp / "data/dedup")
    data["shards"]["val_frac"] = 0.99  # nearly every file is held out; rlhf.gate.heldout_frac splits them
    data["eval"]["out"] = str(tmp / "reports/eval")
    data["eval"]["humaneval"].update(limit=2, max_new_tokens=24, k=[1])
    data["eval"]["fim"].update(max_docs=4, max_new_tokens=12)
    data["feedback"]["simulate"].update(max_tokens=12, files=1)  # the other val files stay unseen
    data["rlhf"]["gate"].update(max_files=3, cursors_per_file=4, max_tokens=12, resamples=199)
    return parse_params(data, "e2e-params")


def params_file(params: Params, path: Path) -> Path:
    """Write params as a YAML file the CLI's --params accepts."""
    import yaml

    path.write_text(yaml.safe_dump(params.model_dump(mode="json", exclude={"source_file"})), encoding="utf-8")
    return path
