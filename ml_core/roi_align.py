"""RoIAlign as two matrix products, for the small feature maps of CPU-sized models.

torchvision's RoIAlign samples every output bin at a grid of points and interpolates each
bilinearly. Both its interpolation and its average over the sampling grid factor by axis: a
sample's weight on the feature at (y, x) is (weight of y) * (weight of x), and whether a sample
falls outside the map (weight 0) is decided per axis too. So, for one RoI,

    out[c, p, q] = sum_y sum_x  Ay[p, y] * F[c, y, x] * Ax[q, x]

with Ay (pooled height x map height) and Ax (pooled width x map width) each averaging the
interpolation weights of the bin's samples along its axis. On a 12 x 12 map (a 96 px image at
stride 8) that is a few small GEMMs, and autograd's backward is two more; torchvision's CPU
backward is a serial scatter loop that took a fifth of a training step of `fasterrcnn_tiny`.
The cost grows with the map's area, so the product form is used only for maps of at most
`SMALL_MAP` positions on the CPU, and only where a gradient is wanted: at inference torchvision's
forward (which has no serial scatter) is as fast or faster. Everything else goes to torchvision.
The values are torchvision's (`aligned` both ways, boxes partly or wholly outside the map, degenerate boxes;
tested to float rounding), and `benchmarks/roi_align.py` measures the two."""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import _filter_input, _setup_scales

# the largest map (height * width) that takes the product form; measured in benchmarks/roi_align.py
SMALL_MAP = 1024


def axis_weights(start: Tensor, end: Tensor, pooled: int, grid: int, length: int, aligned: bool) -> Tensor:
    """(R, pooled, length): each output bin's average interpolation weight on each map position
    along one axis, for RoIs from `start` to `end` in feature-map coordinates (torchvision's
    sampling: `grid` points per bin at the centres of equal sub-bins, clamped as its kernel does)."""
    offset = 0.5 if aligned else 0.0
    start, end = start - offset, end - offset
    size = end - start
    if not aligned:
        size = size.clamp(min=1.0)
    bin_size = (size / pooled)[:, None, None]
    p = torch.arange(pooled, dtype=start.dtype, device=start.device)[None, :, None]
    i = torch.arange(grid, dtype=start.dtype, device=start.device)[None, None, :]
    s = start[:, None, None] + p * bin_size + (i + 0.5) * bin_size / grid  # (R, pooled, grid)
    inside = ((s >= -1.0) & (s <= length)).to(start.dtype)
    s = s.clamp(min=0.0)
    low = s.floor().long()
    edge = low >= length - 1  # torchvision snaps these samples to the last row or column
    low, high = low.clamp(max=length - 1), (low + 1).clamp(max=length - 1)
    frac = torch.where(edge, torch.zeros_like(s), s - low.to(s.dtype))
    w = s.new_zeros(*s.shape, length)
    w.scatter_add_(-1, low[..., None], ((1 - frac) * inside)[..., None])
    w.scatter_add_(-1, high[..., None], (frac * inside)[..., None])
    return w.sum(2) / grid


def roi_align_small(features: Tensor, boxes: list[Tensor], output_size: tuple[int, int], spatial_scale: float,
                    sampling_ratio: int, aligned: bool = False) -> Tensor:
    """torchvision.ops.roi_align(features, boxes, ...) for sampling_ratio > 0, as matrix products.
    boxes: one (R_i, 4) tensor of (x1, y1, x2, y2) in image coordinates per image of the batch."""
    if sampling_ratio <= 0:
        raise ValueError("the product form needs a fixed sampling grid (sampling_ratio > 0)")
    _, c, height, width = features.shape
    ph, pw = output_size
    out = []
    for k, b in enumerate(boxes):
        r = b.shape[0]
        if r == 0:
            out.append(features.new_zeros(0, c, ph, pw))
            continue
        b = b.detach().to(features.dtype) * spatial_scale  # torchvision's RoIAlign passes no gradient to boxes
        ay = axis_weights(b[:, 1], b[:, 3], ph, sampling_ratio, height, aligned)  # (R, ph, H)
        ax = axis_weights(b[:, 0], b[:, 2], pw, sampling_ratio, width, aligned)  # (R, pw, W)
        # rows: one big GEMM over the image's map, (R*ph, H) @ (H, C*W)
        rows = ay.reshape(r * ph, height) @ features[k].permute(1, 0, 2).reshape(height, c * width)
        # columns: per RoI, (ph*C, W) @ (W, pw)
        cols = torch.bmm(rows.view(r, ph * c, width), ax.transpose(1, 2))
        out.append(cols.view(r, ph, c, pw).permute(0, 2, 1, 3))
    return torch.cat(out)


class SmallMapRoIAlign(MultiScaleRoIAlign):
    """MultiScaleRoIAlign that pools a single small CPU map with `roi_align_small` when training."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        feats = _filter_input(x, self.featmap_names)
        if (len(feats) == 1 and self.sampling_ratio > 0 and feats[0].device.type == "cpu"
                and feats[0].requires_grad and torch.is_grad_enabled()
                and feats[0].shape[-2] * feats[0].shape[-1] <= SMALL_MAP):
            if self.scales is None or self.map_levels is None:
                self.scales, self.map_levels = _setup_scales(feats, image_shapes, self.canonical_scale,
                                                             self.canonical_level)
            return roi_align_small(feats[0], boxes, self.output_size, self.scales[0], self.sampling_ratio)
        return super().forward(x, boxes, image_shapes)
