"""Devices: which one a trial trains on under Ray, and the CUDA paths (marked `gpu`: skipped without CUDA).

The device rule runs everywhere: Ray started with declared GPUs assigns them to tasks on a machine without any, and
the glue's decision depends only on what Ray assigned. Everything that needs a real GPU is marked `gpu`;
`benchmarks/gpu_check.sh` runs those first (`python -m pytest -m gpu tests/test_gpu.py`).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from resnet_lab.checkpoint import TrainState
from resnet_lab.data import Augment, DeviceLoader
from resnet_lab.spec import TrialConfig
from resnet_lab.trainer import EpochMetrics, Placement, bf16_supported, derive_seed, fit

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()


def gpu(test: Any) -> Any:
    """Mark a test `gpu` (select with -m gpu) and skip it without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")(test))


SMALL = {"train_size": 512, "test_size": 128, "image_size": 16}

# Runs Ray tasks asking for 0, 0.5 and 1 GPU with each trainer.device and prints what the glue decided. `num_gpus`
# declares GPUs to Ray: on a machine without any, Ray still assigns ids and sets CUDA_VISIBLE_DEVICES for them.
PROBE = """
import json, os, sys
import ray
from resnet_lab.spec import TrainerConfig
from resnet_lab.tune.trainable import placement_of

def probe(device, gpu):
    import torch
    out = {"ids": [str(i) for i in ray.get_gpu_ids()], "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
           "cuda_available": torch.cuda.is_available()}
    try:
        placement = placement_of(TrainerConfig(device=device).resolved(), gpu)
        return {**out, "device": placement.device, "fraction": placement.gpu_fraction}
    except RuntimeError as exc:
        return {**out, "error": str(exc)}

gpus = int(sys.argv[1])
ray.init(num_cpus=2, num_gpus=gpus, include_dashboard=False, log_to_driver=False, _temp_dir=sys.argv[2])
cases = [("auto", 0.0), ("auto", 0.5), ("auto", 1.0), ("cpu", 1.0), ("cuda", 0.0), ("cuda", 1.0)]
results = ray.get([ray.remote(num_cpus=0.1, num_gpus=g)(probe).remote(d, g) for d, g in cases])
print("RESULT", json.dumps([[d, g, r] for (d, g), r in zip(cases, results)]))
ray.shutdown()
"""


def run_probe(tmp_path: Path, gpus: int) -> dict[tuple[str, float], dict[str, Any]]:
    """The glue's decision per (trainer.device, resources.gpu), from tasks of a fresh local Ray with `gpus` GPUs."""
    temp = Path("/tmp") / f"rl-probe-{os.getpid()}-{tmp_path.name[-12:]}"  # Ray's socket paths must stay short
    proc = subprocess.run([sys.executable, "-c", PROBE, str(gpus), str(temp)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-3000:]
    return {(d, g): r for d, g, r in json.loads(line.removeprefix("RESULT "))}


def assert_device_rule(results: dict[tuple[str, float], dict[str, Any]]) -> None:
    assert results[("auto", 0.0)]["device"] == "cpu" and results[("auto", 0.0)]["ids"] == []
    assert results[("cpu", 1.0)]["device"] == "cpu"
    for gpus in (0.5, 1.0):
        r = results[("auto", gpus)]
        assert (r["device"], r["fraction"]) == ("cuda", gpus)
        assert len(r["ids"]) == 1 and r["visible"] == r["ids"][0]  # Ray exposes the assigned GPU as cuda:0
    assert results[("cuda", 1.0)]["device"] == "cuda"
    assert "Ray assigned this trial no GPU" in results[("cuda", 0.0)]["error"]


@pytest.mark.slow
def test_auto_device_trains_on_cuda_only_with_gpus_ray_assigned(tmp_path: Path) -> None:
    assert_device_rule(run_probe(tmp_path, gpus=2))


# --- on a GPU (fast ones first: gpu_check.sh gives them all 180 s) ---------------------------------------------


def config(**trainer: Any) -> TrialConfig:
    return TrialConfig.model_validate({
        "dataset": {"name": "synthetic", "synthetic": SMALL, "val_fraction": 0.25, "augment": True},
        "model": {"name": "resnet", "depth": 8, "width": 0.25},
        "trainer": {"epochs": 2, "batch_size": 64, "device": "cuda", **trainer},
    })


class StopAfter(Exception):
    pass


def without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if not k.endswith(("time_s", "img_s"))} for h in history]


@gpu
def test_one_epoch_with_amp_channels_last_and_compile(caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(epochs=1, amp=True, channels_last=True, compile=True)
    with caplog.at_level(logging.WARNING, logger="resnet_lab.trainer"):
        result = fit(cfg)
    assert result.status == "completed"
    assert all(torch.isfinite(torch.tensor(result.metrics[k])) for k in ("train/loss", "val/loss", "test/loss"))
    # bf16 where the GPU has it natively, float32 with a log line where it does not (T4, V100)
    assert ("no native bf16" in caplog.text) == (not bf16_supported(torch.device("cuda")))


@gpu
@pytest.mark.parametrize(("first", "then"), [("cuda", "cpu"), ("cpu", "cuda")])
def test_resume_across_device_types(tmp_path: Path, first: str, then: str) -> None:
    cfg = config(epochs=4, device=first)

    def stop_after_two(e: EpochMetrics) -> None:
        if e.epoch == 2:
            e.state().save(tmp_path)
            raise StopAfter

    with pytest.raises(StopAfter):
        fit(cfg, stop_after_two)
    state = TrainState.load(tmp_path)
    assert all(t.device.type == "cpu" for t in state.model.values())
    assert state.rng["order"].numel() == torch.Generator().get_state().numel()  # a CPU generator's, on CUDA too
    resumed: list[EpochMetrics] = []
    result = fit(config(epochs=4, device=then), resumed.append, resume=state)
    assert result.status == "completed" and [e.epoch for e in resumed] == [3, 4]


@gpu
def test_data_order_and_augmentation_are_the_same_on_cpu_and_cuda() -> None:
    # CPU generators on every device: a checkpoint's generator state gives the same epoch on any node.
    images = torch.randint(0, 256, (300, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(300) % 10
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.2, 0.2])

    def epoch(device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        loader = DeviceLoader(images.to(device), labels.to(device), 64, mean=mean, std=std, shuffle=True,
                              augment=Augment(crop=True, flip=True), order_generator=torch.Generator().manual_seed(1),
                              augment_generator=torch.Generator().manual_seed(2))
        return [(x.cpu(), y.cpu()) for x, y in loader]

    for (x_cpu, y_cpu), (x_cuda, y_cuda) in zip(epoch("cpu"), epoch("cuda"), strict=True):
        assert torch.equal(y_cpu, y_cuda)
        torch.testing.assert_close(x_cpu, x_cuda)


@gpu
def test_deterministic_runs_on_cuda_are_bit_identical() -> None:
    a = fit(config(deterministic=True, dropout=0.3))
    b = fit(config(deterministic=True, dropout=0.3))
    assert without_timing(a.history) == without_timing(b.history)


@gpu
def test_dropout_on_cuda_draws_from_the_dropout_seed() -> None:
    seeds: list[int] = []
    fit(config(epochs=1, dropout=0.3), lambda e: seeds.append(torch.cuda.initial_seed()))
    # the CUDA generator was seeded for dropout, not left at the weights seed by the model's construction
    assert seeds == [derive_seed(0, "dropout")]


@gpu
def test_packed_trial_is_capped_to_its_fraction_and_releases_its_cache() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    seen: list[float] = []
    refused: list[bool] = []
    reserved: list[int] = []

    def probe(e: EpochMetrics) -> None:
        seen.append(torch.cuda.get_per_process_memory_fraction(device))
        try:
            torch.empty(int(0.6 * total), dtype=torch.uint8, device=device)  # more than half the GPU
            refused.append(False)
        except torch.OutOfMemoryError:
            refused.append(True)
        block = torch.empty(int(0.3 * total), dtype=torch.uint8, device=device)  # within the share: allowed
        del block  # freed, but kept in the caching allocator, as a trial's activations are
        reserved.append(torch.cuda.memory_reserved(device))

    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved(device)
    try:
        fit(config(epochs=1), probe, placement=Placement("cuda", gpu_fraction=0.5))
        assert seen == [0.5] and refused == [True]
        assert reserved[0] >= 0.3 * total
        # The trial's cached blocks went back to the GPU; 64 MiB of slack for cuBLAS/cuDNN workspaces it keeps.
        assert torch.cuda.memory_reserved(device) <= before + 64 * 2**20
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


@gpu
@pytest.mark.slow
def test_auto_device_rule_on_a_gpu_node(tmp_path: Path) -> None:
    results = run_probe(tmp_path, gpus=1)
    # The reason for the rule: Ray 2.60 leaves the GPU visible to a task that asked for none.
    assert results[("auto", 0.0)]["cuda_available"]
    assert_device_rule(results)


@gpu
@pytest.mark.slow
def test_two_trials_packed_on_one_gpu_complete(tmp_path: Path) -> None:
    spec = tmp_path / "packed.yaml"
    spec.write_text("name: packed\nexperiment: packed\n"
                    "dataset: {name: synthetic, synthetic: {train_size: 512, test_size: 128, image_size: 16}}\n"
                    "model: {name: resnet, depth: 8, width: 0.25}\ntrainer: {epochs: 2, batch_size: 64}\n"
                    "seeds: [0, 1]\nresources: {cpu: 1, gpu: 0.5}\nmax_concurrent: 2\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run([sys.executable, str(ROOT / "sweep.py"), str(spec), "--tracking-uri", uri,
                           "--storage", str(tmp_path / "ray_results")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("packed")
    kids = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("resnet_lab.role") == "trial"]
    assert sorted(r.data.tags["resnet_lab.outcome"] for r in kids) == ["completed", "completed"]
