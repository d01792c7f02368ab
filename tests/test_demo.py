"""The demo's pure decisions: where the cluster lives, who can reach it, what it refuses."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from depthflow.demo import data_dir
from depthflow.embedded_postgres import (
    Account,
    EmbeddedPostgres,
    EmbeddedPostgresError,
    reachable_by,
)

# An account that owns nothing here, so only the "other" permission bits apply to it.
STRANGER = Account("stranger", uid=os.geteuid() + 4242, gid=os.getegid() + 4242)
ME = Account("me", uid=os.geteuid(), gid=os.getegid())


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A 0755 directory in the system temp dir (pytest's own base is 0700: no stranger gets in)."""
    path = Path(tempfile.mkdtemp(prefix="depthflow-demo-unit-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_data_dir_follows_xdg_data_home() -> None:
    environ = {"XDG_DATA_HOME": "/srv/share", "HOME": "/home/ann"}
    assert data_dir(environ) == Path("/srv/share/depthflow/demo-pg")


def test_data_dir_ignores_a_relative_xdg_data_home() -> None:
    # The XDG spec: a relative path is invalid and should be ignored.
    environ = {"XDG_DATA_HOME": "share", "HOME": "/home/ann"}
    assert data_dir(environ) == Path("/home/ann/.local/share/depthflow/demo-pg")


def test_data_dir_defaults_under_home() -> None:
    assert data_dir({"HOME": "/home/ann"}) == Path("/home/ann/.local/share/depthflow/demo-pg")


def test_a_private_directory_above_keeps_other_accounts_out(scratch: Path) -> None:
    private = scratch / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    target = private / "depthflow" / "demo-pg"  # not created yet: judged by what exists
    assert not reachable_by(target, STRANGER)
    assert reachable_by(target, ME)


def test_searchable_directories_let_other_accounts_through(scratch: Path) -> None:
    passage = scratch / "passage"
    passage.mkdir()
    passage.chmod(0o711)  # search without listing is enough
    assert reachable_by(passage / "depthflow" / "demo-pg", STRANGER)


async def test_an_existing_directory_that_is_not_private_is_refused(scratch: Path) -> None:
    base = scratch / "demo-pg"
    base.mkdir()
    base.chmod(0o755)
    postgres = EmbeddedPostgres(base, site=scratch, account=ME)
    with pytest.raises(EmbeddedPostgresError, match="not a private directory"):
        await postgres.start()
    assert base.stat().st_mode & 0o777 == 0o755  # reported, not "fixed"
    assert not (base / "data").exists()


def test_the_url_names_the_private_socket_and_no_tcp_host(scratch: Path) -> None:
    base = scratch / "a dir with spaces & an ampersand"
    url = make_url(EmbeddedPostgres(base, site=scratch, account=ME).url)
    assert url.drivername == "postgresql+asyncpg"
    assert (url.username, url.password, url.host, url.database) == (
        "postgres",
        None,
        None,
        "depthflow",
    )
    assert url.query["host"] == str(base / "run")
