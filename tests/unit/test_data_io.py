
import pytest

from ankus.data.io import DataError, ReadStats, check_length, read_jsonl, write_jsonl


def _write(tmp_path, lines):
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_reads_good_rows_and_roundtrips(tmp_path):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "chosen": "e", "rejected": "f"}]
    p = write_jsonl(tmp_path / "x.jsonl", rows)
    assert read_jsonl(p, required=("prompt", "chosen", "rejected")) == rows


@pytest.mark.parametrize("line,match", [
    ('{"prompt": "a"', r"line 2: not valid JSON"),
    ('["a", "b"]', r"line 2: expected a JSON object"),
    ('{"prompt": "a"}', r"line 2: missing field 'chosen'"),
    ('{"prompt": 3, "chosen": "x"}', r"line 2: field 'prompt' must be a string"),
    ('{"prompt": "  ", "chosen": "x"}', r"line 2: field 'prompt' is empty"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, line, match):
    p = _write(tmp_path, ['{"prompt": "ok", "chosen": "ok"}', line])
    with pytest.raises(DataError, match=match) as e:
        read_jsonl(p, required=("prompt", "chosen"))
    assert str(p) in str(e.value)


def test_skip_mode_counts_bad_lines(tmp_path):
    p = _write(tmp_path, ['{"prompt": "ok"}', "garbage", '{"prompt": ""}', '{"prompt": "fine"}'])
    stats = ReadStats()
    rows = read_jsonl(p, required=("prompt",), on_error="skip", stats=stats)
    assert [r["prompt"] for r in rows] == ["ok", "fine"]
    assert stats.read == 2 and stats.skipped == 2 and "line 2" in stats.reasons[0] and "line 3" in stats.reasons[1]


def test_missing_file_and_too_long(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="x.jsonl, line 4: 9000 tokens exceed the model's context of 8192"):
        check_length(9000, 8192, "x.jsonl, line 4")
    check_length(10, 8192, "fine")
