"""What made a run: git commit, package versions, host. Cheap (no heavy imports)."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("resnet-lab", "torch", "torchvision", "ray", "optuna", "mlflow", "numpy")


def git_commit(cwd: Path | None = None) -> str:
    """The working tree's commit (with `-dirty` when it has changes), or "unknown" outside git."""
    root = cwd or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def provenance() -> dict[str, str]:
    """Commit, Python and package versions, as flat string params."""
    out = {"git_commit": git_commit(), "python": platform.python_version(), "host": platform.node()}
    for name in PACKAGES:
        try:
            out[f"version.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[f"version.{name}"] = "not installed"
    return out
