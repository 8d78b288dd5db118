"""Training throughput: our trainer (`fit`) vs a reference loop written the usual way, same model and images.

Reference: a torchvision-style Dataset over PIL images (`Image.fromarray` per item, as torchvision's CIFAR10 does),
`RandomCrop(32, padding=4)`, `RandomHorizontalFlip()`, `ToTensor()`, `Normalize(mean, std)`, `DataLoader(
num_workers=2, pin_memory=<on CUDA>, shuffle=True)`, fp32, default memory format, `torch.optim.Adam(model.
parameters())`, `loss.item()` each step. Ours: `resnet_lab.trainer.fit` on the same uint8 images (device-resident,
augmented on the device, no workers; on CUDA bf16 autocast, channels_last, fused Adam, optionally torch.compile).

Both train the same `build_model(...)` (same kwargs, same initial weights), Adam lr 1e-3, the same batch size and
the same augmentation (crop with 4-pixel zero padding + horizontal flip), with the same number of torch threads.
Epochs alternate (ours, reference, ours, ...) in one process, so both see the same machine load; the first epoch of
each is a warm-up and is not timed. img/s counts training images per second of a whole training epoch (data,
augmentation, forward, backward, optimizer step); our validation pass after each epoch is not counted.

    python benchmarks/train_throughput.py [--quick] [--device cpu|cuda] [--models baseline_cnn,resnet18]
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any

from _common import machine_line, median, parser, resolve_device, show

MODELS = {"baseline_cnn": {"name": "baseline_cnn"}, "resnet18": {"name": "resnet", "depth": 18},
          "resnet10-w0.25": {"name": "resnet", "depth": 10, "width": 0.25}}
LR = 1e-3
# (train images, batch size, timed epochs) per model. CPU: short epochs, many of them, because the load on a shared
# box changes within seconds and only a close pair of epochs sees the same load; CUDA: CIFAR-scale epochs, so that
# per-epoch constants (worker start-up) are not what is measured.
SIZES = {
    ("cpu", False): {"baseline_cnn": (1024, 128, 8), "resnet18": (256, 64, 5), "resnet10-w0.25": (1024, 128, 8)},
    ("cpu", True): {"baseline_cnn": (512, 128, 4), "resnet18": (128, 64, 2), "resnet10-w0.25": (512, 128, 4)},
    ("cuda", False): {"baseline_cnn": (50_000, 512, 3), "resnet18": (50_000, 512, 3),
                      "resnet10-w0.25": (50_000, 512, 3)},
    ("cuda", True): {"baseline_cnn": (10_000, 512, 2), "resnet18": (10_000, 512, 2),
                     "resnet10-w0.25": (10_000, 512, 2)},
}


class PILImages:
    """A torchvision-style dataset: uint8 HWC arrays, `Image.fromarray` and a transform per item (as CIFAR10)."""

    def __init__(self, images: Any, labels: Any, transform: Any) -> None:
        self.data = images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, 32, 32, 3), torchvision's CIFAR layout
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


class Reference:
    """The usual training loop; `epoch()` trains one epoch and returns (images, seconds)."""

    def __init__(self, cfg: Any, data: Any, device: Any, workers: int) -> None:
        import torch
        from torchvision import transforms as T

        from resnet_lab.models import build_model
        from resnet_lab.trainer import derive_seed

        tc = cfg.trainer.resolved()
        self.device = device
        transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                               T.Normalize(data.mean.tolist(), data.std.tolist())])
        dataset = PILImages(data.train[0].cpu(), data.train[1].cpu(), transform)
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=tc.batch_size, shuffle=True, drop_last=True,
                                                  num_workers=workers, pin_memory=device.type == "cuda")
        torch.manual_seed(derive_seed(cfg.seed, "weights"))  # the same initial weights as ours
        self.model = build_model(cfg.model.name, num_classes=data.num_classes, in_channels=data.in_channels,
                                 **cfg.model.build_kwargs(tc.dropout)).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=tc.lr)

    def epoch(self) -> tuple[int, float]:
        import torch
        import torch.nn.functional as F

        self.model.train()
        seen, running_loss = 0, 0.0
        start = time.perf_counter()
        for x, y in self.loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            loss = F.cross_entropy(self.model(x), y)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            running_loss += loss.item()
            seen += len(y)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return seen, time.perf_counter() - start


def trial_config(model: str, images: int, batch: int, epochs: int, device: str, threads: int | None,
                 compile_model: bool) -> Any:
    from resnet_lab.spec import TrialConfig

    return TrialConfig.model_validate({
        "dataset": {"name": "synthetic", "augment": True, "val_fraction": 0.05,
                    "synthetic": {"train_size": images, "test_size": 64, "channels": 3, "image_size": 32,
                                  "num_classes": 10}},
        "model": MODELS[model],
        "trainer": {"recipe": "paper", "optimizer": "adam", "lr": LR, "batch_size": batch, "epochs": epochs,
                    "schedule": "none", "early_stopping_patience": 0, "device": device, "threads": threads,
                    "compile": compile_model},
    })


def load(cfg: Any, device: Any) -> Any:
    """The synthetic images on the device; validation and test cut to 64 images (their pass is not timed)."""
    from resnet_lab.data import load_data

    data = load_data(cfg.dataset, device)
    small = (data.val[0][:64], data.val[1][:64])
    return dataclasses.replace(data, val=small, test=small)


def bench_model(model: str, sizes: tuple[int, int, int], device: str, threads: int, workers: int,
                compile_model: bool) -> dict[str, Any]:
    """Alternate epochs of ours and the reference; returns the per-epoch img/s of both (warm-up dropped)."""
    import torch

    from resnet_lab.trainer import fit

    images, batch, timed = sizes
    cfg = trial_config(model, images, batch, timed + 1, device, threads if device == "cpu" else None, compile_model)
    dev = torch.device(device)
    data = load(cfg, dev)
    torch.set_num_threads(threads)
    reference = Reference(cfg, data, dev, workers)
    ours_rates: list[float] = []
    ref_rates: list[float] = []

    def after_our_epoch(epoch: Any) -> None:
        ours_rates.append(epoch.metrics["throughput_img_s"])
        seen, seconds = reference.epoch()
        ref_rates.append(seen / seconds)
        print(f"  {model} epoch {epoch.epoch}: ours {ours_rates[-1]:,.0f} img/s, reference {ref_rates[-1]:,.0f} "
              f"img/s", flush=True)

    start = time.perf_counter()
    result = fit(cfg, after_our_epoch, data=data)
    wall = time.perf_counter() - start
    n_train = len(data.train[1])
    warm_ours = n_train / ours_rates[0]
    return {"model": model, "params": result.params, "images": n_train, "batch": batch, "ours": ours_rates[1:],
            "ref": ref_rates[1:], "first_epoch_ours_s": warm_ours,
            "steady_epoch_ours_s": n_train / median(ours_rates[1:]), "wall_s": wall}


def bench_data(device: str, threads: int, workers: int, images: int, batch: int, reps: int) -> list[list[str]]:
    """Data pipeline alone (no model): our DeviceLoader vs the reference DataLoader, img/s, interleaved."""
    import torch

    from resnet_lab.data import Augment, DeviceLoader

    cfg = trial_config("baseline_cnn", images, batch, 1, device, None, False)
    dev = torch.device(device)
    data = load(cfg, dev)
    torch.set_num_threads(threads)
    reference = Reference(cfg, data, dev, workers)
    ours_loader = DeviceLoader(*data.train, batch, mean=data.mean, std=data.std, shuffle=True, drop_last=True,
                               augment=Augment(crop=True, flip=True),
                               order_generator=torch.Generator(dev).manual_seed(0),
                               augment_generator=torch.Generator(dev).manual_seed(1))
    ours, ref = [], []
    for _ in range(reps + 1):
        for loader, out in ((ours_loader, ours), (reference.loader, ref)):
            seen, start = 0, time.perf_counter()
            for x, y in loader:
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                seen += len(y)
            if device == "cuda":
                torch.cuda.synchronize()
            out.append(seen / (time.perf_counter() - start))
    o, r = median(ours[1:]), median(ref[1:])
    return [[f"data only ({len(data.train[1])} images, batch {batch})", f"{o:,.0f}", f"{r:,.0f}", f"{o / r:.1f}x"]]


def main() -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--models", default="baseline_cnn,resnet18",
                   help=f"comma-separated, from {', '.join(MODELS)} (default: baseline_cnn,resnet18)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for both (default: all)")
    p.add_argument("--workers", type=int, default=2, help="reference DataLoader workers (default 2)")
    p.add_argument("--compile", action="store_true", help="torch.compile our model (compile time reported)")
    args = p.parse_args()
    device = resolve_device(args.device)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        sys.exit(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    print(machine_line(device))
    print(f"device {device}, torch threads {args.threads}, reference DataLoader workers {args.workers}, "
          f"compile {args.compile}\n", flush=True)

    rows, goal = [], 3.0 if device == "cuda" else 1.5
    results = []
    for model in models:
        r = bench_model(model, SIZES[(device, args.quick)][model], device, args.threads, args.workers, args.compile)
        results.append(r)
        ours, ref = median(r["ours"]), median(r["ref"])
        # Each timed epoch of ours is paired with the reference epoch right after it: the median of the pair
        # ratios is what a burst of load on a shared machine disturbs least.
        pairs = [o / f for o, f in zip(r["ours"], r["ref"], strict=True)]
        rows.append([model, f"{r['params'] / 1e6:.2f}M", r["images"], r["batch"], len(pairs), f"{ours:,.0f}",
                     f"{ref:,.0f}", f"{median(pairs):.2f}x", f"{min(pairs):.2f}-{max(pairs):.2f}",
                     "yes" if median(pairs) >= goal else "no"])
    show(f"train_throughput ({device}): img/s over whole training epochs, medians over timed epochs "
         f"(goal >= {goal:g}x)",
         ["model", "params", "train images", "batch", "epoch pairs", "ours img/s", "reference img/s",
          "ratio (median of pairs)", "pair range", "goal met"], rows)
    if args.compile or device == "cuda":
        show("first-epoch cost (ours): warm-up epoch vs a steady epoch; with --compile the difference is compile "
             "time", ["model", "first epoch s", "steady epoch s", "difference s"],
             [[r["model"], f"{r['first_epoch_ours_s']:.1f}", f"{r['steady_epoch_ours_s']:.1f}",
               f"{r['first_epoch_ours_s'] - r['steady_epoch_ours_s']:.1f}"] for r in results])
    images, batch, _ = SIZES[(device, args.quick)]["baseline_cnn"]
    show("data pipeline alone (augment + normalize, no model), median of 3 interleaved epochs",
         ["pipeline", "ours img/s", "reference img/s", "ratio"],
         bench_data(device, args.threads, args.workers, images, batch, reps=3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
