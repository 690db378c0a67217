"""Zoo architectures from `diffusers`: tiny diffusion U-Nets and a VAE (GroupNorm with
SiLU, self- and cross-attention), random weights from small configs."""

from __future__ import annotations

import torch

from .registry import Architecture, FirstOutput, half_precision, image, randomize, seeded

BLOCKS = dict(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8)


def unet2d():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, attention_head_dim=8,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), **BLOCKS)
    return FirstOutput(randomize(model)).eval(), (image(size=16), torch.tensor([10]))


def unet2d_condition():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, cross_attention_dim=16,
                                 attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **BLOCKS)
    context = torch.randn(1, 6, 16, generator=seeded(1))
    return FirstOutput(randomize(model)).eval(), (image(c=4, size=16), torch.tensor([10]), context)


def vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                          down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                          up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), **BLOCKS)
    return FirstOutput(randomize(model)).eval(), (image(size=16),)


ARCHITECTURES = [
    Architecture("unet2d", "diffusers", ("gn",), unet2d),
    Architecture("unet2d_condition", "diffusers", ("gn", "ln"), unet2d_condition),
    Architecture("vae", "diffusers", ("gn",), vae),
    Architecture("vae_fp16", "diffusers", ("gn",), half_precision(vae), fp16=True),
]
