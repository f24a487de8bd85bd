"""The GPU kit: the wheels that benchmarks/gpu/run.sh installs on the GPU box, which has no network.

    python3 benchmarks/gpu/kit.py download --kit .gpu-kit   # `make gpu-kit`: pip download + check
    python3 benchmarks/gpu/kit.py check --kit .gpu-kit      # every pinned wheel there, nothing else, size fits
    python3 benchmarks/gpu/kit.py device-venv --venv DIR --python python3.12   # `make gpu-rehearsal`'s venv

The box receives the working tree (tracked and untracked-not-ignored files) plus the carried paths, at most
64 MiB together, so the kit may take 64 MiB minus the project's own size. Standard library only: run.sh
calls ``check`` on the box before it installs anything.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PINS = HERE / "kit.txt"
DEVICE_PACKAGES = HERE / "device-packages.txt"
CARRY_LIMIT_MIB = 64.0  # the device tool's limit on the tree that travels, carried paths included
MIB = 1024 * 1024
# The box: CPython 3.12 on x86_64 Linux (glibc 2.35+). Older manylinux tags are what most wheels carry.
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none",
          *[a for tag in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64",
                          "manylinux_2_34_x86_64", "any") for a in ("--platform", tag)]]


class KitError(Exception):
    """The kit cannot go to the box as it is: the message says what to do."""


def normalise(name: str) -> str:
    """PEP 503 project name: case-insensitive, runs of -_. are one '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path = PINS) -> dict[str, str]:
    """name -> exact version, from ``name==version`` lines (comments and blank lines ignored)."""
    pins = {}
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        if not m:
            raise KitError(f"{path}:{n}: {raw.strip()!r} is not an exact pin (name==version)")
        pins[normalise(m.group(1))] = m.group(2)
    return pins


def wheel_name_version(path: Path) -> tuple[str, str]:
    """(normalised name, version) from a wheel file name (PEP 427: name-version-...-tags.whl)."""
    parts = path.name.split("-")
    if path.suffix != ".whl" or len(parts) < 5:
        raise KitError(f"{path}: not a wheel file name")
    return normalise(parts[0]), parts[1]


def project_bytes(repo: Path = REPO) -> int:
    """Bytes of what the device tool sends of the repository: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         check=True, capture_output=True).stdout
    total = 0
    for name in {n for n in out.decode().split("\0") if n}:
        p = repo / name
        if p.is_file() and not p.is_symlink():  # a deleted-but-tracked file is not sent
            total += p.stat().st_size
    return total


def check(kit: Path, pins: dict[str, str], project: int, limit_mib: float = CARRY_LIMIT_MIB) -> dict:
    """Validate the kit folder; returns its summary or raises KitError naming every problem."""
    if not kit.is_dir():
        raise KitError(f"no GPU kit at {kit}: run `make gpu-kit` first (it downloads the wheels)")
    wheels = sorted(kit.glob("*.whl"))
    found: dict[str, tuple[str, Path]] = {}
    problems = []
    for w in wheels:
        name, version = wheel_name_version(w)
        if name in found:
            problems.append(f"two wheels for {name}: {found[name][1].name} and {w.name}")
        found[name] = (version, w)
    for name, version in pins.items():
        if name not in found:
            problems.append(f"missing: {name}=={version}")
        elif found[name][0] != version:
            problems.append(f"{found[name][1].name} is not the pinned {name}=={version}")
    extra = sorted(set(found) - set(pins))
    if extra:
        problems.append(f"not in {PINS.name} (stale? run `make gpu-kit`): {', '.join(found[e][1].name for e in extra)}")
    kit_bytes = sum(w.stat().st_size for w in wheels)
    budget = limit_mib * MIB - project
    if kit_bytes > budget:
        problems.append(f"the kit is {kit_bytes / MIB:.1f} MiB but only {budget / MIB:.1f} MiB may travel "
                        f"({limit_mib:g} MiB carry limit - {project / MIB:.1f} MiB of project)")
    if problems:
        raise KitError(f"GPU kit {kit} is not ready:\n  " + "\n  ".join(problems))
    return {"kit_mib": kit_bytes / MIB, "project_mib": project / MIB, "limit_mib": limit_mib,
            "headroom_mib": (budget - kit_bytes) / MIB,
            "wheels": {w.name: round(w.stat().st_size / MIB, 2) for w in wheels}}


def download(kit: Path, pins_file: Path = PINS) -> None:
    """pip download the pinned wheels for the box (no dependencies: see kit.txt); ``kit`` is replaced only
    when every download succeeded."""
    import shutil
    import tempfile

    kit.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=kit.name + ".", dir=kit.parent))
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", *TARGET,
           "--dest", str(tmp), "-r", str(pins_file)]
    print("+ " + " ".join(cmd), flush=True)
    if subprocess.call(cmd) != 0:
        shutil.rmtree(tmp)
        raise KitError("pip download failed (is PyPI reachable? is every pin in kit.txt published as a wheel "
                       "for CPython 3.12 on manylinux x86_64?)")
    if kit.exists():
        shutil.rmtree(kit)
    tmp.rename(kit)


def device_packages(path: Path = DEVICE_PACKAGES) -> tuple[list[str], set[str]]:
    """(requirements to install, normalised names of everything on the box) from device-packages.txt."""
    install, on_box = [], set()
    for raw in path.read_text(encoding="utf-8").splitlines():
        if raw.startswith("# on-box:"):
            on_box.update(normalise(n) for n in raw.removeprefix("# on-box:").split())
        elif raw.split("#", 1)[0].strip():
            install.append(raw.split("#", 1)[0].strip())
    on_box.update(normalise(re.split(r"[=<>!~ ]", r, maxsplit=1)[0]) for r in install)
    return install, on_box


def device_venv(venv: Path, python: str, path: Path = DEVICE_PACKAGES) -> None:
    """A venv with the box's packages and no others: install the list, then uninstall what pip pulled in
    that the box does not have (e.g. pydantic, which a newer typer wants), so the rehearsal sees what the
    box would import. Skipped when the venv was built from the same list already (a stamp holds its hash)."""
    import hashlib
    import json

    stamp = venv / ".device-packages.sha256"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if stamp.is_file() and stamp.read_text().strip() == digest:
        print(f"{venv}: up to date with {path.name}")
        return
    install, on_box = device_packages(path)
    vpy = venv / "bin" / "python"
    if not vpy.exists():
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    if subprocess.call([str(vpy), "-c", "import sys; sys.exit(sys.version_info[:2] != (3, 12))"]):
        raise KitError(f"{vpy} is not CPython 3.12 (the box's); pass --python with a 3.12 interpreter")
    print(f"installing {len(install)} packages of the box into {venv} (torch 2.11 is a CUDA build: a few GB)",
          flush=True)
    subprocess.run([str(vpy), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *install], check=True)
    listed = json.loads(subprocess.run([str(vpy), "-m", "pip", "list", "--format", "json"], check=True,
                                       capture_output=True, text=True).stdout)
    # CUDA runtime wheels come with torch and are on the box under other names (nvidia-*, cuda-*).
    extra = sorted(d["name"] for d in listed if normalise(d["name"]) not in on_box
                   and not normalise(d["name"]).startswith(("nvidia-", "cuda-")))
    if extra:
        print(f"removing what the box does not have: {', '.join(extra)}", flush=True)
        subprocess.run([str(vpy), "-m", "pip", "uninstall", "--quiet", "-y", *extra], check=True)
    stamp.write_text(digest + "\n")


def report(summary: dict) -> str:
    lines = [f"  {size:7.2f} MiB  {name}" for name, size in sorted(summary["wheels"].items(), key=lambda kv: -kv[1])]
    lines.append(f"GPU kit: {len(summary['wheels'])} wheels, {summary['kit_mib']:.1f} MiB; project "
                 f"{summary['project_mib']:.1f} MiB; {summary['headroom_mib']:.1f} MiB left of "
                 f"{summary['limit_mib']:g} MiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["download", "check", "device-venv"])
    ap.add_argument("--venv", type=Path, help="device-venv: the venv to create or update")
    ap.add_argument("--python", default="python3.12", help="device-venv: a CPython 3.12 (default: %(default)s)")
    ap.add_argument("--kit", type=Path, default=REPO / ".gpu-kit", help="kit folder (default: %(default)s)")
    ap.add_argument("--pins", type=Path, default=PINS, help="exact pins (default: %(default)s)")
    ap.add_argument("--limit-mib", type=float, default=CARRY_LIMIT_MIB,
                    help="what may travel to the box in all, project included (default: %(default)s)")
    ap.add_argument("--project-bytes", type=int, default=None,
                    help="size of the project as sent (default: measured with git ls-files)")
    args = ap.parse_args(argv)
    try:
        if args.action == "device-venv":
            if not args.venv:
                ap.error("device-venv needs --venv DIR")
            device_venv(args.venv, args.python)
            return 0
        pins = read_pins(args.pins)
        if args.action == "download":
            download(args.kit, args.pins)
        project = args.project_bytes if args.project_bytes is not None else project_bytes()
        print(report(check(args.kit, pins, project, args.limit_mib)))
    except KitError as exc:
        print(f"kit: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
