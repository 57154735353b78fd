import os
import stat

import pytest

from lookalike.core.files import open_temporary_beside


@pytest.fixture()
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_new_file_follows_umask(tmp_path, umask_022):
    stream, temporary = open_temporary_beside(tmp_path / "labels.csv")
    with stream:
        stream.write("chip\n")

    assert mode_of(temporary) == 0o644


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_replaced_file_keeps_its_mode(tmp_path, umask_022):
    target = tmp_path / "report.html"
    target.write_text("old", encoding="utf-8")
    os.chmod(target, 0o664)

    stream, temporary = open_temporary_beside(target)
    stream.close()

    assert mode_of(temporary) == 0o664


def test_temporary_is_hidden_beside_target(tmp_path):
    stream, temporary = open_temporary_beside(tmp_path / "report.html")
    with stream:
        stream.write("a\nb\n")

    assert temporary.parent == tmp_path
    assert temporary.name.startswith(".report.html.")
    assert temporary.read_bytes() == b"a\nb\n"
