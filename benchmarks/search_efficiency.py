"""Search efficiency: ASHA + TPE (resnet_lab's CellScheduler + CellSearcher) vs random search at full budget.

A small real task: a narrow baseline CNN on a Fashion-MNIST subset, searching the learning rate (log-uniform) and
dropout (uniform). Both searches run the same number of trials through the same trainable (`train_trial`, what
`sweep.py` runs) on one local Ray, 2 trials at a time, 1 CPU each:
- ours: CellSearcher (a seeded Optuna TPE study) + CellScheduler (ASHA, grace 1 epoch);
- random: Ray Tune's BasicVariantGenerator (random search), every trial trained for the full budget.
Each repetition uses its own search seed and training seed, shared by both methods. Figures per repetition: epochs
spent, the best val/acc any epoch reached, wall time, and the epochs ASHA had spent (in the order the driver
received results) when it first matched random search's best (exactly, and to within 1 point), as a fraction of
random search's epochs. Because val/acc is a noisy reading (1,500 images), the best of ~240 readings is biased
upwards against the best of ~80; so each search's chosen configuration (the completed trial with the best final
val/acc) is also scored on the 10k-image test set.

    python benchmarks/search_efficiency.py [--quick] [--device cpu|cuda] [--seeds N]
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import machine_line, mean_sd, parser, show

GOAL_FRACTION = 1 / 3
SPEC = """\
name: search_efficiency
dataset: {{name: fashion_mnist, subset: {subset}, val_fraction: {val_fraction}}}
model: {{name: baseline_cnn, width: 0.5}}
trainer: {{recipe: paper, epochs: {epochs}, batch_size: 64, early_stopping_patience: 0, device: {device}}}
search:
  lr: {{type: loguniform, low: 1.0e-4, high: 1.0e-1}}
  dropout: {{type: uniform, low: 0.0, high: 0.5}}
samples_per_cell: {trials}
seeds: [{seed}]
scheduler: {{type: asha, grace_period: 1, reduction_factor: {rf}}}
resources: {{cpu: 1, gpu: {gpu}}}
max_concurrent: 2
"""
# 27 trials: three full rungs of reduction factor 3 (1, 3, 9 epochs), the regime ASHA is for. Half of the subset is
# validation (1,500 images: one reading's standard error near 80% accuracy is 1 point, not 2 as with 400), so
# "random search's best" is less a maximum over noise.
SETTINGS = {False: {"trials": 27, "epochs": 9, "rf": 3, "subset": 3000, "val_fraction": 0.5, "seeds": 3},
            True: {"trials": 8, "epochs": 4, "rf": 2, "subset": 1000, "val_fraction": 0.5, "seeds": 2}}


def run_search(method: str, seed: int, settings: dict[str, Any], device: str, tmp: Path) -> dict[str, Any]:
    """One search; returns the driver-ordered (epoch count, val/acc) stream and totals."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from resnet_lab.spec.load import load_spec
    from resnet_lab.tune.schedule import CellScheduler
    from resnet_lab.tune.search import CellSearcher
    from resnet_lab.tune.trainable import train_trial

    spec_path = tmp / f"{method}-{seed}.yaml"
    spec_path.write_text(SPEC.format(device=device, gpu=0.5 if device == "cuda" else 0, seed=seed, **settings))
    loaded = load_spec(str(spec_path), [])
    spec, cells = loaded.spec, loaded.cells
    cell = cells[0]
    stream: list[tuple[str, int, float]] = []
    finals: dict[str, tuple[float, float]] = {}  # completed trial -> (last val/acc, test/acc)

    class Recorder(tune.Callback):
        """Every epoch's val/acc in the order the driver receives them."""

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            stream.append((trial.trial_id, int(result["training_iteration"]), float(result["val/acc"])))
            if "test/acc" in result:
                finals[trial.trial_id] = (float(result["val/acc"]), float(result["test/acc"]))

    if method == "asha+tpe":
        search_alg: Any = CellSearcher(spec, cells, seed=seed)
        scheduler: Any = CellScheduler(spec.scheduler, spec.trainer.epochs, spec.metric, spec.resolved_mode)
        param_space: dict[str, Any] = {}
    else:
        search_alg = BasicVariantGenerator(random_state=seed, max_concurrent=2)  # ignores max_concurrent_trials
        scheduler = None
        param_space = {"cell": cell.label, "stage": "search", "seed": seed,
                       "trainer.lr": tune.loguniform(1e-4, 1e-1), "model.dropout": tune.uniform(0.0, 0.5)}
    resources = {"cpu": 1, "gpu": spec.resources.gpu}
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(train_trial, bases={cell.label: cell.base}), resources),
        param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=settings["trials"],
                                    max_concurrent_trials=2, reuse_actors=True),
        run_config=tune.RunConfig(name=f"{method}-{seed}", storage_path=str(tmp / "results"), verbose=0,
                                  callbacks=[Recorder()], checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )
    start = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - start
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"{method} seed {seed}: {len(errors)} trials failed: {errors[0]}")
    # The configuration each search would hand over: its completed trial with the best final val/acc; its test/acc
    # (10k images) is the quality measure least biased by how many noisy val/acc readings a search took.
    chosen_test = max(finals.values())[1] if finals else float("nan")
    return {"method": method, "seed": seed, "stream": stream, "epochs": len(stream),
            "best": max(acc for _, _, acc in stream), "wall": wall, "trials": len({t for t, _, _ in stream}),
            "completed": len(finals), "test": chosen_test}


def epochs_to_reach(stream: list[tuple[str, int, float]], target: float) -> int | None:
    """Epochs spent (in arrival order) when val/acc first reached `target`; None if never."""
    for spent, (_, _, acc) in enumerate(stream, start=1):
        if acc >= target:
            return spent
    return None


def main() -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=None, help="repetitions (default 3; --quick 2)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args()
    device = args.device or "cpu"
    settings = dict(SETTINGS[args.quick])
    seeds = args.seeds or settings.pop("seeds")
    settings.pop("seeds", None)
    print(machine_line(device))
    val_pct = round(100 * settings["val_fraction"])
    print(f"Fashion-MNIST subset {settings['subset']} ({100 - val_pct}/{val_pct} train/val), baseline_cnn w0.5, "
          f"{settings['trials']} "
          f"trials per search, budget {settings['epochs']} epochs, ASHA grace 1 / reduction {settings['rf']}, "
          f"{seeds} repetitions\n", flush=True)

    import ray

    from resnet_lab.data import prepare_data
    from resnet_lab.spec import DatasetConfig

    prepare_data(DatasetConfig(name="fashion_mnist"))  # unpack Debian's files once, before trials start
    tmp = Path(tempfile.mkdtemp(prefix="rlb-", dir="/tmp"))
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # A checkpoint every epoch is what sweep.py does too; Ray warns about the snapshots every few seconds.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, _temp_dir=str(tmp / "ray"))
    rows, fractions, fractions_1pp, bests = [], [], [], {"asha+tpe": [], "random": []}
    epochs: dict[str, list[float]] = {"asha+tpe": [], "random": []}
    tests: dict[str, list[float]] = {"asha+tpe": [], "random": []}
    walls: dict[str, list[float]] = {"asha+tpe": [], "random": []}
    try:
        for seed in range(seeds):
            random = run_search("random", seed, settings, device, tmp)
            ours = run_search("asha+tpe", seed, settings, device, tmp)
            for r in (random, ours):
                bests[r["method"]].append(r["best"])
                epochs[r["method"]].append(r["epochs"])
                tests[r["method"]].append(r["test"])
                walls[r["method"]].append(r["wall"])
            reach = epochs_to_reach(ours["stream"], random["best"])
            reach_1pp = epochs_to_reach(ours["stream"], random["best"] - 0.01)
            frac = (reach if reach is not None else float("inf")) / random["epochs"]
            frac_1pp = (reach_1pp if reach_1pp is not None else float("inf")) / random["epochs"]
            fractions.append(frac)
            fractions_1pp.append(frac_1pp)
            for r in (random, ours):
                is_ours = r is ours
                rows.append([seed, r["method"], r["trials"], r["completed"], r["epochs"], f"{r['best']:.4f}",
                             f"{r['test']:.4f}", f"{r['wall']:.0f}",
                             (f"{reach} ({frac:.2f})" if reach else "not reached") if is_ours else "",
                             (f"{reach_1pp} ({frac_1pp:.2f})" if reach_1pp else "not reached") if is_ours else ""])
            print(f"  seed {seed}: random best {random['best']:.4f} in {random['epochs']} epochs; ASHA+TPE best "
                  f"{ours['best']:.4f} in {ours['epochs']} epochs, reached random's best after "
                  f"{reach if reach else 'never'}", flush=True)
    finally:
        ray.shutdown()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    show("search_efficiency: per repetition (epochs in the order the driver received them)",
         ["seed", "method", "trials", "completed", "epochs spent", "best val/acc", "chosen trial's test/acc",
          "wall s", "epochs to random's best (frac)", "to within 1 pp (frac)"], rows)
    summary = []
    for method in ("random", "asha+tpe"):
        e_mean, e_sd = mean_sd(epochs[method])
        b_mean, b_sd = mean_sd(bests[method])
        t_mean, t_sd = mean_sd(tests[method])
        w_mean, w_sd = mean_sd(walls[method])
        summary.append([method, f"{e_mean:.1f} +- {e_sd:.1f}", f"{b_mean:.4f} +- {b_sd:.4f}",
                        f"{t_mean:.4f} +- {t_sd:.4f}", f"{w_mean:.0f} +- {w_sd:.0f}"])
    show(f"summary over {seeds} repetitions (mean +- sd)",
         ["method", "epochs spent", "best val/acc", "chosen trial's test/acc", "wall s"], summary)
    finite = [f for f in fractions if f != float("inf")]
    f_mean, f_sd = mean_sd(finite)
    g_mean, g_sd = mean_sd([f for f in fractions_1pp if f != float("inf")])
    ratio = mean_sd(epochs["asha+tpe"])[0] / mean_sd(epochs["random"])[0]
    def reached(mean: float, sd: float, count: int) -> str:
        return f"{count}/{seeds} repetitions, using {mean:.2f} +- {sd:.2f} of its epochs" if count else \
            f"0/{seeds} repetitions"

    print(f"ASHA+TPE spent {ratio:.2f} of random search's epochs (goal: reach random's best within "
          f"{GOAL_FRACTION:.2f} of them). Matched random's best in {reached(f_mean, f_sd, len(finite))}; within 1 "
          f"point in {reached(g_mean, g_sd, sum(f != float('inf') for f in fractions_1pp))}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
