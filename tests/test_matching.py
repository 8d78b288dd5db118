"""Grid variants with their own parameters, and `match_params` solving a width to another cell's parameter count."""

from __future__ import annotations

from pathlib import Path

import pytest

from resnet_lab.models import build_model, count_params
from resnet_lab.spec.errors import SpecError
from resnet_lab.spec.load import load_spec


def spec_file(tmp_path: Path, text: str) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return str(path)


def built_params(name: str, in_channels: int, num_classes: int, **kwargs: object) -> int:
    return count_params(build_model(name, in_channels=in_channels, num_classes=num_classes, **kwargs))


@pytest.mark.parametrize(("matched", "target", "dataset", "shape"), [
    ("{name: baseline_cnn}", "{name: resnet, depth: 10, width: 0.25}", "fashion_mnist", (1, 10)),
    ("{name: baseline_cnn}", "{name: resnet_cifar, depth: 56}", "cifar10", (3, 10)),
    ("{name: resnet, depth: 18}", "{name: baseline_cnn}", "cifar100", (3, 100)),
    ("{name: resnet_cifar, depth: 20}", "{name: mini_resnet, width: 0.25}", "cifar10", (3, 10)),
    ("{name: mini_resnet, skip: false}", "{name: resnet, depth: 8, width: 0.5}", "svhn", (3, 10)),
])
def test_match_params_solves_a_width_within_two_percent(tmp_path: Path, matched: str, target: str, dataset: str,
                                                         shape: tuple[int, int]) -> None:
    text = (f"name: m\ndataset: {{name: {dataset}}}\ngrid:\n  model:\n"
            f"    - {target[:-1]}, label: target}}\n    - {matched[:-1]}, label: matched, match_params: target}}\n")
    loaded = load_spec(spec_file(tmp_path, text))
    cells = {c.label: c for c in loaded.cells}
    target_cfg, matched_cfg = cells["target"].base.model, cells["matched"].base.model
    dropout = 0.3
    want = built_params(target_cfg.name, *shape, **target_cfg.build_kwargs(dropout))
    got = built_params(matched_cfg.name, *shape, **matched_cfg.build_kwargs(dropout))
    assert matched_cfg.width is not None and matched_cfg.width != 1.0
    assert abs(got - want) <= 0.02 * want
    assert cells["matched"].matched == (matched_cfg.width, got, want)


def test_mapping_variants_make_cells_with_their_own_parameters_and_readable_labels(tmp_path: Path) -> None:
    text = ("name: v\ngrid:\n  model:\n    - {name: baseline_cnn, width: 0.5}\n"
            "    - {name: resnet, depth: 10, width: 0.25}\n  skip: [true, false]\n")
    cells = load_spec(spec_file(tmp_path, text)).cells
    assert [c.label for c in cells] == ["baseline_cnn-w0.5", "resnet10-w0.25", "resnet10-w0.25-noskip"]
    assert cells[0].base.model.width == 0.5 and cells[1].base.model.depth == 10
    assert cells[2].base.model.skip is False and cells[0].base.model.skip is None  # skip does not apply: merged


def test_a_mapping_field_the_model_lacks_is_an_error_at_its_line(tmp_path: Path) -> None:
    text = "name: v\ngrid:\n  model:\n    - {name: resnet, depth: 10}\n    - {name: baseline_cnn, depth: 10}\n"
    with pytest.raises(SpecError) as err:
        load_spec(spec_file(tmp_path, text))
    assert "spec.yaml:5: " in str(err.value) and "'depth' does not apply to model 'baseline_cnn'" in str(err.value)


def test_match_params_that_cannot_be_reached_says_how_close_it_got(tmp_path: Path) -> None:
    # resnet-152 at the smallest width still has far more parameters than a tiny baseline
    text = ("name: v\ngrid:\n  model:\n    - {name: baseline_cnn, width: 0.0625, label: tiny}\n"
            "    - {name: resnet, depth: 152, match_params: tiny}\n")
    with pytest.raises(SpecError) as err:
        load_spec(spec_file(tmp_path, text))
    message = str(err.value)
    assert "spec.yaml:5: grid.model[1].match_params:" in message and "the closest is width" in message


def test_confirm_seeds_must_not_overlap_search_seeds(tmp_path: Path) -> None:
    text = ("name: v\nsearch:\n  lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}\nseeds: [0, 1]\n"
            "confirm: {seeds: [1, 2]}\n")
    with pytest.raises(SpecError) as err:
        load_spec(spec_file(tmp_path, text))
    assert "spec.yaml:5: confirm.seeds: seeds [1] also ran the search (seeds: [0, 1])" in str(err.value)
    assert "e.g. confirm.seeds: [2, 3]" in str(err.value)
