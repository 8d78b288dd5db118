"""The spec: YAML in, typed objects or located errors out (resnet_lab/spec)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from resnet_lab.spec import RECIPES, ResolvedTrainer, TrainerConfig, TrialConfig
from resnet_lab.spec.errors import SpecError
from resnet_lab.spec.load import load_spec, parse_override
from resnet_lab.spec.sweep import asha_rungs

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "sweeps").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def errors_of(path: Path, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(SpecError) as info:
        load_spec(str(path), overrides)
    return str(info.value)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_specs_are_valid(path: Path) -> None:
    loaded = load_spec(str(path))
    assert loaded.cells, "every shipped spec has at least one cell"


def test_depth_ablation_expands_to_depth_by_skip_cells() -> None:
    loaded = load_spec(str(ROOT / "sweeps" / "depth_ablation.yaml"))
    assert [c.label for c in loaded.cells] == ["resnet10", "resnet10-noskip", "resnet18", "resnet18-noskip",
                                               "resnet34", "resnet34-noskip"]
    assert all(set(c.search) == {"trainer.lr"} for c in loaded.cells)
    assert loaded.cells[1].base.model.skip is False and loaded.cells[1].base.model.depth == 10


def test_factors_that_do_not_apply_are_dropped_and_cells_merged(tmp_path: Path) -> None:
    spec = write(tmp_path, """
name: cond
grid:
  model: [baseline_cnn, resnet]
  depth: [10, 18]
  skip: [true, false]
search:
  lr: {type: loguniform, low: 1e-4, high: 1e-2}
  depth_unused_placeholder: {type: choice, values: [1]}
""")
    assert "search.depth_unused_placeholder" in errors_of(spec)
    spec.write_text(spec.read_text().replace("  depth_unused_placeholder: {type: choice, values: [1]}\n", ""))
    cells = load_spec(str(spec)).cells
    assert [c.label for c in cells] == ["baseline_cnn", "resnet10", "resnet10-noskip", "resnet18", "resnet18-noskip"]
    assert cells[0].values == {"model.name": "baseline_cnn"}  # depth and skip dropped for the plain CNN


def test_scientific_notation_is_a_float_and_yes_is_not_a_bool(tmp_path: Path) -> None:
    spec = write(tmp_path, "name: s\ntrainer: {lr: 1e-3, epochs: 2}\n")
    assert load_spec(str(spec)).spec.trainer.lr == pytest.approx(1e-3)
    bad = write(tmp_path, "name: s\nmodel: {name: resnet, skip: yes}\n", "bad.yaml")
    assert "bad.yaml:2: model.skip: input should be a valid boolean (got 'yes')" in errors_of(bad)


@pytest.mark.parametrize(("text", "expected"), [
    ("name: s\nmodel:\n  name: resnt\n", "spec.yaml:3: model.name: 'resnt' is not a known model; did you mean "
                                         "'resnet'?"),
    ("name: s\ntrainer:\n  epochs: -1\n", "spec.yaml:3: trainer.epochs: input should be greater than 0 (got -1)"),
    ("name: s\ntrainer:\n  batchsize: 8\n", "spec.yaml:3: trainer.batchsize: unknown key; did you mean 'batch_size'?"),
    ("name: s\nsearch:\n  lr: {type: loguniform, low: 0, high: 1e-3}\n", "spec.yaml:3: search.lr.low: input should "
                                                                          "be greater than 0 (got 0)"),
    ("name: s\nsearch:\n  lr: {type: uniform, low: 0.1, high: 0.01}\n", "spec.yaml:3: search.lr: low must be < high"),
    ("name: s\ngrid:\n  depth: []\n", "spec.yaml:2: grid: factor 'depth' has no values"),
    ("name: s\ngrid:\n  dpeth: [10]\n", "spec.yaml:3: grid.dpeth: 'dpeth' is not a model, trainer or dataset field; "
                                        "did you mean 'depth'?"),
    ("name: s\ngrid:\n  depth: [10, 19]\n", "grid: grid combination {model.depth=19}: model.depth: depth 19 is not "
                                            "supported by 'resnet'; supported: 8, 10, 18, 34, 50, 101, 152"),
    ("name: s\nresources: {gpu: 1.5}\n", "spec.yaml:2: resources.gpu: must be a fraction below 1 (packing) or a "
                                         "whole number of GPUs (got 1.5)"),
    ("name: s\ntrainer: {epochs: 4}\nscheduler: {type: asha, grace_period: 5}\n",
     "spec.yaml:3: scheduler.grace_period: must be <= max_t (4) (got 5)"),
    ("name: s\nmetric: test/acc\n", "spec.yaml:2: metric: the test set is for final evaluation only"),
    ("name: s\nseeds: [1, 1]\n", "spec.yaml:2: seeds: seeds must be unique (got [1, 1])"),
    ("name: s\nconfirm: {seeds: [0]}\n", "spec.yaml:2: confirm: needs a `search` section"),
    ("name: s\n  trainer: 3\n", "spec.yaml:2: invalid YAML"),
    ("name: s\ntrainer:\n\tepochs: 3\n", "spec.yaml:3: invalid YAML: tab character"),
    ("name: s\nname: t\n", "spec.yaml:2: invalid YAML: duplicate key 'name' (first on line 1)"),
    ("", "spec.yaml:1: the spec is empty"),
    ("- a\n- b\n", "spec.yaml:1: expected a mapping of sections at the top level (got LineList)"),
    ("trainer: {epochs: 3}\n", "spec.yaml:1: name: is required"),
])
def test_bad_specs_name_file_line_field_and_rule(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in errors_of(write(tmp_path, text))


def test_non_utf8_and_directory_and_missing_file(tmp_path: Path) -> None:
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"name: s\ndescription: caf\xe9\n")
    assert "bin.yaml:2: not valid UTF-8 (byte 0xe9)" in errors_of(binary)
    assert "is a directory" in errors_of(tmp_path)
    assert "no such file" in errors_of(tmp_path / "nope.yaml")


def test_set_overrides_are_validated_like_the_file(tmp_path: Path) -> None:
    spec = write(tmp_path, "name: s\ntrainer: {epochs: 2}\n")
    loaded = load_spec(str(spec), ["trainer.epochs=5", "trainer.lr=3e-4", "grid.skip=[true, false]"])
    assert loaded.spec.trainer.epochs == 5 and loaded.spec.trainer.lr == pytest.approx(3e-4)
    assert [c.label for c in loaded.cells] == ["resnet18", "resnet18-noskip"]
    assert "trainer.epochs: input should be a valid integer (got 'abc') [from --set trainer.epochs=abc]" in errors_of(
        spec, ("trainer.epochs=abc",))
    assert "trainer.epoch: unknown key; did you mean 'epochs'?" in errors_of(spec, ("trainer.epoch=3",))
    with pytest.raises(SpecError, match=r"expected KEY\.PATH=VALUE"):
        parse_override("trainer.epochs")


def test_trial_config_round_trips_through_ray_flat_dict() -> None:
    cfg = TrialConfig.model_validate({"model": {"name": "resnet", "depth": 34, "skip": False},
                                      "trainer": {"lr": 0.01}, "seed": 3})
    assert TrialConfig.from_flat({**cfg.to_flat(), "cell": "x"}) == cfg


def test_recipe_defaults_live_in_one_place() -> None:
    paper = TrialConfig().trainer.resolved()
    assert (paper.optimizer, paper.lr, paper.batch_size, paper.schedule) == ("adam", 1e-3, 64, "plateau")
    fast = TrialConfig.model_validate({"trainer": {"recipe": "fast", "lr": 0.05}}).trainer.resolved()
    assert (fast.optimizer, fast.nesterov, fast.lr, fast.batch_size) == ("sgd", True, 0.05, 512)


def test_resolved_trainer_is_derived_from_trainer_config() -> None:
    # One declaration of the knobs: the resolved record has TrainerConfig's fields, in its order, and the recipe
    # leaves None only where TrainerConfig means None (no clipping, torch's thread count).
    assert list(ResolvedTrainer.model_fields) == list(TrainerConfig.model_fields)
    for recipe in RECIPES:
        values = TrainerConfig(recipe=recipe).resolved().model_dump()
        assert {k for k, v in values.items() if v is None} == {"grad_clip", "threads"}
    with pytest.raises(ValidationError, match="batch_size"):  # TrainerConfig's bounds hold on the resolved record
        ResolvedTrainer(**{**TrainerConfig().resolved().model_dump(), "batch_size": 0})


def test_asha_rungs_match_grace_and_reduction() -> None:
    from resnet_lab.spec.sweep import AshaConfig

    assert asha_rungs(AshaConfig(type="asha", grace_period=2, reduction_factor=3), 20) == [2, 6, 18]


def test_cli_spec_error_exits_2_without_traceback_or_heavy_imports(tmp_path: Path) -> None:
    spec = write(tmp_path, "name: s\ntrainer:\n  epochs: 0\n")
    probe = ("import sys; from resnet_lab.cli import main; rc = main([sys.argv[1]]); "
             "heavy = [m for m in ('torch', 'ray', 'mlflow', 'optuna') if m in sys.modules]; "
             "print('HEAVY', heavy); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", probe, str(spec)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "spec.yaml:3: trainer.epochs: input should be greater than 0 (got 0)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "HEAVY []" in proc.stdout
    assert not list(tmp_path.glob("mlflow.db")) and not (tmp_path / "ray_results").exists()


def test_dry_run_prints_plan_and_starts_nothing(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "sweep.py"), str(ROOT / "sweeps" / "depth_ablation.yaml"),
                           "--dry-run"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "6 cells, 84 trials, at most 3360 epochs" in proc.stdout
    assert "rungs at epochs [4, 12, 36]" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_merge_keys_override_as_yaml_defines_them() -> None:
    search = load_spec(str(ROOT / "tests" / "specs" / "good" / "merge_keys.yaml")).spec.search
    assert (search["lr"].low, search["lr"].high) == (1e-4, 1e-2)  # the anchor itself is untouched
    assert (search["weight_decay"].type, search["weight_decay"].low, search["weight_decay"].high) == (
        "loguniform", 1e-6, 1e-3)  # merged type, own low and high: an override, not a duplicate key
    dropout = search["dropout"]  # <<: [a, b]: a key of the first mapping beats the same key of the second
    assert (dropout.type, dropout.low, dropout.high) == ("uniform", 0.1, 0.5)


def test_a_reference_for_a_cell_a_set_removed_is_a_warning_printed_with_the_plan(tmp_path: Path) -> None:
    paper = ROOT / "sweeps" / "paper.yaml"
    cmd = [sys.executable, str(ROOT / "sweep.py"), str(paper), "--dry-run"]
    proc = subprocess.run([*cmd, "--set", "grid.model=[resnet]"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    warning = (f"warning: {paper}:21: reference.baseline_cnn: no cell is labelled 'baseline_cnn', so the report cannot "
               "show it (cells: resnet18); a --set changed the grid")
    assert warning in proc.stdout.splitlines()
    assert proc.stdout.index(warning) < proc.stdout.index("1 cells, 6 trials")  # printed with the plan
    assert f"warning: {paper}:19: report.baseline: 'baseline_cnn' is not a cell label" in proc.stdout
    plain = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert plain.returncode == 0 and "warning" not in plain.stdout  # the shipped spec's references all match
    assert list(tmp_path.iterdir()) == []


def test_value_rules_across_fields(tmp_path: Path) -> None:
    # warmup counts only for schedules that warm up; a searched warm-up is checked at its high end.
    fine = write(tmp_path, "name: s\ntrainer: {epochs: 2, warmup_epochs: 5, schedule: plateau}\n")
    assert load_spec(str(fine)).warnings == ()
    searched = write(tmp_path, "name: s\ntrainer: {epochs: 4, schedule: cosine}\n"
                               "search:\n  warmup_epochs: {type: uniform, low: 0.5, high: 6}\n", "searched.yaml")
    assert ("searched.yaml:4: search.warmup_epochs.high: must be <= trainer.epochs (4) with the cosine schedule"
            in errors_of(searched))
    gridded = write(tmp_path, "name: s\ntrainer: {recipe: fast}\ngrid:\n  epochs: [1, 3]\n", "gridded.yaml")
    assert load_spec(str(gridded)).cells  # the fast recipe's 1-epoch warm-up fits a 1-epoch run
    edge = write(tmp_path, "name: s\ngrid: {depth: [18]}\nreference: {resnet18: 1.0}\ntime_budget_s: 1.0e+9\n",
                 "edge.yaml")
    assert load_spec(str(edge)).spec.reference == {"resnet18": 1.0}
    assert "time_budget_s: must be a finite number of seconds (got inf)" in errors_of(
        edge, ("time_budget_s=.inf",))
    assert "reference.resnet18: is an accuracy as a fraction between 0 and 1 (got -0.5)" in errors_of(
        edge, ("reference.resnet18=-0.5",))


def test_grid_size_is_counted_from_factor_lengths_before_expansion(tmp_path: Path) -> None:
    # A mapping entry (a variant) counts as one value of its factor: 2 variants x 600 lrs = 1,200 cells > 1,000.
    lrs = ", ".join(f"{(i + 1) * 1e-5:.5f}" for i in range(600))
    spec = write(tmp_path, f"name: s\ngrid:\n  model: [{{name: resnet, depth: 10}}, {{name: baseline_cnn}}]\n"
                           f"  lr: [{lrs}]\n")
    assert ("spec.yaml:2: grid: 2 factors make 1,200 cells (model 2 x lr 600); at most 1,000 are allowed"
            in errors_of(spec))
