"""The committed stubs are what buf generates from protos/, and the protos pass buf lint."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def buf(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("buf") or str(Path(sys.executable).parent / "buf")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


def test_buf_lint_is_clean():
    out = buf("lint", cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_generated_stubs_match_protos(tmp_path):
    for name in ("buf.yaml", "buf.gen.yaml", "protos", "tools"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    out = buf("generate", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    fresh, committed = tmp_path / "gen" / "python", ROOT / "gen" / "python"
    files = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
    assert files == sorted(
        p.relative_to(committed) for p in committed.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    drifted = [str(f) for f in files if not filecmp.cmp(fresh / f, committed / f, shallow=False)]
    assert not drifted, f"stubs drifted from protos/ (run `make protos`): {drifted}"
