"""cmn.data.annotation: R2Gen annotation parsing and its error messages."""

import json

import pytest

from cmn.data.annotation import Study, drop_empty_reports, is_empty_report, load_annotation
from cmn.errors import DataError


def entry(i, report="The lungs are clear.", paths=None):
    return {"id": f"s{i}", "report": report, "image_path": paths or [f"s{i}/0.png", f"s{i}/1.png"]}


def write(tmp_path, data, name="annotation.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def test_loads_all_splits_and_ignores_extra_keys(tmp_path):
    mimic_like = {**entry(2), "study_id": 123, "subject_id": 9, "split": "test"}
    path = write(tmp_path, {"train": [entry(0), entry(1)], "val": [], "test": [mimic_like]})
    splits = load_annotation(path)
    assert list(splits) == ["train", "val", "test"]
    assert splits["train"][1] == Study("s1", "The lungs are clear.", ("s1/0.png", "s1/1.png"))
    assert splits["val"] == []
    assert splits["test"][0].id == "s2"


def test_only_requested_splits(tmp_path):
    path = write(tmp_path, {"test": [entry(0)]})
    assert list(load_annotation(path, splits=("test",))) == ["test"]


def test_numeric_id_becomes_string(tmp_path):
    path = write(tmp_path, {"train": [{**entry(0), "id": 17}]})
    assert load_annotation(path, splits=("train",))["train"][0].id == "17"


def expect_error(path, *fragments, splits=("train", "val", "test")):
    with pytest.raises(DataError) as info:
        load_annotation(path, splits=splits)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.json", "not found")


def test_directory_instead_of_file(tmp_path):
    expect_error(tmp_path, "directory")


def test_not_json_names_line_and_column(tmp_path):
    path = tmp_path / "annotation.json"
    path.write_text('{"train": [\n  {"id": "a",, }\n]}', encoding="utf-8")
    expect_error(path, "not valid JSON", "line 2", "column")


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "annotation.json"
    path.write_bytes(b'{"train": [{"id": "a", "report": "caf\xe9", "image_path": []}]}')
    expect_error(path, "UTF-8", "0xe9")


def test_top_level_not_an_object(tmp_path):
    expect_error(write(tmp_path, [entry(0)]), "top level", "list")


def test_missing_split_lists_present_ones(tmp_path):
    expect_error(write(tmp_path, {"train": [], "test": []}), "split 'val' is missing", "'test', 'train'")


def test_split_not_a_list(tmp_path):
    expect_error(write(tmp_path, {"train": {"a": 1}}), "split 'train'", "list", splits=("train",))


def test_entry_not_an_object(tmp_path):
    expect_error(write(tmp_path, {"train": [entry(0), "oops"]}), "train[1]", "object", splits=("train",))


@pytest.mark.parametrize("key", ["id", "report", "image_path"])
def test_entry_missing_a_field(tmp_path, key):
    bad = entry(1)
    del bad[key]
    path = write(tmp_path, {"train": [entry(0)], "val": [entry(5), bad], "test": []})
    message = expect_error(path, "val[1]", f"lacks '{key}'")
    assert ("'s1'" in message) == (key != "id")  # the id is named when there is one


@pytest.mark.parametrize("paths", ["s0/0.png", ["s0/0.png", 3], None])
def test_image_path_must_be_list_of_strings(tmp_path, paths):
    bad = {**entry(0), "image_path": paths}
    expect_error(write(tmp_path, {"train": [bad]}), "train[0]", "'s0'", "list of strings", splits=("train",))


def test_report_must_be_string(tmp_path):
    bad = {**entry(0), "report": None}
    expect_error(write(tmp_path, {"train": [bad]}), "'report' must be a string", splits=("train",))


def test_duplicate_ids_name_both_positions(tmp_path):
    path = write(tmp_path, {"train": [entry(0), entry(1), entry(0)]})
    expect_error(path, "train[2]", "'s0'", "duplicate id", "train[0]", splits=("train",))


def test_same_id_in_two_splits_is_allowed(tmp_path):
    path = write(tmp_path, {"train": [entry(0)], "val": [entry(0)], "test": []})
    assert load_annotation(path)["val"][0].id == "s0"


def test_empty_reports_are_kept_by_loading_and_dropped_on_request(tmp_path):
    path = write(tmp_path, {"train": [entry(0, ""), entry(1), entry(2, "  ...  ")]})
    studies = load_annotation(path, splits=("train",))["train"]
    assert len(studies) == 3

    def clean(text):  # IU X-Ray rules turn an empty report into " ."
        return " ".join(text.lower().replace(".", " ").split()) + " ."

    kept, n_dropped = drop_empty_reports(studies, clean)
    assert [s.id for s in kept] == ["s1"]
    assert n_dropped == 2


@pytest.mark.parametrize("cleaned, empty", [(" .", True), ("", True), (". .", True), ("lungs clear .", False)])
def test_is_empty_report(cleaned, empty):
    assert is_empty_report(cleaned) is empty
