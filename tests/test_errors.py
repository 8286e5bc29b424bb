import pytest

from edgepkd.errors import RunError, first_line


def test_first_line_of_an_exception():
    assert first_line(RuntimeError("bad header\n  at byte 12")) == "bad header"
    assert first_line(RuntimeError("\n\n  the reason  \nmore")) == "the reason"   # leading blank lines skipped
    assert first_line(ValueError("x" * 500)) == "x" * 300
    assert first_line(ValueError("x" * 500), 20) == "x" * 20
    assert first_line(RuntimeError("boom\nmore"), with_type=True) == "RuntimeError: boom"


def test_an_empty_message_gives_the_type_name_not_index_error():
    assert first_line(RuntimeError()) == "RuntimeError"
    assert first_line(RuntimeError("  \n "), with_type=True) == "RuntimeError"


def test_a_load_failure_with_an_empty_message_is_one_line(tmp_path, monkeypatch):
    """rundir.load_safetensors quoted str(e).splitlines()[0]: an IndexError for an exception without a message."""
    import safetensors

    import edgepkd.rundir as rundir

    path = tmp_path / "w.safetensors"
    path.write_bytes(b"not safetensors")

    def fails(*a, **k):
        raise RuntimeError()

    monkeypatch.setattr(safetensors, "safe_open", fails)
    with pytest.raises(RunError, match=r"w\.safetensors: not a readable safetensors file \(RuntimeError\)$"):
        rundir.load_safetensors(path)
