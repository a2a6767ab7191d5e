"""segscope's Mask2Former against HF transformers' ``Mask2FormerForUniversalSegmentation``.

A randomly initialized HF model is saved with ``save_pretrained`` and read back through
segscope's converter, the way a Hub checkpoint is; both then see the same padded inputs.

Masked attention thresholds each mask logit at 0. With random weights some logits sit within
float32 rounding of 0, and the two implementations, which sum in different orders, can then
binarize one differently; a single flipped entry moves later layers by ~1e-3. So segscope runs
with HF's attention masks injected, and the tests assert that its own masks differ from them
only by such flips: few entries, each at a logit within ``NEAR_ZERO_LOGIT`` of 0. Where no entry
flips, the injected masks equal segscope's own and the run is its ordinary forward.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from segscope.checkpoints.hf import convert_hf_mask2former, mask2former_config_from_hf
from segscope.models import build_model
from segscope.models.mask2former import transformer_decoder
from segscope.models.mask2former.pixel_decoder import MSDeformAttnPixelDecoder
from segscope.models.mask2former.transformer_decoder import MaskedAttentionDecoder

transformers = pytest.importorskip("transformers")
hf_mask2former = pytest.importorskip("transformers.models.mask2former.modeling_mask2former")

TOLERANCE = 1e-4
NUM_LABELS = 10
# A flipped attention-mask entry is a rounding difference only at a logit this close to 0...
NEAR_ZERO_LOGIT = 1e-4
# ...and only a handful of entries may flip in one forward.
MAX_FLIPPED_FRACTION = 1e-5


def _hf_backbone_config(kind: str) -> transformers.PretrainedConfig:
    stages = ["stage1", "stage2", "stage3", "stage4"]
    if kind == "swin":
        return transformers.SwinConfig(
            embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, out_features=stages
        )
    return transformers.ResNetConfig(out_features=stages)


def _save_random_hf_model(
    directory: Path, backbone: transformers.PretrainedConfig, **kwargs: object
) -> torch.nn.Module:
    config = transformers.Mask2FormerConfig(
        backbone_config=backbone,
        num_labels=NUM_LABELS,
        id2label={i: f"class_{i}" for i in range(NUM_LABELS)},
        **kwargs,
    )
    torch.manual_seed(0)
    model = transformers.Mask2FormerForUniversalSegmentation(config).eval()
    model.save_pretrained(directory)
    return model


def _load_with_segscope(directory: Path) -> torch.nn.Module:
    config, class_names = mask2former_config_from_hf(json.loads((directory / "config.json").read_text()))
    assert class_names == [f"class_{i}" for i in range(NUM_LABELS)]
    model = build_model(config).eval()
    model.load_state_dict(convert_hf_mask2former(load_file(directory / "model.safetensors")), strict=True)
    return model


@pytest.fixture(scope="module", params=["swin", "resnet"])
def model_pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp(f"hf-mask2former-{request.param}")
    hf_model = _save_random_hf_model(directory, _hf_backbone_config(request.param))
    return request.param, hf_model, _load_with_segscope(directory)


def _padded_batch(sizes: list[tuple[int, int]]) -> torch.Tensor:
    """Normalized random images padded with zeros at the bottom/right to a common /32 size."""
    generator = torch.Generator().manual_seed(1)
    height = -(-max(h for h, _ in sizes) // 32) * 32
    width = -(-max(w for _, w in sizes) // 32) * 32
    images = [torch.randn(3, h, w, generator=generator) for h, w in sizes]
    return torch.stack([F.pad(image, (0, width - image.shape[2], 0, height - image.shape[1])) for image in images])


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


class _AttentionMaskSpy:
    """Stands in for ``attention_mask_from_logits``: keeps each mask segscope makes and the
    resized logits it thresholded (both ``[B*heads, Q, h*w]``), and returns ``injected[i]`` in
    place of the ``i``-th mask."""

    def __init__(self, injected: list[torch.Tensor]) -> None:
        self.injected = injected
        self.own_masks: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self._make_mask = transformer_decoder.attention_mask_from_logits

    def __call__(self, mask_logits: torch.Tensor, size: tuple[int, int], num_heads: int) -> torch.Tensor:
        self.own_masks.append(self._make_mask(mask_logits, size, num_heads))
        resized = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
        self.logits.append(resized.flatten(2).repeat_interleave(num_heads, dim=0))
        return self.injected[len(self.own_masks) - 1]


def _hf_attention_masks(hf_model: torch.nn.Module, run_hf: Callable[[], Any]) -> tuple[Any, list[torch.Tensor]]:
    """``run_hf()``'s result and the attention masks ``[B*heads, Q, h*w]`` (True: blocked) its
    decoder attended with, in call order."""
    masks: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        blocked = output[1]
        # HF's decoder loop, not the predictor, lets a query with an empty mask attend everywhere.
        masks.append(blocked & ~blocked.all(dim=-1, keepdim=True))

    predictors = [m for m in hf_model.modules() if isinstance(m, hf_mask2former.Mask2FormerMaskPredictor)]
    hooks = [predictor.register_forward_hook(keep) for predictor in predictors]
    try:
        return run_hf(), masks
    finally:
        for hook in hooks:
            hook.remove()


def _run_both_with_hf_attention_masks(
    hf_model: torch.nn.Module,
    run_hf: Callable[[], Any],
    run_segscope: Callable[[], Any],
) -> tuple[Any, Any, str]:
    """HF's and segscope's results, segscope run with HF's attention masks, and a line saying
    how many mask entries segscope itself binarized differently; asserts each is a threshold flip."""
    with torch.no_grad():
        expected, hf_masks = _hf_attention_masks(hf_model, run_hf)
        spy = _AttentionMaskSpy(hf_masks)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(transformer_decoder, "attention_mask_from_logits", spy)
            output = run_segscope()

    assert len(spy.own_masks) == len(hf_masks)
    flipped = total = 0
    worst = 0.0
    for index, (own, theirs, logits) in enumerate(zip(spy.own_masks, hf_masks, spy.logits)):
        assert own.shape == theirs.shape
        disagree = own != theirs
        if disagree.any():
            worst = max(worst, logits[disagree].abs().max().item())
            assert worst <= NEAR_ZERO_LOGIT, f"mask {index}: an entry flipped at logit {worst:.2e}, not by rounding"
        flipped += int(disagree.sum())
        total += own.numel()
    assert flipped <= MAX_FLIPPED_FRACTION * total, f"{flipped} of {total} attention-mask entries flipped"
    return expected, output, f"{flipped} of {total} attention-mask entries flipped, at |logit| <= {worst:.1e}"


# Originals that are not multiples of 32: 250x330 (with a smaller one beside it) pads to
# 256x352, 300x420 to 320x448. HF's Swin shrinks its window on maps smaller than it, so every
# stride-32 map stays above 7 pixels.
@pytest.mark.parametrize("sizes", [[(250, 330), (230, 300)], [(300, 420)]], ids=["256x352-batch2", "320x448"])
def test_outputs_match_hf_transformers(model_pair, sizes: list[tuple[int, int]]) -> None:
    backbone, hf_model, model = model_pair
    images = _padded_batch(sizes)
    expected, output, flips = _run_both_with_hf_attention_masks(
        hf_model,
        lambda: hf_model(pixel_values=images, output_auxiliary_logits=True),
        lambda: model(images),
    )

    class_diff = _max_diff(output.class_logits, expected.class_queries_logits)
    mask_diff = _max_diff(output.mask_logits, expected.masks_queries_logits)
    assert len(output.aux_outputs) == len(expected.auxiliary_logits) == 9
    aux_diff = max(
        max(_max_diff(c, e["class_queries_logits"]), _max_diff(m, e["masks_queries_logits"]))
        for (c, m), e in zip(output.aux_outputs, expected.auxiliary_logits)
    )
    print(
        f"\n{backbone} {tuple(images.shape)}: max |diff| class {class_diff:.2e}, mask {mask_diff:.2e}, "
        f"aux {aux_diff:.2e} (mask logits up to {expected.masks_queries_logits.abs().max():.2f}); "
        f"{flips}"
    )
    assert max(class_diff, mask_diff, aux_diff) <= TOLERANCE


@pytest.mark.parametrize("pre_norm", [False, True], ids=["post-norm", "pre-norm"])
def test_heads_match_hf_on_given_features_with_narrow_non_default_widths(tmp_path: Path, pre_norm: bool) -> None:
    # Widths that differ from each other exercise the decoder's input projections and a mask
    # embedding narrower than the queries; the backbone is bypassed.
    backbone = transformers.SwinConfig(
        embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8], out_features=["stage1", "stage2", "stage3", "stage4"]
    )
    hf_model = _save_random_hf_model(
        tmp_path,
        backbone,
        feature_size=64,
        mask_feature_size=32,
        hidden_dim=96,
        encoder_layers=2,
        encoder_feedforward_dim=128,
        decoder_layers=4,
        num_attention_heads=4,
        dim_feedforward=128,
        num_queries=12,
        pre_norm=pre_norm,
    )
    config, _ = mask2former_config_from_hf(json.loads((tmp_path / "config.json").read_text()))
    pixel_decoder = MSDeformAttnPixelDecoder(
        (32, 64, 128, 256),
        dim=config.pixel_decoder_dim,
        mask_dim=config.mask_dim,
        num_layers=config.pixel_decoder_layers,
        ffn_dim=config.pixel_decoder_ffn_dim,
        num_heads=config.pixel_decoder_heads,
    ).eval()
    decoder = MaskedAttentionDecoder(
        in_channels=config.pixel_decoder_dim,
        mask_dim=config.mask_dim,
        num_classes=config.num_classes,
        hidden_dim=config.hidden_dim,
        num_queries=config.num_queries,
        num_layers=config.decoder_layers,
        num_heads=config.decoder_heads,
        ffn_dim=config.decoder_ffn_dim,
        pre_norm=config.pre_norm,
    ).eval()
    weights = convert_hf_mask2former(load_file(tmp_path / "model.safetensors"))
    for name, module in [("pixel_decoder", pixel_decoder), ("transformer_decoder", decoder)]:
        module.load_state_dict({k[len(name) + 1 :]: v for k, v in weights.items() if k.startswith(name + ".")})

    generator = torch.Generator().manual_seed(2)
    features = [
        torch.randn(2, channels, 96 // stride, 128 // stride, generator=generator)
        for channels, stride in zip((32, 64, 128, 256), (4, 8, 16, 32))
    ]

    def run_hf() -> Any:
        pixels = hf_model.model.pixel_level_module.decoder(features)
        return hf_model.model.transformer_module(list(pixels.multi_scale_features), pixels.mask_features)

    def run_segscope() -> list[tuple[torch.Tensor, torch.Tensor]]:
        mask_features, multi_scale = pixel_decoder(features)
        return decoder(multi_scale, mask_features)

    hf_queries, predictions, _ = _run_both_with_hf_attention_masks(hf_model, run_hf, run_segscope)

    assert len(predictions) == len(hf_queries.masks_queries_logits) == config.decoder_layers + 1
    for (class_logits, mask_logits), hidden, hf_masks in zip(
        predictions, hf_queries.intermediate_hidden_states, hf_queries.masks_queries_logits
    ):
        assert _max_diff(class_logits, hf_model.class_predictor(hidden.transpose(0, 1))) <= TOLERANCE
        assert _max_diff(mask_logits, hf_masks) <= TOLERANCE
