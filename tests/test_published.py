"""The published VTAB-1K rows: every row has a source, and its averages recompute from its tasks."""

from __future__ import annotations

import re

import pytest
import yaml

from petl_zoo.results.published import (
    CONVENTIONS,
    _data_path,
    check_row,
    load_published,
    recompute,
    tolerance,
)

ROWS = load_published()
REQUIRED = {  # the comparison set: (method, options that must match)
    "Full": ("full", {}),
    "Linear": ("linear", {}),
    "VPT-Shallow": ("vpt", {"deep": False}),
    "VPT-Deep": ("vpt", {"deep": True}),
    "LoRA": ("lora", {}),
    "AdaptFormer": ("adapter", {"style": "parallel"}),
    "SSF": ("ssf", {}),
    "NOAH": (None, {}),
    "FacT-TK<=32": ("fact", {"kind": "tk"}),
    "RepAdapter": ("repadapter", {}),
    "Convpass": ("convpass", {"placement": "block"}),
}


def test_the_comparison_set_is_there_with_our_method_names():
    import petl_zoo

    names = {r.name: r for r in ROWS}
    for name, (method, options) in REQUIRED.items():
        assert name in names, name
        row = names[name]
        assert row.method == method and options.items() <= row.options.items(), name
    known = set(petl_zoo.list_methods())
    assert all(r.method is None or r.method in known for r in ROWS)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r.name}-{r.source.key}")
def test_printed_averages_recompute_under_the_declared_convention(row):
    problems = check_row(row)
    # A row whose printed average does not recompute says so (discrepancy) and only then.
    assert bool(problems) == bool(row.discrepancy), problems or row.discrepancy
    means = recompute(row.accuracy)
    other = next(c for c in CONVENTIONS if c != row.source.average)
    # The other convention does not reproduce the printed number: the label is not a guess.
    assert abs(means[other] - row.average) > 1.0
    for g, printed in row.group_means.items():
        assert abs(means[g] - printed) <= tolerance(row.source, row.source.average_decimals)


def test_the_recorded_discrepancy_is_real_and_names_the_recomputed_value():
    (lora,) = [r for r in ROWS if r.discrepancy]
    assert lora.name == "LoRA" and lora.average == 74.5
    assert f"{recompute(lora.accuracy)['mean_of_group_means']:.2f}" in lora.discrepancy


def test_every_row_has_a_source_file_at_a_commit_and_a_protocol():
    for row in ROWS:
        src = row.source
        assert re.fullmatch(r"[0-9a-f]{40}", src.commit), src.key
        assert "/" in src.repository and src.file and src.where and src.title
        assert row.selection in ("last", "best", "unstated") and row.selection_detail
        assert row.weights and row.input_norm
    assert {r.source.average for r in ROWS} == set(CONVENTIONS)


def test_checking_catches_a_changed_number_and_a_wrong_convention():
    row = next(r for r in ROWS if r.name == "Full")
    assert check_row(row) == []
    assert check_row(row, "mean_of_19")  # 65.57 is not 68.9
    from dataclasses import replace

    changed = replace(row, accuracy={**row.accuracy, "dmlab": row.accuracy["dmlab"] + 3.0})
    assert check_row(changed)  # structured mean +0.375 -> average +0.125 > tolerance 0.1


def test_hand_computed_means():
    row = next(r for r in ROWS if r.name == "Convpass" and r.source.key == "convpass-readme")
    means = recompute(row.accuracy)
    natural = (72.29 + 91.16 + 72.18 + 99.15 + 90.90 + 91.26 + 54.87) / 7
    assert means["natural"] == pytest.approx(natural) and round(natural, 2) == 81.69


def test_a_malformed_file_is_one_error_naming_the_row(tmp_path):
    data = yaml.safe_load(_data_path().read_text(encoding="utf-8"))
    data["rows"][2]["selection"] = "best-ish"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data, allow_unicode=True))
    with pytest.raises(
        ValueError, match=r"published row 2 \(VPT-Shallow\): selection 'best-ish' is not one of"
    ):
        load_published(bad)
    data["rows"][2]["selection"] = "last"
    del data["rows"][3]["accuracy"]["dmlab"]
    bad.write_text(yaml.safe_dump(data, allow_unicode=True))
    with pytest.raises(ValueError, match=r"row 3 \(VPT-Deep\): accuracy must name the 19 tasks"):
        load_published(bad)
