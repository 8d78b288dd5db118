"""`python sweep.py SPEC.yaml`: validate the spec, then (and only then) import the heavy machinery and run.

A spec error prints in well under 2 s: nothing here imports torch, ray or mlflow before the spec is valid.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from resnet_lab import console
from resnet_lab.spec.cells import Cell, configs_in, startup_configs, trials_in
from resnet_lab.spec.errors import SpecError
from resnet_lab.spec.load import LoadedSpec, load_spec
from resnet_lab.spec.sweep import AshaConfig, asha_rungs

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """The `sweep.py` command line."""
    p = argparse.ArgumentParser(
        prog="python sweep.py", description="Run a hyperparameter sweep from a YAML spec.",
        epilog="other commands: `python sweep.py report SPEC_OR_EXPERIMENT` (ablation table and plots), "
               "`python sweep.py ui [SPEC_OR_EXPERIMENT]` (MLflow UI on 127.0.0.1)")
    p.add_argument("spec", help="sweep spec (YAML), e.g. sweeps/quickstart.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a spec value, validated like the file (repeatable): --set trainer.epochs=3")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit; starts neither Ray nor MLflow")
    p.add_argument("--estimate", action="store_true",
                   help="with --dry-run: epochs (at most, expected with ASHA), device-hours and wall time per cell, "
                        "from earlier runs of the cells in --tracking-uri or from timing a few training steps")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray on this machine)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    p.add_argument("--storage", default=None, help="where Ray keeps trial state (overrides the spec's storage)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (overrides the spec)")
    p.add_argument("--resume", action="store_true", help="continue the latest interrupted run of this sweep")
    p.add_argument("--ray-temp-dir", default=None, help="Ray session directory for a local Ray (default /tmp/ray)")
    return p


def plan_lines(loaded: LoadedSpec) -> list[list[str]]:
    """Rows of the dry-run table: one per cell."""
    spec = loaded.spec
    rows = []
    for cell in loaded.cells:
        configs, trials = configs_in(spec, cell), trials_in(spec, cell)
        confirm = len(spec.confirm.seeds) if spec.confirm else 0
        searched = ", ".join(f"{p.split('.')[-1]}~{d.type}" for p, d in cell.search.items()) or "-"
        random_first = str(startup_configs(spec, cell)) if cell.search else "-"
        rows.append([cell.label, _size(cell), searched, str(configs), random_first, str(len(spec.seeds)),
                     str(confirm), str(trials), str(trials * spec.trainer.epochs)])
    return rows


def _size(cell: Cell) -> str:
    """`306,218`, or for a `match_params` cell `305,994 (width 0.8804, matches resnet10-w0.25 -0.1%)`."""
    from resnet_lab.models.matching import param_count  # the dry-run builds each model once (a few seconds)

    try:
        count = param_count(cell.base)
    except (OSError, ValueError) as exc:  # an image folder not there yet: the plan still prints
        return f"? ({exc})"
    if cell.matched is None:
        return f"{count:,}"
    width, got, target = cell.matched
    return f"{got:,} (width {width:g}, matches {cell.match_params} {100 * (got - target) / target:+.1f}%)"


def print_plan(loaded: LoadedSpec) -> None:
    """The dry-run: cells, trials per cell, ASHA rungs, the most epochs the sweep can spend."""
    spec = loaded.spec
    rows = plan_lines(loaded)
    console.print_table(f"sweep '{spec.name}' ({loaded.source}, spec {loaded.spec_hash})",
                        ["cell", "parameters", "searched", "configs", "random first", "seeds", "confirm", "trials",
                         "max epochs"], rows)
    total_trials = sum(int(r[7]) for r in rows)
    total_epochs = sum(int(r[8]) for r in rows)
    console.info(f"{len(rows)} cells, {total_trials} trials, at most {total_epochs} epochs "
                 f"({spec.trainer.epochs} per trial); metric {spec.metric} ({spec.resolved_mode})")
    if isinstance(spec.scheduler, AshaConfig):
        max_t = spec.scheduler.max_t or spec.trainer.epochs
        console.info(f"ASHA per cell: rungs at epochs {asha_rungs(spec.scheduler, max_t)} up to {max_t}, "
                     f"keeping the top 1/{spec.scheduler.reduction_factor} at each")
    else:
        console.info("no early stopping by a scheduler: every trial runs its full budget")
    console.info(f"resources per trial: {spec.resources.cpu:g} CPU, {spec.resources.gpu:g} GPU; "
                 f"max concurrent: {spec.max_concurrent or 'as many as fit'}")


SUBCOMMANDS = {"report": "resnet_lab.report", "ui": "resnet_lab.ui"}  # each module has main(argv) -> int


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `sweep.py`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        return int(importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        loaded = load_spec(args.spec, args.overrides)
    except SpecError as exc:
        console.error(str(exc))
        return EXIT_USAGE
    for warning in loaded.warnings:  # legitimate but suspicious values (resnet_lab/spec/checks.py), with the plan
        console.info(f"warning: {warning}")
    if args.dry_run:
        print_plan(loaded)
        if args.estimate:
            from resnet_lab.estimate import print_estimate
            from resnet_lab.tracking import resolve_tracking_uri

            try:
                uri = resolve_tracking_uri(args.tracking_uri)
            except ValueError as exc:
                console.error(f"--tracking-uri: {exc}")
                return EXIT_USAGE
            print_estimate(loaded, uri, args.max_concurrent)
        return 0
    if args.estimate:
        console.error("--estimate goes with --dry-run: python sweep.py SPEC --dry-run --estimate")
        return EXIT_USAGE
    return run(loaded, args, argv)


def preflight_storage(path: str) -> str | None:
    """None when Ray can write trial state under `path` (local paths only), else the reason."""
    if "://" in path:
        return None
    target = Path(path).expanduser().absolute()
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=".write-test-"):
            pass
    except OSError as exc:
        return f"storage {target} is not writable: {exc.strerror or exc}"
    return None


def run(loaded: LoadedSpec, args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Preflight (tracking store, storage, data, cluster), then start Ray and MLflow and run the sweep."""
    from resnet_lab.tracking import resolve_tracking_uri

    try:
        uri = resolve_tracking_uri(args.tracking_uri)
    except ValueError as exc:
        console.error(f"--tracking-uri: {exc}")
        return EXIT_USAGE
    from resnet_lab.tune.runner import PreflightError, RunOptions, run_sweep, storage_path

    storage = storage_path(loaded, args.storage)
    problem = preflight_storage(storage)
    if problem:
        console.error(f"{problem} (set `storage:` in the spec or --storage)")
        return EXIT_USAGE
    tracker_problem = preflight_tracking(uri, loaded, resuming=args.resume)
    if tracker_problem:
        console.error(tracker_problem)
        return EXIT_USAGE
    datasets = {cell.base.dataset for cell in loaded.cells if cell.base.dataset.has_files}
    if datasets:  # resnet_lab.data imports torch (4 s of the driver's CPU): only when there are files to check
        from resnet_lab.data import DatasetError, prepare_data

        try:
            for dataset in datasets:
                prepare_data(dataset)  # once, in the driver: trials never race to download, offline fails here
        except DatasetError as exc:
            console.error(str(exc))
            return EXIT_USAGE
    options = RunOptions(tracking_uri=uri, address=args.address, storage=args.storage,
                         max_concurrent=args.max_concurrent, ray_temp_dir=args.ray_temp_dir, resume=args.resume)
    resume_cmd = " ".join(["python", "sweep.py", *argv, *([] if args.resume else ["--resume"])])
    verb = "resuming" if args.resume else "starting"
    console.info(f"{verb} sweep '{loaded.spec.name}': {len(loaded.cells)} cells; MLflow at {uri}")
    try:
        outcome = run_sweep(loaded, options)
    except PreflightError as exc:
        console.error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        console.error(f"aborted; MLflow runs were marked KILLED. Continue with: {resume_cmd}")
        return EXIT_INTERRUPTED
    summary = ", ".join(f"{n} {k}" for k, n in sorted(outcome.outcomes.items())) or "none ended"
    if outcome.tracking_lost:
        console.error(f"the sweep stopped after {outcome.wall_s:.0f} s with MLflow unreachable "
                      f"({outcome.tracking_lost}). Ray Tune's state is saved in {outcome.experiment_dir} and the "
                      "writes MLflow has not taken are spooled; --resume sends them once MLflow answers")
        console.info(f"continue with: {resume_cmd}")
        return EXIT_INTERRUPTED
    if outcome.interrupted:
        console.info(f"interrupted after {outcome.wall_s:.0f} s: {outcome.trials}/{outcome.planned} trials ended "
                     f"({summary}); state saved in {outcome.experiment_dir}")
        console.info(f"continue with: {resume_cmd}")
        return EXIT_INTERRUPTED
    console.info(f"done in {outcome.wall_s:.0f} s: {outcome.trials} trials ({summary})")
    try:
        from resnet_lab.report import write_report

        write_report(uri, loaded.spec.experiment_name, outcome.parent_run_id, loaded.spec)
        console.info(f"regenerate the report with: python sweep.py report {args.spec} --tracking-uri {uri}")
    except Exception as exc:  # the sweep's results are safe in MLflow; a report problem must not hide that
        console.error(f"the sweep finished but its report failed: {type(exc).__name__}: {exc}")
    # Job execution off, as `sweep.py ui` runs it: MLflow 3.17's server otherwise starts 8 more processes (~2 GB).
    console.info(f"compare runs: python sweep.py ui {args.spec} --tracking-uri {uri}  (or: "
                 f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri {uri} --host 127.0.0.1 "
                 "--workers 1, then open "
                 f"http://127.0.0.1:5000/#/experiments/{outcome.experiment_id}/runs)")
    return 0


def preflight_tracking(uri: str, loaded: LoadedSpec, resuming: bool) -> str | None:
    """None when the MLflow store answers and accepts writes; else the reason. Also warns of an unfinished run."""
    from resnet_lab.tracking import SweepTracker

    # One quick try: MLflow's client retries with back-off for minutes, which is right mid-sweep, not here.
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"})
    try:
        tracker = SweepTracker(uri, loaded.spec.experiment_name)
        tracker.check_writable()
        previous = tracker.latest_sweep(loaded.spec.name)
    except Exception as exc:  # MLflow raises many types (MlflowException, OSError, requests errors)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"MLflow tracking store {uri} is not usable: {first[:300]}"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if previous is not None and previous.info.status != "FINISHED" and not resuming:
        name = previous.data.tags.get("resnet_lab.sweep", previous.info.run_name)
        console.info(f"note: the previous run of this sweep ({name}) did not finish; this starts a new sweep. "
                     f"To continue that one instead: python sweep.py {loaded.source} --resume")
    return None


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
