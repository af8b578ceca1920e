"""The published rows of VTAB-1K, FGVC-5 and the full-dataset suite: every row has a source, and its
averages recompute from its tasks."""

from __future__ import annotations

import re

import pytest
import yaml

from petl_zoo.results.benchmarks import FGVC_5, SUITE, VTAB_1K
from petl_zoo.results.published import (
    CONVENTIONS,
    MODELS,
    SELECTIONS,
    _data_path,
    check_row,
    load_published,
    recompute,
    tolerance,
)
from petl_zoo.results.published_table import published_csv, render_published

ROWS = load_published()
BENCHMARKS = (VTAB_1K, FGVC_5, SUITE)
ALL_ROWS = [(b, r) for b in BENCHMARKS for r in load_published(benchmark=b)]
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


# --- every benchmark's file: FGVC-5 (V-PETL Bench) and the suite (FourierFT, ViT-B and ViT-L) beside VTAB-1K


@pytest.mark.parametrize("bench", BENCHMARKS, ids=lambda b: b.name)
def test_every_benchmark_ships_a_file_that_loads(bench):
    assert bench.published is not None and _data_path(bench).name == bench.published.file
    rows = load_published(benchmark=bench)
    assert rows and all(set(r.accuracy) == set(bench.task_names) for r in rows)
    assert {r.source.average for r in rows} <= set(bench.conventions)
    assert all(r.model in MODELS and r.selection in SELECTIONS and r.selection_detail for r in rows)


@pytest.mark.parametrize(
    ("bench", "row"),
    ALL_ROWS,
    ids=[f"{b.name}-{r.name}-{r.model}-{r.params_m}" for b, r in ALL_ROWS],
)
def test_every_printed_average_recomputes_or_states_why(bench, row):
    problems = check_row(row, benchmark=bench)
    assert bool(problems) == bool(row.discrepancy), problems or row.discrepancy


@pytest.mark.parametrize(
    ("bench", "row"),
    ALL_ROWS,
    ids=[f"{b.name}-{r.name}-{r.model}-{r.params_m}" for b, r in ALL_ROWS],
)
def test_every_row_cites_its_source(bench, row):
    src = row.source
    assert src.title and src.where and src.cite
    assert src.repository or src.url
    if src.repository:
        assert re.fullmatch(r"[0-9a-f]{40}", src.commit) and "/" in src.repository and src.file
        assert f"{src.repository} {src.file} @ {src.commit[:7]}" in src.cite
    if src.url:
        assert src.url.startswith("https://") and src.version and f"{src.url} ({src.version})" in src.cite


def test_one_group_benchmarks_average_as_the_plain_mean():
    for bench, n in ((FGVC_5, 5), (SUITE, 8)):
        assert bench.conventions == (f"mean_of_{n}", "mean_of_group_means")
        for row in load_published(benchmark=bench):
            means = recompute(row.accuracy, bench)
            assert means[f"mean_of_{n}"] == pytest.approx(means["mean_of_group_means"])
            assert row.source.average == f"mean_of_{n}"


def test_fgvc_rows_are_v_petl_benchs_table():
    rows = load_published(benchmark=FGVC_5)
    names = [r.name for r in rows]
    for name in ("Full fine-tuning", "Linear probing", "Adapter", "AdaptFormer", "BitFit", "VPT-Shallow"):
        assert name in names
    assert {"VPT-Deep", "SSF", "LoRA", "Prefix Tuning", "U-Tuning", "GPS", "HST", "LAST", "SNF"} <= set(names)
    ssf = next(r for r in rows if r.name == "SSF")
    assert ssf.accuracy["fgvc_cub"] == 89.5 and ssf.average == 90.72 and ssf.params_m == 0.39
    mean = (89.5 + 85.7 + 99.6 + 89.6 + 89.2) / 5
    assert recompute(ssf.accuracy, FGVC_5)["mean_of_5"] == pytest.approx(mean)
    assert {r.weights for r in rows} == {"orig_in21k"} and {r.input_norm for r in rows} == {"imagenet"}


def test_suite_rows_name_their_backbone():
    rows = load_published(benchmark=SUITE)
    by_model = {m: [r for r in rows if r.model == m] for m in MODELS}
    table_rows = ["LP", "FF", "LoRA", "FourierFT", "FourierFT"]
    assert [r.name for r in by_model["vit_base_patch16_224"]] == table_rows
    assert [r.name for r in by_model["vit_large_patch16_224"]] == table_rows
    ff_large = next(r for r in by_model["vit_large_patch16_224"] if r.name == "FF")
    assert (
        ff_large.params_m == 303.3 and ff_large.average == 90.20 and "vit_large_patch16_224" in ff_large.label
    )
    assert all(r.seeds == 5 and r.selection == "best_val" for r in rows)
    assert all(r.model == "vit_base_patch16_224" for r in ROWS)  # VTAB-1K's rows: the default, ViT-B


def test_the_suite_table_shows_the_model_and_the_vtab_table_does_not():
    suite = render_published(load_published(benchmark=SUITE), "markdown", SUITE)
    assert "| Method | Model | Source |" in suite and "vit_large_patch16_224" in suite
    assert "https://arxiv.org/abs/2405.03003 (v1)" in suite
    assert "| Method | Source |" in render_published(ROWS, "markdown", VTAB_1K)
    cols = [("suite_pets", "")]
    lines = published_csv(load_published(benchmark=SUITE), cols, SUITE).splitlines()
    assert (
        lines[0].split(",")[3] == "vit_base_patch16_224"
        and lines[-1].split(",")[3] == "vit_large_patch16_224"
    )


def test_a_source_needs_a_repository_at_a_commit_or_a_url_and_version(tmp_path):
    data = yaml.safe_load(_data_path(SUITE).read_text(encoding="utf-8"))
    src = data["sources"]["fourierft-icml24"]
    for key in ("url", "version", "repository"):
        src.pop(key)
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump(data, allow_unicode=True))
        with pytest.raises(ValueError, match="lacks|needs"):
            load_published(bad, SUITE)
        src[key] = "x"
    data = yaml.safe_load(_data_path(SUITE).read_text(encoding="utf-8"))
    for key in ("url", "version"):
        del data["sources"]["fourierft-icml24"][key]
    bad.write_text(yaml.safe_dump(data, allow_unicode=True))
    rows = load_published(bad, SUITE)  # the repository copy alone is a valid source too
    assert rows[0].source.cite.startswith(
        "wassname/adapters_as_hypotheses docs/fourierft_spectral.md @ 3800481"
    )
    data["rows"][5]["model"] = "vit_huge_patch14_224"
    bad.write_text(yaml.safe_dump(data, allow_unicode=True))
    with pytest.raises(
        ValueError, match=r"published row 5 \(LP\): model 'vit_huge_patch14_224' is not one of"
    ):
        load_published(bad, SUITE)
