"""A bare Ray Tune run of a spec's trials, for `sweep_overhead.py`, `startup.py` and `scaling.py`: no MLflow, no
checkpoints, no logging callbacks, no searcher; one trial per seed of the spec's first cell (or of seeds 0..N-1 with
--trials N), reporting each epoch's metrics.

    python benchmarks/_raw_tune.py SPEC.yaml --storage DIR --ray-temp-dir DIR [--reuse-actors] [--trials N]
                                   [--checkpoints]

`--checkpoints`: each epoch's report carries the trainer's state as a Tune checkpoint, as sweep.py's trials do
(`resnet_lab/tune/trainable.py`): what checkpointing alone costs, apart from MLflow, the searcher and ASHA.

Prints `FIRST_RESULT <unix time>` when the driver receives the first epoch's result and `RAW_FIT_S <seconds>`
(Tuner.fit only) before exiting.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("spec")
    p.add_argument("--storage", required=True)
    p.add_argument("--ray-temp-dir", default=None)
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--reuse-actors", action="store_true")
    p.add_argument("--trials", type=int, default=None,
                   help="run this many trials, seeds 0..N-1 of the first cell (default: the spec's seeds)")
    p.add_argument("--checkpoints", action="store_true", help="a checkpoint with every epoch's report")
    args = p.parse_args()

    import ray
    from ray import tune

    from resnet_lab.spec.load import load_spec

    class FirstResult(tune.Callback):
        """Prints when the first result reaches the driver (the moment sweep.py logs it to MLflow)."""

        seen = False

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            if not self.seen:
                self.seen = True
                print(f"FIRST_RESULT {time.time():.3f}", flush=True)

    loaded = load_spec(args.spec, [])
    base = loaded.cells[0].base.model_dump(exclude_none=True)
    base["trainer"]["threads"] = max(1, int(loaded.spec.resources.cpu))  # as sweep.py gives each trial

    checkpoints = args.checkpoints

    def trainable(config: dict[str, Any]) -> None:
        import tempfile

        from resnet_lab.spec import TrialConfig
        from resnet_lab.trainer import fit

        def report(epoch: Any) -> None:
            if not checkpoints:
                tune.report(dict(epoch.metrics))
                return
            with tempfile.TemporaryDirectory() as directory:  # as resnet_lab.tune.trainable.train_trial does
                epoch.state().save(directory)
                tune.report(dict(epoch.metrics), checkpoint=tune.Checkpoint.from_directory(directory))

        cfg = TrialConfig.model_validate({**base, "seed": config["seed"]})
        fit(cfg, report)

    ray.init(include_dashboard=False, log_to_driver=False, _temp_dir=args.ray_temp_dir)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": loaded.spec.resources.cpu}),
        param_space={"seed": tune.grid_search(list(range(args.trials) if args.trials else loaded.spec.seeds))},
        tune_config=tune.TuneConfig(max_concurrent_trials=args.max_concurrent, reuse_actors=args.reuse_actors),
        run_config=tune.RunConfig(name="raw", storage_path=args.storage, verbose=0, callbacks=[FirstResult()]),
    )
    start = time.perf_counter()
    results = tuner.fit()
    print(f"RAW_FIT_S {time.perf_counter() - start:.3f}", flush=True)
    errors = [r.error for r in results if r.error]
    ray.shutdown()
    if errors:
        print(f"{len(errors)} trials failed: {errors[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
