"""A built wheel carries everything an installed depthflow needs: `depthflow migrate` from any
directory (the migrations are package data), and the dashboard's and docs' static files."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import sysconfig
import uuid
import zipfile
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import make_url

from depthflow.storage import db

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(REPO)],
        check=True,
        timeout=600,
    )
    (built,) = out.glob("depthflow-*.whl")
    return built


@pytest.fixture
def installed(wheel: Path, tmp_path: Path) -> Path:
    """A fresh venv holding the wheel alone; its dependencies are this interpreter's (a .pth
    line), so nothing is downloaded and nothing of the checkout is importable."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "--no-deps", "--quiet", str(wheel)],
        check=True,
        timeout=300,
    )  # fmt: skip
    return venv


def test_the_wheel_ships_the_migrations_and_the_static_files(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    versions = {p.name for p in (REPO / "alembic" / "versions").glob("*.py")}
    assert {"depthflow/migrations/env.py", "depthflow/migrations/script.py.mako"} <= names
    assert {f"depthflow/migrations/versions/{v}" for v in versions} <= names
    # Every module of the source tree (the package list in pyproject.toml is explicit).
    source = REPO / "src"
    modules = {str(p.relative_to(source)) for p in (source / "depthflow").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    assert "depthflow/api/static/dashboard/index.html" in names
    assert any(n.startswith("depthflow/api/static/docs/") for n in names)


def test_an_installed_depthflow_migrates_from_any_directory(
    installed: Path, database_url: str, tmp_path: Path
) -> None:
    url = make_url(database_url).set(database=f"depthflow_wheel_{uuid.uuid4().hex[:8]}")
    rendered = url.render_as_string(hide_password=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH"}}
    try:
        result = subprocess.run(
            [str(installed / "bin" / "depthflow"), "migrate"],
            cwd=elsewhere,
            env={**env, "DATABASE_URL": rendered},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        where = subprocess.run(
            [
                str(installed / "bin" / "python"),
                "-c",
                "import depthflow; print(depthflow.__file__)",
            ],
            cwd=elsewhere,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert str(installed) in where, "the wheel's depthflow, not the checkout's"

        assert asyncio.run(revision(rendered)) == db.head_revision()
    finally:
        asyncio.run(db.drop_database(rendered))


async def revision(url: str) -> str:
    conn = await asyncpg.connect(db.asyncpg_dsn(url))
    try:
        return str(await conn.fetchval("SELECT version_num FROM alembic_version"))
    finally:
        await conn.close()
