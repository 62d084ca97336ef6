"""LoRA adapters on aigc's own families (``model.lora``), through Hugging Face PEFT.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") replaces a layer's
``W x`` by ``W x + (alpha / r) B A x`` with ``A`` (r, in) and ``B`` (out, r); ``B`` starts at zero, so
the adapted model is its base at step 0, and only ``A`` and ``B`` train. PEFT's
``inject_adapter_in_model`` does this on any ``nn.Module`` (Linear, Conv2d and Embedding layers): the
base layer's weights move to ``<layer>.base_layer.*`` and the adapter's are ``<layer>.lora_A.default.*``
and ``<layer>.lora_B.default.*``.

A family names the nets that take adapters and their default target layers
(``GenerativeModule.lora_targets``) and the EMA copies that follow them (``ema_nets``); the EMA
copies are rebuilt from the adapted nets, so the EMA holds the adapters' average too. Everything
that is not an adapter is frozen: it is the base model's, loaded from ``aigc train --init-from``
(:mod:`aigc.models.init`), and the module's ``base_weight_keys`` leave it out of checkpoints and
exports (the adapter's checkpoint is a few percent of the model's).
"""

from __future__ import annotations

import copy
import re
from typing import Any

from aigc.config import ConfigError

#: the marker of every adapter tensor's name (PEFT's ``lora_A``, ``lora_B``, ``lora_embedding_A``...)
ADAPTER_MARK = "lora_"
_BASE_LAYER = re.compile(r"\.base_layer(?=\.)")


def is_adapter_key(key: str) -> bool:
    return ADAPTER_MARK in key


def base_key(key: str) -> str:
    """The name a base weight had before PEFT wrapped its layer: ``unet.q.base_layer.weight`` ->
    ``unet.q.weight`` (what the base model's export calls it)."""
    return _BASE_LAYER.sub("", key)


def apply_lora(module: Any, cfg: Any) -> None:
    """Freeze ``module`` and add the adapters ``cfg`` (a :class:`~aigc.config.LoraConfig`) asks for
    to each net in ``module.lora_targets``; then rebuild the EMA copies from the adapted nets."""
    from peft import LoraConfig, inject_adapter_in_model

    module.requires_grad_(False)
    injected = 0
    for net_name, default in module.lora_targets.items():
        net = getattr(module, net_name)
        if net is None:
            continue
        targets = list(cfg.targets or default)
        matched = [n for n, _ in net.named_modules() if any(n == t or n.endswith(f".{t}") for t in targets)]
        if not matched:
            continue  # none of this net's layers is a target (PEFT would raise): the net stays frozen
        _refuse_fused_layers(net, matched, net_name)
        peft_cfg = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
            target_modules=targets,
            lora_dropout=cfg.dropout,
        )
        inject_adapter_in_model(peft_cfg, net)
        injected += 1
    if injected == 0:
        layers = sorted(
            {n.rsplit(".", 1)[-1] for net in module.lora_targets for n, _ in _modules(module, net)}
        )
        raise ConfigError(
            f"model.lora.targets: {cfg.targets} names no layer of the {module.family} model's nets "
            f"({', '.join(module.lora_targets)}); its layers' names end with: {', '.join(layers[:40])}"
        )
    for ema_name, live_name in module.ema_nets.items():
        setattr(module, ema_name, copy.deepcopy(getattr(module, live_name)).requires_grad_(False))


def _refuse_fused_layers(net: Any, matched: list[str], net_name: str) -> None:
    """PyTorch's ``nn.TransformerEncoderLayer`` (the text encoder's blocks) runs a fused kernel in eval
    mode that reads ``linear1.weight``/``linear2.weight`` directly: an adapter there would train but
    be skipped when the model generates. Refuse such targets rather than train a silent no-op."""
    import torch.nn as nn

    fused = [
        n
        for n in matched
        if isinstance(
            net.get_submodule(n.rsplit(".", 1)[0]) if "." in n else net,
            (nn.TransformerEncoderLayer, nn.MultiheadAttention),
        )
    ]
    if fused:
        raise ConfigError(
            f"model.lora.targets: {', '.join(f'{net_name}.{n}' for n in fused)} are layers of PyTorch's "
            "fused TransformerEncoderLayer, whose inference path bypasses adapters; target other layers"
        )


def _modules(module: Any, net_name: str):
    net = getattr(module, net_name, None)
    return [] if net is None else [(n, m) for n, m in net.named_modules() if n]


def merged_module(module: Any) -> Any:
    """A copy of LoRA ``module`` without adapters: each adapted layer's ``W + (alpha / r) B A`` folded
    into its weight (PEFT's ``merge``; the EMA copies' too), as a module of the same family whose
    ``model.lora`` is unset, so its export stands alone (``aigc export --merge``)."""
    from peft.tuners.lora import LoraLayer

    work = copy.deepcopy(module)
    for layer in work.modules():
        if isinstance(layer, LoraLayer):
            layer.merge()
    state = {base_key(k): v for k, v in work.state_dict().items() if not is_adapter_key(k)}
    hp = dict(module.hparams)
    hp["model"] = dict(hp["model"], lora=None)
    plain = type(module)(**hp)
    plain.load_state_dict(state)
    return plain.to(next(module.parameters()).device).eval()
