"""segscope's ViT-Adapter against the ViT-Adapter project's own ``BEiTAdapter``, on the same weights.

The original needs mmcv/mmseg/mmdet and a compiled CUDA operator, none of which install with
current PyTorch. This script runs its source files from a local checkout of
https://github.com/czczup/ViT-Adapter as they are, with the few imports they make of those
frameworks answered by inert stand-ins (a registry decorator, a logger) and the CUDA operator
replaced by the pure-PyTorch core the original ships beside it (``ms_deform_attn_core_pytorch``).
Both variants are checked: ``segmentation/`` (BEiT, class token, per-interaction features) and
``detection/`` (windowed BEiTv2 layout, last-interaction features). Weights are random, moved
into segscope's model by the mmlab converter's backbone rules, and loaded strictly.

    python scripts/compare_vit_adapter_original.py --repo /path/to/ViT-Adapter
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from segscope.checkpoints.mmlab import _BACKBONE_RULES, _DROPPED
from segscope.checkpoints.renaming import rename_key
from segscope.checkpoints.safe_load import load_state_dict_strict
from segscope.config import BeitConfig, ViTAdapterConfig
from segscope.models.backbones.vit_adapter import ViTAdapter

_REGISTRY = """class _Registry:
    def register_module(self, *args, **kwargs):
        return args[0] if args and isinstance(args[0], type) else (lambda cls: cls)
BACKBONES = _Registry()
"""
_LOGGER = "import logging\ndef get_root_logger(*args, **kwargs):\n    return logging.getLogger()\n"
_OPS = """from .ms_deform_attn_func import ms_deform_attn_core_pytorch
class MSDeformAttnFunction:
    @staticmethod
    def apply(value, shapes, starts, locations, weights, im2col_step):
        return ms_deform_attn_core_pytorch(value, shapes, locations, weights)
"""


def stage_original(repo: Path, into: Path) -> None:
    """The original's backbone files, importable, with stand-ins for what they import."""
    files = {
        "mmcv_custom/__init__.py": "def load_checkpoint(*args, **kwargs):\n    raise RuntimeError('unused')\n",
        "MultiScaleDeformableAttention.py": "",
        "ops/__init__.py": "",
        "ops/functions/__init__.py": _OPS,
        "ops/modules/__init__.py": "from .ms_deform_attn import MSDeformAttn\n",
    }
    for toolbox in ("mmseg", "mmdet"):
        files |= {
            f"{toolbox}/__init__.py": "",
            f"{toolbox}/models/__init__.py": "",
            f"{toolbox}/models/builder.py": _REGISTRY,
            f"{toolbox}/utils/__init__.py": _LOGGER,
        }
    for path, text in files.items():
        (into / path).parent.mkdir(parents=True, exist_ok=True)
        (into / path).write_text(text)
    shutil.copy(repo / "detection/ops/functions/ms_deform_attn_func.py", into / "ops/functions")
    shutil.copy(repo / "detection/ops/modules/ms_deform_attn.py", into / "ops/modules")
    for variant, folder in (("segpkg", "segmentation/mmseg_custom"), ("detpkg", "detection/mmdet_custom")):
        source = repo / folder / "models/backbones"
        (into / variant / "base").mkdir(parents=True)
        (into / variant / "__init__.py").write_text("")
        (into / variant / "base/__init__.py").write_text("")
        shutil.copy(source / "base/beit.py", into / variant / "base")
        shutil.copy(source / "beit_adapter.py", into / variant)
        shutil.copy(source / "adapter_modules.py", into / variant)


def randomize(module: torch.nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                if "running_var" in name:
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
                else:
                    tensor.copy_(0.2 * torch.randn(tensor.shape, generator=generator))


def compare(variant: str, size: tuple[int, int]) -> float:
    windows = [2, 2, 2, 4]
    if variant == "segmentation":
        from segpkg.beit_adapter import BEiTAdapter

        extra: dict = {}
        vit = BeitConfig(embed_dim=32, depth=4, num_heads=2, rel_pos_grid=4, layer_scale_init=0.1, drop_path_rate=0.0)
    else:
        from detpkg.beit_adapter import BEiTAdapter

        extra = {"window_attn": [True] * 4, "window_size": windows}
        vit = BeitConfig(
            embed_dim=32, depth=4, num_heads=2, rel_pos_grid=4, layer_scale_init=0.1, drop_path_rate=0.0,
            cls_token=False, window_sizes=tuple(windows),
        )
    original = BEiTAdapter(
        img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2, mlp_ratio=4, qkv_bias=True,
        use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1, drop_path_rate=0.0, conv_inplane=8,
        n_points=4, deform_num_heads=2, cffn_ratio=0.25, deform_ratio=0.5,
        interaction_indexes=[[0, 0], [1, 1], [2, 2], [3, 3]], **extra,
    )
    randomize(original)
    ours = ViTAdapter(
        ViTAdapterConfig(
            vit=vit, conv_inplane=8, deform_num_heads=2, interaction_indexes=((0, 0), (1, 1), (2, 2), (3, 3)),
            vit_feature_per_interaction=variant == "segmentation",
        )
    )
    weights = {}
    for key, value in original.state_dict().items():
        released = f"backbone.{key}"  # as the released checkpoints name it
        if not _DROPPED.fullmatch(released):
            weights[(rename_key(released, _BACKBONE_RULES) or released).removeprefix("backbone.")] = value
    load_state_dict_strict(ours, weights, "the original's weights")
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = original.eval()(images), ours.eval()(images)
    difference = max((a - e).abs().max().item() for a, e in zip(actual, expected))
    print(f"{variant:<12} {size[0]}x{size[1]}: max |difference| over the four maps {difference:.1e}")
    return difference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, required=True, help="a checkout of czczup/ViT-Adapter")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as staging:
        stage_original(args.repo, Path(staging))
        sys.path.insert(0, staging)
        # The segmentation BEiT's bias index is built for its 4x4 construction grid.
        results = [compare("segmentation", (64, 64)), compare("detection", (64, 96)), compare("detection", (96, 160))]
    sys.exit(0 if max(results) <= 1e-4 else 1)


if __name__ == "__main__":
    main()
