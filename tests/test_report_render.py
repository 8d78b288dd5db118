"""resnet_lab/report/render.py: the accuracy-vs-depth figure's lines come from the cells' fields, not their labels."""

from __future__ import annotations

from collections import Counter

from resnet_lab.report.cells import CellSummary
from resnet_lab.report.render import depth_line_labels


def cell(name: str, depth: int, skip: bool, **setting: str) -> CellSummary:
    """A table row as the report builds it, with only what the figure reads filled in."""
    return CellSummary(cell=name, model="resnet", depth=depth, block="basic", skip=skip, stage="search", config=name,
                       runs=[], counts=Counter(), outcomes=Counter(), val=None, test=None, test_finished=None,
                       train_acc=None, best_epoch=None, train_time_s=None, params=None, reference=None,
                       best_run=None, flow={}, setting={"dataset.name": "cifar10", **setting})


def test_cells_that_differ_only_in_depth_share_a_line_whatever_their_labels() -> None:
    cells = [cell("first", 18, True, **{"model.width": "0.25"}), cell("second", 34, True, **{"model.width": "0.25"}),
             cell("x-noskip", 18, False, **{"model.width": "0.25"}), cell("y", 34, False, **{"model.width": "0.25"})]
    assert depth_line_labels(cells) == {"first": "resnet-w0.25 skip", "second": "resnet-w0.25 skip",
                                        "x-noskip": "resnet-w0.25 no skip", "y": "resnet-w0.25 no skip"}


def test_block_and_dataset_set_lines_apart() -> None:
    cells = [cell("a", 50, True, **{"model.block": "preact", "dataset.name": "svhn"}),
             cell("b", 50, True, **{"dataset.name": "svhn"}), cell("c", 50, True)]
    assert depth_line_labels(cells) == {"a": "resnet-preact-svhn skip", "b": "resnet-svhn skip",
                                        "c": "resnet-cifar10 skip"}


def test_a_grid_over_the_recipe_names_the_recipe_not_the_values_it_implies_or_the_searched_lr() -> None:
    # One searched configuration per cell: its lr is fixed within a cell and differs between cells, like the batch
    # size each recipe implies; the recipe alone tells the cells at one depth apart.
    fast, paper = {"trainer.recipe": "fast", "trainer.batch_size": "512"}, {"trainer.recipe": "paper",
                                                                             "trainer.batch_size": "64"}
    cells = [cell("f18", 18, True, **fast, **{"trainer.lr": "0.11"}),
             cell("f34", 34, True, **fast, **{"trainer.lr": "0.07"}),
             cell("p18", 18, True, **paper, **{"trainer.lr": "0.002"}),
             cell("p34", 34, True, **paper, **{"trainer.lr": "0.0009"})]
    labels = depth_line_labels(cells)
    assert labels["f18"] == labels["f34"] == "resnet-recipefast skip"
    assert labels["p18"] == labels["p34"] == "resnet-recipepaper skip"
