"""The autoencoder family (aigc.models.nets.autoencoder, aigc.models.autoencoder): shapes, the
latent/token contract latent families rely on, the VQ and KL maths, that it learns to reconstruct
real digits, config errors, export round trip, generate, and evaluation by reconstruction."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aigc.config import AutoencoderConfig, ConfigError, load_config
from aigc.models import build_module
from aigc.models.autoencoder import AutoencoderModule, latent_scale, psnr
from aigc.models.nets.autoencoder import Autoencoder, autoencoder_net, kl_divergence
from aigc.models.text import Tokenizer, build_text_encoder

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"base_channels": 8, "text": {"dim": 8, "layers": 0, "heads": 1}}


def _net(kind: str, size: int, channels: int, **model) -> Autoencoder:
    mults = {8: [1, 2], 32: [1, 2, 2], 64: [1, 2, 2, 2]}[size]
    return autoencoder_net({"kind": kind, "channel_mults": mults, **SMALL, **model}, size, channels)


def _images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """sklearn's 8x8 digits as (N, 1, 8, 8) in [-1, 1] (values 0..16)."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images, dtype=torch.float32)[:, None]
    return x / 8.0 - 1.0


# ------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("kind", ["kl", "vq"])
@pytest.mark.parametrize(("size", "channels"), [(8, 1), (8, 3), (32, 1), (32, 3), (64, 3)])
def test_shapes_and_contract(kind: str, size: int, channels: int) -> None:
    torch.manual_seed(0)
    net = _net(kind, size, channels, codebook_size=16).eval()
    x = _images(2, channels, size)
    h = size // {8: 2, 32: 4, 64: 8}[size]
    assert net.kind == kind and net.latent_shape == (4, h, h)
    z = net.latents(x)
    assert z.shape == (2, 4, h, h)
    assert torch.equal(z, net.latents(x))  # deterministic
    assert net.decode(z).shape == (2, channels, size, size)
    recon, aux, _ = net(x, sample=False)
    assert recon.shape == x.shape
    if kind == "kl":
        assert net.codebook_size is None and aux.shape == (2,)
        with pytest.raises(ValueError, match="vq"):
            net.tokens(x)
        with pytest.raises(ValueError, match="vq"):
            net.decode_tokens(torch.zeros(2, h, h, dtype=torch.long))
        assert torch.allclose(recon, net.decode(z))  # forward without sampling decodes the mean
    else:
        codes = net.tokens(x)
        assert net.codebook_size == 16
        assert codes.shape == (2, h, h) and codes.dtype == torch.long
        assert int(codes.min()) >= 0 and int(codes.max()) < 16
        # latents are exactly the code vectors of tokens, and decode_tokens == decode(latents)
        assert torch.equal(z, net.quantizer.codebook[codes].permute(0, 3, 1, 2))
        assert torch.allclose(net.decode_tokens(codes), net.decode(z))
        with torch.no_grad():  # no straight-through arithmetic without gradients: exactly decode(e)
            assert torch.allclose(net(x, sample=False)[0], net.decode(z), atol=1e-6)
        with pytest.raises(ValueError, match=r"\[0, 16\)"):
            net.decode_tokens(torch.full((1, h, h), 16))


def test_bad_shapes_are_clear_errors() -> None:
    net = _net("kl", 8, 1)
    with pytest.raises(ValueError, match=r"images must be \(B, 1, 8, 8\)"):
        net.latents(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"latents must be \(B, 4, 4, 4\)"):
        net.decode(torch.zeros(2, 4, 2, 2))


def test_mid_attention_only_on_small_latent_grids() -> None:
    from aigc.models.nets.autoencoder import SelfAttention

    def has_attention(net: Autoencoder) -> bool:
        return any(isinstance(m, SelfAttention) for m in net.modules())

    assert has_attention(_net("kl", 32, 3))  # 8x8 latents
    assert not has_attention(autoencoder_net({**SMALL, "channel_mults": [1, 2]}, 32, 3))  # 16x16


# --------------------------------------------------------------------------------------- maths
def test_kl_matches_the_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    kl = kl_divergence(mean, logvar)
    # KL(N(m, s^2) || N(0, 1)) = log(1/s) + (s^2 + m^2)/2 - 1/2, per dimension, summed per image
    s = torch.exp(0.5 * logvar)
    expected = (torch.log(1 / s) + (s**2 + mean**2) / 2 - 0.5).flatten(1).sum(1)
    assert torch.allclose(kl, expected, atol=1e-5)
    assert torch.allclose(kl_divergence(torch.zeros(2, 4), torch.zeros(2, 4)), torch.zeros(2))
    # Monte Carlo: E_q[log q(z) - log p(z)] for one dimension
    m, sd = 0.7, 0.5
    z = m + sd * torch.randn(400_000, generator=g, dtype=torch.float64)
    mc = (-0.5 * ((z - m) / sd) ** 2 - math.log(sd) + 0.5 * z**2).mean()
    closed = kl_divergence(torch.tensor([[m]]), torch.tensor([[2 * math.log(sd)]])).item()
    assert float(mc) == pytest.approx(closed, abs=5e-3)


def test_vq_straight_through_gradient_reaches_the_encoder() -> None:
    net = _net("vq", 8, 1, codebook_size=16).train()
    x = _images(4, 1, 8)
    recon, commitment, info = net(x)
    (F.mse_loss(recon, x) + 0.25 * commitment).backward()
    first = net.encoder.conv_in.weight.grad
    assert first is not None and float(first.abs().sum()) > 0
    assert all(not isinstance(p, torch.nn.Parameter) for p in net.quantizer.buffers())
    assert not list(net.quantizer.parameters())  # the codebook moves by EMA, not by the optimiser
    assert 0 < float(info["usage"]) <= 1 and 1 <= float(info["perplexity"]) <= 16


def test_vq_ema_moves_codes_to_the_mean_of_their_assignments() -> None:
    from aigc.models.nets.autoencoder import VectorQuantizer

    q = VectorQuantizer(codebook_size=2, dim=1, decay=0.5, restart_below=0.0).train()
    q.initialized.fill_(True)
    q.codebook.copy_(torch.tensor([[-1.0], [1.0]]))
    q.ema_sum.copy_(q.codebook)
    q.ema_count.fill_(1.0)
    z = torch.tensor([-3.0, -3.0, 2.0, 2.0]).view(1, 1, 2, 2)  # (B, c, h, w)
    for _ in range(30):
        q(z)
    assert torch.allclose(q.codebook.flatten(), torch.tensor([-3.0, 2.0]), atol=1e-3)


def test_dead_codes_are_restarted_at_encoder_outputs() -> None:
    from aigc.models.nets.autoencoder import VectorQuantizer

    q = VectorQuantizer(codebook_size=4, dim=2, decay=0.5, restart_below=0.1).train()
    z = torch.zeros(1, 2, 2, 2)
    z[0, :, 0, 0] = 5.0
    q(z)  # initialises from the batch
    q.codebook[3] = 100.0  # far away: never chosen
    q.ema_sum[3] = 100.0
    for _ in range(6):
        q(z)
    assert float(q.codebook[3].abs().max()) <= 5.0 + 1e-4  # restarted on one of the z vectors


def test_latent_scale_gives_unit_variance() -> None:
    z = 3.0 * torch.randn(64, 4, 4, 4, generator=torch.Generator().manual_seed(0)) + 1.0
    s = latent_scale(z)
    assert s == pytest.approx(1 / 3.0, rel=0.02)
    assert float((z * s).std()) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="std"):
        latent_scale(torch.ones(4, 4))
    assert psnr(0.01) == pytest.approx(10 * math.log10(4 / 0.01))


# ------------------------------------------------------------------------------------ learning
def _module(kind: str, **model) -> AutoencoderModule:
    cfg = load_config(ROOT / "models" / f"autoencoder-{kind}.yaml")
    m = cfg.model.model_dump(mode="json") | model
    return AutoencoderModule(
        model=m,
        tokenizer=Tokenizer.build(["a digit"]).to_dict(),
        image_size=8,
        channels=1,
        trainer=cfg.trainer.model_dump(mode="json"),
    )


def _recon_mse(module: AutoencoderModule, x: torch.Tensor) -> float:
    return float(F.mse_loss(module.reconstruct(x).float() / 127.5 - 1, x))


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_training_on_digits_makes_reconstruction_error_fall(kind: str, digits: torch.Tensor) -> None:
    torch.manual_seed(0)
    module = _module(kind, base_channels=8)
    train, val = digits[:1500], digits[1500:]
    before = _recon_mse(module, val)
    opt = torch.optim.AdamW((p for p in module.parameters() if p.requires_grad), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    logged: dict[str, float] = {}
    module.log = lambda key, value, **_: logged.__setitem__(key, float(value.detach()))  # no Trainer
    for step in range(120):
        batch = {"image": train[torch.randint(0, len(train), (32,), generator=g)]}
        loss = module.training_step(batch, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _recon_mse(module, val)
    assert after < 0.25 * before, (before, after)
    assert psnr(after) > 18.0  # blurry baseline: the mean image is ~11 dB on digits
    expected = {"train/loss", "train/recon"} | ({"train/kl"} if kind == "kl" else {"train/vq"})
    assert expected <= set(logged)
    if kind == "vq":
        assert logged["train/codebook_usage"] > 0.2 and logged["train/perplexity"] > 20
    # validation counts valid rows only: padding rows (garbage here) do not change val/loss
    rows = val[:8].clone()
    padded = torch.cat([rows, torch.ones(4, 1, 8, 8)])
    module.eval()
    module.validation_step({"image": rows, "caption": [""] * 8, "valid": torch.ones(8, dtype=torch.bool)}, 0)
    clean = dict(logged)
    valid = torch.tensor([True] * 8 + [False] * 4)
    module.validation_step({"image": padded, "caption": [""] * 12, "valid": valid}, 0)
    assert logged["val/loss"] == pytest.approx(clean["val/loss"], rel=1e-5)
    assert logged["val/psnr"] == pytest.approx(10 * math.log10(4 / clean["val/loss"]), rel=1e-5)


def test_no_text_encoder_and_only_the_autoencoder_trains() -> None:
    module = _module("kl")
    assert module.text_encoder is None  # not text-conditioned: nothing to build, freeze or save
    trainable = {n.split(".")[0] for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"autoencoder"}
    assert all(k.startswith("autoencoder.") for k in module.state_dict())
    with pytest.raises(ValueError, match="not text-conditioned"):
        module.encode_text(["a digit"])


def _with_old_text_encoder(module: AutoencoderModule) -> dict[str, torch.Tensor]:
    """The module's state as versions that built an (unused) text encoder wrote it."""
    old = build_text_encoder(module.model_cfg.text, len(module.tokenizer))
    return module.state_dict() | {f"text_encoder.{k}": v for k, v in old.state_dict().items()}


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_checkpoints_and_exports_with_the_old_text_encoder_still_load(
    kind: str, digits: torch.Tensor, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    from aigc.models.export import export_model, load_checkpoint, load_export

    torch.manual_seed(2)
    module = _module(kind, codebook_size=32)
    module.train()
    module.autoencoder(digits[:256])  # the VQ codebook initialises: weights differ from a fresh module
    module.eval()
    old_state = _with_old_text_encoder(module)
    # A checkpoint as Lightning wrote it: plain-JSON hyperparameters (model.text included) + state.
    ckpt = tmp_path / "old.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": old_state}, ckpt)
    # An export whose weights.safetensors still holds the text encoder.
    out = export_model(module, tmp_path / "export")
    save_file({k: v.contiguous() for k, v in old_state.items()}, str(out / "weights.safetensors"))
    assert any(k.startswith("text_encoder.") for k in load_file(str(out / "weights.safetensors")))
    expected = module.reconstruct(digits[:16])
    for loaded in (load_checkpoint(ckpt), load_export(out)):
        assert loaded.text_encoder is None
        assert not any(k.startswith("text_encoder.") for k in loaded.state_dict())
        assert torch.equal(loaded.reconstruct(digits[:16]), expected)
    # Only the text encoder's keys are forgiven: any other stray key is still an error.
    with pytest.raises(RuntimeError, match="Unexpected key"):
        _module(kind, codebook_size=32).load_state_dict(old_state | {"decoder.extra": torch.zeros(1)})


# ------------------------------------------------------------------------------------- configs
def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.channel_mults.*divide.*image size 8"):
        load_config(ROOT / "models" / "autoencoder-kl.yaml", ["model.channel_mults=[1,2,2,2,2]"])
    with pytest.raises(ConfigError, match=r"model\.kind: Input should be 'kl' or 'vq'"):
        load_config(ROOT / "models" / "autoencoder-kl.yaml", ["model.kind=gumbel"])
    with pytest.raises(ConfigError, match=r"model\.codebook_size"):
        load_config(ROOT / "models" / "autoencoder-vq.yaml", ["model.codebook_size=1"])
    with pytest.raises(ConfigError, match=r"model\.recon_loss"):
        load_config(ROOT / "models" / "autoencoder-kl.yaml", ["model.recon_loss=l3"])
    with pytest.raises(ConfigError, match=r"model\.channel_mults"):
        autoencoder_net({"channel_mults": [1, 2, 2, 2, 2]}, 8, 1)  # building the net checks it too
    with pytest.raises(ConfigError, match=r"model\.codebook_sise: unknown key"):
        autoencoder_net({"codebook_sise": 8}, 8, 1)


def test_shipped_configs_build() -> None:
    for name, size in (("kl", 8), ("vq", 8), ("kl32", 32), ("vq32", 32)):
        cfg = load_config(ROOT / "models" / f"autoencoder-{name}.yaml")
        assert isinstance(cfg.model, AutoencoderConfig) and cfg.data.image_size == size
        module = build_module(cfg, Tokenizer.build(["x"]), cfg.data.image_size, cfg.data.channels)
        assert module.autoencoder.kind == name[:2]
        assert module.autoencoder.latent_shape[1] == size // cfg.model.downsampling()


# ------------------------------------------------------------------------- export and generate
@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_export_round_trip_and_generate(kind: str, digits: torch.Tensor, tmp_path: Path) -> None:
    from aigc.models.export import export_model, load_export

    torch.manual_seed(1)
    module = _module(kind, codebook_size=32)
    module.train()
    module.autoencoder(digits[:256])  # one training forward: the VQ codebook initialises and moves
    module.eval()
    loaded = load_export(export_model(module, tmp_path / "export"))
    assert isinstance(loaded, AutoencoderModule) and loaded.autoencoder.kind == kind
    assert torch.equal(module.reconstruct(digits[:64]), loaded.reconstruct(digits[:64]))
    as_uint8 = ((digits[:4] + 1) * 127.5).round().byte()
    assert torch.equal(module.reconstruct(as_uint8), module.reconstruct(as_uint8.float() / 127.5 - 1))
    # a latent family copies exactly the autoencoder.* weights
    state = {
        k.removeprefix("autoencoder."): v
        for k, v in module.state_dict().items()
        if k.startswith("autoencoder.")
    }
    fresh = autoencoder_net(module.hparams["model"], 8, 1).eval()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.latents(digits[:8]), module.autoencoder.latents(digits[:8]))

    images = loaded.generate(["ignored", "prompts"], num_samples=3, seed=5)
    assert images.dtype == torch.uint8 and images.shape == (6, 1, 8, 8)
    assert torch.equal(images, loaded.generate(["other", "words"], num_samples=3, seed=5))  # no text
    assert not torch.equal(images, loaded.generate(["ignored", "prompts"], num_samples=3, seed=6))
    with pytest.raises(ValueError, match="allowed: temperature"):
        loaded.generate(["x"], steps=3)


# ------------------------------------------------------------------- evaluation by reconstruction
def test_evaluate_reconstruction_reports_psnr_and_fd(digits_dataset: Path, tmp_path: Path) -> None:
    from aigc.contract import PROVENANCE
    from aigc.evaluation import EvaluatorConfig, reference_evaluator
    from aigc.evaluation.evaluate import evaluate_reconstruction

    tiny = EvaluatorConfig(
        width=8,
        feature_dim=8,
        embed_dim=8,
        text_dim=16,
        text_layers=1,
        clip_steps=20,
        classifier_steps=20,
        batch_size=64,
    )
    evaluator = reference_evaluator(digits_dataset, cache_dir=tmp_path / "cache", config=tiny)
    module = _module("kl")
    report = evaluate_reconstruction(module, evaluator, digits_dataset, num_samples=300, seed=3)
    for key in ("eval/psnr", "eval/mse", "eval/fd", "eval/fd_train_val", *PROVENANCE):
        assert key in report, key
    assert report["num_samples"] == 300 and report["seed"] == 3 and report["family"] == "autoencoder"
    assert report["collapse"] is False and report["copying"] is False
    assert report["eval/psnr"] == pytest.approx(10 * math.log10(255**2 / report["eval/mse"]))
    # an autoencoder that reproduces its input exactly: PSNR inf, FD ~0 (the same images)
    module.reconstruct = lambda images, batch_size=256: images.clone()
    perfect = evaluate_reconstruction(module, evaluator, digits_dataset, num_samples=300, seed=3)
    assert perfect["eval/mse"] == 0 and perfect["eval/psnr"] == float("inf")
    assert perfect["eval/fd"] == pytest.approx(0.0, abs=1e-6) and report["eval/fd"] > 1e-3
    assert perfect["eval/fd"] < report["eval/fd"] and report["eval/psnr"] < 30
    del module.reconstruct
    # evaluate_model (what final_evaluation runs) dispatches on the family: the same report
    from aigc.evaluation import evaluate_model

    again = evaluate_model(module, evaluator, digits_dataset, num_samples=300, seed=3)
    assert again["eval/psnr"] == report["eval/psnr"] and again["eval/fd"] == report["eval/fd"]
    with pytest.raises(ValueError, match="reconstruction"):
        evaluate_model(module, evaluator, digits_dataset, num_samples=300, seed=3, temperature=0.5)
