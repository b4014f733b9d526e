"""SAM's mask decoder rearranged for a CPU: the same function as mobilesam_model.MaskDecoder, ~2× fewer FLOPs.

Why it can be cheaper: the image side of the two-way transformer (4096 positions × 256 channels) is the
same for every prompt of an image until the first image→token attention, and every attention in it either
has few queries (the ~7 prompt tokens) or few keys (the same tokens). So, per image, `share()` computes once
what no prompt changes (the first layer's key/value/query projections of the image); per prompt:
- tokens→image attention (T queries): project the T queries through the key weights instead of projecting
  4096 keys (q·(Wk x) = (Wk^T q)·x; the key bias adds one constant per query row, which softmax ignores), and
  project the attention-weighted sum of the image instead of 4096 values (Σ a·(Wv x + b) = Wv (Σ a·x) + b);
- image→tokens attention (T keys): the output projection applied to the T value rows of each head, then
  mixed by the 4096×T attention weights (out_proj(A v) = A (v Wo_h^T) per head, since each row of A sums to 1);
- the ×4 upscaling's transposed convolutions (kernel 2, stride 2: no overlap) as per-pixel matrix products in
  channels-last layout, the 256² layout restored only for the final logits.
Outputs match the plain module within float32 rounding (tests compare them).
A prompt can also be decoded in two stages (`transform`, then `upscale` only if wanted), with `lattice` giving
the logits at every 4th low-res pixel (one per embedding position) for 1/16 of the upscaling's work: the
automatic pass judges a prompt's masks on them and upscales only those that may be new (auto_masks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

HEADS = 8


@dataclass(frozen=True)
class Shared:
    """What every prompt on one image shares: src = image + dense prompt, pe, and layer 1's image projections."""

    src: torch.Tensor  # 1×P×C
    pe: torch.Tensor  # 1×P×C
    k1: torch.Tensor  # 1×H×P×d: layer 1's tokens→image keys
    v1: torch.Tensor  # 1×H×P×d: its values
    q1: torch.Tensor  # 1×H×P×d: layer 1's image→tokens queries
    side: int


def _heads(x: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, HEADS, c // HEADS).transpose(1, 2)


def share(decoder, image: torch.Tensor, image_pe: torch.Tensor, dense: torch.Tensor) -> Shared:
    """image 1×C×S×S, image_pe 1×C×S×S, dense 1×C×1×1 or 1×C×S×S → the per-image part of the decoder."""
    side = image.shape[-1]
    src = (image + dense).flatten(2).transpose(1, 2).contiguous()
    pe = image_pe.flatten(2).transpose(1, 2).contiguous()
    first = decoder.transformer.layers[0]
    t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
    k = src + pe
    k1, v1, q1 = (_heads(x).contiguous() for x in (t2i.k_proj(k), t2i.v_proj(src), i2t.q_proj(k)))
    return Shared(src, pe, k1, v1, q1, side)


def _tokens_to_image(attn, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """SAM's attention with T queries over P image positions, never projecting the P keys or values."""
    q = _heads(attn.q_proj(queries))  # B×H×T×d
    d = q.shape[-1]
    wk = attn.k_proj.weight.view(HEADS, d, -1)  # H×d×C
    wv = attn.v_proj.weight.view(HEADS, d, -1)
    q_in = torch.matmul(q, wk)  # B×H×T×C: the queries seen in the image's own channels
    b, h, t, c = q_in.shape
    scores = torch.matmul(q_in.reshape(b, h * t, c), keys.transpose(1, 2)) * d**-0.5  # B×HT×P
    weights = scores.softmax(dim=-1)
    mixed = torch.matmul(weights, values).view(b, h, t, c)  # B×H×T×C
    out = torch.matmul(mixed, wv.transpose(1, 2)) + attn.v_proj.bias.view(1, h, 1, d)  # B×H×T×d
    return attn.out_proj(out.transpose(1, 2).reshape(b, t, h * d))


def _image_to_tokens(attn, scores: torch.Tensor, keys: torch.Tensor, tokens_v: torch.Tensor) -> torch.Tensor:
    """SAM's attention with P image queries over T tokens, given its scaled scores (B×H×P×T): keys + update."""
    v = _heads(attn.v_proj(tokens_v))  # B×H×T×d
    d = v.shape[-1]
    weights = scores.softmax(dim=-1)
    wo = attn.out_proj.weight.view(-1, HEADS, d).transpose(0, 1)  # H×C×d
    # each value row through out_proj; every head's weights sum to 1, so bias / H per head adds the bias once
    rows = torch.matmul(v, wo.transpose(1, 2)) + attn.out_proj.bias / HEADS  # B×H×T×C
    b, h, p, t = weights.shape
    mixed = weights.permute(0, 2, 1, 3).reshape(b, p, h * t)
    return keys + torch.matmul(mixed, rows.reshape(b, h * t, -1))  # keys broadcast: never copied per prompt


def _i2t_scores(attn, image: torch.Tensor, tokens_k: torch.Tensor) -> torch.Tensor:
    """Scaled scores B×H×P×T of P image queries (q_proj(image)) against T token keys, never projecting the P
    queries: q·k = image·(Wq^T k) + bq·k."""
    k = _heads(attn.k_proj(tokens_k))  # B×H×T×d
    b, h, t, d = k.shape
    wq = attn.q_proj.weight.view(h, d, -1)  # H×d×C
    k_in = torch.matmul(wq.transpose(1, 2), k.transpose(-1, -2))  # B×H×C×T
    const = torch.matmul(attn.q_proj.bias.view(h, 1, d), k.transpose(-1, -2))  # B×H×1×T
    c = k_in.shape[2]
    scores = torch.matmul(image, k_in.transpose(1, 2).reshape(b, c, h * t))  # B×P×HT
    scores = scores.view(b, -1, h, t).transpose(1, 2) + const
    return scores * d**-0.5


def _block(layer, queries, keys, tokens, shared: Shared, first: bool):
    """One TwoWayBlock (mobilesam_model.TwoWayBlock.forward, rearranged)."""
    i2t = layer.cross_attn_image_to_token
    if first:
        queries = layer.norm1(layer.self_attn(queries, queries, queries))
        q = _heads(layer.cross_attn_token_to_image.q_proj(queries + tokens))
        scale = q.shape[-1] ** -0.5
        weights = (torch.matmul(q, shared.k1.transpose(-1, -2)) * scale).softmax(dim=-1)
        out = torch.matmul(weights, shared.v1)  # B×H×T×d
        b, h, t, d = out.shape
        attended = layer.cross_attn_token_to_image.out_proj(out.transpose(1, 2).reshape(b, t, h * d))
        queries = layer.norm2(queries + attended)
        queries = layer.norm3(queries + layer.mlp(queries))
        k = _heads(i2t.k_proj(queries + tokens))
        scores = torch.matmul(shared.q1, k.transpose(-1, -2)) * scale
    else:
        q = queries + tokens
        queries = layer.norm1(queries + layer.self_attn(q, q, queries))
        keyed = keys + shared.pe
        attended = _tokens_to_image(layer.cross_attn_token_to_image, queries + tokens, keyed, keys)
        queries = layer.norm2(queries + attended)
        queries = layer.norm3(queries + layer.mlp(queries))
        scores = _i2t_scores(i2t, keyed, queries + tokens)
    keys = layer.norm4(_image_to_tokens(i2t, scores, keys, queries))
    return queries, keys


def upscale(decoder, keys: torch.Tensor, weights: torch.Tensor, side: int) -> torch.Tensor:
    """keys B×P×C (P = side²), mask weights B×M×C/8 → logits B×M×4side×4side (output_upscaling, then the dot):
    ~40 % of a prompt's work."""
    conv1, norm, _, conv2, _ = decoder.output_upscaling
    b = keys.shape[0]
    c1, c2 = conv1.out_channels, conv2.out_channels
    w1 = conv1.weight.permute(0, 2, 3, 1).reshape(conv1.in_channels, 4 * c1)  # columns (kh, kw, out)
    x = F.linear(keys, w1.t(), conv1.bias.repeat(4)).view(b, side, side, 2, 2, c1)
    x = F.gelu(F.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))
    w2 = conv2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)
    y = F.gelu(F.linear(x, w2.t(), conv2.bias.repeat(4)).view(b, side, side, 2, 2, 2, 2, c2))
    m = weights.shape[1]
    logits = torch.matmul(y.view(b, -1, c2), weights.transpose(1, 2))  # B×(side²·16)×M
    # (row, col) of the 4side² output = (4a + 2ah + bh, 4b + 2aw + bw)
    logits = logits.view(b, side, side, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6)
    return logits.reshape(b, m, 4 * side, 4 * side)


def transform(decoder, shared: Shared, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt tokens N×T×C on one image → the decoder up to its masks: (keys N×P×C: the image side after the
    two-way transformer, mask weights N×4×C/8: the hypernetworks' outputs, predicted IoU N×4)."""
    n = sparse.shape[0]
    out_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight])
    tokens = torch.cat([out_tokens.expand(n, -1, -1), sparse], dim=1)
    transformer = decoder.transformer
    queries, keys = tokens, shared.src
    for i, layer in enumerate(transformer.layers):
        queries, keys = _block(layer, queries, keys, tokens, shared, first=i == 0)
    final = _tokens_to_image(transformer.final_attn_token_to_image, queries + tokens, keys + shared.pe, keys)
    hs = transformer.norm_final_attn(queries + final)
    mlps = decoder.output_hypernetworks_mlps
    weights = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(mlps)], dim=1)
    return keys, weights, decoder.iou_prediction_head(hs[:, 0])


def lattice(decoder, keys: torch.Tensor, weights: torch.Tensor, side: int) -> torch.Tensor:
    """The logits at the low-res pixels (4a, 4b) only: N×4×S×S, exactly upscale(...)
    [..., ::4, ::4] for 1/16 of its work. Each low-res pixel depends on one embedding position alone (transposed
    convolutions of kernel 2, stride 2; a per-pixel norm), so one kernel tap of each convolution gives it."""
    conv1, norm, _, conv2, _ = decoder.output_upscaling
    x = F.linear(keys, conv1.weight[:, :, 0, 0].t(), conv1.bias)
    x = F.gelu(F.layer_norm(x, (conv1.out_channels,), norm.weight, norm.bias, norm.eps))
    y = F.gelu(F.linear(x, conv2.weight[:, :, 0, 0].t(), conv2.bias))
    logits = torch.matmul(y, weights.transpose(1, 2))  # N×P×M
    return logits.transpose(1, 2).reshape(keys.shape[0], weights.shape[1], side, side)


def decode(decoder, shared: Shared, sparse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt tokens N×T×C on one image → (logits N×4×4S×4S, predicted IoU N×4), as MaskDecoder.forward."""
    keys, weights, iou = transform(decoder, shared, sparse)
    return upscale(decoder, keys, weights, shared.side), iou


@dataclass
class Staged:
    """A prompt decoded in two stages (for the automatic pass): the predicted IoUs and the lattice logits now,
    the full low-res logits only when asked for (`logits()`, computed once). Arrays are numpy, N×M(×…)."""

    iou: np.ndarray  # N×M
    lattice: np.ndarray  # N×M×S×S: the logits at low-res pixels (4a, 4b)
    finish: Callable[[], np.ndarray]  # → the full low-res logits N×M×4S×4S
    _logits: np.ndarray | None = None

    def logits(self) -> np.ndarray:
        if self._logits is None:
            self._logits = self.finish()
        return self._logits
