"""Train one model without Ray or MLflow: `python -m resnet_lab.train --model resnet --depth 18 ...`."""

from __future__ import annotations

import argparse
import sys
import typing
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from resnet_lab.spec import TrainerConfig, TrialConfig, model_names
from resnet_lab.spec.base import clean_message, without_none
from resnet_lab.spec.trial import with_values

if TYPE_CHECKING:
    from resnet_lab.trainer import EpochMetrics

# Flags that set a model or dataset field: flag -> the field's dotted path. Every TrainerConfig knob is a flag too
# (`--batch-size` sets trainer.batch_size), added from its fields, so a new knob needs no edit here.
# trainer.dropout is left out: `--dropout` sets model.dropout, which overrides it.
FIELD_FLAGS: dict[str, str] = {
    "--model": "model.name", "--depth": "model.depth", "--block": "model.block", "--width": "model.width",
    "--skip": "model.skip", "--dropout": "model.dropout", "--stem": "model.stem",
    "--dataset": "dataset.name", "--data-root": "dataset.root", "--subset": "dataset.subset",
    "--classes": "dataset.classes", "--init": "model.init", "--seed": "seed",
}
FIELD_FLAGS.update({f"--{name.replace('_', '-')}": f"trainer.{name}" for name in TrainerConfig.model_fields
                    if name != "dropout"})
# What a bare `python -m resnet_lab.train` runs: a quick look, not the spec's 30 epochs of CIFAR-10.
CLI_DEFAULTS: dict[str, Any] = {"dataset.name": "fashion_mnist", "trainer.epochs": 2}
HELP: dict[str, str] = {
    "--model": f"one of: {', '.join(model_names())}",
    "--skip": "residual shortcuts on (default) or off (plain-net ablation)",
    "--data-root": "data directory (default: $RESNET_LAB_DATA or ~/.cache/resnet-lab/data)",
    "--subset": "use only N training images",
    "--classes": "keep only these classes, relabelled 0..k-1 in this order",
    "--init": "start from this checkpoint directory ({seed}: the seed), with a new head",
}


def field_at(path: str) -> FieldInfo:
    """The pydantic field a dotted path names in TrialConfig (`trainer.lr`)."""
    model: type[BaseModel] = TrialConfig
    *sections, leaf = path.split(".")
    for section in sections:
        model = model.model_fields[section].annotation  # type: ignore[assignment]
    return model.model_fields[leaf]


def argument_for(info: FieldInfo) -> dict[str, Any]:
    """argparse keywords from a field's type: its Literal values as choices, bools as --x/--no-x, tuples as lists."""
    annotation = without_none(info.annotation)  # `X | None`: the flag gives an X
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(annotation) is Literal:
        return {"choices": typing.get_args(annotation)}
    if typing.get_origin(annotation) is tuple:  # dataset.classes: tuple[int, ...]
        return {"type": typing.get_args(typing.get_args(annotation)[0])[0], "nargs": "+"}
    if annotation in (int, float, str):
        return {"type": annotation}
    raise TypeError(f"no command-line form for a field of type {annotation}")  # a flag was mapped to a new kind


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; every value is validated by the spec types, not here."""
    p = argparse.ArgumentParser(prog="python -m resnet_lab.train", description=__doc__)
    for flag, path in FIELD_FLAGS.items():
        info = field_at(path)
        default = CLI_DEFAULTS.get(path)
        shown = default if default is not None else info.default
        help_text = HELP.get(flag, path) + (f" (default: {shown})" if shown is not None else "")
        # default None: a flag not given leaves the field to the config (or the recipe) instead of restating it
        kwargs = argument_for(info)
        if "type" in kwargs:
            kwargs["metavar"] = path.rsplit(".", 1)[-1].upper()
        p.add_argument(flag, dest=path, default=default, help=help_text, **kwargs)
    p.add_argument("--no-download", dest="dataset.download", action="store_const", const=False,
                   help="never try to download the dataset")
    p.add_argument("--save-state", metavar="DIR",
                   help="save the final training state (train_state.pt) in DIR ({seed}: the seed), e.g. for --init")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrialConfig:
    """Build the TrialConfig from the flags that were given; raises pydantic.ValidationError on bad values."""
    paths = {*FIELD_FLAGS.values(), "dataset.download"}
    given = {path: value for path, value in vars(args).items() if path in paths and value is not None}
    return TrialConfig.model_validate(with_values({}, given))


def error_lines(exc: ValidationError) -> list[str]:
    """One line per problem, led by the flag that set the field (`--model: 'resnt' is not a known model; ...`)."""
    flags = {path: flag for flag, path in FIELD_FLAGS.items()}
    flags["dataset.download"] = "--no-download"
    lines = []
    for err in exc.errors():
        path = ".".join(map(str, err["loc"]))
        message, value = clean_message(err["msg"]), err.get("input")
        # a whole section is no use to print; our own validators already show the value
        shown = "(got" in message or (err["type"] == "value_error" and str(value) in message)
        if not (isinstance(value, dict) or shown):
            message += f" (got {value!r})"
        # a section's own rule (`dataset: dataset.classes lists a class twice`) is led by the flag it names
        flag = flags.get(path) or next((f for p, f in flags.items() if "." in p and p in message), path)
        lines.append(f"{flag}: {message}")
    return lines


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
        console.error("\n".join(error_lines(exc)))
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
