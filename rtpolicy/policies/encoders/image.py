"""Camera-frame encoders: augmentation, a conv backbone and a spatial-softmax keypoint head.

The diffusion_policy recipe: a torchvision ResNet-18 trained from scratch (``weights=None``: nothing is
downloaded) with every BatchNorm replaced by GroupNorm (batch statistics interact badly with EMA weights
and small batches), and its average pool + classifier replaced by a spatial softmax that returns the
expected image coordinates of K learned keypoints. ``small_cnn`` is a four-layer alternative for speed.

Frames arrive as the observation convention has them, (..., H, W, 3) uint8 (float in the same 0-255
units is accepted too); :class:`ImageAugment` crops them (random in ``train()``, centre in ``eval()``),
optionally jitters colour, and maps them to (N, 3, h, w) float in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2

from rtpolicy.registry import Registry

BACKBONES: Registry[nn.Module] = Registry("image backbone")


def replace_batchnorm(module: nn.Module, group_size: int = 16) -> nn.Module:
    """Swap every BatchNorm2d in ``module`` (in place) for GroupNorm with ``group_size`` channels per group."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            c = child.num_features
            setattr(module, name, nn.GroupNorm(max(1, c // group_size), c))
        else:
            replace_batchnorm(child, group_size)
    return module


@BACKBONES.register("resnet18")
class ResNet18GN(nn.Module):
    """torchvision ResNet-18 (random init) with GroupNorm, cut before its pooling and classifier.

    x (N, 3, h, w) float -> feature map (N, 512, ceil(h/32), ceil(w/32))
    """

    out_channels = 512

    def __init__(self):
        super().__init__()
        from torchvision.models import resnet18

        net = replace_batchnorm(resnet18(weights=None))
        self.trunk = nn.Sequential(*list(net.children())[:-2])  # conv1 .. layer4; drops avgpool, fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)


@BACKBONES.register("small_cnn")
class SmallCNN(nn.Module):
    """Four 3x3/5x5 conv + GroupNorm + Mish layers, three of them strided.

    x (N, 3, h, w) float -> feature map (N, 128, ~h/8, ~w/8)
    """

    out_channels = 128

    def __init__(self):
        super().__init__()
        layers, c_in = [], 3
        for c_out, k, stride in [(32, 5, 2), (64, 3, 2), (128, 3, 2), (128, 3, 1)]:
            layers += [nn.Conv2d(c_in, c_out, k, stride, k // 2), nn.GroupNorm(8, c_out), nn.Mish()]
            c_in = c_out
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SpatialSoftmax(nn.Module):
    """Feature map (N, C, h, w) -> expected (x, y) of K keypoints (N, 2K), coordinates in [-1, 1].

    A 1x1 conv gives K heat maps; a softmax over each map's h*w cells (with a learned temperature)
    weights the cell coordinates.
    """

    def __init__(self, in_channels: int, num_keypoints: int):
        super().__init__()
        if num_keypoints < 1:
            raise ValueError(f"num_keypoints must be >= 1, got {num_keypoints}")
        self.keypoints = nn.Conv2d(in_channels, num_keypoints, kernel_size=1)
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        attn = (self.keypoints(x).flatten(2) / self.log_temperature.exp()).softmax(dim=-1)  # (N, K, h*w)
        ys, xs = torch.meshgrid(
            torch.linspace(-1.0, 1.0, h, device=x.device), torch.linspace(-1.0, 1.0, w, device=x.device), indexing="ij"
        )
        cells = torch.stack([xs.flatten(), ys.flatten()], dim=-1).to(attn.dtype)  # (h*w, 2)
        return (attn @ cells).flatten(1)


class ImageAugment(nn.Module):
    """Frames (N, H, W, 3) uint8 -> (N, 3, h, w) float in [-1, 1], (h, w) = round(crop_fraction * (H, W)).

    ``train()``: an independent random crop (and colour jitter when ``color_jitter > 0``) per frame;
    ``eval()``: the centre crop, deterministic. No parameters.
    """

    def __init__(self, size: tuple[int, int], crop_fraction: float = 1.0, color_jitter: float = 0.0):
        super().__init__()
        if not 0 < crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
        if color_jitter < 0:
            raise ValueError(f"color_jitter must be >= 0, got {color_jitter}")
        self.size = tuple(int(s) for s in size)
        self.crop = tuple(max(1, round(s * crop_fraction)) for s in self.size)
        steps = [v2.RandomCrop(self.crop)] if self.crop != self.size else []
        if color_jitter > 0:
            steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
        self.random = v2.Compose(steps) if steps else None
        # the centre crop as fixed slices (torchvision's CenterCrop offsets): the same pixels, and traceable for ONNX
        self.offset = tuple(round((s - c) / 2.0) for s, c in zip(self.size, self.crop))

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.ndim != 4 or tuple(frames.shape[1:]) != (*self.size, 3):
            raise ValueError(f"frames have shape {tuple(frames.shape)}, expected (N, {self.size[0]}, {self.size[1]}, 3)")
        x = frames.permute(0, 3, 1, 2)
        x = x if x.dtype == torch.uint8 else x.float().div(255.0)  # v2 takes uint8 or float in [0, 1]
        if self.training and self.random is not None:
            x = torch.stack([self.random(f) for f in x])  # one draw per frame
        else:
            (top, left), (h, w) = self.offset, self.crop
            x = x[..., top:top + h, left:left + w]
        x = x.float().div(255.0) if x.dtype == torch.uint8 else x
        return x * 2.0 - 1.0


class ImageEncoder(nn.Module):
    """Camera frames -> one token per camera per observation step.

    obs[key]  (B, To, H, W, 3) uint8 for every key in ``shapes`` ({key: [H, W, 3]}, cameras in sorted order),
              or, when ``frozen``, its cached keypoints (B, To, 2K) float from :meth:`keypoints`
    ->        (B, To * C, D): camera-major, i.e. tokens [c * To + t] for camera c, step t

    Each frame: ImageAugment -> backbone (shared by every camera, or one per camera) -> SpatialSoftmax
    (num_keypoints) -> Linear -> D, plus a learned step and camera embedding.

    ``frozen``: the backbones and keypoint layers get no gradient and frames are always centre-cropped,
    so a frame's keypoints are a fixed function of the frame and can be computed once (see
    :func:`cache_keypoints`); the Linear projections and embeddings still train.
    """

    def __init__(
        self,
        shapes: dict[str, list[int]],
        obs_horizon: int,
        dim: int,
        backbone: str = "resnet18",
        shared: bool = True,
        num_keypoints: int = 32,
        crop_fraction: float = 1.0,
        color_jitter: float = 0.0,
        frozen: bool = False,
    ):
        super().__init__()
        if not shapes:
            raise ValueError("ImageEncoder needs at least one image key")
        for key, shape in shapes.items():
            if len(shape) != 3 or shape[2] != 3 or min(shape) < 1:
                raise ValueError(f"image obs key {key!r} has shape {list(shape)}; expected (H, W, 3)")
        if backbone not in BACKBONES:
            raise ValueError(f"unknown image backbone {backbone!r}; registered: {', '.join(BACKBONES.names())}")
        self.keys = sorted(shapes)
        self.augment = nn.ModuleList(ImageAugment(tuple(shapes[k][:2]), crop_fraction, color_jitter) for k in self.keys)
        n_nets = 1 if shared else len(self.keys)
        self.backbones = nn.ModuleList(BACKBONES.build(backbone) for _ in range(n_nets))
        c = BACKBONES.get(backbone).cls.out_channels
        with torch.no_grad():  # keypoints need a feature map of at least 2 cells along some axis
            for key, aug in zip(self.keys, self.augment):
                fmap = self.backbones[0](torch.zeros(1, 3, *aug.crop)).shape[2:]
                if max(fmap) < 2:
                    raise ValueError(
                        f"image obs key {key!r}: {list(shapes[key][:2])} frames cropped to {list(aug.crop)} give a "
                        f"{fmap[0]}x{fmap[1]} {backbone} feature map, too small for spatial-softmax keypoints; "
                        f"use frames of >= 64 pixels for resnet18 or the small_cnn backbone"
                    )
        self.heads = nn.ModuleList(
            nn.Sequential(SpatialSoftmax(c, num_keypoints), nn.Linear(2 * num_keypoints, dim)) for _ in range(n_nets)
        )
        self.pos = nn.Parameter(torch.zeros(1, 1, obs_horizon, dim))
        self.camera = nn.Parameter(torch.zeros(1, len(self.keys), 1, dim))
        self.n_tokens = obs_horizon * len(self.keys)
        self.dim = dim
        self.keypoint_dim = 2 * num_keypoints
        self.frozen = bool(frozen)
        if self.frozen:
            self.backbones.requires_grad_(False)
            for head in self.heads:
                head[0].requires_grad_(False)
            self.augment.eval()

    def train(self, mode: bool = True) -> "ImageEncoder":
        super().train(mode)
        if self.frozen:  # a frozen encoder never augments: its keypoints must match the cached ones
            self.augment.eval()
        return self

    def keypoints(self, key: str, frames: torch.Tensor) -> torch.Tensor:
        """Frames (N, H, W, 3) of camera ``key`` -> spatial-softmax keypoints (N, 2K)."""
        i = self.keys.index(key)
        net = 0 if len(self.backbones) == 1 else i
        return self.heads[net][0](self.backbones[net](self.augment[i](frames)))

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = []
        for i, key in enumerate(self.keys):
            x = obs[key]
            net = 0 if len(self.backbones) == 1 else i
            if x.ndim == 3 and self.frozen and x.shape[-1] == self.keypoint_dim:  # cached keypoints (B, To, 2K)
                tokens.append(self.heads[net][1](x.float()))
                continue
            if x.ndim != 5:
                raise ValueError(f"image obs {key!r} has shape {tuple(x.shape)}; expected (B, To, H, W, 3)"
                                 + (f" or cached keypoints (B, To, {self.keypoint_dim})" if self.frozen else ""))
            b, to = x.shape[:2]
            tokens.append(self.heads[net][1](self.keypoints(key, x.flatten(0, 1))).view(b, to, -1))
        out = torch.stack(tokens, dim=1) + self.pos[:, :, : tokens[0].shape[1]] + self.camera  # (B, C, To, D)
        return out.flatten(1, 2)


def find_image_encoder(module: nn.Module) -> ImageEncoder | None:
    """The ImageEncoder inside a policy (or any module), or None."""
    return next((m for m in module.modules() if isinstance(m, ImageEncoder)), None)


def load_image_weights(encoder: ImageEncoder, path: str) -> int:
    """Initialise ``encoder``'s backbones and keypoint layers from a safetensors file; returns the tensors loaded.

    The file is an rtpolicy checkpoint (its EMA policy's image encoder is used) or an ImageEncoder state
    dict. Names are matched after their ``images.`` prefix; a file with no matching tensor, or with a
    tensor of another shape, raises ValueError naming it.
    """
    from safetensors.torch import load_file

    tensors = load_file(path)
    if any(k.startswith("ema/") for k in tensors):
        tensors = {k[len("ema/"):]: v for k, v in tensors.items() if k.startswith("ema/")}
    if any("images." in k for k in tensors):  # a policy's state dict: its encoder's "...images.<name>" tensors
        tensors = {k.split("images.", 1)[1]: v for k, v in tensors.items() if "images." in k}
    # the frozen part: backbones.* and heads.<i>.0.* (spatial-softmax keypoints)
    own = {k: v for k, v in encoder.state_dict().items()
           if k.startswith("backbones.") or (k.startswith("heads.") and k.split(".")[2] == "0")}
    found = {k: v for k, v in tensors.items() if k in own}
    missing = sorted(set(own) - set(found))
    if missing:
        raise ValueError(f"{path} has no image encoder weights for {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                         f"({len(missing)} of {len(own)} missing); is it a checkpoint of a policy with the same image backbone?")
    for k in own:
        if tuple(found[k].shape) != tuple(own[k].shape):
            raise ValueError(f"{path}: image encoder weight {k!r} has shape {tuple(found[k].shape)}, expected {tuple(own[k].shape)}")
    encoder.load_state_dict({k: found[k] for k in own}, strict=False)
    return len(own)


@torch.no_grad()
def cache_keypoints(encoder: ImageEncoder, frames: Mapping[str, Any], batch_size: int = 256,
                    device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Every stored frame of a frozen encoder's cameras -> its keypoints, computed once.

    frames: {key: (T, H, W, 3) uint8 array-like (a zarr array or numpy)}
    ->      {key: (T, 2K) float32 numpy}, equal to what ``encoder`` computes for those frames at any time
    """
    if not encoder.frozen:
        raise ValueError("cache_keypoints needs a frozen image encoder (policy.encoder.freeze_image=true): "
                         "a trained encoder's keypoints change at every step")
    was_training = encoder.training
    encoder.eval()
    out = {}
    try:
        for key, arr in frames.items():
            feats = np.empty((arr.shape[0], encoder.keypoint_dim), np.float32)
            for start in range(0, arr.shape[0], batch_size):
                chunk = torch.from_numpy(np.asarray(arr[start:start + batch_size])).to(device)
                feats[start:start + len(chunk)] = encoder.keypoints(key, chunk).float().cpu().numpy()
            out[key] = feats
    finally:
        encoder.train(was_training)
    return out
