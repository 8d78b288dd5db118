"""`python sweep.py report SPEC_OR_EXPERIMENT`: the ablation table with confidence intervals, and its figures.

Reads the sweep back from MLflow (through `resnet_lab.tracking.query`), writes `reports/<sweep>/report.md` and PNGs,
prints the table, and logs the files as artifacts of the sweep's parent run (under `report/`).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resnet_lab import console

if TYPE_CHECKING:
    from resnet_lab.spec.sweep import ReportConfig, SweepSpec
    from resnet_lab.tracking.query import SweepRuns

EXIT_NOT_FOUND, EXIT_USAGE = 1, 2
ARTIFACT_DIR = "report"


def _logged_sections(sweep: SweepRuns) -> tuple[dict[str, float], ReportConfig]:
    """`reference` and `report` of the spec the sweep logged (spec.yaml on the parent run), read with the spec's
    own YAML rules and models; a missing or unreadable spec gives no reference and the default report section."""
    from pydantic import ValidationError

    from resnet_lab.spec.errors import SpecError
    from resnet_lab.spec.loader import parse_yaml_text
    from resnet_lab.spec.sweep import ReportConfig

    text = sweep.spec_text()
    try:
        data = parse_yaml_text(text, "spec.yaml") if text else None
    except SpecError:
        data = None
    if not isinstance(data, Mapping):
        return {}, ReportConfig()
    reference = data.get("reference")
    references = {str(k): float(v) for k, v in reference.items()
                  if isinstance(v, int | float) and not isinstance(v, bool)} if isinstance(reference, Mapping) else {}
    try:
        section = ReportConfig.model_validate(dict(data.get("report") or {}))
    except (ValidationError, TypeError, ValueError):
        section = ReportConfig()
    return references, section


def write_report(tracking_uri: str, experiment: str, parent_run_id: str | None = None,
                 spec: SweepSpec | None = None, out_dir: Path | None = None, *, show: bool = True) -> Path:
    """Write report.md and its figures for a sweep (default: the experiment's newest); returns report.md's path.

    Args:
        tracking_uri: the MLflow store (already resolved, e.g. by `resolve_tracking_uri`).
        experiment: the MLflow experiment name.
        parent_run_id: the sweep's parent run id or name; None picks the newest sweep (of `spec`, when given).
        spec: the sweep's spec, for the reference numbers (else they come from the logged spec.yaml).
        out_dir: where to write; default `reports/<sweep name>/` under the working directory.
        show: print the tables to the terminal.

    Raises `resnet_lab.tracking.query.SweepNotFound` when the experiment or sweep does not exist.
    """
    from resnet_lab.report.render import ablation_rows, comparison_rows, figures, markdown
    from resnet_lab.report.summary import summarize
    from resnet_lab.tracking.query import TrackingError, load_sweep

    sweep = load_sweep(tracking_uri, experiment, parent_run_id, spec.name if spec is not None else None)
    params = sweep.parent.params
    metric = params.get("metric") or (spec.metric if spec else "val/acc")
    mode = params.get("mode") or (spec.resolved_mode if spec else "max")
    if spec is not None:
        reference, section = dict(spec.reference), spec.report
    else:
        reference, section = _logged_sections(sweep)
    summary = summarize(sweep, metric, mode, reference, baseline=section.baseline,
                        compare_pairs=section.compare, target_acc=section.target_acc)
    out = (out_dir or Path("reports") / sweep.parent.name).absolute()
    out.mkdir(parents=True, exist_ok=True)
    pngs = figures(summary, out)
    report = out / "report.md"
    report.write_text(markdown(summary, pngs))
    try:
        sweep.log_artifacts([report, *pngs], ARTIFACT_DIR)
        logged = f"; logged to run {sweep.parent.run_id} under {ARTIFACT_DIR}/"
    except TrackingError as exc:
        logged = f"; could not log it to MLflow: {exc}"
    if show:
        console.print_table(f"{sweep.parent.name}: best configuration per cell ({metric}, 95% CI over seeds)",
                            *ablation_rows(summary))
        if summary.comparisons:
            console.print_table("comparisons: a minus b, paired by seed (pp; exact sign-flip p, Holm-adjusted)",
                                *comparison_rows(summary))
        for line in summary.conclusions:
            console.info(line)
        console.info(f"report: {report} ({len(pngs)} figures){logged}")
    return report


def build_parser() -> argparse.ArgumentParser:
    """The `sweep.py report` command line."""
    p = argparse.ArgumentParser(
        prog="python sweep.py report",
        description="Ablation table (mean ± 95% CI over seeds) and figures of a sweep, from MLflow.")
    p.add_argument("target", metavar="SPEC_OR_EXPERIMENT",
                   help="the sweep's spec (YAML) or its MLflow experiment name")
    p.add_argument("--sweep", default=None, metavar="RUN_NAME_OR_ID",
                   help="which sweep (parent run name or id); default: the newest in the experiment")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: reports/<sweep>/)")
    return p


def resolve_target(target: str) -> tuple[str, Any]:
    """(experiment name, spec or None) from SPEC_OR_EXPERIMENT; a spec error raises SpecError."""
    if target.endswith((".yaml", ".yml")) or Path(target).is_file():
        from resnet_lab.spec.load import load_spec

        spec = load_spec(target).spec
        return spec.experiment_name, spec
    return target, None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `sweep.py report`; returns the exit code."""
    from resnet_lab.spec.errors import SpecError

    args = build_parser().parse_args(argv)
    try:
        experiment, spec = resolve_target(args.target)
    except SpecError as exc:
        console.error(str(exc))
        return EXIT_USAGE
    from resnet_lab.tracking import resolve_tracking_uri
    from resnet_lab.tracking.query import SweepNotFound

    try:
        uri = resolve_tracking_uri(args.tracking_uri)
    except ValueError as exc:
        console.error(f"--tracking-uri: {exc}")
        return EXIT_USAGE
    try:
        write_report(uri, experiment, args.sweep, spec, args.out)
    except SweepNotFound as exc:
        message = str(exc)
        console.error(message if "no MLflow database" in message else f"{message} (tracking store {uri})")
        return EXIT_NOT_FOUND
    return 0
