"""rundir.read_json: the one reader of the JSON files edgepkd writes (run state, metrics, manifests, bench files,
selections): every bad file is a one-line error naming the file and the fix, never a traceback."""

import pytest

from edgepkd.errors import RunError
from edgepkd.report import load_metrics
from edgepkd.rundir import RunDir, read_json


def test_reads_and_defaults(tmp_path):
    path = tmp_path / "manifest.json"
    assert read_json(path, {"artifacts": list}, "a manifest", "export again", default={"artifacts": []}) == \
        {"artifacts": []}
    path.write_text('{"artifacts": [1], "target": "t"}')
    assert read_json(path, {"artifacts": list}, "a manifest", "export again")["artifacts"] == [1]


@pytest.mark.parametrize("content", ["{not json", '{"results": {}}', '{"results": {}, "errors": null}', "[1, 2]", "",
                                     b"\xff\xfe\x00binary"])
def test_bad_files_fail_in_one_line_naming_file_and_fix(tmp_path, content):
    path = tmp_path / "host.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(RunError) as e:
        read_json(path, {"results": dict, "errors": dict}, "a bench file", "move it away and bench again",
                  default={})
    msg = str(e.value)
    assert msg.startswith(f"{path}: not a bench file edgepkd wrote") and msg.endswith("move it away and bench again")
    assert "\n" not in msg


def test_unreadable_and_missing(tmp_path):
    (tmp_path / "selection.json").mkdir()  # a directory where the file should be
    with pytest.raises(RunError, match="selection.json: cannot read it"):
        read_json(tmp_path / "selection.json", {"devices": dict}, "a selection file", "move it away")
    with pytest.raises(RunError, match="metrics.json: cannot read it"):
        load_metrics(tmp_path)


def test_run_state_and_metrics_use_it(tmp_path):
    run = RunDir(tmp_path)
    assert run.state()["stages"] == {}
    run.state_path.write_text('{"stages": [1]}')
    with pytest.raises(RunError, match="state.json: not a run state edgepkd wrote \\(no valid stages\\)"):
        run.state()
    (tmp_path / "metrics.json").write_text('{"models": []}')
    with pytest.raises(RunError, match="no valid ensemble_prefixes"):
        load_metrics(tmp_path)
