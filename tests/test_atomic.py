"""Atomic directories: a committed directory replaces the old one whole; crash left-overs are cleared."""
from saelab.atomic import commit_dir, fresh_tmp


def test_commit_replaces_whole_directory(tmp_path):
    final = tmp_path / "sae"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp = fresh_tmp(final)
    assert tmp == tmp_path / "sae.tmp" and list(tmp.iterdir()) == []
    (tmp / "new.txt").write_text("new")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "deep.txt").write_text("deep")
    commit_dir(tmp, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt", "sub"]
    assert (final / "sub" / "deep.txt").read_text() == "deep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no .tmp, no .old


def test_fresh_tmp_clears_crash_leftovers(tmp_path):
    final = tmp_path / "step_000500"
    stale = tmp_path / "step_000500.tmp"
    stale.mkdir()
    (stale / "half_written.safetensors").write_bytes(b"\x00" * 10)
    tmp = fresh_tmp(final)
    assert list(tmp.iterdir()) == []
    commit_dir(tmp, final)  # also works when there is no old directory
    assert final.is_dir() and not stale.exists()
