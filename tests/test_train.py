"""`python -m resnet_lab.train`: flags derived from the typed config, errors led by the flag, one real run."""

from __future__ import annotations

from pathlib import Path

import pytest

from resnet_lab.spec import TrainerConfig, model_names
from resnet_lab.train import config_from_args, main, parse_args


def test_readme_command_builds_the_documented_config() -> None:
    args = ["--model", "resnet", "--depth", "18", "--dataset", "fashion_mnist", "--subset", "2000", "--epochs", "2"]
    cfg = config_from_args(parse_args(args))
    assert (cfg.model.name, cfg.model.depth, cfg.dataset.name, cfg.dataset.subset) == ("resnet", 18, "fashion_mnist",
                                                                                         2000)
    assert (cfg.trainer.epochs, cfg.trainer.recipe, cfg.trainer.device, cfg.seed) == (2, "paper", "auto", 0)
    assert cfg.dataset.download and not cfg.trainer.compile


def test_bare_command_keeps_its_quick_defaults() -> None:
    cfg = config_from_args(parse_args([]))
    assert (cfg.model.name, cfg.dataset.name, cfg.trainer.epochs) == ("resnet", "fashion_mnist", 2)
    assert cfg.model.depth is None and cfg.trainer.lr is None  # left to the model and the recipe, not restated


def test_every_trainer_knob_is_a_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    shown = capsys.readouterr().out
    for name in set(TrainerConfig.model_fields) - {"dropout"}:  # --dropout is the model's (it overrides the trainer's)
        assert f"--{name.replace('_', '-')}" in shown, name
    args = ["--optimizer", "sgd", "--momentum", "0.8", "--no-amp", "--grad-clip", "1.5", "--deterministic",
            "--compile", "--dropout", "0.1", "--skip", "--no-skip", "--no-download", "--classes", "3", "1"]
    cfg = config_from_args(parse_args(args))
    assert (cfg.trainer.optimizer, cfg.trainer.momentum, cfg.trainer.amp, cfg.trainer.grad_clip) == ("sgd", 0.8,
                                                                                                     False, 1.5)
    assert cfg.trainer.deterministic and cfg.trainer.compile and cfg.trainer.dropout is None
    assert (cfg.model.dropout, cfg.model.skip, cfg.dataset.download, cfg.dataset.classes) == (0.1, False, False,
                                                                                             (3, 1))


def test_unknown_model_names_the_flag_and_the_known_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", "resnt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model: 'resnt' is not a known model; did you mean 'resnet'?")
    assert all(name in err for name in model_names())


@pytest.mark.parametrize(("argv", "expected"), [
    (["--depth", "7"], "--depth: depth 7 is not supported by 'resnet'; supported: 8, 10, 18"),
    (["--lr", "-1"], "--lr: input should be greater than 0 (got -1.0)"),
    (["--model", "baseline_cnn", "--skip"], "--skip: 'skip' does not apply to model 'baseline_cnn' (got True)"),
    (["--classes", "1", "1"], "--classes: dataset.classes lists a class twice (got (1, 1))"),  # a section's rule
])
def test_bad_value_is_reported_against_its_flag(argv: list[str], expected: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert expected in capsys.readouterr().err


def test_choices_come_from_the_config_types(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--dataset", "imagenet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --dataset: invalid choice: 'imagenet'" in err and "'fashion_mnist'" in err and "'svhn'" in err


def test_one_epoch_on_synthetic_data_saves_its_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", "baseline_cnn", "--dataset", "synthetic", "--subset", "128", "--epochs", "1", "--device", "cpu",
            "--seed", "3", "--save-state", str(tmp_path / "s{seed}")]
    assert main(argv) == 0
    assert (tmp_path / "s3" / "train_state.pt").is_file()
    assert "completed: test/acc" in capsys.readouterr().out
