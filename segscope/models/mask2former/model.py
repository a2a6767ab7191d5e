"""Mask2Former: backbone -> pixel decoder -> masked-attention transformer decoder."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from segscope.config import Mask2FormerConfig
from segscope.models.backbones import build_backbone
from segscope.models.mask2former.criterion import SetCriterion, Target
from segscope.models.mask2former.pixel_decoder import NUM_ENCODER_LEVELS, MSDeformAttnPixelDecoder
from segscope.models.mask2former.transformer_decoder import MaskedAttentionDecoder


@dataclass
class Mask2FormerOutput:
    """Raw predictions for a batch of ``B`` padded images of size ``H x W``.

    ``class_logits [B,Q,C+1]``: per-query class scores, the last column "no object".
    ``mask_logits [B,Q,H/4,W/4]``: per-query mask logits at stride 4 of the padded input.
    ``aux_outputs``: ``(class_logits, mask_logits)`` of the initial queries and of every
    decoder layer but the last, in order (for the auxiliary losses).
    """

    class_logits: Tensor
    mask_logits: Tensor
    aux_outputs: list[tuple[Tensor, Tensor]] = field(default_factory=list)


class Mask2Former(nn.Module):
    """Mask2Former (Cheng et al., 2022) for panoptic, semantic and instance segmentation."""

    # The head parameters BEiT's segmentation recipe puts at the bottom of the layer-decay stack
    # (the ViT-Adapter COCO-Stuff config's ``LayerDecayOptimizerConstructor``): mask and class
    # heads, query and level embeddings of the transformer decoder.
    head_embeddings = re.compile(r"transformer_decoder\.(mask_head|class_head|level_embed|query_pos|query_feat)\.")

    def __init__(self, cfg: Mask2FormerConfig) -> None:
        super().__init__()
        self.config = cfg
        self.backbone = build_backbone(cfg.backbone)
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            tuple(self.backbone.out_channels),
            dim=cfg.pixel_decoder_dim,
            mask_dim=cfg.mask_dim,
            num_layers=cfg.pixel_decoder_layers,
            ffn_dim=cfg.pixel_decoder_ffn_dim,
            num_heads=cfg.pixel_decoder_heads,
            num_points=cfg.deform_num_points,
        )
        self.transformer_decoder = MaskedAttentionDecoder(
            in_channels=cfg.pixel_decoder_dim,
            mask_dim=cfg.mask_dim,
            num_classes=cfg.num_classes,
            hidden_dim=cfg.hidden_dim,
            num_queries=cfg.num_queries,
            num_layers=cfg.decoder_layers,
            num_heads=cfg.decoder_heads,
            ffn_dim=cfg.decoder_ffn_dim,
            pre_norm=cfg.pre_norm,
            num_levels=NUM_ENCODER_LEVELS,
            enforce_input_projection=cfg.enforce_input_projection,
        )
        # Holds no weights (its class weights are a non-persistent buffer).
        self.criterion = SetCriterion.from_config(cfg)

    def forward(
        self, images: Tensor, targets: Sequence[Target] | None = None
    ) -> Mask2FormerOutput | dict[str, Tensor]:
        """``images [B,3,H,W]``: normalized, padded to multiples of 32 by the preprocessing.

        Without ``targets``, the raw outputs. With them (one ``{"labels" [K], "masks"
        [K,H,W]}`` per image), the weighted losses of every decoder layer, computed in
        float32 whatever autocast runs the network in.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [B,3,H,W], got {tuple(images.shape)}")
        mask_features, multi_scale = self.pixel_decoder(self.backbone(images))
        *aux, (class_logits, mask_logits) = self.transformer_decoder(multi_scale, mask_features)
        outputs = Mask2FormerOutput(class_logits, mask_logits, aux)
        if targets is None:
            return outputs
        with torch.autocast(images.device.type, enabled=False):
            return self.criterion(outputs, targets)
