"""`ownllm lineage VERSION`: what reproduces a model version, and a check that it did.

Prints the version's git revision, dvc.lock hash, snapshot hash, weights hash, parent chain and the
exact commands that rebuild it. ``--check DIR`` hashes a rebuilt model directory the way the registry
did and exits non-zero unless the weights are identical.
"""

from __future__ import annotations

from pathlib import Path


def describe(db_url: str, name: str) -> dict:
    """The lineage record of a version and of its ancestors, from the feedback store."""
    from feedback.db import session_factory
    from feedback.store import get_version

    factory = session_factory(db_url)
    with factory() as s:
        mv = get_version(s, name)
        chain, cur = [], mv.parent
        while cur is not None:
            chain.append(cur.name)
            cur = cur.parent
        extra = (mv.eval_results or {}).get("lineage", {})
        return {"version": mv.name, "path": mv.path, "rollout": mv.rollout_state.value, "git_rev": mv.git_rev,
                "dvc_lock_hash": mv.dvc_lock_hash, "snapshot_hash": mv.snapshot_hash, "model_hash": mv.model_hash,
                "parents": chain, "experiment": extra.get("experiment"), "commands": extra.get("commands") or []}


def render(info: dict) -> str:
    lines = [f"version        {info['version']}  ({info['rollout']})",
             f"weights        {info['path']}",
             f"git revision   {info['git_rev'] or 'unknown'}",
             f"dvc.lock hash  {info['dvc_lock_hash'] or 'unknown'}",
             f"snapshot hash  {info['snapshot_hash'] or '-'}",
             f"model hash     {info['model_hash'] or 'unknown'}",
             f"parents        {' <- '.join(info['parents']) or '-'}"]
    if info["experiment"]:
        lines.append(f"experiment     {info['experiment']}")
    if info["commands"]:
        lines.append("reproduce with:")
        lines += [f"  {c}" for c in info["commands"]]
        lines.append(f"  ownllm lineage {info['version']} --check models/tuned   # identical weights?")
    return "\n".join(lines)


def check(info: dict, model_dir: str | Path) -> tuple[bool, str]:
    from feedback.lineage import model_hash

    got = model_hash(model_dir)
    if got is None:
        return False, f"no model files in {model_dir}"
    if got == info["model_hash"]:
        return True, f"{model_dir}: identical to {info['version']} (model hash {got[:16]})"
    return False, f"{model_dir}: model hash {got[:16]} differs from {info['version']}'s {str(info['model_hash'])[:16]}"
