"""aigc.models.nets."""

from aigc.models.nets.gan import Generator, ProjectionDiscriminator  # noqa: F401
from aigc.models.nets.transformer import GPT, GPTConfig, KVCache  # noqa: F401
from aigc.models.nets.unet import UNet, UNetConfig  # noqa: F401
from aigc.models.nets.vae import VAEDecoder, VAEEncoder  # noqa: F401
