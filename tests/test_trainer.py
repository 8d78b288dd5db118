"""The plain PyTorch trainer on tiny real runs (resnet_lab/trainer.py, checkpoint.py, optim.py)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from resnet_lab.checkpoint import TrainState
from resnet_lab.spec import TrialConfig
from resnet_lab.trainer import EpochMetrics, derive_seed, fit

TIMING_KEYS = ("epoch_time_s", "train_time_s", "eval_time_s", "throughput_img_s")
SMALL = {"train_size": 256, "test_size": 64, "image_size": 16}


def config(**sections: Any) -> TrialConfig:
    base: dict[str, Any] = {
        "dataset": {"name": "synthetic", "synthetic": SMALL, "val_fraction": 0.25},
        "model": {"name": "resnet", "depth": 8, "width": 0.125},
        "trainer": {"epochs": 3, "batch_size": 32, "threads": 1},
    }
    for key, value in sections.items():
        replace = not isinstance(value, dict) or (key == "model" and "name" in value)  # another model: its own fields
        base[key] = value if replace else {**base.get(key, {}), **value}
    return TrialConfig.model_validate(base)


def without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in history]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    # Two test workers or a busy CI box: one thread keeps CPU timing stable and results bit-exact.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_memorizes_a_tiny_set() -> None:
    cfg = config(trainer={"epochs": 15, "lr": 3e-3, "early_stopping_patience": 0},
                 model={"name": "baseline_cnn", "width": 0.5, "dropout": 0.0},
                 dataset={"synthetic": {**SMALL, "train_size": 128, "noise": 0.3}})
    epochs: list[EpochMetrics] = []
    result = fit(cfg, epochs.append)
    losses = [e.metrics["train/loss"] for e in epochs]
    assert result.status == "completed" and len(epochs) == 15
    assert losses[-1] < 0.25 * losses[0]
    assert epochs[-1].metrics["train/acc"] >= 0.98
    assert epochs[-1].final and not any(e.final for e in epochs[:-1])


def test_reports_every_metric_per_epoch_and_final_metrics() -> None:
    epochs: list[EpochMetrics] = []
    result = fit(config(), epochs.append)
    for e in epochs:
        for key in ("train/loss", "train/acc", "val/loss", "val/acc", "lr", "epoch_time_s", "throughput_img_s"):
            assert math.isfinite(e.metrics[key]), key
    # gradient-flow metrics: tests/test_gradflow.py
    for key in ("test/acc", "test/loss", "params", "best_epoch"):
        assert key in result.metrics
    assert result.metrics["params"] == result.params > 0


def test_same_seed_gives_identical_metrics_and_other_seed_differs() -> None:
    exact = {"deterministic": True}  # bit-exact on any device only with deterministic kernels (GPU: no autotuning)
    a = fit(config(seed=7, trainer=exact))
    b = fit(config(seed=7, trainer=exact))
    c = fit(config(seed=8, trainer=exact))
    assert without_timing(a.history) == without_timing(b.history)
    assert without_timing(a.history) != without_timing(c.history)


def test_seeds_are_split_by_purpose() -> None:
    seeds = {derive_seed(3, p) for p in ("weights", "order", "augment", "dropout")}
    assert len(seeds) == 4 and derive_seed(3, "order") == derive_seed(3, "order")


class StopAfter(Exception):
    pass


@pytest.mark.parametrize("recipe", ["paper", "fast"])
def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path: Path, recipe: str) -> None:
    cfg = config(trainer={"recipe": recipe, "epochs": 4, "batch_size": 32, "deterministic": True},
                 dataset={"augment": True, "synthetic": {**SMALL, "image_size": 20}})
    full = fit(cfg)

    def stop_after_two(e: EpochMetrics) -> None:
        if e.epoch == 2:
            e.state().save(tmp_path)
            raise StopAfter

    with pytest.raises(StopAfter):
        fit(cfg, stop_after_two)
    state = TrainState.load(tmp_path)  # weights_only=True inside
    assert state.epoch == 2 and state.config == cfg.to_flat()
    # Data order and augmentation come from CPU generators on every device: states that load on any node.
    assert state.rng["order"].numel() == state.rng["augment"].numel() == torch.Generator().get_state().numel()
    resumed_epochs: list[EpochMetrics] = []
    resumed = fit(cfg, resumed_epochs.append, resume=state)
    assert [e.epoch for e in resumed_epochs] == [3, 4]
    assert without_timing(resumed.history) == without_timing(full.history)
    assert resumed.metrics["test/acc"] == full.metrics["test/acc"]


def test_resuming_a_finished_run_trains_nothing(tmp_path: Path) -> None:
    cfg = config(trainer={"epochs": 2})
    fit(cfg, lambda e: e.state().save(tmp_path))
    calls: list[EpochMetrics] = []
    result = fit(cfg, calls.append, resume=TrainState.load(tmp_path))
    assert calls == [] and result.status == "completed" and "test/acc" in result.metrics


def test_divergence_ends_the_run_as_a_result_not_an_exception() -> None:
    # lr 10 with weight decay 1.0 multiplies every weight by -9 per step: float32 overflows within two epochs.
    cfg = config(model={"name": "baseline_cnn", "width": 0.25},
                 trainer={"epochs": 6, "batch_size": 8, "optimizer": "sgd", "lr": 10.0, "momentum": 0.0,
                          "weight_decay": 1.0, "schedule": "none"})
    epochs: list[EpochMetrics] = []
    result = fit(cfg, epochs.append)
    assert result.status == "diverged"
    assert len(epochs) < 6 and epochs[-1].final and epochs[-1].status == "diverged"
    assert result.metrics["diverged"] == 1.0 and not math.isfinite(result.metrics["train/loss"])


def test_early_stopping_on_val_loss_with_patience() -> None:
    # Labels drowned in noise: val loss stops improving after a few epochs while train loss keeps falling.
    cfg = config(model={"name": "baseline_cnn", "width": 0.5, "dropout": 0.0},
                 dataset={"synthetic": {**SMALL, "noise": 8.0}},
                 trainer={"epochs": 40, "lr": 3e-3, "early_stopping_patience": 2})
    result = fit(cfg)
    val = [h["val/loss"] for h in result.history]
    assert result.status == "early_stopped" and len(val) < 40
    assert len(val) - result.best_epoch == 2  # stopped exactly `patience` epochs after the best
    assert min(val) == val[result.best_epoch - 1] and all(v >= min(val) for v in val[result.best_epoch:])


def test_plateau_schedule_lowers_lr_when_val_loss_stalls() -> None:
    cfg = config(model={"name": "baseline_cnn", "width": 0.5, "dropout": 0.0},
                 dataset={"synthetic": {**SMALL, "noise": 8.0}},
                 trainer={"epochs": 12, "lr": 3e-3, "early_stopping_patience": 0, "plateau_patience": 1,
                          "plateau_factor": 0.5})
    lrs = [h["lr"] for h in fit(cfg).history]
    assert lrs[0] == pytest.approx(3e-3) and min(lrs) <= 1.5e-3


def test_fast_recipe_warms_up_then_anneals() -> None:
    cfg = config(trainer={"recipe": "fast", "epochs": 4, "batch_size": 32, "lr": 0.4, "warmup_epochs": 1.0})
    lrs = [h["lr"] for h in fit(cfg).history]
    assert lrs[0] == pytest.approx(0.4, rel=0.1)  # end of the warm-up epoch: at (one step past) the peak
    assert lrs[0] > lrs[1] > lrs[2] > lrs[3]


@pytest.mark.parametrize(("epochs", "steps_per_epoch", "warmup_epochs"),
                         [(2, 1, 1.0), (3, 1, 1.0), (4, 10, 0.0), (1, 1, 1.0), (1, 2, 0.5), (10, 5, 1.0)])
def test_onecycle_runs_for_any_length_and_warm_up(epochs: int, steps_per_epoch: int, warmup_epochs: float) -> None:
    # OneCycleLR divided by zero for warm-ups under 2 steps: warmup_epochs 0, or a fast-recipe run of a few steps.
    from resnet_lab.optim import build_scheduler

    tc = config(trainer={"recipe": "fast", "epochs": epochs, "lr": 0.2, "warmup_epochs": warmup_epochs}
                ).trainer.resolved()
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=tc.lr)
    scheduler = build_scheduler(optimizer, tc, steps_per_epoch)
    total = epochs * steps_per_epoch
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(total - 1):  # the trainer steps the schedule after every optimizer step
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert all(0 < lr <= 0.2 * (1 + 1e-9) for lr in lrs)
    if total >= 3:  # a cycle: up to the peak, then down below the start
        assert max(lrs) == pytest.approx(0.2) and lrs[0] < 0.2 and lrs[-1] < lrs[0]


def test_fast_recipe_with_one_step_per_epoch_trains() -> None:
    cfg = config(trainer={"recipe": "fast", "epochs": 2, "batch_size": 512})  # 192 images: one step an epoch
    result = fit(cfg)
    assert result.status == "completed" and len(result.history) == 2


def test_fit_restores_the_callers_global_rng_and_threads() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    fit(config(trainer={"epochs": 1, "threads": 2}))
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads


def test_grayscale_model_input_channels_follow_the_data() -> None:
    cfg = config(dataset={"synthetic": {**SMALL, "channels": 1}}, trainer={"epochs": 1})
    assert fit(cfg).status == "completed"


def cuda_generator_state(seed: int, offset: int) -> torch.Tensor:
    """The 16 bytes `torch.Generator("cuda").get_state()` returns (Philox seed, offset): what old checkpoints hold."""
    return torch.tensor([seed, offset], dtype=torch.int64).view(torch.uint8)


def test_checkpoint_with_cuda_generator_states_resumes_reseeded_on_any_device(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(trainer={"epochs": 4, "deterministic": True}, dataset={"augment": True})

    def stop_after_two(e: EpochMetrics) -> None:
        if e.epoch == 2:
            e.state().save(tmp_path)
            raise StopAfter

    with pytest.raises(StopAfter):
        fit(cfg, stop_after_two)

    def old_format() -> TrainState:
        """The checkpoint as a CUDA node wrote it before generators moved to the CPU: 16-byte generator states."""
        state = TrainState.load(tmp_path)  # fresh each time: resuming trains the loaded optimizer state in place
        state.rng["order"], state.rng["augment"] = cuda_generator_state(5, 1024), cuda_generator_state(6, 2048)
        return state

    with pytest.raises(RuntimeError):
        torch.Generator().set_state(old_format().rng["order"])  # what resuming on a CPU node used to do
    with caplog.at_level("WARNING", logger="resnet_lab.trainer"):
        first = fit(cfg, resume=old_format())
    assert first.status == "completed" and [h["epoch"] for h in first.history] == [1.0, 2.0, 3.0, 4.0]
    assert "16-byte generator state" in caplog.text and "will not repeat an uninterrupted one" in caplog.text
    second = fit(cfg, resume=old_format())  # the reseed is a function of the trial: a retry repeats it exactly
    assert without_timing(second.history) == without_timing(first.history)


def test_deterministic_option_sets_torch_flags_during_the_run_only() -> None:
    seen: list[tuple[bool, bool]] = []

    def record(_: EpochMetrics) -> None:
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark))

    assert not torch.are_deterministic_algorithms_enabled()
    fit(config(trainer={"epochs": 1, "deterministic": True}), record)
    fit(config(trainer={"epochs": 1}), record)
    assert seen == [(True, False), (False, False)]  # cudnn.benchmark: CUDA runs only, and never when deterministic
    assert not torch.are_deterministic_algorithms_enabled()


def test_compile_starts_fresh_in_every_trial_of_a_reused_process() -> None:
    # A reused Ray actor runs trial after trial in one process. Dynamo caches compiled code per code object (the
    # model class's `forward`) with a guard on the instance: each trial's new model adds entries until the
    # recompile limit, then dynamo silently runs eager. With the limit at 2 (default 8), the second trial would
    # compile nothing; fit() resets dynamo when a trial starts, so each compiles its train and eval graphs.
    from torch._dynamo.utils import counters

    torch.compiler.set_default_backend("eager")  # the same tracing and caching as inductor, without codegen
    try:
        graphs = []
        with torch._dynamo.config.patch(recompile_limit=2):
            for depth in (8, 10, 8):
                before = counters["stats"]["unique_graphs"]
                result = fit(config(model={"name": "resnet", "depth": depth, "width": 0.125},
                                    trainer={"epochs": 1, "compile": True}))
                assert result.status == "completed"
                graphs.append(counters["stats"]["unique_graphs"] - before)
        assert graphs == [2, 2, 2]  # training (grad on) and evaluation (no_grad) graphs, every trial
    finally:
        torch.compiler.set_default_backend(None)  # back to inductor
        torch._dynamo.reset()


def test_best_model_is_a_host_copy_and_checkpoints_load_on_cpu(tmp_path: Path) -> None:
    cfg = config(trainer={"epochs": 2, "early_stopping_patience": 3})
    states: list[TrainState] = []
    fit(cfg, lambda e: states.append(e.state()) if e.epoch == 1 else None)
    state = states[0]
    assert state.best_model is not None
    for name, tensor in state.best_model.items():
        assert tensor.device.type == "cpu"
        assert tensor.data_ptr() != state.model[name].data_ptr() or tensor.numel() == 0  # a copy, not a view
    state.save(tmp_path)
    loaded = TrainState.load(tmp_path)
    for name, tensor in state.model.items():
        assert torch.equal(loaded.model[name], tensor)


class _Clock:
    """A settable time for CheckpointClock."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _epoch(n: int, last: bool = False) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(epoch=n, status="completed" if last else None)


def test_checkpoint_every_n_epochs_and_always_the_last() -> None:
    from resnet_lab.tune.trainable import CheckpointClock

    clock = CheckpointClock(3)
    assert [n for n in range(1, 9) if clock.due(_epoch(n))] == [3, 6]
    assert clock.due(_epoch(8, last=True)) and clock.due(_epoch(1, last=True))


def test_auto_checkpoints_by_time_bounded_by_the_last_checkpoints_cost() -> None:
    from resnet_lab.tune.trainable import AUTO_COST_RATIO, AUTO_MIN_INTERVAL_S, CheckpointClock

    now = _Clock()
    clock = CheckpointClock("auto", now=now)
    due_at: list[float] = []
    for n in range(1, 60):  # 2 s epochs; a checkpoint costs 0.25 s at first, then 1.5 s (exact in binary)
        now.t += 2.0
        if clock.due(_epoch(n)):
            due_at.append(now.t)
            with clock.saving():
                now.t += 0.25 if len(due_at) == 1 else 1.5
    # Short epochs wait out the floor (10 s); a cheap checkpoint keeps the floor, a dear one stretches the interval
    # to AUTO_COST_RATIO times its cost, measured from the end of the save.
    assert len(due_at) >= 4 and due_at[0] == AUTO_MIN_INTERVAL_S
    assert AUTO_MIN_INTERVAL_S <= due_at[1] - (due_at[0] + 0.25) < AUTO_MIN_INTERVAL_S + 2.0
    for before, after in itertools.pairwise(due_at[1:]):
        assert AUTO_COST_RATIO * 1.5 <= after - (before + 1.5) < AUTO_COST_RATIO * 1.5 + 2.0
    assert clock.due(_epoch(60, last=True))  # the last epoch whatever the clock says


def test_auto_checkpoints_every_epoch_when_epochs_are_long() -> None:
    from resnet_lab.tune.trainable import CheckpointClock

    now = _Clock()
    clock = CheckpointClock("auto", now=now)
    for n in range(1, 6):  # minute-long epochs, a 2 s checkpoint: every epoch
        now.t += 60.0
        assert clock.due(_epoch(n))
        with clock.saving():
            now.t += 2.0
