"""`ownllm repro check`: does this workspace reproduce the committed dvc.lock, and if not, why.

For every stage of the committed lock (``git show <rev>:dvc.lock``), the outputs in the workspace are hashed by DVC
itself (``Output.get_hash``, the hashes ``dvc repro`` writes into the lock) and compared with the committed ones:

- identical: every output has the committed hash;
- not built: an output is missing;
- inputs changed: a code file, a git-tracked input or a parameter differs from the committed revision, so this is
  not a rebuild of it;
- follows upstream: it differs because an upstream stage's output does (that stage says why);
- numerics differ: the numerics fingerprint (a ``numerics.json`` output of this stage or an upstream one, see
  pipeline/numerics.py) differs from the committed run's, so different bits are expected; the stage's metrics are
  compared with ``repro.tolerances`` instead;
- determinism bug: same inputs, same fingerprint, different bits; the first differing output (and file inside it)
  is named.
"""

from __future__ import annotations

import fnmatch
import json
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Params

IDENTICAL, NOT_BUILT, INPUTS_CHANGED = "identical", "not built", "inputs changed"
FOLLOWS_UPSTREAM, NUMERICS_DIFFER, DETERMINISM_BUG = "follows upstream", "numerics differ", "determinism bug"
RECORD_NAME = "numerics.json"


class ReproCheckError(RuntimeError):
    """The check cannot run (no git revision, no committed dvc.lock, not a DVC repository)."""


@dataclass
class MetricDiff:
    report: str
    metric: str
    committed: float | None
    current: float | None
    tolerance: float | None  # None: shown, not judged

    @property
    def ok(self) -> bool:
        if self.tolerance is None:
            return True
        if self.committed is None or self.current is None:
            return False
        return abs(self.current - self.committed) <= self.tolerance + 1e-12


@dataclass
class StageCheck:
    stage: str
    verdict: str
    ok: bool
    detail: str = ""
    differing: list[str] = field(default_factory=list)
    metrics: list[MetricDiff] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["metrics"] = [{**asdict(m), "ok": m.ok} for m in self.metrics]
        return out


def git_show(root: Path, rev: str, path: str) -> str | None:
    proc = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def committed_lock(root: Path, rev: str) -> dict[str, Any]:
    text = git_show(root, rev, "dvc.lock")
    if text is None:
        raise ReproCheckError(f"no dvc.lock at git revision {rev!r} in {root} (commit the lock of the run first)")
    return yaml.safe_load(text).get("stages", {})


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/") or parent.startswith(path.rstrip("/") + "/")


def _flatten(d: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        out[prefix[:-1]] = float(d)
    return out


class Workspace:
    """The workspace's DVC repository: current hashes of outputs and deps, committed contents where kept."""

    def __init__(self, root: Path, rev: str):
        from dvc.repo import Repo

        self.root, self.rev = root, rev
        try:
            self.repo = Repo(str(root))
        except Exception as exc:  # noqa: BLE001 - DVC raises its own NotDvcRepoError and friends
            raise ReproCheckError(f"{root} is not a DVC repository: {exc}") from None
        self.outputs: dict[str, Any] = {}
        self.deps: dict[str, Any] = {}
        self.params: dict[str, list[Any]] = {}
        for stage in self.repo.index.stages:
            for out in stage.outs:
                self.outputs[out.def_path] = out
            for dep in stage.deps:
                if dep.__class__.__name__ == "ParamsDependency":
                    self.params.setdefault(stage.name, []).append(dep)
                else:
                    self.deps[(stage.name, dep.def_path)] = dep
        self._hashes: dict[str, str | None] = {}

    def current_md5(self, path: str, stage: str | None = None) -> str | None:
        if path not in self._hashes:
            obj = self.outputs.get(path) or (self.deps.get((stage, path)) if stage else None)
            if obj is None or not (self.root / path).exists():
                self._hashes[path] = None
            else:
                self._hashes[path] = obj.get_hash().value
        return self._hashes[path]

    def current_params(self, stage: str) -> dict[str, dict[str, Any]]:
        """{params file: {key: value}} as DVC reads them for the stage."""
        return {dep.def_path: dep.read_params() for dep in self.params.get(stage, [])}

    def committed_text(self, path: str, md5: str | None) -> str | None:
        """The committed content of a small output: from git, else from the DVC cache."""
        text = git_show(self.root, self.rev, path)
        if text is None and md5 and not md5.endswith(".dir"):
            cached = Path(self.repo.cache.local.oid_to_path(md5))
            if cached.is_file():
                text = cached.read_text(encoding="utf-8")
        return text

    def first_differing_file(self, path: str, committed_md5: str) -> str:
        """``path`` itself, or for a directory the first file whose hash differs (when the cache has the tree)."""
        if not committed_md5.endswith(".dir"):
            return path
        from dvc_data.hashfile.build import build
        from dvc_data.hashfile.hash_info import HashInfo
        from dvc_data.hashfile.tree import Tree

        out = self.outputs[path]
        cache = self.repo.cache.local
        try:
            committed = dict((k, hi.value) for k, (_, hi) in Tree.load(cache, HashInfo("md5", committed_md5)).iteritems())
        except Exception:  # noqa: BLE001 - the committed tree is not in this cache (a fresh clone)
            return f"{path} (its committed file list is not in the DVC cache)"
        _, _, tree = build(cache, out.fs_path, out.fs, "md5", ignore=out.dvcignore)
        current = dict((k, hi.value) for k, (_, hi) in tree.iteritems())
        for key in sorted(set(committed) | set(current)):
            if committed.get(key) != current.get(key):
                state = "missing" if key not in current else "new" if key not in committed else "differs"
                return f"{path}/{'/'.join(key)} ({state})"
        return path


def _fingerprint_detail(ws: Workspace, path: str, committed_md5: str) -> str:
    committed = ws.committed_text(path, committed_md5)
    current_file = ws.root / path
    if committed is None or not current_file.is_file():
        return f"{path} differs from the committed one"
    old, new = json.loads(committed), json.loads(current_file.read_text(encoding="utf-8"))
    flat_old, flat_new = _flatten_all(old), _flatten_all(new)
    changed = [f"{k}: {flat_old.get(k)} → {flat_new.get(k)}" for k in sorted(set(flat_old) | set(flat_new))
               if k != "id" and flat_old.get(k) != flat_new.get(k)]
    return f"{path}: " + "; ".join(changed[:6]) + (" …" if len(changed) > 6 else "")


def _flatten_all(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten_all(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _metrics(ws: Workspace, outs: list[dict], tolerances: dict[str, float]) -> list[MetricDiff]:
    diffs = []
    for out in outs:
        path = out["path"]
        if not path.endswith(".json") or path.endswith(RECORD_NAME):
            continue
        current_file = ws.root / path
        committed = ws.committed_text(path, out.get("md5"))
        old = _flatten(json.loads(committed)) if committed else {}
        new = _flatten(json.loads(current_file.read_text(encoding="utf-8"))) if current_file.is_file() else {}
        for key in sorted(set(old) | set(new)):
            if key.startswith("numerics."):
                continue
            tol = next((t for pat, t in tolerances.items()
                        if fnmatch.fnmatch(path, pat.split(":", 1)[0]) and fnmatch.fnmatch(key, pat.split(":", 1)[1])),
                       None)
            if tol is not None or old.get(key) != new.get(key):
                diffs.append(MetricDiff(path, key, old.get(key), new.get(key), tol))
    return diffs


def check(params: Params, root: str | Path = ".", rev: str | None = None) -> list[StageCheck]:
    root = Path(root).resolve()
    rev = rev or params.repro.lock_rev
    lock = committed_lock(root, rev)
    ws = Workspace(root, rev)
    producer = {out["path"]: name for name, st in lock.items() for out in st.get("outs", [])}
    upstream: dict[str, set[str]] = {}
    for name, st in lock.items():  # the lock lists stages in pipeline order
        ups = {producer[p] for dep in st.get("deps", []) for p in producer if _under(dep["path"], p) and producer[p] != name}
        upstream[name] = ups | {u for up in ups for u in upstream.get(up, set())}
    results: dict[str, StageCheck] = {}
    for name, st in lock.items():
        results[name] = _check_stage(ws, name, st, lock, producer, upstream[name], results, params)
    return list(results.values())


def _check_stage(ws: Workspace, name: str, st: dict, lock: dict, producer: dict[str, str], upstream: set[str],
                 done: dict[str, StageCheck], params: Params) -> StageCheck:
    outs = st.get("outs", [])
    current = {o["path"]: ws.current_md5(o["path"]) for o in outs}
    differing = [o["path"] for o in outs if current[o["path"]] != o.get("md5")]
    if not differing:
        return StageCheck(name, IDENTICAL, True)
    missing = [p for p in differing if current[p] is None]
    if missing:
        return StageCheck(name, NOT_BUILT, False, f"missing: {', '.join(missing)} (run `dvc repro`)", differing)

    # Inputs that no stage produces (code, git-tracked files, parameters): a change means another revision.
    changed = [d["path"] for d in st.get("deps", [])
               if not any(_under(d["path"], p) for p in producer) and ws.current_md5(d["path"], name) != d.get("md5")]
    now = ws.current_params(name)
    for file, values in (st.get("params") or {}).items():
        for key, value in values.items():
            if now.get(file, {}).get(key) != value:
                changed.append(f"{file}:{key}")
    if changed:
        return StageCheck(name, INPUTS_CHANGED, False,
                          f"not a rebuild of {ws.rev}: {', '.join(changed)} changed", differing)

    broken_up = sorted(u for u in upstream if done[u].verdict in (DETERMINISM_BUG, INPUTS_CHANGED, NOT_BUILT)
                       and any(o["path"] in done[u].differing for o in lock[u].get("outs", [])))
    if broken_up:
        return StageCheck(name, FOLLOWS_UPSTREAM, done[broken_up[0]].ok,
                          f"its inputs differ because {', '.join(broken_up)} do", differing)

    records = [(o["path"], o.get("md5")) for s in sorted(upstream | {name}) for o in lock[s].get("outs", [])
               if Path(o["path"]).name == RECORD_NAME]
    other = [(p, md5) for p, md5 in records if ws.current_md5(p) != md5]
    if other:
        metrics = _metrics(ws, outs, params.repro.tolerances)
        judged = [m for m in metrics if m.tolerance is not None]
        detail = "; ".join(_fingerprint_detail(ws, p, md5) for p, md5 in other)
        if not judged:
            detail += " (no metric of this stage has a tolerance: outputs differ as expected)"
        return StageCheck(name, NUMERICS_DIFFER, all(m.ok for m in judged), detail, differing, metrics)

    produced_changed = [d["path"] for d in st.get("deps", [])
                        if any(_under(d["path"], p) for p in producer) and ws.current_md5(d["path"], name) != d.get("md5")]
    if produced_changed:
        ups = sorted(u for u in upstream if done[u].verdict != IDENTICAL)
        return StageCheck(name, FOLLOWS_UPSTREAM, all(done[u].ok for u in ups),
                          f"its inputs {', '.join(produced_changed)} differ ({', '.join(ups) or 'upstream'})", differing)

    first = next(o for o in outs if o["path"] in differing)
    return StageCheck(name, DETERMINISM_BUG, False,
                      "same inputs and numerics fingerprint, different bits: first differing output "
                      + ws.first_differing_file(first["path"], first.get("md5") or ""), differing)


def render(results: list[StageCheck], rev: str) -> str:
    width = max((len(r.stage) for r in results), default=5)
    lines = [f"workspace against dvc.lock at {rev}:"]
    for r in results:
        mark = "ok " if r.ok else "FAIL"
        lines.append(f"  {mark} {r.stage:<{width}}  {r.verdict}" + (f": {r.detail}" if r.detail else ""))
        for m in r.metrics:
            tol = "shown only" if m.tolerance is None else f"tolerance {m.tolerance:g}: {'within' if m.ok else 'BEYOND'}"
            lines.append(f"       {m.report}:{m.metric}  {m.committed} → {m.current}  ({tol})")
    bad = [r.stage for r in results if not r.ok]
    lines.append("reproduced" if not bad else f"not reproduced: {', '.join(bad)}")
    return "\n".join(lines)


def main(args) -> int:
    from pipeline.cli import UserError
    from pipeline.config import load_params

    params = load_params(args.params)
    rev = args.rev or params.repro.lock_rev
    try:
        results = check(params, args.root, rev)
    except ReproCheckError as exc:
        raise UserError(str(exc)) from None
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2, sort_keys=True))
    else:
        print(render(results, rev))
    return 0 if all(r.ok for r in results) else 1
