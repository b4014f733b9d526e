"""MobileSAM in torch, written from the published architecture, and the low-level embed / decode / upscale calls.

The network (Zhang et al. 2023, "Faster Segment Anything"; module names follow the official checkpoint's keys so
its state dict loads with strict=True):
- image encoder: TinyViT-5M at 1024² input. A two-convolution stem (stride 4) → stage 0 of MBConv blocks at
  256² → stages 1-3 of windowed-attention blocks (embed dims 64/128/160/320, depths 2/2/6/2, heads 2/4/5/10,
  windows 7/7/14/7; patch merging halves the resolution after stages 0 and 1 only, so stages 2 and 3 run at
  64²) → a neck (1×1 conv to 256, LayerNorm2d, 3×3 conv, LayerNorm2d): a 256×64×64 embedding. Each attention
  window adds a learned bias per head indexed by the |dy|, |dx| offset between two positions.
- prompt encoder (SAM's): a point or box corner is encoded with random Fourier features of its position in
  the 1024² frame (sin and cos of 2π·(2p-1)·G, G a fixed 2×128 Gaussian matrix) plus a learned embedding
  for its kind (exclude, include, box top-left, box bottom-right; padding uses "not a point"); without a mask
  prompt, the dense prompt is the learned "no mask" embedding at every one of the 64² positions.
- mask decoder (SAM's): an IoU token and 4 mask tokens join the prompt tokens; a two-way transformer (depth 2,
  8 heads, MLP 2048; token self-attention, tokens→image and image→tokens cross-attention at half width) updates
  tokens and image; the image is upscaled ×4 by two transposed convolutions to 256², and each mask token's
  3-layer MLP gives the weights of a dot product with it: 4 mask logit maps at 256² plus 4 predicted IoUs.
  Output 0 is the single-mask answer; outputs 1-3 the multimask answers (whole / part / sub-part).

Pre- and post-processing (SAM's): the long side is resized to 1024 (bilinear), pixels normalised with
ImageNet mean/std, the rest of the 1024² frame padded with zeros; masks come back as 256² logits for the
padded frame, are upscaled to 1024², cropped to the resized image and resized to the original size; mask =
logits > 0.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

# torch's OpenMP threads sleep when idle instead of spinning (read once, when torch loads its OpenMP runtime, so
# only when torch is not imported yet; a value already set wins): prompts alternate torch and onnxruntime work,
# and spinning threads of one starve the other's on a small CPU (see mobilesam_onnx._session).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

if TYPE_CHECKING:
    import mask_decoder_fast

IMAGE_SIZE = 1024  # the encoder's square input
EMBED_SIZE = 64  # the embedding's side
LOW_RES = 256  # the decoder's mask logits' side
PROMPT_DIM = 256
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
ENCODER_DIMS = (64, 128, 160, 320)
ENCODER_DEPTHS = (2, 2, 6, 2)
ENCODER_HEADS = (2, 4, 5, 10)
ENCODER_WINDOWS = (7, 7, 14, 7)
# prompts per decoder pass: one. Each prompt's activations (~30 MB) then stay in the CPU's caches: measured
# 28–33 ms per prompt one at a time against 37–40 ms in batches of 8–64 (onnxruntime, 2 threads; a busy machine
# can reverse that: one bench_mobilesam run gave 50 ms alone, 33–45 ms batched)
DECODE_CHUNK = 1
SHARED_KEPT = 4  # images whose per-image decoder part (mask_decoder_fast.Shared, ~14 MB each) is kept


# ------------------------------------------------------------------------------------------ image encoder


class ConvNorm(nn.Sequential):
    """Convolution without bias followed by BatchNorm ('c', 'bn'); `fold()` merges the two for inference."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1):
        super().__init__()
        self.shape = (cin, cout, kernel, stride, kernel // 2, groups)
        self.add_module("c", nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))

    @torch.no_grad()
    def fold(self) -> None:
        conv, bn = self._modules["c"], self._modules["bn"]
        if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
            return  # already folded
        assert bn.running_var is not None and bn.running_mean is not None
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        cin, cout, kernel, stride, pad, groups = self.shape
        fused = nn.Conv2d(cin, cout, kernel, stride, pad, groups=groups)
        fused.weight.copy_(conv.weight * scale[:, None, None, None])
        assert fused.bias is not None
        fused.bias.copy_(bn.bias - bn.running_mean * scale)
        self.c, self.bn = fused, nn.Identity()


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW tensor (eps 1e-6, as SAM)."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight[:, None, None] + self.bias[:, None, None]


class Stem(nn.Module):
    """3 → dim/2 → dim channels, two stride-2 3×3 convolutions: 1024² → 256²."""

    def __init__(self, dim: int):
        super().__init__()
        self.seq = nn.Sequential(ConvNorm(3, dim // 2, 3, 2), nn.GELU(), ConvNorm(dim // 2, dim, 3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1×1 expand ×4, 3×3 depthwise, 1×1 project, residual, GELU after each."""

    def __init__(self, dim: int, expand: int = 4):
        super().__init__()
        hidden = dim * expand
        self.conv1 = ConvNorm(dim, hidden)
        self.conv2 = ConvNorm(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvNorm(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """1×1 conv to the next width, 3×3 depthwise conv (stride 2, or 1 into the last stage), 1×1 conv."""

    def __init__(self, dim: int, out_dim: int, stride: int):
        super().__init__()
        self.conv1 = ConvNorm(dim, out_dim)
        self.conv2 = ConvNorm(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = ConvNorm(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


class WindowAttention(nn.Module):
    """Multi-head attention inside one window, with a learned bias per head for each (|dy|, |dx|) offset."""

    offset_index: torch.Tensor

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(heads, window * window))
        rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
        rows, cols = rows.flatten(), cols.flatten()
        offset = (rows[:, None] - rows[None, :]).abs() * window + (cols[:, None] - cols[None, :]).abs()
        self.register_buffer("offset_index", offset, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        bias = self.attention_biases[:, self.offset_index]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    """LayerNorm, Linear ×4, GELU, Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention (zero-padded to whole windows) + residual, depthwise 3×3 conv, MLP + residual."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, heads, window)
        self.local_conv = ConvNorm(dim, dim, 3, groups=dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: B, H, W, C
        b, h, w, c = x.shape
        ws = self.window
        pad_h, pad_w = (-h) % ws, (-w) % ws
        y = F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else x
        nh, nw = (h + pad_h) // ws, (w + pad_w) // ws
        y = y.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        y = self.attn(y).view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, nh * ws, nw * ws, c)
        x = x + y[:, :h, :w]
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class ConvStage(nn.Module):
    """Stage 0: MBConv blocks, then patch merging (NCHW in and out)."""

    def __init__(self, dim: int, depth: int, out_dim: int):
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class AttentionStage(nn.Module):
    """Stages 1-3: TinyViT blocks (channels-last), then patch merging unless it is the last stage (NCHW out)."""

    def __init__(self, dim: int, depth: int, heads: int, window: int, out_dim: int | None, stride: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(TinyViTBlock(dim, heads, window) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim, stride) if out_dim is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x)
        x = x.permute(0, 3, 1, 2)
        return self.downsample(x) if self.downsample is not None else x


class TinyViTEncoder(nn.Module):
    """TinyViT-5M with SAM's neck: 1×3×1024×1024 normalised pixels → 1×256×64×64."""

    def __init__(self):
        super().__init__()
        dims, depths = ENCODER_DIMS, ENCODER_DEPTHS
        self.patch_embed = Stem(dims[0])
        self.layers = nn.ModuleList([ConvStage(dims[0], depths[0], dims[1])])
        for i in range(1, 4):
            out_dim = dims[i + 1] if i < 3 else None
            stride = 2 if i == 1 else 1  # stage 2 → 3 keeps 64²: the neck wants 64×64
            self.layers.append(
                AttentionStage(dims[i], depths[i], ENCODER_HEADS[i], ENCODER_WINDOWS[i], out_dim, stride)
            )
        # The ImageNet classifier TinyViT was pre-trained with: unused, kept so the checkpoint loads strictly.
        self.norm_head = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], 1000)
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], PROMPT_DIM, 1, bias=False),
            LayerNorm2d(PROMPT_DIM),
            nn.Conv2d(PROMPT_DIM, PROMPT_DIM, 3, padding=1, bias=False),
            LayerNorm2d(PROMPT_DIM),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)


# ------------------------------------------------------------------------------------------ prompt encoder


class RandomFourierPositions(nn.Module):
    """Positions in [0, 1]² → 256 features: sin and cos of 2π (2p - 1) G, G a fixed random 2×128 matrix."""

    positional_encoding_gaussian_matrix: torch.Tensor

    def __init__(self, features: int = PROMPT_DIM // 2):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, features))

    def forward(self, unit_xy: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * ((2 * unit_xy - 1) @ self.positional_encoding_gaussian_matrix)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    def grid(self, side: int) -> torch.Tensor:
        """Encoding of every cell centre of a side×side grid: 256×side×side."""
        centres = (torch.arange(side, dtype=torch.float32) + 0.5) / side
        ys, xs = torch.meshgrid(centres, centres, indexing="ij")
        return self(torch.stack([xs, ys], dim=-1)).permute(2, 0, 1)


class PromptEncoder(nn.Module):
    """Points and boxes (in the 1024² frame) → sparse tokens; the dense prompt is 'no mask' everywhere."""

    def __init__(self):
        super().__init__()
        self.pe_layer = RandomFourierPositions()
        # 0 exclude point, 1 include point, 2 box top-left, 3 box bottom-right
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, PROMPT_DIM) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, PROMPT_DIM)
        # Encodes a low-res mask prompt; unused by Mask Studio, kept so the checkpoint loads strictly.
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, 4, 2, 2), LayerNorm2d(4), nn.GELU(), nn.Conv2d(4, 16, 2, 2), LayerNorm2d(16), nn.GELU(),
            nn.Conv2d(16, PROMPT_DIM, 1),
        )  # fmt: skip
        self.no_mask_embed = nn.Embedding(1, PROMPT_DIM)

    def _encode(self, xy: torch.Tensor) -> torch.Tensor:
        return self.pe_layer((xy + 0.5) / IMAGE_SIZE)  # + 0.5: the centre of the pixel

    def forward(self, points: torch.Tensor | None, labels: torch.Tensor | None, boxes: torch.Tensor | None):
        """points N×K×2 and labels N×K (1, 0, -1 padding) and/or boxes N×4 → N×T×256 tokens."""
        tokens = []
        if points is not None and labels is not None:
            if boxes is None:  # as SAM: a padding point stands in for the absent box
                points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
                labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
            emb = self._encode(points)
            pad = (labels == -1)[..., None]
            emb = torch.where(pad, self.not_a_point_embed.weight, emb)
            emb = emb + (labels == 0)[..., None] * self.point_embeddings[0].weight
            emb = emb + (labels == 1)[..., None] * self.point_embeddings[1].weight
            tokens.append(emb)
        if boxes is not None:
            corners = self._encode(boxes.reshape(-1, 2, 2))
            corners = corners + torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])
            tokens.append(corners)
        return torch.cat(tokens, dim=1)


# ------------------------------------------------------------------------------------------ mask decoder


class TokenAttention(nn.Module):
    """SAM's attention: q, k, v projected to dim/downsample, 8 heads, projected back."""

    def __init__(self, dim: int, heads: int, downsample: int = 1):
        super().__init__()
        inner = dim // downsample
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(dim, inner), nn.Linear(dim, inner)
        self.v_proj, self.out_proj = nn.Linear(dim, inner), nn.Linear(inner, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q_proj(q)), self._split(self.k_proj(k)), self._split(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)
        b, h, n, c = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, h * c))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class TwoWayBlock(nn.Module):
    """Token self-attention, tokens→image, token MLP, image→tokens; post-norm residuals (the first layer's
    self-attention replaces the tokens, without positional encoding or residual)."""

    def __init__(self, dim: int, heads: int, mlp: int, first: bool):
        super().__init__()
        self.first = first
        self.self_attn = TokenAttention(dim, heads)
        self.cross_attn_token_to_image = TokenAttention(dim, heads, 2)
        self.mlp = FeedForward(dim, mlp)
        self.cross_attn_image_to_token = TokenAttention(dim, heads, 2)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.norm3, self.norm4 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, queries, keys, query_pe, key_pe):
        if self.first:
            queries = self.norm1(self.self_attn(queries, queries, queries))
        else:
            q = queries + query_pe
            queries = self.norm1(queries + self.self_attn(q, q, queries))
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, k, keys))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, queries + query_pe, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, dim: int = PROMPT_DIM, depth: int = 2, heads: int = 8, mlp: int = 2048):
        super().__init__()
        self.layers = nn.ModuleList(TwoWayBlock(dim, heads, mlp, first=i == 0) for i in range(depth))
        self.final_attn_token_to_image = TokenAttention(dim, heads, 2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor):
        """image B×C×H×W (+ image_pe 1×C×H×W), tokens B×T×C → (tokens B×T×C, image B×HW×C)."""
        keys = image.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, tokens, key_pe)
        out = self.final_attn_token_to_image(queries + tokens, keys + key_pe, keys)
        return self.norm_final_attn(queries + out), keys


class MaskMlp(nn.Module):
    """Linear layers with ReLU between them."""

    def __init__(self, dim: int, hidden: int, out: int, depth: int = 3):
        super().__init__()
        sizes = [dim] + [hidden] * (depth - 1) + [out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class MaskDecoder(nn.Module):
    """Image embedding + prompt tokens → 4 mask logit maps (256²) and 4 predicted IoUs per prompt."""

    masks = 4

    def __init__(self, dim: int = PROMPT_DIM):
        super().__init__()
        self.transformer = TwoWayTransformer(dim)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(self.masks, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, 2, 2), LayerNorm2d(dim // 4), nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, 2, 2), nn.GELU(),
        )  # fmt: skip
        self.output_hypernetworks_mlps = nn.ModuleList(MaskMlp(dim, dim, dim // 8) for _ in range(self.masks))
        self.iou_prediction_head = MaskMlp(dim, 256, self.masks)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor):
        """image 1×C×64×64, sparse N×T×C, dense 1×C×64×64 → (logits N×4×256×256, iou N×4)."""
        n = sparse.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight])
        tokens = torch.cat([out_tokens.expand(n, -1, -1), sparse], dim=1)
        src = (image + dense).expand(n, -1, -1, -1)
        b, c, h, w = src.shape
        hs, keys = self.transformer(src, image_pe, tokens)
        upscaled = self.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
        weights = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        b, c, h, w = upscaled.shape
        logits = (weights @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        return logits, self.iou_prediction_head(hs[:, 0])


class MobileSamNet(nn.Module):
    """The three parts under the checkpoint's names."""

    def __init__(self):
        super().__init__()
        self.image_encoder = TinyViTEncoder()
        self.prompt_encoder = PromptEncoder()
        self.mask_decoder = MaskDecoder()


# ------------------------------------------------------------------------------------------ low-level interface


@dataclass(frozen=True)
class Embedding:
    """One image's encoder output: features 1×256×64×64, the original (h, w), the resized input's (h, w)."""

    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size()


def input_size(height: int, width: int) -> tuple[int, int]:
    """SAM's resize: the long side to 1024, the other in proportion (rounded)."""
    scale = IMAGE_SIZE / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


class MobileSam:
    """The loaded network and the calls the engine and the automatic pass use (all thread-safe).

    fast_decoder: decode with mask_decoder_fast (the default; the same function rearranged, ~2× less CPU per
    prompt) or with the plain MaskDecoder module (the reference the fast one is tested against). The fast
    decoder runs on onnxruntime once mobilesam_onnx.attach has given the model one (`onnx_decoder`), the image
    encoder once mobilesam_onnx.attach_encoder has (`onnx_encoder`)."""

    def __init__(self, net: MobileSamNet, *, fast_decoder: bool = True):
        self.net = net.eval()
        self.fast_decoder = fast_decoder
        self.onnx_decoder = None  # mobilesam_onnx.attach sets it: the fast decoder on onnxruntime
        self.onnx_encoder = None  # mobilesam_onnx.attach_encoder sets it: the image encoder on onnxruntime
        self.onnx_staged = None  # mobilesam_onnx.attach sets it too: the decoder's two stages (decode_staged)
        self._shared: OrderedDict[int, tuple[torch.Tensor, object]] = OrderedDict()
        self._shared_lock = threading.Lock()
        for module in net.modules():
            if isinstance(module, ConvNorm):
                module.fold()
        self.net.requires_grad_(False)
        self._mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
        self._std = torch.tensor(PIXEL_STD).view(3, 1, 1)
        with torch.inference_mode():
            self._image_pe = net.prompt_encoder.pe_layer.grid(EMBED_SIZE)[None]
            self._dense = net.prompt_encoder.no_mask_embed.weight.view(1, -1, 1, 1)

    def embed(self, rgb: np.ndarray) -> Embedding:
        """RGB uint8 H×W×3 → its embedding (the costly step: about a second on a small CPU)."""
        from PIL import Image

        height, width = rgb.shape[:2]
        in_h, in_w = input_size(height, width)
        resized = np.array(Image.fromarray(rgb).resize((in_w, in_h), Image.Resampling.BILINEAR))
        with torch.inference_mode():
            x = (torch.from_numpy(resized).permute(2, 0, 1).float() - self._mean) / self._std
            x = F.pad(x, (0, IMAGE_SIZE - in_w, 0, IMAGE_SIZE - in_h))[None]
            features = self.net.image_encoder(x) if self.onnx_encoder is None else self.onnx_encoder(x)
        return Embedding(features.contiguous(), (height, width), (in_h, in_w))

    def decode(
        self,
        emb: Embedding,
        points: np.ndarray | None,
        labels: np.ndarray | None,
        boxes: np.ndarray | None = None,
        multimask: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Prompts in original pixel coordinates → (low-res logits N×3×256×256 float32, predicted IoU N×3)
        (N×1 each with multimask=False: SAM's single-mask output, better for several points or a box).

        points float32 N×K×2 (x, y), labels int N×K (1 include, 0 exclude, -1 padding), boxes float32 N×4
        (x0, y0, x1, y1); points or boxes may be None. Batched by DECODE_CHUNK prompts."""
        pts, lab, box = self._scaled(emb, points, labels, boxes)
        n = pts.shape[0] if pts is not None else box.shape[0]  # type: ignore[union-attr]
        keep = slice(1, None) if multimask else slice(0, 1)
        logits, ious = [], []
        with torch.inference_mode():
            for start in range(0, n, DECODE_CHUNK):
                part = slice(start, start + DECODE_CHUNK)
                sparse = self.net.prompt_encoder(
                    None if pts is None else pts[part],
                    None if lab is None else lab[part],
                    None if box is None else box[part],
                )
                low, iou = self._decode(emb, sparse)
                logits.append(low[:, keep].numpy())
                ious.append(iou[:, keep].numpy())
        return np.concatenate(logits), np.concatenate(ious)

    @staticmethod
    def _scaled(emb: Embedding, points, labels, boxes) -> tuple[torch.Tensor | None, ...]:
        """decode's prompts as tensors, from original pixels to the model's input pixels."""
        sy = emb.input_size[0] / emb.original_size[0]
        sx = emb.input_size[1] / emb.original_size[1]
        scale = np.array([sx, sy], np.float32)
        pts = None if points is None else torch.from_numpy(np.asarray(points, np.float32) * scale)
        lab = None if labels is None else torch.from_numpy(np.asarray(labels, np.int64))
        box = None if boxes is None else torch.from_numpy(np.asarray(boxes, np.float32) * np.tile(scale, 2))
        if pts is None and box is None:
            raise ValueError("decode needs points or boxes")
        return pts, lab, box

    @property
    def staged_decoding(self) -> bool:
        """Whether decode_staged saves work: the fast decoder, in torch or on its staged onnxruntime graphs (not
        when only the one-stage graph runs on onnxruntime: torch's first stage would cost more than it saves)."""
        return self.fast_decoder and (self.onnx_staged is not None or self.onnx_decoder is None)

    def decode_staged(self, emb: Embedding, points: np.ndarray, labels: np.ndarray) -> mask_decoder_fast.Staged:
        """decode(emb, points, labels) with multimask=True in two stages (mask_decoder_fast.Staged): predicted
        IoUs N×3 and the logits at every 4th low-res pixel now, the full low-res logits when asked for."""
        import mask_decoder_fast

        pts, lab, _ = self._scaled(emb, points, labels, None)
        decoder, shared = self.net.mask_decoder, self._shared_part(emb)
        with torch.inference_mode():
            sparse = self.net.prompt_encoder(pts, lab, None)
            if self.onnx_staged is not None:
                staged = self.onnx_staged
                keys, weights, iou, lattice = staged.prompt(shared, sparse)
                return mask_decoder_fast.Staged(iou[:, 1:], lattice[:, 1:], lambda: staged.masks(keys, weights[:, 1:]))
            keys, weights, iou = mask_decoder_fast.transform(decoder, shared, sparse)
            lattice = mask_decoder_fast.lattice(decoder, keys, weights[:, 1:], shared.side)

        def finish() -> np.ndarray:
            with torch.inference_mode():
                return mask_decoder_fast.upscale(decoder, keys, weights[:, 1:], shared.side).numpy()

        return mask_decoder_fast.Staged(iou[:, 1:].numpy(), lattice.numpy(), finish)

    def _decode(self, emb: Embedding, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decoder = self.net.mask_decoder
        if not self.fast_decoder:
            return decoder(emb.features, self._image_pe, sparse, self._dense)
        import mask_decoder_fast

        if self.onnx_decoder is not None:
            return self.onnx_decoder(self._shared_part(emb), sparse)
        return mask_decoder_fast.decode(decoder, self._shared_part(emb), sparse)

    def _shared_part(self, emb: Embedding):
        """The decoder's per-image part for this embedding, from a small LRU (a click after a click reuses it)."""
        import mask_decoder_fast

        key = id(emb.features)
        with self._shared_lock:
            hit = self._shared.get(key)
            if hit is not None and hit[0] is emb.features:  # the tensor itself, not a reused id
                self._shared.move_to_end(key)
                return hit[1]
        shared = mask_decoder_fast.share(self.net.mask_decoder, emb.features, self._image_pe, self._dense)
        with self._shared_lock:
            self._shared[key] = (emb.features, shared)
            while len(self._shared) > SHARED_KEPT:
                self._shared.popitem(last=False)
        return shared

    def low_res_frame(self, emb: Embedding) -> tuple[int, int, float, float]:
        """Where the image lies in the decoder's low-res logits: the rows and columns it covers (the rest is
        the padding of the square input) and the scale from original pixels to low-res pixels along x and y."""
        in_h, in_w = emb.input_size
        height, width = emb.original_size
        rows, cols = -(-in_h * LOW_RES // IMAGE_SIZE), -(-in_w * LOW_RES // IMAGE_SIZE)
        return rows, cols, in_w / width * LOW_RES / IMAGE_SIZE, in_h / height * LOW_RES / IMAGE_SIZE

    def point_features(self, emb: Embedding, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """The image embedding at original pixels (xs, ys): N×256 float32 vectors of unit length (the
        automatic pass compares places with them)."""
        from auto_masks import embedding_at

        return embedding_at(
            emb.features[0].numpy(),
            xs,
            ys,
            emb.input_size[1] / emb.original_size[1],
            emb.input_size[0] / emb.original_size[0],
            IMAGE_SIZE,
        )

    def full_masks(self, emb: Embedding, low_res_logits: np.ndarray) -> np.ndarray:
        """Low-res logits M×256×256 → boolean masks M×H×W, `to_full(...) > 0` computed only inside the window
        each mask can reach (mask_upscale: a fraction of the cost for a mask covering a fraction of the picture)."""
        import mask_upscale

        geometry = mask_upscale.Geometry(LOW_RES, IMAGE_SIZE, emb.input_size, emb.original_size)
        return mask_upscale.full_masks(np.asarray(low_res_logits, np.float32), geometry)

    def to_full(self, emb: Embedding, low_res_logits: np.ndarray) -> np.ndarray:
        """Low-res logits M×256×256 → logits M×H×W at the original size (mask = logits > 0)."""
        in_h, in_w = emb.input_size
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(low_res_logits, np.float32))[:, None]
            x = F.interpolate(x, (IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
            x = x[..., :in_h, :in_w]
            x = F.interpolate(x, emb.original_size, mode="bilinear", align_corners=False)
        return x[:, 0].numpy()


def load(path: Path, *, fast_decoder: bool = True) -> MobileSam:
    """Build the network and load a checkpoint strictly (raises what torch raises: the caller translates)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = MobileSamNet()
    net.load_state_dict(state, strict=True)
    return MobileSam(net, fast_decoder=fast_decoder)
