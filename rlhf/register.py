"""`ownllm rlhf register`: only a tuned model that passed the gate becomes a model version.

The version gets its lineage — git revision, dvc.lock hash, snapshot hash, weights hash, parent — through
the feedback store's registry (``feedback.store.register_model_version``), in rollout state ``staff``; when
the gate found the gain significant it is promoted at once to ``rlhf.gate.promote_to`` (default ``all``, so
the next refresh tunes from it), otherwise ``ownllm models promote`` moves it on by hand. Its weights are copied to
``rlhf.registry_dir/<version>/`` so that the next ``models/tuned/`` does not overwrite what is served.
The version name is derived from the weights hash, so registering the same model twice is a no-op.
With ``rlhf.filter.enabled`` the suggestion filter the gate fitted for these weights is registered with the
version (refused by the registry if it was fitted for other weights); the gateway applies it when
``serve.suggestion_filter`` is on.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from rlhf.config import RLHFParams
from rlhf.gate import read_gate
from rlhf.snapshot import read_manifest

STAGE = "rlhf_register"


@dataclass
class RegisterResult:
    registered: bool
    version: str | None
    reason: str
    lineage: dict

    def to_json(self) -> dict:
        """The stage's metrics file. The git revision and dvc.lock hash stay out of it (they are in the
        store): dvc.lock records this file's hash, and a file holding dvc.lock's own hash would make
        dvc.lock differ on every reproduction."""
        stable = {k: self.lineage.get(k) for k in ("snapshot_hash", "model_hash", "parent", "rollout")}
        return {"registered": self.registered, "version": self.version, "reason": self.reason, "lineage": stable}


def deployed_filter_path(params: RLHFParams) -> Path:
    """The suggestion filter the gate fitted for the tuned model (``rlhf.gate.run_gate``)."""
    from rlhf.gate import DEPLOYED_NAME

    return Path(params.eval.out) / DEPLOYED_NAME / "filter.json"


def version_name(model_hash: str) -> str:
    return f"ft-{model_hash[:12]}"


def reproduce_commands(git_rev: str | None, exp_name: str | None) -> list[str]:
    """What rebuilds this version's weights from its lineage (printed by `ownllm lineage`)."""
    cmds = [f"git checkout {git_rev or '<rev>'}"]
    if exp_name:
        cmds.append(f"dvc exp apply {exp_name}   # the refresh experiment: its params and dvc.lock")
    cmds += ["dvc checkout   # the snapshot data/feedback and the parent model, from the DVC cache",
             "dvc repro --force --single-item sft preference   # retrain from the snapshot: same weights"]
    return cmds


def register_tuned(params: RLHFParams, db_url: str, repo: str | Path = ".") -> RegisterResult:
    """Register ``rlhf.tuned_out`` if the gate passed; never touches the registry otherwise."""
    from feedback.db import session_factory
    from feedback.lineage import file_hash, git_rev, model_hash

    cfg = params.rlhf
    gate = read_gate(params)
    manifest = read_manifest(cfg.snapshot_dir) or {}
    if not gate["passed"]:
        return RegisterResult(False, None, "gate failed", {})
    tuned = Path(cfg.tuned_out)
    if gate["tuned"].get("weights_sha256"):
        from rlhf.tune import weights_hash

        if weights_hash(tuned) != gate["tuned"]["weights_sha256"]:
            return RegisterResult(False, None, f"{tuned} changed since the gate evaluated it; run the gate again", {})
    filt, filt_path = None, deployed_filter_path(params)
    if cfg.filter.enabled and filt_path.is_file():  # the filter the gate judged with this model: it goes along
        import json

        from feedback.suggestion_filter import FilterMismatch, SuggestionFilter

        try:
            filt = json.loads(filt_path.read_text(encoding="utf-8"))
            SuggestionFilter.from_json(filt, str(filt_path)).check_model(tuned, "tuned model")
        except (FilterMismatch, ValueError) as exc:
            return RegisterResult(False, None, f"{filt_path}: {exc}", {})
    # The CTranslate2 conversion goes beside the weights, as `ownllm export` writes it for the base model: without
    # it the gateway serves the version with transformers, about 10x slower (docs/BENCHMARKS.md, issue 16).
    from pipeline.train.export import convert_to_ct2, has_ct2

    mhash = model_hash(tuned)
    name = version_name(mhash)
    dest = Path(cfg.registry_dir) / name
    if not dest.exists():  # content-named: an existing folder already holds these exact weights
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(tuned, tmp)
        if params.export.ctranslate2:
            convert_to_ct2(tmp)
        tmp.rename(dest)
    elif params.export.ctranslate2 and not has_ct2(dest):  # registered before versions carried the conversion
        convert_to_ct2(dest)
    rev = git_rev(repo)
    exp_name = os.environ.get("OWNLLM_EXP_NAME")
    lineage = {"git_rev": rev, "dvc_lock_hash": file_hash(Path(repo) / "dvc.lock"),
               "snapshot_hash": manifest.get("content_hash"), "model_hash": mhash,
               "parent": gate["parent"].get("version"), "experiment": exp_name,
               "commands": reproduce_commands(rev, exp_name)}
    factory = session_factory(db_url)
    from feedback.store import register_model_version

    if filt is not None:
        lineage["suggestion_filter"] = str(filt_path)
    with factory.begin() as s:
        register_model_version(s, name, str(dest.resolve()), git_rev=rev, dvc_lock_hash=lineage["dvc_lock_hash"],
                               snapshot_hash=lineage["snapshot_hash"], model_hash=mhash,
                               parent=lineage["parent"], eval_results={"gate": gate, "lineage": lineage},
                               state="staff", suggestion_filter=filt,
                               filter_source=str(filt_path) if filt is not None else None)
        target = gate.get("promote_to") or "staff"
        if gate.get("significant") and target != "staff":
            # A significant gain on the paired held-out replay: roll it out (the gate's rule, rlhf.gate.promote_to).
            from feedback.store import promote

            promote(s, name, target)
    lineage["rollout"] = gate.get("promote_to") if gate.get("significant") else "staff"
    return RegisterResult(True, name, "gate passed" + (" (significant)" if gate.get("significant") else ""), lineage)
