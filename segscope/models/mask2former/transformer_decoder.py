"""Mask2Former's masked-attention transformer decoder and its prediction heads.

Learned queries attend, one level per layer (coarsest first, round-robin), only to the pixels
inside the mask they predicted at the previous step. After the initial queries and after
every layer, the shared heads turn each query into class logits and a mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segscope.models.init import caffe2_xavier_init
from segscope.models.ops.position_encoding import sine_position_encoding

Prediction = tuple[Tensor, Tensor]  # class logits [B,Q,C+1], mask logits [B,Q,H/4,W/4]


def attention_mask_from_logits(mask_logits: Tensor, size: tuple[int, int], num_heads: int) -> Tensor:
    """Masked attention's mask from ``mask_logits [B,Q,H,W]`` for a level of ``size (h, w)``.

    Returns ``[B*num_heads, Q, h*w]`` bool, True where a query may not attend: outside its
    predicted mask (sigmoid < 0.5 after bilinear resizing). A query whose mask is empty at
    this level would attend to nothing (a softmax over no keys is NaN), so it attends
    everywhere instead. No gradient flows through the mask.
    """
    resized = F.interpolate(mask_logits.detach(), size=size, mode="bilinear", align_corners=False)
    # Compare the sigmoid with 0.5, not the logit with 0, to binarize exactly like the references.
    blocked = resized.flatten(2).sigmoid() < 0.5
    blocked &= ~blocked.all(dim=-1, keepdim=True)
    return blocked.repeat_interleave(num_heads, dim=0)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class MaskedAttentionLayer(nn.Module):
    """Masked cross-attention -> self-attention -> FFN, each with a residual and a LayerNorm.

    Post-norm (normalize after each residual sum) by default; ``pre_norm`` normalizes each
    block's input instead.
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, pre_norm: bool = False) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.cross_attn_norm = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.self_attn_norm = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        # The reference initialization: Xavier for every matrix, biases as PyTorch sets them.
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    def forward(
        self, queries: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor, attn_mask: Tensor
    ) -> Tensor:
        """Update ``queries [B,Q,C]`` from ``memory [B,S,C]``.

        ``attn_mask [B*heads, Q, S]`` is True where a query may NOT attend (PyTorch's
        convention); position encodings are added to queries and keys, never to values.
        """

        def cross(x: Tensor) -> Tensor:
            return self.cross_attn(
                x + query_pos, memory + memory_pos, memory, attn_mask=attn_mask, need_weights=False
            )[0]

        def self_attend(x: Tensor) -> Tensor:
            q = x + query_pos
            return self.self_attn(q, q, x, need_weights=False)[0]

        def ffn(x: Tensor) -> Tensor:
            return self.linear2(F.relu(self.linear1(x)))

        blocks = ((cross, self.cross_attn_norm), (self_attend, self.self_attn_norm), (ffn, self.ffn_norm))
        for block, norm in blocks:
            queries = queries + block(norm(queries)) if self.pre_norm else norm(queries + block(queries))
        return queries


class MaskedAttentionDecoder(nn.Module):
    """Multi-scale features + mask features -> ``num_layers + 1`` (class, mask) predictions.

    The first prediction comes from the learned queries alone, one more follows each layer;
    the last is the model's output, the others feed the auxiliary losses.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        mask_dim: int,
        num_classes: int,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_layers: int = 9,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        pre_norm: bool = False,
        num_levels: int = 3,
        enforce_input_projection: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_pos = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(num_levels, hidden_dim)
        project = in_channels != hidden_dim or enforce_input_projection
        self.input_proj = nn.ModuleList(
            nn.Conv2d(in_channels, hidden_dim, 1) if project else nn.Identity() for _ in range(num_levels)
        )
        for projection in self.input_proj:
            if isinstance(projection, nn.Conv2d):
                caffe2_xavier_init(projection)
        self.layers = nn.ModuleList(
            MaskedAttentionLayer(hidden_dim, num_heads, ffn_dim, pre_norm) for _ in range(num_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_head = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_head = MLP(hidden_dim, hidden_dim, mask_dim, num_layers=3)

    def forward(self, multi_scale_features: list[Tensor], mask_features: Tensor) -> list[Prediction]:
        """``multi_scale_features``: ``num_levels`` maps ``[B,C,H_l,W_l]``, coarsest first;
        ``mask_features [B, mask_dim, H/4, W/4]``. Returns ``num_layers + 1`` predictions."""
        if len(multi_scale_features) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature maps, got {len(multi_scale_features)}")
        memories, memory_pos, sizes = [], [], []
        for level, x in enumerate(multi_scale_features):
            height, width = x.shape[-2:]
            sizes.append((height, width))
            pos = sine_position_encoding(height, width, self.level_embed.embedding_dim, device=x.device, dtype=x.dtype)
            memory_pos.append(pos.flatten(1).t()[None])  # [1, HW, C]
            memory = self.input_proj[level](x).flatten(2).transpose(1, 2)
            memories.append(memory + self.level_embed.weight[level])

        batch = mask_features.shape[0]
        queries = self.query_feat.weight[None].expand(batch, -1, -1)
        query_pos = self.query_pos.weight[None].expand(batch, -1, -1)

        class_logits, mask_logits, attn_mask = self._predict(queries, mask_features, sizes[0])
        predictions = [(class_logits, mask_logits)]
        for i, layer in enumerate(self.layers):
            level = i % self.num_levels
            queries = layer(queries, query_pos, memories[level], memory_pos[level], attn_mask)
            next_size = sizes[(i + 1) % self.num_levels]
            class_logits, mask_logits, attn_mask = self._predict(queries, mask_features, next_size)
            predictions.append((class_logits, mask_logits))
        return predictions

    def _predict(
        self, queries: Tensor, mask_features: Tensor, attn_size: tuple[int, int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Class logits, mask logits and the next layer's attention mask of ``queries [B,Q,C]``."""
        normed = self.decoder_norm(queries)
        class_logits = self.class_head(normed)
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_head(normed), mask_features)
        return class_logits, mask_logits, attention_mask_from_logits(mask_logits, attn_size, self.num_heads)
