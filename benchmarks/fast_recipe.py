"""Time a `fast`-recipe run: resnet18 on synthetic CIFAR-shaped data (3x32x32, 10 classes) for a fixed number of
epochs through `fit()`, the trainer every trial runs. Prints each epoch's wall time and img/s, the first epoch
(cudnn autotuning, and compilation with --compile) apart from the steady ones, and the total.

No baseline of its own: `train_throughput.py` compares against the reference loop; this is the absolute time a
researcher can plan with (the GPU check of issue 7, run by `gpu_check.sh`).

    python benchmarks/fast_recipe.py [--quick] [--device cpu|cuda] [--epochs N] [--images N] [--compile]
"""

from __future__ import annotations

import sys
import time
from typing import Any

from _common import machine_line, median, parser, resolve_device, show


def main() -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=None, help="epochs (default 10; --quick 2)")
    p.add_argument("--images", type=int, default=None, help="training images (default 50,000; --quick 512)")
    p.add_argument("--model", default="resnet18", choices=("resnet18", "baseline_cnn"))
    p.add_argument("--compile", action="store_true", help="torch.compile the model (trainer.compile)")
    args = p.parse_args()
    device = resolve_device(args.device)
    epochs = args.epochs or (2 if args.quick else 10)
    images = args.images or (512 if args.quick else 50_000)
    print(machine_line(device))

    from resnet_lab.spec import TrialConfig
    from resnet_lab.trainer import fit

    model: dict[str, Any] = {"name": "resnet", "depth": 18} if args.model == "resnet18" else {"name": "baseline_cnn"}
    cfg = TrialConfig.model_validate({
        "dataset": {"name": "synthetic", "val_fraction": 0.1,
                    "synthetic": {"train_size": images, "test_size": max(64, images // 5), "image_size": 32}},
        "model": model,
        "trainer": {"recipe": "fast", "epochs": epochs, "early_stopping_patience": 0, "device": device,
                    "compile": args.compile},
    })
    tc = cfg.trainer.resolved()
    print(f"{args.model}, fast recipe ({tc.optimizer}, {tc.schedule}, batch {tc.batch_size}, bf16 autocast "
          f"{'on' if tc.amp and device == 'cuda' else 'off'}, channels_last {tc.channels_last}, compile "
          f"{tc.compile}), {images:,} synthetic 3x32x32 images "
          f"({cfg.dataset.val_fraction:.0%} held out for validation), {epochs} epochs on {device}\n", flush=True)
    rows: list[list[Any]] = []
    start = time.perf_counter()
    result = fit(cfg, lambda e: rows.append([e.epoch, f"{e.metrics['epoch_time_s']:.2f}",
                                             f"{e.metrics['throughput_img_s']:,.0f}",
                                             f"{e.metrics['train/loss']:.3f}", f"{e.metrics['val/acc']:.3f}"]))
    total = time.perf_counter() - start
    show("epochs (epoch s: train + validation; img/s: training only)",
         ["epoch", "epoch s", "train img/s", "train/loss", "val/acc"], rows)
    steady = [float(r[1]) for r in rows[1:]]
    first = float(rows[0][1])
    print(f"fit() total {total:.1f} s for {len(rows)} epochs ({result.status}); first epoch {first:.2f} s, "
          f"steady epochs median {median(steady):.2f} s, first minus steady {first - median(steady):.2f} s "
          f"(data to the device, autotuning{', compilation' if args.compile else ''}); "
          f"test/acc {result.metrics['test/acc']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
