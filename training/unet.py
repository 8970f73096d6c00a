"""A small 2D U-Net (Ronneberger et al. 2015) with depth and width from the config.

``depth`` is the number of 2x down-samplings; level ``i`` has ``base_channels * 2**i`` channels,
so depth 4 with 8 base channels runs 8-16-32-64-128 (about 0.47 M parameters). Each level is two
3x3 convolutions with batch normalisation and ReLU; up-sampling is a 2x2 transposed convolution.
Batch normalisation folds into the convolutions at ONNX export, so the served graph is plain
convolutions.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

LOGGER = logging.getLogger(__name__)


class DoubleConv(nn.Sequential):
    """Two (3x3 convolution, batch norm, ReLU) blocks."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """2D U-Net returning logits ``(N, out_channels, H, W)``.

    Parameters
    ----------
    in_channels : int
        Input channels (1 for a grey NM frame).
    out_channels : int
        Output channels, one per segment (sigmoid, multi-label).
    depth : int
        Number of 2x down-samplings (1-6). H and W must be divisible by ``2**depth``.
    base_channels : int
        Channels of the first level; doubled at every level.

    Raises
    ------
    ValueError
        If a size parameter is out of range.
    """

    def __init__(
        self, in_channels: int = 1, out_channels: int = 2, depth: int = 4, base_channels: int = 8
    ) -> None:
        super().__init__()
        if not 1 <= depth <= 6:
            raise ValueError(f"depth must be between 1 and 6, got {depth!r}")
        if base_channels < 1 or in_channels < 1 or out_channels < 1:
            raise ValueError(
                "in_channels, out_channels and base_channels must be positive, got "
                f"{in_channels!r}, {out_channels!r}, {base_channels!r}"
            )
        self.depth = depth
        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        previous = in_channels
        for width in widths:
            self.down.append(DoubleConv(previous, width))
            previous = width
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.up_conv = nn.ModuleList()
        for width in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(width * 2, width, 2, stride=2))
            self.up_conv.append(DoubleConv(width * 2, width))
        self.head = nn.Conv2d(widths[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits for a batch ``(N, C, H, W)``."""
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.depth:
                skips.append(x)
                x = self.pool(x)
        for up, conv, skip in zip(self.up, self.up_conv, reversed(skips), strict=True):
            x = conv(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def build_unet(in_channels: int, out_channels: int, depth: int, base_channels: int) -> UNet:
    """Build a :class:`UNet` and log its parameter count."""
    net = UNet(in_channels, out_channels, depth, base_channels)
    n_params = sum(p.numel() for p in net.parameters())
    LOGGER.info("U-Net depth %d, %d base channels: %d parameters", depth, base_channels, n_params)
    return net


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
