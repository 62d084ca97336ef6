"""Training throughput per family at 32 and 64 px RGB: samples/s, model FLOPs per sample, FLOP/s.

Each ``models/<family>-rgb<size>.yaml`` is built as shipped (``--batch-size`` and ``--set`` change it)
and trained by the project's own Lightning Trainer (``aigc.training.trainer.build_trainer``, one
device, no validation) on **random data of the config's shape**: one fixed batch of
``(B, 3, S, S)`` images in [-1, 1] with emoji-like captions, already on the device. So the figure
is the model's (forward, backward, optimiser, EMA, Lightning's loop), not the loader's.

Per config: ``--warmup`` batches are left out of the timing; the first of them runs under
``torch.utils.flop_counter.FlopCounterMode``, which counts the matmul, convolution and attention
FLOPs of the whole training step (forward and backward of every net it runs: for the GAN its
``d_steps`` discriminator updates and the generator update) divided by the batch size. Counted
FLOPs do not depend on the device or the precision, so ``achieved_tflop_per_s = samples_per_s x
gflop_per_sample / 1000`` compares a CPU in fp32 with a GPU in bf16. The next ``--steps`` batches
are timed (CUDA synchronised at both ends). Prints one JSON object; ``skipped`` lists the
(family, size) pairs asked for that have no config (the autoregressive family at 64 px).

Model FLOPs utilisation (``mfu``) is ``achieved_tflop_per_s`` over the device's dense peak at the
run's precision: ``--peak-tflop-per-s``, else ``PEAK_TFLOP_PER_S`` for a GPU whose name it knows
(null otherwise, and on the CPU).

    .venv/bin/python benchmarks/throughput.py                       # CPU, 1 thread, every rgb config
    .venv/bin/python benchmarks/throughput.py --families diffusion --sizes 32 --steps 5
    python benchmarks/throughput.py --device cuda --steps 50         # bf16-mixed by default on CUDA
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path
from typing import Any

from aigc.config import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
CPU_BATCH = 8  # default batch size on the CPU (see main)
# Captions shaped like the OpenMoji ones (lower-cased Unicode names, 1 to 11 words), so the text
# encoder runs on realistic lengths.
CAPTIONS = [
    "hot beverage",
    "grinning face with big eyes",
    "face with stuck-out tongue and tightly-closed eyes",
    "red apple",
    "smiling face with smiling eyes and hand covering mouth",
    "rocket",
    "black right-pointing double triangle with vertical bar",
    "cat face with wry smile",
]


# Dense (no sparsity) tensor-core peaks from NVIDIA's data sheets, TFLOP/s, by a word of the device
# name and the trainer precision. H100 SXM and H200 share the chip and its clocks: 989.4 bf16/fp16
# dense (the sheets' 1,979 counts 2:4 sparsity). The H200 lent to this project ran an 8192^3 bf16
# matmul at about 790 TFLOP/s, so an MFU near 0.8 is the ceiling of one large matmul there.
PEAK_TFLOP_PER_S = {
    # No "32": whether fp32 matmuls use TF32 tensor cores (494.7) or not (66.9) is torch's setting.
    "H200": {"bf16-mixed": 989.4, "16-mixed": 989.4},
    "H100": {"bf16-mixed": 989.4, "16-mixed": 989.4},
}


def peak_tflop_per_s(device_name: str, precision: str) -> float | None:
    """The dense peak of a GPU this file knows (by a word of its name) at ``precision``, else None."""
    for word, peaks in PEAK_TFLOP_PER_S.items():
        if word in device_name:
            return peaks.get(precision)
    return None


def rgb_configs() -> dict[tuple[str, int], Path]:
    """(family, image size) -> its shipped ``models/<family>-rgb<size>.yaml``."""
    out = {}
    for path in sorted(MODELS.glob("*-rgb*.yaml")):
        family, _, size = path.stem.rpartition("-rgb")
        if size.isdigit():
            out[(family, int(size))] = path
    return out


def register_cpu_attention_flops() -> None:
    """Teach FlopCounterMode the CPU flash-attention kernels (torch 2.13 counts only the CUDA ones),
    with the same formulas as the CUDA kernels: 4·B·H·Sq·Sk·D forward, 2.5× that backward."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in fc.flop_registry:

        @fc.register_flop_formula(fwd)
        def _fwd(q_shape, k_shape, v_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
            return fc.sdpa_flop_count(q_shape, k_shape, v_shape)

    if bwd is not None and bwd not in fc.flop_registry:

        @fc.register_flop_formula(bwd)
        def _bwd(grad_shape, q_shape, k_shape, v_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
            return fc.sdpa_backward_flop_count(grad_shape, q_shape, k_shape, v_shape)


def _measure_callback(warmup: int, total: int, device: Any):
    """A callback counting the FLOPs of batch 0 and timing batches ``warmup .. total - 1``."""
    import pytorch_lightning as pl
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    class Measure(pl.Callback):
        def __init__(self) -> None:
            self.counter: FlopCounterMode | None = None
            self.flops = 0
            self.start: float | None = None
            self.end: float | None = None
            self.cpu_start = self.cpu_end = 0.0

        def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
            if batch_idx == 0:  # entered before Lightning's autocast and left after it: LIFO holds
                self.counter = FlopCounterMode(display=False)
                self.counter.__enter__()
            if batch_idx == warmup:
                sync()
                self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
            if batch_idx == 0 and self.counter is not None:
                self.counter.__exit__(None, None, None)
                self.flops = self.counter.get_total_flops()
            if batch_idx == total - 1:
                sync()
                self.end, self.cpu_end = time.perf_counter(), time.process_time()

    return Measure()


def measure(
    family: str,
    size: int,
    path: Path,
    device: Any,
    precision: str,
    steps: int,
    warmup: int,
    batch_size: int | None,
    overrides: list[str],
) -> dict[str, Any]:
    """Samples/s, FLOPs/sample and parameters of one config's training step on ``device``."""
    import torch
    from torch.utils.data import DataLoader

    from aigc.config import lightning_precision, load_config
    from aigc.models import build_module
    from aigc.models.text import Tokenizer
    from aigc.training.trainer import build_trainer

    cfg = load_config(path, overrides)
    if batch_size is not None:
        cfg.data.batch_size = batch_size
    cfg.trainer.precision = precision
    b, c = cfg.data.batch_size, cfg.data.channels
    torch.manual_seed(cfg.trainer.seed)
    module = build_module(cfg, Tokenizer.build(CAPTIONS), cfg.data.image_size, c)
    params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(b, c, size, size, generator=g) * 2 - 1).to(device)  # (B, C, S, S) in [-1, 1]
    batch = {
        "image": images,
        "caption": [CAPTIONS[i % len(CAPTIONS)] for i in range(b)],
        "valid": torch.ones(b, dtype=torch.bool, device=device),
    }
    total = warmup + steps
    # batch_size=None: the loader hands over the same prepared batch ``total`` times, no collation.
    loader = DataLoader([batch] * total, batch_size=None, shuffle=False, num_workers=0)
    timer = _measure_callback(warmup, total, device)
    use_gpu = device.type == "cuda"
    trainer = build_trainer(
        module,
        use_gpu=use_gpu,
        callbacks=[timer],
        max_steps=-1,
        max_epochs=1,
        limit_val_batches=0,
        log_every_n_steps=max(1, total),
    )
    trainer.fit(module, train_dataloaders=loader)
    seconds = timer.end - timer.start
    samples_per_s = steps * b / seconds
    flop_per_sample = timer.flops / b
    return {
        "family": family,
        "image_size": size,
        "config": str(path.relative_to(ROOT)),
        "batch_size": b,
        "params": params,
        "precision": lightning_precision(precision, use_gpu),
        "seconds_per_step": round(seconds / steps, 4),
        # CPU seconds of this process per step: on a shared machine the steadier CPU figure (with
        # one thread it is the step's compute, whatever else runs); meaningless for a GPU.
        "cpu_seconds_per_step": None if use_gpu else round((timer.cpu_end - timer.cpu_start) / steps, 4),
        "samples_per_s": round(samples_per_s, 2),
        "gflop_per_sample": round(flop_per_sample / 1e9, 3),
        "achieved_tflop_per_s": round(samples_per_s * flop_per_sample / 1e12, 4),
    }


def cpu_name() -> str:
    """The CPU's model name (Linux), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument(
        "--families",
        nargs="+",
        choices=FAMILIES,
        default=None,
        help="default: every family with an rgb config",
    )
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 64])
    p.add_argument("--steps", type=int, default=None, help="timed batches (default 3 on CPU, 30 on CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed batches first (default 1 CPU, 3 CUDA)")
    p.add_argument(
        "--batch-size",
        default=None,
        help=f"int, or 'config' (each config's data.batch_size); default {CPU_BATCH} on CPU, config on CUDA",
    )
    p.add_argument(
        "--precision",
        choices=["32", "bf16-mixed", "16-mixed"],
        default=None,
        help="trainer.precision (default bf16-mixed on CUDA; the CPU trains in 32-bit)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    p.add_argument(
        "--peak-tflop-per-s",
        type=float,
        default=None,
        help="the device's dense peak at this precision, for mfu (default: PEAK_TFLOP_PER_S by GPU name)",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE config override")
    a = p.parse_args()
    if (a.warmup is not None and a.warmup < 1) or (a.steps is not None and a.steps < 1):
        p.error("--warmup and --steps must be >= 1")
    if a.batch_size not in (None, "config") and not (a.batch_size.isdigit() and int(a.batch_size) > 0):
        p.error(f"--batch-size must be a positive int or 'config', got {a.batch_size!r}")

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    register_cpu_attention_flops()
    on_gpu = (a.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if on_gpu and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    device = torch.device("cuda" if on_gpu else "cpu")
    precision = a.precision or ("bf16-mixed" if on_gpu else "32")
    steps = a.steps or (30 if on_gpu else 3)
    warmup = a.warmup or (3 if on_gpu else 1)  # CUDA: the allocator and cuDNN's autotuning settle first
    # The CPU default is a small batch so that the default run stays near 3 minutes on 2 cores (a CPU's
    # samples/s depends little on the batch size); a GPU's does, so there each config's own size counts.
    batch = a.batch_size or ("config" if on_gpu else str(CPU_BATCH))
    batch_size = None if batch == "config" else int(batch)

    configs = rgb_configs()
    families = a.families or [f for f in FAMILIES if any(k[0] == f for k in configs)]
    results, skipped = [], []
    for family in families:
        for size in a.sizes:
            path = configs.get((family, size))
            if path is None:
                reason = f"no models/{family}-rgb{size}.yaml"
                skipped.append({"family": family, "image_size": size, "reason": reason})
                continue
            results.append(
                measure(family, size, path, device, precision, steps, warmup, batch_size, a.overrides)
            )

    device_name = torch.cuda.get_device_name(device) if on_gpu else f"cpu: {cpu_name()}"
    peak = a.peak_tflop_per_s or (peak_tflop_per_s(device_name, precision) if on_gpu else None)
    for r in results:
        r["mfu"] = None if not peak else round(r["achieved_tflop_per_s"] / peak, 4)
    report = {
        "benchmark": "throughput",
        "device": device_name,
        "peak_tflop_per_s": peak,
        "torch": torch.__version__,
        "threads": None if on_gpu else torch.get_num_threads(),
        "data": "one random batch of each config's shape, on the device: measures the model, not the loader",
        "flops": "FlopCounterMode over one training step (forward + backward), divided by the batch size",
        "warmup_steps_skipped": warmup,
        "steps": steps,
        "overrides": a.overrides,
        "results": results,
        "skipped": skipped,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
