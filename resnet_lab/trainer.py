"""The plain PyTorch trainer: `fit(cfg, on_epoch)` knows nothing about Ray, MLflow, Optuna or rich.

Reporting, checkpoint upload and early stopping by a scheduler arrive through `on_epoch`: Ray's glue reports and
lets ASHA stop the actor; a test appends to a list.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from resnet_lab import gradflow
from resnet_lab.checkpoint import TrainState
from resnet_lab.data import DataSplits, DeviceLoader, load_data
from resnet_lab.models import build_model, count_params
from resnet_lab.optim import PER_STEP_SCHEDULES, build_optimizer, build_scheduler
from resnet_lab.outcome import Outcome
from resnet_lab.spec import ResolvedTrainer, TrialConfig

EVAL_BATCH = 1024
DIVERGENCE_CHECK_STEPS = 50  # a NaN check forces a device sync; every 50 steps costs nothing measurable
log = logging.getLogger(__name__)


@dataclass
class EpochMetrics:
    """What one epoch produced. `state()` is valid only during the callback (it references live tensors)."""

    epoch: int
    metrics: dict[str, float]
    final: bool
    status: Outcome | None  # set on the final epoch
    state: Callable[[], TrainState]
    artifacts: dict[str, bytes] = field(default_factory=dict)  # final epoch: files for the run (analysis figures)


@dataclass
class RunResult:
    """The outcome of `fit`."""

    status: Outcome
    metrics: dict[str, float]  # the final epoch's metrics, test/* included
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    params: int = 0


def derive_seed(seed: int, purpose: str) -> int:
    """Independent 63-bit seeds per purpose (weights, order, augment, dropout) from one trial seed."""
    purposes = ("weights", "order", "augment", "dropout")
    return int(np.random.SeedSequence([seed, purposes.index(purpose)]).generate_state(2, np.uint64)[0] >> 1)


@dataclass(frozen=True)
class Placement:
    """Where the orchestrator put a run: its device and the share of that GPU's memory it may use.

    Under Ray the glue decides it from the GPUs Ray assigned (`ray.get_gpu_ids()`): Ray 2.60 leaves every GPU
    visible to a task that asked for none, so "a GPU is visible" does not mean "this trial may use it".
    """

    device: str  # "cpu", "cuda" (the current device) or "cuda:N"
    gpu_fraction: float = 1.0  # < 1: trials packed onto one GPU; caps this process's CUDA caching allocator


def select_device(tc: ResolvedTrainer) -> torch.device:
    """The device outside an orchestrator: "auto" is CUDA when visible. "cuda" is the current CUDA device."""
    if tc.device == "cuda" or (tc.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device is 'cuda' but no CUDA device is visible to this process")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` runs bf16 natively (compute capability 8.0+, Ampere on; T4/V100 only emulate it)."""
    if device.type != "cuda":
        return False
    return torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] >= 8


def load_generator_state(gen: torch.Generator, saved: torch.Tensor, reseed: int) -> None:
    """Load a saved state into CPU generator `gen`; reseed with `reseed` if it is another kind's state.

    A CUDA generator's state (16 bytes: seed and Philox offset; checkpoints written before generators moved to the
    CPU) cannot become a CPU generator's (Mersenne Twister, 5056 bytes): the run goes on with the data order and
    augmentation of `reseed`, not those an uninterrupted run would have drawn, and says so.
    """
    saved = saved.cpu()
    if saved.numel() == gen.get_state().numel():
        gen.set_state(saved)
        return
    log.warning("checkpoint holds a %d-byte generator state (a CUDA generator's); data order and augmentation "
                "continue from seed %d instead, so the resumed run will not repeat an uninterrupted one exactly",
                saved.numel(), reseed)
    gen.manual_seed(reseed)


def process_group() -> tuple[int, int]:
    """(rank, world size) when Ray Train (or torchrun) initialised a process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _Run:
    """State of one `fit` call; split out so each phase is a short method."""

    def __init__(self, cfg: TrialConfig, data: DataSplits, device: torch.device) -> None:
        self.cfg, self.data, self.device = cfg, data, device
        self.tc = cfg.trainer.resolved()
        self.cuda = device.type == "cuda"
        self.amp = self.cuda and self.tc.amp and bf16_supported(device)
        if self.cuda and self.tc.amp and not self.amp:
            log.warning("trainer.amp: %s has no native bf16 (compute capability %d.%d, before Ampere); training "
                        "in float32", torch.cuda.get_device_name(device), *torch.cuda.get_device_capability(device))
        # channels_last on CPU too: oneDNN convolutions, BN and pooling run NHWC without reorders (baseline_cnn's
        # training steps 1.2-1.5x faster on 2 CPU cores, resnet18's about the same; benchmarks/README.md).
        self.memory_format = torch.channels_last if self.tc.channels_last else torch.contiguous_format
        # manual_seed seeds CUDA too: fork the CUDA generator as well, so dropout on the GPU keeps fit's dropout seed.
        with torch.random.fork_rng(devices=[device] if self.cuda else []):
            torch.manual_seed(derive_seed(cfg.seed, "weights"))
            kwargs = cfg.model.build_kwargs(self.tc.dropout)
            self.model = build_model(cfg.model.name, num_classes=data.num_classes, in_channels=data.in_channels,
                                     **kwargs)
        self.params = count_params(self.model)
        if cfg.model.init is not None:  # transfer: another run's weights, a new head, frozen layers
            from resnet_lab.transfer import initialize

            initialize(self.model, cfg.model, cfg.seed)
        self.model.to(device=device, memory_format=self.memory_format)
        self.rank, self.world = process_group()
        forward: nn.Module = self.model
        if self.world > 1:  # gradients averaged across workers; buffers (BN stats) broadcast from rank 0
            forward = nn.parallel.DistributedDataParallel(self.model, device_ids=[device] if self.cuda else None)
        self.forward = torch.compile(forward) if self.tc.compile else forward
        # Evaluation runs on each rank's share of a split without DDP's wrapper: its forward may broadcast buffers,
        # a collective that ranks with different numbers of evaluation batches would not match.
        self.eval_forward = self.forward if self.world == 1 else (
            torch.compile(self.model) if self.tc.compile else self.model)
        # CPU generators on every device: their state (5056 bytes) loads on any node, where a CUDA generator's (16
        # bytes) loads on CUDA only; drawing an epoch's order on the host and copying the indices costs ~1 ms.
        self.order_gen = torch.Generator("cpu").manual_seed(derive_seed(cfg.seed, "order"))
        self.aug_gen = torch.Generator("cpu").manual_seed(derive_seed(cfg.seed, "augment"))
        # DDP: each worker trains on a fixed 1/world shard, batch_size images per worker per step (global batch =
        # batch_size x workers); the lr applies to that global batch as given. Every shard is trimmed to
        # len(train) // world images (at most world - 1 images left out, the same ones every epoch), so every rank
        # takes the same drop_last decision and runs the same number of steps: a rank with one step more would wait
        # forever in DDP's gradient all-reduce (1421 synthetic images, val 0.1, batch 64, 2 workers: 10 vs 9 steps).
        shard = len(data.train[1]) // self.world
        train_x = data.train[0][self.rank::self.world][:shard]
        train_y = data.train[1][self.rank::self.world][:shard]
        self.train_loader = DeviceLoader(
            train_x, train_y, batch_size=self.tc.batch_size, mean=data.mean, std=data.std, shuffle=True,
            drop_last=len(train_y) > self.tc.batch_size, augment=data.augment_for(cfg.dataset.augment),
            order_generator=self.order_gen, augment_generator=self.aug_gen, channels_last=self.memory_format
            == torch.channels_last)
        self.optimizer = build_optimizer(self.model, self.tc, device)
        self.scheduler = build_scheduler(self.optimizer, self.tc, len(self.train_loader))
        self.epoch = 0
        self.best_val_loss, self.best_epoch, self.bad_epochs = math.inf, 0, 0
        self.best_model: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, float]] = []
        self.artifacts: dict[str, bytes] = {}  # files the final analysis made (resnet_lab.analysis)
        self._probe: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- state -----------------------------------------------------------------------------------------------
    def state(self) -> TrainState:
        rng = {"order": self.order_gen.get_state(), "augment": self.aug_gen.get_state(),
               "torch": torch.get_rng_state()}
        if self.cuda:
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return TrainState(
            epoch=self.epoch, model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(), rng=rng, best_val_loss=self.best_val_loss,
            best_epoch=self.best_epoch, bad_epochs=self.bad_epochs, best_model=self.best_model,
            history=list(self.history), config=self.cfg.to_flat())

    def restore(self, state: TrainState) -> None:
        self.model.load_state_dict(state.model)
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        for purpose, gen in (("order", self.order_gen), ("augment", self.aug_gen)):
            load_generator_state(gen, state.rng[purpose], reseed=derive_seed(self.cfg.seed, purpose) + state.epoch)
        torch.set_rng_state(state.rng["torch"].cpu())
        if self.cuda and "cuda" in state.rng:
            torch.cuda.set_rng_state(state.rng["cuda"].cpu(), self.device)
        self.epoch, self.history = state.epoch, list(state.history)
        self.best_val_loss, self.best_epoch, self.bad_epochs = state.best_val_loss, state.best_epoch, state.bad_epochs
        self.best_model = state.best_model

    # -- phases ----------------------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager[None]:
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext()

    def train_epoch(self) -> dict[str, float]:
        """One pass over the training set; returns train metrics, gradient flow and throughput."""
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        start = time.perf_counter()
        for steps, (x, y) in enumerate(self.train_loader, start=1):
            with self.autocast():
                logits = self.forward(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=self.tc.label_smoothing)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.tc.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
            self.optimizer.step()
            if self.tc.schedule in PER_STEP_SCHEDULES:
                self.scheduler.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
            # Single process only: a DDP worker leaving the loop alone would hang the others' all-reduce.
            if self.world == 1 and steps % DIVERGENCE_CHECK_STEPS == 0 and not torch.isfinite(loss_sum):
                break
        if self.world > 1:  # global metrics
            totals = torch.stack([loss_sum, correct.float(), torch.tensor(float(seen), device=self.device)])
            torch.distributed.all_reduce(totals)
            loss_sum, correct, seen = totals[0], totals[1], int(totals[2].item())
            # DDP copies rank 0's buffers at each training forward; the last step then moved every rank's BN
            # running statistics its own way. Evaluation and checkpoints use rank 0's, as the next step would.
            for buffer in self.model.buffers():
                torch.distributed.broadcast(buffer, 0)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        train_time = time.perf_counter() - start
        # train_time_s: the optimisation steps only (evaluation is timed apart), what convergence speed is made of.
        return {"train/loss": loss_sum.item() / max(seen, 1), "train/acc": correct.item() / max(seen, 1),
                "throughput_img_s": seen / max(train_time, 1e-9), "train_time_s": train_time}

    @torch.no_grad()
    def evaluate(self, split: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
        """(mean loss, accuracy) on a split, without augmentation; under DDP each rank evaluates 1/world of it."""
        self.model.eval()
        images, labels = split[0][self.rank::self.world], split[1][self.rank::self.world]
        loader = DeviceLoader(images, labels, batch_size=EVAL_BATCH, mean=self.data.mean, std=self.data.std,
                              channels_last=self.memory_format == torch.channels_last)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        for x, y in loader:
            with self.autocast():
                logits = self.eval_forward(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
        sums = torch.stack([loss_sum.double(), correct.double()])
        if self.world > 1:  # sums over every rank's share, so all ranks take the same decisions
            torch.distributed.all_reduce(sums)
        result = sums / len(split[1])  # in float64: 79/80 is 0.9875, not 0.98750001
        return result[0].item(), result[1].item()

    def end_of_epoch(self, val_loss: float) -> bool:
        """Update plateau schedule and early stopping; True when early stopping says stop."""
        if self.tc.schedule == "plateau":
            self.scheduler.step(val_loss)
        if val_loss < self.best_val_loss:
            self.best_val_loss, self.best_epoch, self.bad_epochs = val_loss, self.epoch, 0
            if self.tc.early_stopping_patience > 0:
                # On the host: a second copy of the weights in GPU memory would count against a packed trial's
                # share, and checkpoints write it from the host anyway.
                self.best_model = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            return False
        self.bad_epochs += 1
        return 0 < self.tc.early_stopping_patience <= self.bad_epochs

    def final_metrics(self, status: Outcome) -> dict[str, float]:
        """Test metrics, with the best-val-loss weights when early stopping kept them."""
        if status is not Outcome.DIVERGED and self.best_model is not None:
            self.model.load_state_dict(self.best_model)
        test_loss, test_acc = self.evaluate(self.data.test)
        return {"test/loss": test_loss, "test/acc": test_acc, "params": float(self.params),
                "num_classes": float(self.data.num_classes), "best_epoch": float(self.best_epoch),
                "diverged": float(status is Outcome.DIVERGED)} | self.analyse(status)

    def analyse(self, status: Outcome) -> dict[str, float]:
        """`cfg.analysis` (lesion study, attributions) on the tested weights; figures kept in `self.artifacts`."""
        if not self.cfg.analysis or status is Outcome.DIVERGED:
            return {}
        from resnet_lab.analysis import analyse_run

        found = analyse_run(self.cfg, self.model, self.data, channels_last=self.memory_format == torch.channels_last,
                            amp=self.amp)
        self.artifacts = found.artifacts
        return found.metrics

    def gradient_flow(self, phase: str) -> dict[str, float]:
        """Block-output gradient norms and relative layer gradients on the fixed probe batch (resnet_lab.gradflow)."""
        x, y = self.probe
        return gradflow.measure(self.model, x, y).metrics(phase)

    @property
    def probe(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first validation images, normalised as the model sees them: the same batch for every measurement."""
        if self._probe is None:
            val_x, val_y = self.data.val
            n = min(gradflow.PROBE_IMAGES, len(val_y))
            loader = DeviceLoader(val_x[:n], val_y[:n], batch_size=n, mean=self.data.mean, std=self.data.std,
                                  channels_last=self.memory_format == torch.channels_last)
            self._probe = next(iter(loader))
        return self._probe

    def epochs(self) -> Iterator[tuple[dict[str, float], Outcome | None]]:
        """Run epochs from the current one; yields (metrics, final status or None)."""
        while self.epoch < self.tc.epochs:
            start = time.perf_counter()
            # Gradient flow at initialisation, after epoch 1 and on the tested weights (the claim is about both).
            at_init = self.gradient_flow("init") if self.epoch == 0 else {}
            self.epoch += 1
            metrics = {"epoch": float(self.epoch), "workers": float(self.world), **at_init, **self.train_epoch()}
            eval_start = time.perf_counter()
            val_loss, val_acc = self.evaluate(self.data.val)
            metrics.update({"val/loss": val_loss, "val/acc": val_acc, "eval_time_s": time.perf_counter() - eval_start,
                            "lr": self.optimizer.param_groups[0]["lr"]})
            if self.epoch == 1:
                metrics.update(self.gradient_flow("epoch1"))
            status: Outcome | None = None
            if not (math.isfinite(metrics["train/loss"]) and math.isfinite(val_loss)):
                status = Outcome.DIVERGED
            elif self.end_of_epoch(val_loss):
                status = Outcome.EARLY_STOPPED
            elif self.epoch == self.tc.epochs:
                status = Outcome.COMPLETED
            if status is not None:
                metrics.update(self.final_metrics(status))
                metrics.update(self.gradient_flow("final"))
            metrics["epoch_time_s"] = time.perf_counter() - start
            self.history.append(metrics)
            yield metrics, status
            if status is not None:
                return


def fit(cfg: TrialConfig, on_epoch: Callable[[EpochMetrics], None] | None = None, *,
        resume: TrainState | None = None, data: DataSplits | None = None,
        placement: Placement | None = None) -> RunResult:
    """Train `cfg` to completion (or early stop, or divergence), calling `on_epoch` after every epoch.

    Args:
        cfg: the trial to run.
        on_epoch: receives every epoch's metrics and a way to take the full state for a checkpoint.
        resume: continue from this state (as saved by an earlier call's `EpochMetrics.state()`), from any device.
        data: pre-loaded data for `cfg.dataset` (reuse across runs in one process); loaded when None.
        placement: the device (and GPU memory share) an orchestrator assigned; None: `select_device`.
    """
    tc = cfg.trainer.resolved()
    device = torch.device(placement.device) if placement is not None else select_device(tc)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda" and placement is not None:
        # Packed trials (resources.gpu 0.5) share one GPU: each may allocate its share, and an OOM names the trial
        # that overran instead of its neighbour. 1.0 lifts a cap an earlier trial of a reused actor set.
        torch.cuda.set_per_process_memory_fraction(placement.gpu_fraction, device)
    if tc.compile:
        # A reused actor keeps dynamo's cache on `forward`'s code: one entry per earlier trial's model, until the
        # recompile limit (8) stops compiling and runs eager with only a warning in the worker's log.
        torch._dynamo.reset()
    threads = torch.get_num_threads()
    flags = _DeterminismFlags.current()
    # fork_rng: dropout draws from the global generator; seed it for this run and give the caller's back after.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if tc.threads is not None:
            torch.set_num_threads(tc.threads)
        try:
            torch.manual_seed(derive_seed(cfg.seed, "dropout"))  # CPU and CUDA generators alike
            _DeterminismFlags.for_run(tc, device).apply()
            return _train(cfg, device, on_epoch, resume, data)
        finally:
            torch.set_num_threads(threads)
            flags.apply()
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the run's tensors are gone: give its cached blocks back to the GPU


@dataclass(frozen=True)
class _DeterminismFlags:
    """torch's process-wide determinism switches, saved before a run and put back after it."""

    algorithms: bool
    warn_only: bool
    cudnn_benchmark: bool
    cudnn_deterministic: bool

    @classmethod
    def current(cls) -> _DeterminismFlags:
        return cls(torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                   torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)

    @classmethod
    def for_run(cls, tc: ResolvedTrainer, device: torch.device) -> _DeterminismFlags:
        """`trainer.deterministic`: deterministic kernels, no autotuning; else cudnn.benchmark on CUDA."""
        if tc.deterministic:
            if device.type == "cuda":
                # cuBLAS is deterministic only with a fixed workspace; read when cuBLAS starts (torch's reproducibility
                # notes), so a process whose first CUDA run was not deterministic keeps its setting.
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            # warn_only: AdaptiveAvgPool2d's CUDA backward has no deterministic kernel by torch's list and would raise;
            # pooling to 1x1 adds one value per input element, so its atomics do not reorder sums.
            return cls(True, True, False, True)
        # fixed input shapes: autotuning pays off after one batch
        return cls(False, False, device.type == "cuda", False)

    def apply(self) -> None:
        torch.use_deterministic_algorithms(self.algorithms, warn_only=self.warn_only)
        torch.backends.cudnn.benchmark = self.cudnn_benchmark
        torch.backends.cudnn.deterministic = self.cudnn_deterministic


def _train(cfg: TrialConfig, device: torch.device, on_epoch: Callable[[EpochMetrics], None] | None,
           resume: TrainState | None, data: DataSplits | None) -> RunResult:
    """`fit`'s body: every tensor of the run is local here, so it is freed when this returns."""
    run = _Run(cfg, data if data is not None else load_data(cfg.dataset, device), device)
    if resume is not None:
        run.restore(resume)
    if resume is not None and resume.history and resume.history[-1].get("test/acc") is not None:
        last = resume.history[-1]  # the state of a finished run: nothing left to train
        status: Outcome = Outcome.DIVERGED if last.get("diverged") else (
            Outcome.COMPLETED if run.epoch >= run.tc.epochs else Outcome.EARLY_STOPPED)
        return RunResult(status, last, run.history, run.best_epoch, run.params)
    status, last = Outcome.COMPLETED, {}
    for metrics, final_status in run.epochs():
        if on_epoch is not None:
            on_epoch(EpochMetrics(run.epoch, metrics, final_status is not None, final_status, run.state,
                                  run.artifacts if final_status is not None else {}))
        last = metrics
        if final_status is not None:
            status = final_status
    return RunResult(status, last, run.history, run.best_epoch, run.params)
