"""Every stage of dvc.yaml depends on the project code it runs, so changing that code re-runs the stage.

For each command of each stage, the `ownllm` parser names the handler (``module:function``); from that module the
project's import graph is followed, imports inside functions included (the sub-commands import lazily), and every
project file reached must be covered by one of the stage's ``deps`` (the file itself or a folder above it).

Two things are not followed: ``pipeline/cli.py``, the dispatcher every stage shares (argv → handler; its one
numerics-relevant step calls pipeline/numerics.py, which the stages that run a model import themselves), and
``__init__.py`` files with no code in them.
"""

from __future__ import annotations

import ast
import shlex
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from pipeline.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "feedback", "rlhf")
NOT_FOLLOWED = {"pipeline.cli"}


def module_file(name: str) -> Path | None:
    """The project file of a dotted module name (``pkg/mod.py`` or ``pkg/mod/__init__.py``), or None."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


class Module:
    """One project module, parsed: its top-level definitions and what names it binds to other modules."""

    def __init__(self, name: str, path: Path):
        self.name, self.path = name, path
        self.tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        self.package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        self.defs = {n.name: n for n in self.tree.body
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        self.top_level = [n for n in self.tree.body if n not in self.defs.values()]
        # Decorators, default values and base classes run when the module is imported.
        for d in self.defs.values():
            self.top_level += [*d.decorator_list, *getattr(d, "bases", [])]
            if not isinstance(d, ast.ClassDef):
                self.top_level += [x for x in d.args.defaults + d.args.kw_defaults if x is not None]
        self.bindings = self._bindings(self.tree.body)
        # Importing it does more than bind names: a statement other than imports, definitions, a docstring and
        # literal constants (a registry, a computed default). Else the file matters only if something is used.
        self.runs_code = any(not self._only_defines(n) for n in self.tree.body)

    @staticmethod
    def _only_defines(node: ast.stmt) -> bool:
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return True
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            return True
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            try:
                ast.literal_eval(node.value)
                return True
            except ValueError:
                return False
        return False

    def absolute(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        parts = self.package.split(".")
        return ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))

    def _bindings(self, nodes) -> dict[str, tuple[str, str | None]]:
        """Local name → (module, attribute or None) for the imports among ``nodes``, at any depth."""
        out: dict[str, tuple[str, str | None]] = {}
        for node in (n for top in nodes for n in ast.walk(top)):
            if isinstance(node, ast.Import):
                for a in node.names:
                    out[a.asname or a.name.split(".")[0]] = (a.name if a.asname else a.name.split(".")[0], None)
            elif isinstance(node, ast.ImportFrom):
                base = self.absolute(node)
                for a in node.names:
                    out[a.asname or a.name] = (base, a.name)
        return out


@lru_cache(maxsize=None)
def project_files(root: str) -> frozenset[str]:
    """Repository-relative files of the project code that running ``root`` (``module:function``) can execute.

    Followed per top-level function, class and method, so that a module of many commands (rlhf/commands.py) only
    brings in what the stage's own handler reaches. A definition brings in the imports in its body and what it
    names: a definition of its module, ``from module import name``, ``module.name``. Importing a module runs its
    top level and its packages' ``__init__``. Methods are resolved by name, as a call on an object of unknown type
    must be: a method runs when code already reached calls ``<anything>.<its name>(...)``, uses ``self.<its name>``
    (a bound method handed on), reads it as a property, or when it is a dunder; a class with a base outside the
    project (a Composer callback, a torch module) has all its methods run, since the framework calls them. A plain
    attribute read (``params.data.clean``) is not a call. This over-approximates (every branch counts), which is
    what a dependency list needs.

    A module's file counts when something of it is used or its top level does more than define (see
    ``Module.runs_code``): importing ``engine`` runs ``dedup``'s imports, but ``dedup.py`` is only a dependency of
    a stage that calls into it.

    Written here rather than with the standard library's ``modulefinder``: that one works per module (a catch-all
    command module would make every stage depend on everything), cannot skip third-party code cheaply and fails
    on PEP 420 namespace packages (``pipeline/train`` has no ``__init__.py``).
    """
    modules: dict[str, Module | None] = {}

    def module(name: str) -> Module | None:
        if name not in modules:
            path = module_file(name)
            modules[name] = Module(name, path) if path and name not in NOT_FOLLOWED else None
        return modules[name]

    def is_project(name: str) -> bool:
        return module_file(name) is not None

    called: set[str] = set()  # .name(...) calls and self.name uses
    read: set[str] = set()  # every attribute read (properties)
    classes: list[tuple[Module, ast.ClassDef, bool]] = []  # (module, class, all methods run)
    used: set[str] = set()  # modules something is taken from, or whose top level does more than define
    seen: set[tuple] = set()
    todo: list[tuple] = [tuple(root.split(":"))]  # (module, None) top level | (module, def) | (module, class, method)
    while todo:
        item = todo.pop()
        if item in seen:
            continue
        seen.add(item)
        name, def_name = item[0], item[1]
        mod = module(name)
        if mod is None:
            continue
        if def_name is not None or mod.runs_code:
            used.add(name)
        parents = name.split(".")
        todo += [(".".join(parents[:i]), None) for i in range(1, len(parents) + 1)]  # importing runs the packages
        if def_name is None:
            nodes = mod.top_level
        elif def_name not in mod.defs:
            continue  # a constant or an alias: the module's top level covers it
        elif len(item) == 3:
            nodes = [m for m in mod.defs[def_name].body if getattr(m, "name", None) == item[2]]
        elif isinstance(mod.defs[def_name], ast.ClassDef):
            cls = mod.defs[def_name]
            nodes = [n for n in cls.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            nodes += [d for m in cls.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))
                      for d in m.decorator_list + [x for x in m.args.defaults + m.args.kw_defaults if x is not None]]
            external_base = any(not is_project(local_target(mod, b)) for b in cls.bases)
            classes.append((mod, cls, external_base))
        else:
            nodes = [mod.defs[def_name]]
        local = {**mod.bindings, **mod._bindings(nodes)}
        for node in (n for top in nodes for n in ast.walk(top)):
            if isinstance(node, ast.Attribute) and (chain := params_chain(node)):
                PARAMS_READ.setdefault(root, set()).add(chain)
            if isinstance(node, ast.Import):
                todo += [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = mod.absolute(node)
                todo.append((base, None))
                for a in node.names:  # `from pkg import module` imports the module; else it names a definition
                    todo.append((f"{base}.{a.name}", None) if is_project(f"{base}.{a.name}") else (base, a.name))
            if isinstance(node, ast.Name) and node.id in mod.defs:
                todo.append((name, node.id))
            elif isinstance(node, ast.Name) and node.id in local and local[node.id][1]:
                target, attr = local[node.id]
                todo.append((f"{target}.{attr}", None) if is_project(f"{target}.{attr}") else (target, attr))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                called.add(node.func.attr)
            if isinstance(node, ast.Attribute):
                read.add(node.attr)
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    called.add(node.attr)
                if isinstance(node.value, ast.Name) and node.value.id in local:
                    target, attr = local[node.value.id]
                    target = f"{target}.{attr}" if attr else target  # `from pkg import module`, then module.x
                    if is_project(target):
                        todo.append((f"{target}.{node.attr}", None) if is_project(f"{target}.{node.attr}")
                                    else (target, node.attr))
        for cmod, cls, all_methods in classes:  # methods reachable by now (by name, dunders, framework-called)
            for m in cls.body:
                if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                        all_methods or m.name in called or (m.name.startswith("__") and m.name.endswith("__"))
                        or (m.name in read and any(getattr(d, "id", None) == "property" for d in m.decorator_list))):
                    if (cmod.name, cls.name, m.name) not in seen:
                        todo.append((cmod.name, cls.name, m.name))

    return frozenset(modules[name].path.relative_to(REPO).as_posix() for name in used)


# root → the ``params.a.b`` chains its reachable code reads (filled by ``project_files``).
PARAMS_READ: dict[str, set[str]] = {}


def params_chain(node: ast.Attribute) -> str | None:
    """``params.rlhf.gate.heldout_frac`` → ``"rlhf.gate.heldout_frac"``; None for an attribute not read off ``params``."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join(reversed(parts)) if isinstance(node, ast.Name) and node.id == "params" else None


def local_target(mod: Module, base: ast.expr) -> str:
    """The dotted name a base-class expression refers to, as far as the module's imports say."""
    if isinstance(base, ast.Name):
        if base.id in mod.defs:
            return mod.name
        target, attr = mod.bindings.get(base.id, ("builtins", base.id))
        return f"{target}.{attr}" if attr else target
    if isinstance(base, ast.Attribute) and isinstance(base.value, ast.Name):
        target, attr = mod.bindings.get(base.value.id, ("builtins", None))
        return f"{target}.{attr}" if attr else target
    return "builtins"


def stage_definitions() -> dict[str, dict]:
    """dvc.yaml's stages; a ``foreach`` stage (the refresh rounds) as its ``do`` body for one key of the params
    it iterates over, DVC's name ``stage@key``."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    out = {}
    for name, stage in stages.items():
        if "foreach" not in stage:
            out[name] = stage
            continue
        items = params
        for part in stage["foreach"].strip("${} ").split("."):
            items = items[part]
        # The default may define no item (rlhf.loop.rounds is empty: round 1 only): check the first a profile adds.
        key, item = next(iter(items.items()), ("round-2", "reports/rlhf_register.json"))
        text = yaml.safe_dump(stage["do"]).replace("${key}", key).replace("${item}", item)
        out[f"{name}@{key}"] = yaml.safe_load(text)
    return out


def stage_commands() -> list[tuple[str, str, list[str]]]:
    out = []
    for name, stage in stage_definitions().items():
        cmds = stage["cmd"] if isinstance(stage["cmd"], list) else [stage["cmd"]]
        deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
        out.extend((name, cmd, deps) for cmd in cmds)
    return out


@lru_cache(maxsize=1)
def parser():
    return build_parser()


def handler(cmd: str) -> str:
    words = shlex.split(cmd)
    assert words[0] == "ownllm", f"a stage runs something other than an ownllm sub-command: {cmd!r}"
    return parser().parse_args(words[1:]).func.__qualname__  # pipeline.cli.lazy: "module:function"


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage,cmd,deps", stage_commands(), ids=lambda v: v if isinstance(v, str) and " " in v else None)
def test_stage_deps_cover_the_code_it_runs(stage, cmd, deps):
    files = project_files(handler(cmd))
    assert files, f"{cmd}: found no project code; the import walk is broken"
    missing = sorted(f for f in files if not covered(f, deps))
    assert not missing, f"stage {stage!r} ({cmd}) runs code its deps in dvc.yaml do not cover: {missing}"


def test_the_walk_finds_lazy_and_relative_imports():
    """The property the deps test rests on: function-level imports are followed (the train stage's collator
    imports span corruption; its callbacks are imported inside build_trainer)."""
    files = project_files("pipeline.train.trainer:main")
    for f in ("pipeline/train/span_corruption.py", "pipeline/train/batchlog.py", "pipeline/train/spike.py",
              "pipeline/numerics.py", "pipeline/config.py"):
        assert f in files
    assert "pipeline/cli.py" not in files and "feedback/app.py" not in files


@pytest.mark.parametrize("stage,cmd,deps", stage_commands(), ids=lambda v: v if isinstance(v, str) and " " in v else None)
def test_stages_that_apply_numerics_are_pinned_and_track_them(stage, cmd, deps):
    """A stage whose code applies params `numerics` must have them pinned by the CLI before torch loads; a stage the
    CLI pins must re-run when they change."""
    from pipeline.cli import NUMERICS_COMMANDS

    words = tuple(w for w in shlex.split(cmd)[1:3] if not w.startswith("-"))
    pinned = any(words[:len(c)] == c for c in NUMERICS_COMMANDS)
    if "pipeline/numerics.py" in project_files(handler(cmd)):
        assert pinned, f"{cmd!r} applies params `numerics` but is missing from pipeline.cli.NUMERICS_COMMANDS"
    if not pinned:
        return
    params = stage_definitions()[stage].get("params", [])
    assert "numerics" in params, f"stage {stage!r} applies params `numerics` but does not list them in dvc.yaml"


# Parameters that decide which documents a stage reads (the train/validation split, the gate's share of the
# validation files). Most parameters a stage's code can reach do not change its outputs (W&B settings, the
# engine, paths that its deps name), so only these are checked: a stage that reads one without listing it keeps
# stale outputs when the split moves (the simulator replayed gate files after rlhf.gate.heldout_frac changed).
SPLIT_PARAMS = ("shards.val_frac", "rlhf.gate.heldout_frac")


@pytest.mark.parametrize("stage,cmd,deps", stage_commands(), ids=lambda v: v if isinstance(v, str) and " " in v else None)
def test_stages_that_read_a_data_split_track_it(stage, cmd, deps):
    root = handler(cmd)
    project_files(root)
    listed = [p if isinstance(p, str) else next(iter(p))
              for p in stage_definitions()[stage].get("params", [])]
    for key in SPLIT_PARAMS:
        if any(c == key or c.startswith(key + ".") for c in PARAMS_READ.get(root, ())):
            assert any(key == p or key.startswith(p + ".") for p in listed), \
                f"stage {stage!r} ({cmd}) reads params.{key} but does not list it in dvc.yaml"


def test_the_walk_sees_params_reads():
    project_files("feedback.simulate:main")
    assert "rlhf.gate.heldout_frac" in PARAMS_READ["feedback.simulate:main"]


def test_a_later_refresh_round_tracks_every_parameter_round_one_does():
    """refresh@round-N runs simulate ... register itself: a parameter one of those stages lists (a new learner
    knob) must re-run the later rounds too. Their output paths are the exception (a round writes its own folder)."""
    stages = stage_definitions()
    refresh = next(v for k, v in stages.items() if k.startswith("refresh@"))
    listed = [p if isinstance(p, str) else next(iter(p)) for p in refresh.get("params", [])]
    own_paths = {"rlhf.snapshot_dir", "rlhf.sft_out", "rlhf.tuned_out"}
    for name in ("simulate", "snapshot", "sft", "preference", "gate", "register"):
        for p in stages[name].get("params", []):
            key = p if isinstance(p, str) else next(iter(p))
            assert key in own_paths or any(key == r or key.startswith(r + ".") for r in listed), \
                f"stage {name!r} lists params.{key}; refresh@round-N runs that stage's code but does not list it"
