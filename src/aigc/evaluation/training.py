"""Training the evaluator's networks on a dataset's train split (in memory, a fixed number of steps).

Everything is seeded from ``EvaluatorConfig.seed`` through local generators, so training does not
disturb (or depend on) the caller's global RNG state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from aigc.evaluation.data import SplitData
from aigc.evaluation.nets import DualEncoder, EvaluatorConfig, ImageClassifier, clip_loss
from aigc.models.text import Tokenizer

Progress = Callable[[str], None]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of ``(B, C, H, W)`` by up to ``max_shift`` pixels (edge padding)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    s = max_shift
    padded = F.pad(x, (s, s, s, s), mode="replicate")  # (B, C, H+2s, W+2s)
    dy = torch.randint(0, 2 * s + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * s + 1, (b,), generator=generator)
    rows = dy[:, None] + torch.arange(h)  # (B, H)
    cols = dx[:, None] + torch.arange(w)  # (B, W)
    out = padded[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` index batches, epoch by epoch over shuffled ``range(n)``; drops short tails."""
    batch_size = min(batch_size, n)
    done = 0
    while done < steps:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            if done == steps:
                return
            yield perm[i : i + batch_size]
            done += 1


def _optimizer(params, cfg: EvaluatorConfig, steps: int):
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:  # linear warm-up, cosine decay to 0
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def shift_for(cfg: EvaluatorConfig) -> int:
    """Augmentation shift in pixels: ``max_shift`` at 8x8, scaled with the image size above 32 px."""
    return cfg.max_shift * max(1, cfg.image_size // 32)


def train_dual_encoder(
    cfg: EvaluatorConfig, tokenizer: Tokenizer, train: SplitData, progress: Progress | None = None
) -> DualEncoder:
    """Contrastive training (symmetric InfoNCE) on the train image-caption pairs."""
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = DualEncoder(cfg, len(tokenizer))
    ids, mask = tokenizer.encode(train.captions, cfg.max_tokens)  # (N, T) each
    opt, sched = _optimizer(model.parameters(), cfg, cfg.clip_steps)
    model.train()
    for step, idx in enumerate(_batches(len(train), cfg.batch_size, cfg.clip_steps, g)):
        x = random_shift(to_float(train.images[idx]), shift_for(cfg), g)
        img = model.image_embeddings(model.image_features(x))  # (B, E)
        # Encode each distinct caption once (template captions repeat a lot), trimmed to the
        # longest one: (U, T') -> (U, E), then gathered back to (B, E).
        captions = [train.captions[i] for i in idx.tolist()]
        uniq = {c: i for i, c in enumerate(dict.fromkeys(captions))}
        first = torch.tensor([idx[captions.index(c)] for c in uniq])
        t = int(mask[first].sum(1).max())
        txt = model.text_embeddings(ids[first, :t], mask[first, :t])[[uniq[c] for c in captions]]
        loss = clip_loss(img, txt, model.logit_scale, captions)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress and (step % 100 == 0 or step == cfg.clip_steps - 1):
            progress(f"dual encoder step {step + 1}/{cfg.clip_steps}: loss {loss.item():.3f}")
    return model.eval()


def train_classifier(
    cfg: EvaluatorConfig, train: SplitData, progress: Progress | None = None
) -> ImageClassifier:
    """Cross-entropy training of the label classifier (needs ``train.labels``)."""
    if train.labels is None:
        raise ValueError("train_classifier needs labels")
    g = torch.Generator().manual_seed(cfg.seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        model = ImageClassifier(cfg)
    opt, sched = _optimizer(model.parameters(), cfg, cfg.classifier_steps)
    model.train()
    for step, idx in enumerate(_batches(len(train), cfg.batch_size, cfg.classifier_steps, g)):
        x = random_shift(to_float(train.images[idx]), shift_for(cfg), g)
        loss = F.cross_entropy(model(x), train.labels[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress and (step % 100 == 0 or step == cfg.classifier_steps - 1):
            progress(f"classifier step {step + 1}/{cfg.classifier_steps}: loss {loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def accuracy(model: ImageClassifier, data: SplitData, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` on a labelled split."""
    if data.labels is None:
        raise ValueError("accuracy needs labels")
    correct = 0
    for i in range(0, len(data), batch_size):
        pred = model(to_float(data.images[i : i + batch_size])).argmax(1)
        correct += int((pred == data.labels[i : i + batch_size]).sum())
    return correct / len(data)
