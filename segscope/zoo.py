"""The model zoo: the one place where a model name becomes a config and a weight source."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from segscope.config import (
    BeitConfig,
    CascadeMaskRCNNConfig,
    Mask2FormerConfig,
    PreprocessConfig,
    ResNetConfig,
    SwinConfig,
    ViTAdapterConfig,
)

# "hf": a transformers directory on the Hub; "segscope": a file in the package; the others are
# files at a URL in a foreign layout (the architecture's ``file_formats`` in ``segscope.registry``).
WeightFormat = Literal["hf", "detectron2", "segscope", "mmseg0", "mmseg1", "mmdet2", "mmdet3", "modelscope"]
Task = Literal["panoptic", "semantic", "instance"]


@dataclass(frozen=True)
class WeightSource:
    """Where a model's weights live and in which format.

    Exactly one of ``hub_id`` (a Hugging Face repository), ``url`` or ``package_file`` (a
    file shipped inside segscope) is set. ``sha256``, when known, is checked after a URL
    download (a mismatch is refused before the file enters the cache).
    """

    format: WeightFormat
    hub_id: str | None = None
    url: str | None = None
    package_file: str | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.hub_id, self.url, self.package_file)) != 1:
            raise ValueError("a WeightSource needs exactly one of hub_id, url, package_file")


@dataclass(frozen=True)
class ZooEntry:
    """A published model: architecture, categories, weights, and the figure its card reports."""

    name: str
    config: Any  # a registered architecture's config (segscope.registry)
    categories: str
    source: WeightSource
    default_task: Task
    card_metric: str
    description: str
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)


def _swin(embed_dim: int, depths: tuple[int, ...], heads: tuple[int, ...], window: int) -> SwinConfig:
    return SwinConfig(
        embed_dim=embed_dim,
        depths=depths,
        num_heads=heads,
        window_size=window,
        pretrain_img_size=384 if window == 12 else 224,
    )


_SWIN_VARIANTS: dict[str, tuple[SwinConfig, str, str]] = {
    # name: (backbone, HF hub id, PQ reported by the Mask2Former model zoo)
    "t": (_swin(96, (2, 2, 6, 2), (3, 6, 12, 24), 7), "facebook/mask2former-swin-tiny-coco-panoptic", "PQ 53.2"),
    "s": (_swin(96, (2, 2, 18, 2), (3, 6, 12, 24), 7), "facebook/mask2former-swin-small-coco-panoptic", "PQ 54.6"),
    "b": (_swin(128, (2, 2, 18, 2), (4, 8, 16, 32), 12), "facebook/mask2former-swin-base-coco-panoptic", "PQ 55.1"),
    "l": (_swin(192, (2, 2, 18, 2), (6, 12, 24, 48), 12), "facebook/mask2former-swin-large-coco-panoptic", "PQ 57.8"),
}


# A Mask2Former small enough to train from scratch on the synthetic shapes on a CPU and to
# ship inside the package (2M parameters): a 4-stage Swin of width 32 with 4x4 windows
# (128-pixel images divide into whole windows at every stage), a 64-wide pixel decoder and
# queries, 3 encoder and 4 decoder layers. ``scripts/train_demo.py`` trains it.
DEMO_CONFIG = Mask2FormerConfig(
    backbone=SwinConfig(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=4, drop_path_rate=0.1),
    num_classes=6,
    pixel_decoder_dim=64,
    mask_dim=64,
    pixel_decoder_layers=3,
    pixel_decoder_ffn_dim=256,
    pixel_decoder_heads=4,
    hidden_dim=64,
    num_queries=20,
    decoder_layers=4,
    decoder_heads=4,
    decoder_ffn_dim=256,
    train_num_points=1024,
)
DEMO_PREPROCESS = PreprocessConfig(short_side=128, max_size=256)


_VIT_ADAPTER_RELEASES = "https://github.com/czczup/ViT-Adapter/releases/download/"


def vit_adapter_mask2former(
    *,
    windowed: bool,
    num_classes: int,
    head_dim: int,
    head_heads: int,
    ffn_dims: tuple[int, int],
    queries: int,
    drop_path: float,
) -> Mask2FormerConfig:
    """The ViT-Adapter-L (BEiT-L/16, 24 blocks) Mask2Former of the two ViT-Adapter cards.

    ``windowed``: the COCO panoptic detector's BEiTv2 (14-patch windows, every sixth block
    in 56-patch windows, no class token, the last interaction's tokens added to every map);
    else the COCO-Stuff segmenter's BEiT (global attention over a 56x56 grid, class token,
    each interaction's tokens added to its own map). ``ffn_dims``: (pixel decoder, decoder).
    """
    vit = BeitConfig(
        drop_path_rate=drop_path,
        cls_token=not windowed,
        rel_pos_grid=56,
        window_sizes=((14,) * 5 + (56,)) * 4 if windowed else (),
    )
    return Mask2FormerConfig(
        backbone=ViTAdapterConfig(vit=vit, vit_feature_per_interaction=not windowed),
        num_classes=num_classes,
        pixel_decoder_dim=head_dim,
        mask_dim=head_dim,
        pixel_decoder_ffn_dim=ffn_dims[0],
        pixel_decoder_heads=head_heads,
        hidden_dim=head_dim,
        num_queries=queries,
        decoder_heads=head_heads,
        decoder_ffn_dim=ffn_dims[1],
    )


# mmseg's COCO-Stuff test: short side 896 (long side at most 3584), stretched to a multiple of
# 32, 896x896 windows every 512 pixels.
COCO_STUFF_896_SLIDING = PreprocessConfig(
    short_side=896, max_size=3584, resize_to_multiple=True, window=896, window_stride=512
)


def _build_zoo() -> dict[str, ZooEntry]:
    entries = [
        ZooEntry(
            name="demo",
            config=DEMO_CONFIG,
            categories="synthetic_shapes",
            source=WeightSource(format="segscope", package_file="weights/demo.safetensors"),
            default_task="panoptic",
            card_metric="PQ 78.1 (synthetic shapes)",
            description="tiny Mask2Former trained on segscope's synthetic shapes; works offline",
            preprocess=DEMO_PREPROCESS,
        ),
        ZooEntry(
            name="mask2former-r50-coco-panoptic",
            config=Mask2FormerConfig(backbone=ResNetConfig(depth=50), num_classes=133),
            categories="coco_panoptic",
            source=WeightSource(
                format="detectron2",
                url="https://dl.fbaipublicfiles.com/maskformer/mask2former/coco/panoptic/"
                "maskformer2_R50_bs16_50ep/model_final_94dc52.pkl",
            ),
            default_task="panoptic",
            card_metric="PQ 51.6",
            description="Mask2Former, ResNet-50, COCO panoptic (133 classes)",
        )
    ]
    entries += [
        ZooEntry(
            name="vitadapter-beit-l-cocostuff164k-semantic",
            config=vit_adapter_mask2former(
                windowed=False,
                num_classes=171,
                head_dim=1024,
                head_heads=32,
                ffn_dims=(4096, 4096),
                queries=200,
                drop_path=0.3,
            ),
            categories="coco_stuff",
            source=WeightSource(
                format="mmseg0",
                url=_VIT_ADAPTER_RELEASES + "v0.2.6/mask2former_beit_adapter_large_896_80k_cocostuff164k.zip",
            ),
            default_task="semantic",
            card_metric="mIoU 47.2 (aAcc 69.9, mAcc 57.2)",
            description="ViT-Adapter-L (BEiT-L) + Mask2Former, COCO-Stuff-164k semantic (171 classes), sliding 896",
            preprocess=COCO_STUFF_896_SLIDING,
        ),
        ZooEntry(
            name="vitadapter-beitv2-l-coco-panoptic",
            config=vit_adapter_mask2former(
                windowed=True,
                num_classes=133,
                head_dim=256,
                head_heads=8,
                ffn_dims=(1024, 2048),
                queries=100,
                drop_path=0.4,
            ),
            categories="coco_panoptic",
            source=WeightSource(
                format="mmdet2",
                url=_VIT_ADAPTER_RELEASES + "panoptic/mask2former_beitv2_adapter_large_16x1_3x_coco-panoptic.pth",
            ),
            default_task="panoptic",
            card_metric="PQ 58.4 (things 65.0, stuff 48.4), box AP 52.9, mask AP 48.9",
            description="ViT-Adapter-L (BEiTv2-L, windowed) + Mask2Former, COCO panoptic (133 classes)",
        ),
    ]
    entries.append(
        ZooEntry(
            name="cascade-mask-rcnn-swin-b-coco-instance",
            # Swin-B (window 7, ImageNet-22k at 224 px), FPN, three cascade stages, 80 COCO classes.
            config=CascadeMaskRCNNConfig(),
            categories="coco_instances",
            source=WeightSource(
                format="mmdet2",
                url="https://github.com/SwinTransformer/storage/releases/download/v1.0.2/"
                "cascade_mask_rcnn_swin_base_patch4_window7.pth",
            ),
            default_task="instance",
            # The card's figures; the Swin project lists 51.9 / 45.0 for this release.
            card_metric="box AP 52.7, mask AP 46.1",
            description="Cascade Mask R-CNN, Swin-B, COCO instances (80 classes)",
        )
    )
    for size, (backbone, hub_id, metric) in _SWIN_VARIANTS.items():
        large = size == "l"
        entries.append(
            ZooEntry(
                name=f"mask2former-swin-{size}-coco-panoptic",
                # The Swin-L model was trained with 200 queries, the others with 100.
                config=Mask2FormerConfig(backbone=backbone, num_classes=133, num_queries=200 if large else 100),
                categories="coco_panoptic",
                source=WeightSource(format="hf", hub_id=hub_id),
                # The Swin-L card serves the panoptic model as a semantic segmenter (mIoU 67.2).
                default_task="semantic" if large else "panoptic",
                card_metric="mIoU 67.2 (semantic), " + metric if large else metric,
                description=f"Mask2Former, Swin-{size.upper()}, trained COCO panoptic (133 classes)",
            )
        )
    return {entry.name: entry for entry in entries}


ZOO: dict[str, ZooEntry] = _build_zoo()

# Short names people type.
ALIASES: dict[str, str] = {
    "mask2former-swin-tiny-coco-panoptic": "mask2former-swin-t-coco-panoptic",
    "mask2former-swin-small-coco-panoptic": "mask2former-swin-s-coco-panoptic",
    "mask2former-swin-base-coco-panoptic": "mask2former-swin-b-coco-panoptic",
    "mask2former-swin-large-coco-panoptic": "mask2former-swin-l-coco-panoptic",
}


def get_entry(name: str) -> ZooEntry | None:
    """The zoo entry called ``name`` (or one of its aliases), else None."""
    return ZOO.get(ALIASES.get(name, name))


def list_models() -> list[str]:
    """Names of the models in the zoo."""
    return sorted(ZOO)
