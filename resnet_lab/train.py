"""Train one model without Ray or MLflow: `python -m resnet_lab.train --model resnet --depth 18 ...`."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from pydantic import ValidationError

from resnet_lab.spec import DATASET_NAMES, TrialConfig, model_names

if TYPE_CHECKING:
    from resnet_lab.trainer import EpochMetrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; every value is validated by the spec types, not here."""
    p = argparse.ArgumentParser(prog="python -m resnet_lab.train", description=__doc__)
    p.add_argument("--model", default="resnet", help=f"one of: {', '.join(model_names())}")
    p.add_argument("--depth", type=int)
    p.add_argument("--block", choices=("basic", "bottleneck", "preact"))
    p.add_argument("--width", type=float)
    p.add_argument("--skip", action=argparse.BooleanOptionalAction, default=None,
                   help="residual shortcuts on (default) or off (plain-net ablation)")
    p.add_argument("--dropout", type=float)
    p.add_argument("--dataset", default="fashion_mnist", help=f"one of: {', '.join(DATASET_NAMES)}")
    p.add_argument("--data-root", help="data directory (default: $RESNET_LAB_DATA or ~/.cache/resnet-lab/data)")
    p.add_argument("--no-download", action="store_true", help="never try to download the dataset")
    p.add_argument("--subset", type=int, help="use only N training images")
    p.add_argument("--classes", type=int, nargs="+", help="keep only these classes, relabelled 0..k-1 in this order")
    p.add_argument("--init", help="start from this checkpoint directory ({seed}: the seed), with a new head")
    p.add_argument("--save-state", metavar="DIR",
                   help="save the final training state (train_state.pt) in DIR ({seed}: the seed), e.g. for --init")
    p.add_argument("--recipe", choices=("paper", "fast"), default="paper")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrialConfig:
    """Build the TrialConfig; raises pydantic.ValidationError on bad values."""
    model = {"name": args.model, "depth": args.depth, "block": args.block, "width": args.width,
             "skip": args.skip, "dropout": args.dropout, "init": args.init}
    dataset = {"name": args.dataset, "root": args.data_root, "subset": args.subset,
               "download": not args.no_download, "classes": args.classes}
    trainer = {"recipe": args.recipe, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
               "device": args.device, "compile": args.compile}
    drop_none = lambda d: {k: v for k, v in d.items() if v is not None}  # noqa: E731
    return TrialConfig.model_validate({"model": drop_none(model), "dataset": drop_none(dataset),
                                       "trainer": drop_none(trainer), "seed": args.seed})


def on_epoch(epoch: EpochMetrics, save_state: str | None, seed: int) -> None:
    """Print the epoch; after the last, save the state where `--save-state` says."""
    from resnet_lab import console

    console.print_epoch(epoch.metrics, header=epoch.epoch == 1)
    if epoch.final and save_state:
        path = epoch.state().save(save_state.replace("{seed}", str(seed)))
        console.info(f"saved {path}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for bad input)."""
    from resnet_lab import console

    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValidationError as exc:
        for err in exc.errors():
            console.error(f"--{'.'.join(map(str, err['loc'][-1:]))}: {err['msg']} (got {err.get('input')!r})")
        return 2

    from resnet_lab.data import DatasetMissingError
    from resnet_lab.trainer import fit

    console.info(f"training {cfg.model.name} on {cfg.dataset.name}: {cfg.model.model_dump(exclude_none=True)}")
    try:
        result = fit(cfg, lambda e: on_epoch(e, args.save_state, cfg.seed))
    except DatasetMissingError as exc:
        console.error(str(exc))
        return 2
    m = result.metrics
    console.info(f"{result.status}: test/acc {m['test/acc']:.2%}  test/loss {m['test/loss']:.4f}  "
                 f"params {result.params:,}  best epoch {result.best_epoch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
