"""A PyTorch twin of the network, with DeepCAD-RT's architecture and state_dict keys.

Used by the parity tests and by the benchmark's side-by-side timing, and shipped as the
architecture file of exported bioimage.io packages (so it imports nothing but torch at
module level); it needs torch, which deepcad-jax itself never does. Keys:
Generator.encoders.{i}.basic_module.SingleConv{1,2}.conv.{weight,bias},
Generator.decoders.{i}..., Generator.final_conv.{weight,bias}; tensors (N, C, T, H, W).
"""

import torch
from torch import nn
from torch.nn import functional as F


class SingleConv(nn.Sequential):
  def __init__(self, cin, cout):
    super().__init__()
    self.add_module("conv", nn.Conv3d(cin, cout, 3, padding=1, bias=True))
    self.add_module("ReLU", nn.ReLU(inplace=True))


class DoubleConv(nn.Sequential):
  def __init__(self, cin, cout, encoder):
    super().__init__()
    mid = max(cout // 2, cin) if encoder else cout
    self.add_module("SingleConv1", SingleConv(cin, mid))
    self.add_module("SingleConv2", SingleConv(mid, cout))


class Encoder(nn.Module):
  def __init__(self, cin, cout, pool):
    super().__init__()
    self.pooling = nn.MaxPool3d(2) if pool else None
    self.basic_module = DoubleConv(cin, cout, encoder=True)

  def forward(self, x):
    if self.pooling is not None:
      x = self.pooling(x)
    return self.basic_module(x)


class Decoder(nn.Module):
  def __init__(self, cin, cout):
    super().__init__()
    self.basic_module = DoubleConv(cin, cout, encoder=False)

  def forward(self, skip, x):
    x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
    return self.basic_module(torch.cat((skip, x), dim=1))


class UNet(nn.Module):
  def __init__(self, f):
    super().__init__()
    widths = [f * 2**i for i in range(4)]
    self.encoders = nn.ModuleList(
        [Encoder(1 if i == 0 else widths[i - 1], w, pool=i > 0) for i, w in enumerate(widths)])
    rev = widths[::-1]
    self.decoders = nn.ModuleList(
        [Decoder(rev[i] + rev[i + 1], rev[i + 1]) for i in range(3)])
    self.final_conv = nn.Conv3d(f, 1, 1)

  def forward(self, x):
    skips = []
    for enc in self.encoders:
      x = enc(x)
      skips.insert(0, x)
    for dec, skip in zip(self.decoders, skips[1:]):
      x = dec(skip, x)
    return self.final_conv(x)


class Network_3D_Unet(nn.Module):
  def __init__(self, f_maps=16):
    super().__init__()
    self.Generator = UNet(f_maps)

  def forward(self, x):
    return self.Generator(x)


def from_flax_params(params, features: int) -> Network_3D_Unet:
  """A PyTorch twin loaded with the same weights as Flax `params` (the inverse of
  `deepcad_jax.model_io.convert.to_flax_params`)."""
  # deliberate: this file is shipped alone in bioimage.io packages (torch only)
  from deepcad_jax.export.pth import torch_state_dict
  state = {k: torch.from_numpy(v) for k, v in torch_state_dict(params).items()}
  net = Network_3D_Unet(features)
  net.load_state_dict(state)
  return net
