"""Zoo architectures from MONAI (medical imaging): segmentation nets with BatchNorm,
GroupNorm and LayerNorm, 2-D and 3-D, random weights from small configs."""

from __future__ import annotations

import torch

from .registry import Architecture, FirstOutput, image, randomize, seeded


def unet_bn():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    model = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2),
                 num_res_units=1, norm="batch")
    return FirstOutput(randomize(model)).eval(), (image(c=1),)


def segresnet():
    from monai.networks.nets import SegResNet

    torch.manual_seed(0)
    model = SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 1),
                      blocks_up=(1,), norm=("group", {"num_groups": 4}))
    return FirstOutput(randomize(model)).eval(), (torch.randn(1, 1, 16, 16, 16, generator=seeded()),)


def dynunet_gn():
    from monai.networks.nets import DynUNet

    torch.manual_seed(0)
    model = DynUNet(spatial_dims=2, in_channels=1, out_channels=2, kernel_size=[3, 3, 3], strides=[1, 2, 2],
                    upsample_kernel_size=[2, 2], filters=[8, 16, 32], norm_name=("group", {"num_groups": 4}))
    return FirstOutput(randomize(model)).eval(), (image(c=1),)


def swin_unetr():
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    model = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                      spatial_dims=2, norm_name="instance")
    return FirstOutput(randomize(model)).eval(), (image(c=1, size=64),)


def unetr():
    from monai.networks.nets import UNETR

    torch.manual_seed(0)
    model = UNETR(in_channels=1, out_channels=2, img_size=(32, 32), feature_size=8, hidden_size=32, mlp_dim=64,
                  num_heads=4, spatial_dims=2, norm_name="batch")
    return FirstOutput(randomize(model)).eval(), (image(c=1),)


ARCHITECTURES = [
    Architecture("monai_unet_bn", "monai", ("bn",), unet_bn),
    Architecture("monai_segresnet_3d", "monai", ("gn",), segresnet),
    Architecture("monai_dynunet_gn", "monai", ("gn",), dynunet_gn),
    Architecture("monai_swin_unetr", "monai", ("ln",), swin_unetr),
    Architecture("monai_unetr", "monai", ("ln", "bn"), unetr),
]
