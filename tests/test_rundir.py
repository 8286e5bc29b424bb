"""rundir.read_json: the one reader of the JSON files edgepkd writes (manifests, bench files, selections)."""

import pytest

from edgepkd.errors import RunError
from edgepkd.rundir import read_json


def test_reads_and_defaults(tmp_path):
    path = tmp_path / "manifest.json"
    assert read_json(path, ("artifacts",), "a manifest", "export again", default={"artifacts": []}) == {"artifacts": []}
    path.write_text('{"artifacts": [1], "target": "t"}')
    assert read_json(path, ("artifacts",), "a manifest", "export again")["artifacts"] == [1]


@pytest.mark.parametrize("text", ["{not json", '{"results": {}}', "[1, 2]", ""])
def test_bad_files_fail_in_one_line_naming_file_and_fix(tmp_path, text):
    path = tmp_path / "host.json"
    path.write_text(text)
    with pytest.raises(RunError) as e:
        read_json(path, ("results", "errors"), "a bench file", "move it away and bench again", default={})
    msg = str(e.value)
    assert msg.startswith(f"{path}: not a bench file edgepkd wrote") and "move it away and bench again" in msg
    assert "\n" not in msg


def test_missing_without_default_is_an_error(tmp_path):
    with pytest.raises(RunError, match="selection.json is missing; move it away"):
        read_json(tmp_path / "selection.json", ("devices",), "a selection file", "move it away")
