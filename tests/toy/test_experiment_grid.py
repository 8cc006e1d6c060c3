"""The experiment grid: a run is reused for a row only when the configs are the same, a work folder
never mixes worlds or settings, a partial grid reports what it has, a method may set its own steps,
and tables build from the kept per-run metrics files alone."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from relvid.toy.drivers.customize import method_config, method_names
from tests.helpers.scripts import load_script


def _resolved(method: str, tmp_path: Path) -> dict:
    cfg = method_config(method, "approaching", tmp_path / "cache", tmp_path / "out")
    return OmegaConf.to_container(cfg, resolve=True)


def test_reused_rows_have_identical_configs(tmp_path):
    grid = load_script("run")
    assert grid.SAME_RUN  # QK/V is DreamRelation's default placement
    for row, source in grid.SAME_RUN.items():
        assert _resolved(row, tmp_path) == _resolved(source, tmp_path)  # lora.frozen included
    # a row that differs is never reused
    assert _resolved("placement_q_kv", tmp_path) != _resolved("dreamrelation", tmp_path)


def test_lambda_m_rows_differ_from_dreamrelation_in_lambda_m_only(tmp_path):
    grid = load_script("run")
    assert grid.table_methods(["6"]) == ["hmt_lambda_1", "hmt_lambda_25", "dreamrelation", "hmt_lambda_100"]
    assert "hmt_lambda_1" not in grid.table_methods(grid.DEFAULT_TABLES)  # the sweep runs only on request
    paper = _resolved("dreamrelation", tmp_path)
    assert paper["hmt"]["lambda_m"] == 50  # Table 6's DreamRelation row is the paper's lambda_m
    for lambda_m in (1, 25, 100):
        row = _resolved(f"hmt_lambda_{lambda_m}", tmp_path)
        assert row["hmt"]["lambda_m"] == lambda_m
        row["hmt"]["lambda_m"] = 50
        assert row == paper


def test_work_folder_refuses_runs_of_another_world_or_settings(tmp_path):
    grid = load_script("run")
    out = tmp_path / "work"
    grid.check_work_folder(out, steps=800, prompts=10)  # a new folder is labelled
    recorded = json.loads((out / grid.GRID_FILE).read_text())
    assert recorded == {"world": grid.world_fingerprint(), "steps": 800, "prompts": 10}
    grid.check_work_folder(out, steps=800, prompts=10)  # the same grid goes on
    with pytest.raises(SystemExit, match="another grid"):
        grid.check_work_folder(out, steps=400, prompts=10)
    (out / grid.GRID_FILE).write_text(json.dumps({**recorded, "world": "0" * 16}))
    with pytest.raises(SystemExit, match="another grid"):
        grid.check_work_folder(out, steps=800, prompts=10)
    unlabelled = tmp_path / "old"
    (unlabelled / "runs" / "base").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no grid.json"):
        grid.check_work_folder(unlabelled, steps=800, prompts=10)


def test_tables_average_only_relations_every_row_finished():
    grid = load_script("run")
    m = {"relation_accuracy": 1.0, "subject_fidelity": 0.5, "appearance_leakage": 0.0, "temporal_consistency": 0.9}
    results = {("base", "approaching", s): {**m, "relation_accuracy": 0.0} for s in (0, 1)}
    results |= {("dreamrelation", r, s): m for r in ("approaching", "orbiting") for s in (0, 1)}
    results[("base", "orbiting", 0)] = m  # seed 1 missing: orbiting is not complete for base
    rows, common = grid.table_rows(results, ["base", "dreamrelation"], ["approaching", "orbiting"], [0, 1])
    assert common == ["approaching"]
    assert rows[0]["relation_accuracy"] == {"mean": 0.0, "std": 0.0}
    assert rows[1]["relation_accuracy"] == {"mean": 1.0, "std": 0.0}
    rows, common = grid.table_rows(results, ["base", "wo_hmt"], ["approaching"], [0, 1])
    assert common == [] and rows[0]["relation_accuracy"] is None


def test_finished_only_trains_nothing_and_reports_what_is_missing(tmp_path):
    grid = load_script("run")
    out, res = tmp_path / "work", tmp_path / "results"
    code = grid.main(["--relations", "approaching", "--seeds", "0", "--methods", "base", "direct_lora",
                      "--prompts", "1", "--finished-only", "--out", str(out), "--results", str(res)])
    assert code == 0
    assert not (out / "runs" / "direct_lora").exists()  # not trained
    assert (out / "runs" / "base" / "approaching" / "seed0" / "metrics.json").is_file()  # the base needs no training
    kept = res / "runs" / "base" / "approaching_s0.json"  # its small copy, for the committed folder
    record = json.loads(kept.read_text())
    assert kept.stat().st_size < 8_000 and record["settings"]["steps"] == 0
    (video,) = record["videos"]  # every metric per video, the prompt and the sampling seed
    assert {"prompt", "seed", "judged_relation", *grid.METRICS} <= set(video) and "colour_fidelity" in grid.METRICS
    text = (res / "RESULTS.md").read_text()
    assert "runs found: 1 of 2; methods with none: direct_lora" in text
    assert "Relations: none" in text  # Table 1 has no relation with all its rows
    assert "| direct_lora | — |" in text
    # another guidance keeps its metrics beside the default's
    grid.main(["--relations", "approaching", "--seeds", "0", "--methods", "base", "--prompts", "1",
               "--finished-only", "--guidance", "8", "--out", str(out), "--results", str(res)])
    assert (out / "runs" / "base" / "approaching" / "seed0" / "metrics_cfg8.json").is_file()
    assert "guidance 8" in (res / "RESULTS.md").read_text()


def test_metrics_of_another_guidance_or_adapter_set_are_kept_apart():
    grid = load_script("run")
    default = grid.TOY_SAMPLING.guidance_scale
    names = {grid.metrics_name(default), grid.metrics_name(8.0), grid.metrics_name(default, "all"),
             grid.metrics_name(8.0, "all"), grid.metrics_name(default, "subjects")}
    assert names == {"metrics.json", "metrics_cfg8.json", "metrics_all.json", "metrics_all_cfg8.json",
                     "metrics_subjects.json"}


def test_methods_alone_report_in_the_tables_that_hold_them(tmp_path):
    grid = load_script("run")
    out, res = tmp_path / "work", tmp_path / "results"
    code = grid.main(["--relations", "approaching", "--seeds", "0", "--methods", "base", "hmt_lambda_1",
                      "--prompts", "1", "--finished-only", "--out", str(out), "--results", str(res)])
    assert code == 0  # used to fail writing an empty report: hmt_lambda_1 is in no default table
    text = (res / "RESULTS.md").read_text()
    assert "## Table 1" in text and "## Table 6" in text and "## Table 2" not in text


def test_every_table_row_is_a_method_file_and_the_ablations_freeze_through_the_core_key(tmp_path):
    grid = load_script("run")
    assert set(grid.ALL_METHODS) - {"base"} == set(method_names())
    frozen = {m: _resolved(m, tmp_path)["lora"]["frozen"] for m in method_names()}
    assert frozen.pop("wo_relation_lora") == ["relation"] and frozen.pop("wo_ffn_lora") == ["ffn"]
    assert frozen.pop("wo_subject_lora") == ["subject1", "subject2"]
    assert all(v == [] for v in frozen.values())
    with pytest.raises(ValueError, match="unknown toy method 'wo_everything'"):
        method_config("wo_everything", "approaching", tmp_path / "cache", tmp_path / "out")


def test_the_report_keeps_the_hand_written_summary_and_links_the_notes(tmp_path):
    grid = load_script("run")
    results = tmp_path / "RESULTS.md"
    grid.write_report(results, "| table |\n")  # no file yet: a title, the marker, the tables
    assert results.read_text() == f"# Toy-world experiment grid\n\n{grid.GENERATED_MARKER}\n| table |\n"
    results.write_text(f"# Grid\n\nWhat the grid shows today.\n\n{grid.GENERATED_MARKER}\nold tables\n")
    grid.write_report(results, "| new table |\n")
    assert results.read_text() == f"# Grid\n\nWhat the grid shows today.\n\n{grid.GENERATED_MARKER}\n| new table |\n"
    committed = (Path(grid.__file__).parent / "RESULTS.md").read_text()
    assert grid.GENERATED_MARKER in committed and "## Notes" not in committed  # NOTES.md is linked, not copied
    assert "[NOTES.md](NOTES.md)" in committed


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _differences(a: dict, b: dict) -> dict:
    """{key: (a's, b's)} for the keys whose values differ (a missing key is None)."""
    a, b = _flat(a), _flat(b)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def test_reference_semantics_rows_change_only_their_keys(tmp_path):
    grid = load_script("run")
    assert grid.table_methods(["1r"]) == ["base", "direct_lora", "dreamrelation", "dreamrelation_zero_grad",
                                          "direct_lora_paper_steps", "reference"]
    assert "1r" not in grid.DEFAULT_TABLES and grid.TABLE_TITLES["1r"] == "Table 1 (reference semantics)"
    paper, direct = _resolved("dreamrelation", tmp_path), _resolved("direct_lora", tmp_path)
    assert _differences(_resolved("dreamrelation_zero_grad", tmp_path), paper) == {
        "hmt.unselected": ("zero_grad", "skip")}
    assert _differences(_resolved("direct_lora_paper_steps", tmp_path), direct) == {
        "trainer.max_steps": (333, 800)}
    assert _differences(_resolved("reference", tmp_path), paper) == {
        "hmt.unselected": ("zero_grad", "skip"), "hmt.weighting": ("squared", "linear"),
        "hmt.relation_mask": ("sum", "max"), "lora.dtype": ("bf16", "fp32"),
        "optim.warmup_from": ("zero", "first_step"), "optim.schedule_steps": (1000, None),
        "rcl.bank": ("split", "videos"), "rcl.exclude_same_clip": (False, True),
        "rcl.negatives": ("all_current", "sample")}
    reference = _resolved("reference", tmp_path)
    assert reference["rcl"]["positive_videos"] == 10 and reference["rcl"]["negative_frames"] == 64
    assert reference["rcl"]["n_pos"] == 4 and reference["trainer"]["max_steps"] == 800
    # the toy base was pretrained with dropped captions encoded as "", so the toy row samples with that
    assert reference["sampling"]["null_condition"] == "encoded"
    # every other semantic key is configs/reference.yaml's, on the toy's horizon (800 * 3000 / 2400)
    shipped = OmegaConf.load(Path(grid.__file__).parents[2] / "configs" / "reference.yaml")
    toy = _flat(reference)
    for key, value in _flat(OmegaConf.to_container(shipped)).items():
        if key == "optim.schedule_steps":
            assert toy[key] == value * 800 // 2400
        elif key.split(".")[0] not in ("sampling", "preview", "relation_accuracy"):  # sampling: above
            assert toy[key] == value, key


def test_a_method_file_sets_its_own_steps_and_the_tables_show_them(tmp_path):
    grid = load_script("run")
    assert grid.method_steps("direct_lora_paper_steps", 800) == 333
    assert grid.method_steps("reference", 400) == grid.method_steps("dreamrelation_zero_grad", 400) == 800
    assert grid.method_steps("dreamrelation", 400) == 400 and grid.method_steps("direct_lora", 800) == 800
    assert grid.method_steps("base", 800) == 0
    m = {"relation_accuracy": 0.5, "subject_fidelity": 0.0, "appearance_leakage": 0.0, "temporal_consistency": 0.9}
    results = {(meth, "approaching", 0): m for meth in ("direct_lora", "direct_lora_paper_steps")}
    rows, _ = grid.table_rows(results, ["direct_lora", "direct_lora_paper_steps"], ["approaching"], [0],
                              {"direct_lora": 800, "direct_lora_paper_steps": 333})
    assert [r["steps"] for r in rows] == [800, 333]
    assert rows[0]["colour_fidelity"] is None  # metrics files older than the metric leave it empty
    assert grid.kept_path("runs", "reference", "orbiting", 2) == Path("runs/reference/orbiting_s2.json")
    assert grid.kept_path("runs", "base", "orbiting", 0, "metrics_all_cfg8.json") == Path(
        "runs/base/orbiting_s0_all_cfg8.json")


def test_tables_build_from_kept_metrics_files_when_the_run_folders_are_gone(tmp_path):
    grid = load_script("run")
    runs, res = tmp_path / "runs", tmp_path / "results"
    settings = {"world": grid.world_fingerprint(), "prompts": 1, "sampling_steps": grid.TOY_SAMPLING.num_steps,
                "guidance": grid.TOY_SAMPLING.guidance_scale, "adapters": "inference", "null_condition": "encoded"}
    for method, steps, acc in (("base", 0, 0.0), ("direct_lora_paper_steps", 333, 1.0)):
        for seed in (0, 1):
            video = {"prompt": "p", "seed": 1, "judged_relation": "approaching" if acc else None,
                     "relation_accuracy": bool(acc), "subject_fidelity": False, "colour_fidelity": True,
                     "appearance_leakage": False, "temporal_consistency": 0.9}
            record = {m: float(video[m]) for m in grid.METRICS} | {
                "method": method, "relation": "approaching", "seed": seed,
                "settings": {**settings, "steps": steps}, "videos": [video]}
            path = grid.kept_path(runs, method, "approaching", seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record))
    argv = ["--relations", "approaching", "--seeds", "0", "1", "--methods", "base", "direct_lora_paper_steps",
            "--prompts", "1", "--finished-only", "--out", str(tmp_path / "work"), "--results", str(res),
            "--runs", str(runs)]
    assert grid.main(argv) == 0
    assert not (tmp_path / "work" / "runs").exists()  # nothing trained or sampled
    text = (res / "RESULTS.md").read_text()
    assert "runs found: 4 of 4" in text and "## Table 1 (reference semantics)" in text
    row = next(line for line in text.splitlines() if line.startswith("| direct_lora_paper_steps | 1.0000"))
    assert "| 333 |" in row and "| 1.0000 ± 0.0000 |" in row  # steps; colour fidelity
    # a seed missing: no table averages the relation, and each finished run gets a line of its own
    assert grid.main([*argv, "--seeds", "0", "1", "2"]) == 0
    text = (res / "RESULTS.md").read_text()
    assert "Relations: none" in text and "## Finished runs outside the tables" in text
    assert "| direct_lora_paper_steps | approaching | 1 | 333 | 1.0000 | 0.0000 | 1.0000 |" in text
    # a kept run made with other settings is refused, not mixed in
    stale = json.loads(grid.kept_path(runs, "base", "approaching", 1).read_text())
    stale["settings"]["guidance"] = 8.0
    grid.kept_path(runs, "base", "approaching", 1).write_text(json.dumps(stale))
    with pytest.raises(SystemExit, match="guidance: 8.0 there, 4.0 here"):
        grid.main(argv)
