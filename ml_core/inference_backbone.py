"""The copy of a detector's backbone that inference runs on a GPU (ml_core.fast_rcnn.BatchedViews).

The model's own backbone is left untouched (training goes on with it); the copy is rewritten for
speed with the same outputs up to float rounding:

* `fold_batch_norms`: each eval-mode batch norm after a conv is folded into the conv's weights and
  bias (no separate scale-and-shift pass over every activation; under autocast torchvision's
  FrozenBatchNorm2d also ran that pass in float32).
* `fuse_conv_relu` (optional): conv + bias + ReLU, and a ResNet block's last conv + bias + residual
  + ReLU, as one cuDNN call each on CUDA (`aten::cudnn_convolution_relu` / `_add_relu`), so the
  bias, the residual sum and the ReLU do not each read and write the whole activation again.
  Elsewhere the fused modules run the same ops one after another.
* `TopDownInPrecision`: the FPN's top-down nearest upsampling in the features' own precision,
  fused with the sum with its lateral. Autocast runs every upsampling in float32, so under fp16
  each level's upsampled map, and the sum with its lateral (fp16 + fp32 = fp32), were float32
  passes over the largest maps, cast back to fp16 by the next conv (a profile on an H200: the
  float32 upsampling and sums about 5 % of a group's device time). Nearest upsampling copies
  values; what changes is rounding: each level's sum is rounded to fp16 (the next conv reads it
  in fp16 either way), where torchvision carried it to the next level in float32.
* `inference_head`: the same copy (conv + bias + ReLU fused, channels_last) of the RPN head, whose
  3x3 conv and ReLU run on every pyramid level of every view.
* channels_last memory format (cuDNN's fp16 kernels work in NHWC).
* `cudnn_autotuned`: cudnn.benchmark around the backbone and the RPN head.
"""
from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
import warnings

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork


# --- batch norms folded into the convolutions ----------------------------------------------------

def _fold(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """conv followed by an eval-mode batch norm -> one conv with a bias."""
    if isinstance(bn, nn.BatchNorm2d):
        mean, var, w, b, eps = bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps
        if w is None:
            w = torch.ones_like(mean)
        if b is None:
            b = torch.zeros_like(mean)
    else:  # torchvision.ops.FrozenBatchNorm2d
        mean, var, w, b, eps = bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps
    scale = w / torch.sqrt(var + eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    fused = fused.to(conv.weight.device, conv.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(mean)
        fused.bias.copy_((bias - mean) * scale + b)
    return fused


def _is_bn(m: nn.Module) -> bool:
    from torchvision.ops import FrozenBatchNorm2d
    return isinstance(m, FrozenBatchNorm2d) or (isinstance(m, nn.BatchNorm2d) and m.track_running_stats
                                                and m.running_mean is not None)


def fold_batch_norms(module: nn.Module) -> int:
    """Fold every batch norm that directly follows a conv into it, in place; returns how many.

    Pairs: consecutive (Conv2d, BN) in an nn.Sequential, and attributes convN / bnN of one module
    (torchvision's ResNet blocks and stem: conv1/bn1, ...). Anything else is left as it is."""
    n = 0
    for m in list(module.modules()):
        if isinstance(m, nn.Sequential):
            names = list(m._modules)
            for a, b in zip(names, names[1:]):
                conv, bn = m._modules[a], m._modules[b]
                if isinstance(conv, nn.Conv2d) and _is_bn(bn):
                    m._modules[a], m._modules[b] = _fold(conv, bn), nn.Identity()
                    n += 1
        for name in list(m._modules):
            if name.startswith("conv") and f"bn{name[4:]}" in m._modules:
                conv, bn = m._modules[name], m._modules[f"bn{name[4:]}"]
                if isinstance(conv, nn.Conv2d) and _is_bn(bn):
                    m._modules[name], m._modules[f"bn{name[4:]}"] = _fold(conv, bn), nn.Identity()
                    n += 1
    return n


# --- conv + bias + ReLU (+ residual) as one cuDNN call ----------------------------------------------

def _fusable(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and type(conv) is nn.Conv2d and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


def _on_cuda(x: torch.Tensor) -> bool:
    return x.is_cuda


class _CudnnConv:
    """A conv's weights in the dtype of the call (cast once per dtype and device: the copy is for
    inference, its weights do not change), and whether cuDNN runs its fused kernels here: a cuDNN
    without them raises on the first call, and from then on the module runs the ops one after
    another (with a warning, once)."""

    def __init__(self, conv: nn.Conv2d):
        self.conv = conv
        self._cast: dict[tuple, tuple] = {}
        self.usable = True

    def args(self, x: torch.Tensor):
        """(x, weight, bias) in the precision the call runs in: autocast's on CUDA if enabled."""
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
        c = self.conv
        key = (dtype, c.weight.device)                  # a copy moved elsewhere casts again
        if key not in self._cast:
            self._cast[key] = (c.weight.detach().to(dtype), None if c.bias is None else c.bias.detach().to(dtype))
        w, b = self._cast[key]
        return x.to(dtype), w, b

    def geometry(self):
        c = self.conv
        return list(c.stride), list(c.padding), list(c.dilation), c.groups

    def call(self, fused, x, *extra):
        """fused(x, weight, *extra, bias, geometry...) on CUDA; None where it cannot run."""
        if not (_on_cuda(x) and self.usable):
            return None
        try:
            x, w, b = self.args(x)
            if extra:      # cudnn_convolution_add_relu(x, w, z, alpha, bias, ...)
                return fused(x, w, extra[0].to(x.dtype), 1.0, b, *self.geometry())
            return fused(x, w, b, *self.geometry())
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError as e:
            self.usable = False
            warnings.warn(f"cuDNN's fused convolution is not available here ({e}); running conv and ReLU apart",
                          stacklevel=3)
            return None


class ConvReLU(nn.Module):
    """relu(conv(x)): one cudnn_convolution_relu call on CUDA, the two ops elsewhere."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self._cudnn = _CudnnConv(conv)

    def forward(self, x):
        out = self._cudnn.call(torch.cudnn_convolution_relu, x)
        return F.relu(self.conv(x)) if out is None else out


class FusedResidualBlock(nn.Module):
    """A torchvision ResNet block (Bottleneck or BasicBlock) with its batch norms folded:
    every conv but the last with its ReLU, the last with the residual sum and the final ReLU
    (cudnn_convolution_add_relu), as in the block's own forward."""

    def __init__(self, block: nn.Module):
        super().__init__()
        convs = [block.conv1, block.conv2] + ([block.conv3] if isinstance(block, Bottleneck) else [])
        self.inner = nn.Sequential(*(ConvReLU(c) for c in convs[:-1]))
        self.last = convs[-1]
        self.downsample = block.downsample
        self._cudnn = _CudnnConv(self.last)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.inner(x)
        fused = self._cudnn.call(torch.cudnn_convolution_add_relu, out, identity)
        return F.relu(self.last(out) + identity) if fused is None else fused


def _folded_block(block: nn.Module) -> bool:
    names = ("bn1", "bn2") + (("bn3",) if isinstance(block, Bottleneck) else ())
    return (all(isinstance(getattr(block, n), nn.Identity) for n in names)
            and all(_fusable(getattr(block, f"conv{i}")) for i in range(1, len(names) + 1)))


def fuse_conv_relu(module: nn.Module) -> int:
    """In place, on a module whose batch norms are folded: torchvision ResNet blocks become
    FusedResidualBlock, and a conv followed by a ReLU (with only folded-away Identity between)
    among the children of an nn.Sequential or torchvision's IntermediateLayerGetter (containers
    that run their children in order) becomes ConvReLU. Returns how many were fused."""
    from torchvision.models._utils import IntermediateLayerGetter
    n = 0
    for m in list(module.modules()):
        for name, child in list(m._modules.items()):
            if isinstance(child, (Bottleneck, BasicBlock)) and type(child) in (Bottleneck, BasicBlock) \
                    and _folded_block(child):
                m._modules[name] = FusedResidualBlock(child)
                n += 1
        if not isinstance(m, (nn.Sequential, IntermediateLayerGetter)):
            continue
        names = list(m._modules)
        for i, name in enumerate(names):
            conv = m._modules[name]
            if not _fusable(conv):
                continue
            j = i + 1
            while j < len(names) and isinstance(m._modules[names[j]], nn.Identity):
                j += 1
            if j < len(names) and isinstance(m._modules[names[j]], nn.ReLU):
                m._modules[name], m._modules[names[j]] = ConvReLU(conv), nn.Identity()
                n += 1
    return n


# --- the FPN's top-down path in the features' precision -------------------------------------------

class TopDownInPrecision(nn.Module):
    """torchvision's FeaturePyramidNetwork forward with its nearest upsampling and the sum with the
    lateral in the maps' own precision (`upsample_add`); the same modules and operations (the same
    values outside autocast; under it, sums rounded to the maps' precision level by level)."""

    def __init__(self, fpn: FeaturePyramidNetwork):
        super().__init__()
        self.fpn = fpn

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        fpn = self.fpn
        names, x = list(x.keys()), list(x.values())
        last_inner = fpn.get_result_from_inner_blocks(x[-1], -1)
        results = [fpn.get_result_from_layer_blocks(last_inner, -1)]
        for idx in range(len(x) - 2, -1, -1):
            inner_lateral = fpn.get_result_from_inner_blocks(x[idx], idx)
            last_inner = upsample_add(inner_lateral, last_inner)
            results.insert(0, fpn.get_result_from_layer_blocks(last_inner, idx))
        if fpn.extra_blocks is not None:
            results, names = fpn.extra_blocks(results, x, names)
        return OrderedDict(zip(names, results))


def upsample_add(lateral: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """lateral + nearest-upsampled top (to lateral's size), in their own precision. Where lateral is
    exactly twice top's size (the FPN's levels when the batch is padded to the size divisor) the
    upsampling is a broadcast inside the sum: one pass, no upsampled map written and read again
    (nearest at a scale of exactly 1/2 reads source row y // 2, column x // 2: the same values)."""
    n, c, h2, w2 = lateral.shape
    h, w = top.shape[-2:]
    if h2 == 2 * h and w2 == 2 * w:
        try:
            pairs = lateral.view(n, c, h, 2, w, 2)          # NCHW and channels_last both split so
        except RuntimeError:
            pairs = None
        if pairs is not None:
            return (pairs + top[:, :, :, None, :, None]).reshape(n, c, h2, w2)
    with torch.autocast(lateral.device.type, enabled=False):
        top_down = F.interpolate(top, size=(h2, w2), mode="nearest")
    return lateral + top_down


def top_down_in_precision(module: nn.Module) -> int:
    """In place: every torchvision FeaturePyramidNetwork child becomes TopDownInPrecision."""
    n = 0
    for m in list(module.modules()):
        for name, child in list(m._modules.items()):
            if type(child) is FeaturePyramidNetwork:
                m._modules[name] = TopDownInPrecision(child)
                n += 1
    return n


# --- the copy ---------------------------------------------------------------------------------------

def inference_backbone(backbone: nn.Module, *, fold: bool, channels_last: bool, fuse: bool = False) -> nn.Module:
    """A copy of the backbone for inference (the model's own is left untouched); fuse needs fold."""
    if fuse and not fold:
        raise ValueError("conv + ReLU fusion needs the batch norms folded first (fold=True)")
    if not fold and not channels_last:
        return backbone
    b = copy.deepcopy(backbone).eval()
    if fold:
        fold_batch_norms(b)
    if fuse:
        fuse_conv_relu(b)
    top_down_in_precision(b)
    if channels_last:
        b = b.to(memory_format=torch.channels_last)
    return b


def inference_head(head: nn.Module, *, channels_last: bool, fuse: bool) -> nn.Module:
    """A copy of a head of convolutions (torchvision's RPNHead) with conv + ReLU fused and in
    channels_last, for inference; the head itself where neither applies."""
    if not fuse and not channels_last:
        return head
    h = copy.deepcopy(head).eval()
    if fuse:
        fuse_conv_relu(h)
    return h.to(memory_format=torch.channels_last) if channels_last else h


@contextlib.contextmanager
def cudnn_autotuned(enabled: bool):
    """cudnn.benchmark for the backbone and the RPN head on CUDA: their input is a scale's padded
    batch, one shape per scale when a group's images share a size (else one per new padded size),
    so each shape gets its convolution algorithms chosen by timing once. Not for the RoI heads:
    their batch is the number of boxes, new at every call, and re-tuning each (measured on an H100,
    keypoint head) made the keypoint model 5x slower. The flag is process-wide in torch: set and
    restored here, for inference from one thread per process (as the workers and the CLI run it)."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled or before
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before
