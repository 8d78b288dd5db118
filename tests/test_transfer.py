"""resnet_lab.transfer and dataset.classes: start from another run's weights with a new head, frozen early layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from resnet_lab.checkpoint import STATE_FILE, TrainState
from resnet_lab.data import load_data
from resnet_lab.spec import DatasetConfig, ModelConfig, TrialConfig
from resnet_lab.trainer import fit
from resnet_lab.transfer import TransferError, checkpoint_path

SYNTHETIC = {"name": "synthetic", "synthetic": {"train_size": 400, "test_size": 100, "image_size": 16}}
MODEL = {"name": "resnet", "depth": 10, "width": 0.125}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def trial(classes: list[int], seed: int = 0, epochs: int = 1, **model: object) -> TrialConfig:
    return TrialConfig.model_validate({
        "dataset": {**SYNTHETIC, "classes": classes}, "model": {**MODEL, **model}, "seed": seed,
        "trainer": {"epochs": epochs, "batch_size": 50, "device": "cpu", "threads": 1}})


def pretrain(directory: Path, seed: int = 0) -> TrainState:
    """A finished run on classes 0-4, its final state saved where `model.init` can find it."""
    states: list[TrainState] = []
    fit(trial([0, 1, 2, 3, 4], seed), lambda e: states.append(e.state()) if e.final else None)
    states[0].save(directory)
    return TrainState.load(directory)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainState]:
    directory = tmp_path_factory.mktemp("pretrain") / "s0"
    return directory, pretrain(directory)


def test_classes_keeps_those_images_relabelled_in_the_listed_order() -> None:
    full = load_data(DatasetConfig.model_validate(SYNTHETIC))
    picked = load_data(DatasetConfig.model_validate({**SYNTHETIC, "classes": [7, 2]}))
    assert picked.num_classes == 2
    images, labels = full.test
    for new, old in enumerate((7, 2)):
        assert torch.equal(picked.test[0][picked.test[1] == new], images[labels == old])
    n_train = sum(int((full.train[1] == c).sum() + (full.val[1] == c).sum()) for c in (7, 2))
    assert len(picked.train[1]) + len(picked.val[1]) == n_train


def test_a_class_the_dataset_lacks_is_named() -> None:
    with pytest.raises(ValueError, match=r"dataset\.classes: synthetic has classes 0-9; no class 12"):
        load_data(DatasetConfig.model_validate({**SYNTHETIC, "classes": [3, 12]}))


def test_fine_tuning_loads_the_tested_weights_with_a_new_head_and_frozen_layers(
        source: tuple[Path, TrainState]) -> None:
    directory, state = source
    states: list[TrainState] = []
    cfg = trial([5, 6, 7, 8, 9], epochs=2, init=str(directory), freeze=1)
    result = fit(cfg, lambda e: states.append(e.state()) if e.final else None)
    after = states[0].model
    before = state.best_model if state.best_model is not None else state.model
    # Stem and layer1 frozen: weights and BN running statistics unchanged after two epochs of training.
    for key in (k for k in before if k.split(".")[0] in ("conv1", "bn1", "layer1")):
        assert torch.equal(after[key], before[key]), key
    assert not torch.equal(after["layer2.0.conv1.weight"], before["layer2.0.conv1.weight"])  # trained on
    # The head is new: the fine-tuned run starts from its own seed's fresh classifier, not the source's.
    assert not torch.equal(after["fc.weight"], before["fc.weight"])
    assert result.status == "completed" and result.metrics["test/acc"] > 0.0


def test_head_reset_starts_from_the_same_fresh_classifier_as_scratch(source: tuple[Path, TrainState]) -> None:
    from resnet_lab.trainer import _Run

    directory, state = source
    data = load_data(trial([5, 6, 7, 8, 9]).dataset)
    scratch = _Run(trial([5, 6, 7, 8, 9]), data, torch.device("cpu")).model.state_dict()
    tuned = _Run(trial([5, 6, 7, 8, 9], init=str(directory)), data, torch.device("cpu")).model.state_dict()
    assert torch.equal(scratch["fc.weight"], tuned["fc.weight"])  # same seed, same new head: a paired comparison
    assert torch.equal(tuned["layer2.0.conv1.weight"], state.model["layer2.0.conv1.weight"])


def test_seed_placeholder_and_the_state_file_name_both_point_at_the_directory(tmp_path: Path) -> None:
    assert checkpoint_path(f"{tmp_path}/pretrain-s{{seed}}", 3) == tmp_path / "pretrain-s3"
    assert checkpoint_path(f"{tmp_path}/s1/{STATE_FILE}", 0) == tmp_path / "s1"


def test_missing_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(TransferError, match=rf"model.init: no {STATE_FILE} in {tmp_path}/s0"):
        fit(trial([5, 6, 7, 8, 9], init=f"{tmp_path}/s{{seed}}"))


def test_a_checkpoint_of_another_architecture_is_refused(source: tuple[Path, TrainState]) -> None:
    with pytest.raises(TransferError, match=r"does not fit this model \(other shape: bn1\.bias, "):
        fit(trial([5, 6, 7, 8, 9], init=str(source[0]), width=0.25))
    with pytest.raises(TransferError, match=r"other shape: fc\.bias, fc\.weight"):
        fit(trial([5, 6, 7], init=str(source[0]), head="keep"))  # 5 source classes, 3 here


def test_freeze_and_head_need_init_and_freeze_needs_stages() -> None:
    with pytest.raises(ValidationError, match=r"model\.freeze and model\.head apply with model\.init"):
        ModelConfig.model_validate({"name": "resnet", "freeze": "stem"})
    with pytest.raises(ValidationError, match=r"model\.freeze needs a model with a stem and stages"):
        ModelConfig.model_validate({"name": "baseline_cnn", "init": "/x", "freeze": 1})
    assert ModelConfig.model_validate({"name": "resnet", "init": "rel/path"}).init == str(Path("rel/path").absolute())
