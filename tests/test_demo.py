"""The demo replaces its own earlier run on a rerun, and never anything else."""

import pytest

from chattune.demo import MARKER, _clear_previous
from chattune.errors import UserError


def test_rerun_replaces_a_previous_demo_run(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "config.yaml").write_text("x: 1")
    (out / MARKER).touch()
    _clear_previous(out)
    assert not out.exists()


def test_refuses_a_directory_the_demo_did_not_make(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a previous demo run"):
        _clear_previous(out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_missing_or_empty_directory_is_fine(tmp_path):
    _clear_previous(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    _clear_previous(tmp_path / "empty")
    assert (tmp_path / "empty").exists()
