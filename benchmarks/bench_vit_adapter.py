"""The COCO-Stuff ViT-Adapter card at full size: seconds per 896 x 896 window, by stage.

The model is the zoo entry ``vitadapter-beit-l-cocostuff164k-semantic`` (571M parameters)
with random weights: speed does not depend on the values. Its original implementation needs
mmcv 1.x with compiled CUDA operators and cannot be installed here, so the one side-by-side
comparison is its transformer trunk: segscope's BEiT-L against timm's on the same weights and
input (their outputs are checked to agree first). Reported: median seconds of the repeats
after one warm-up run.

    python benchmarks/bench_vit_adapter.py --size 896 --repeats 2
    python benchmarks/bench_vit_adapter.py --device cuda --dtype bfloat16 --repeats 10
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from segscope.models import build_model
from segscope.zoo import ZOO

CARD = "vitadapter-beit-l-cocostuff164k-semantic"


def median_seconds(run: Callable[[], object], repeats: int, device: torch.device) -> float:
    run()  # warm-up: allocator, kernels, caches
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timm_trunk(model: torch.nn.Module, size: int) -> torch.nn.Module:
    """timm's BEiT-L at ``size`` px holding the same weights as segscope's trunk."""
    from timm.models.beit import Beit, checkpoint_filter_fn

    vit = model.backbone.vit.config
    reference = Beit(
        img_size=size,
        patch_size=vit.patch_size,
        num_classes=0,
        embed_dim=vit.embed_dim,
        depth=vit.depth,
        num_heads=vit.num_heads,
        qkv_bias=True,
        use_abs_pos_emb=False,
        use_rel_pos_bias=True,
        init_values=vit.layer_scale_init,
    )
    state = checkpoint_filter_fn(dict(model.backbone.vit.state_dict()), reference)
    missing = reference.load_state_dict(state, strict=False).missing_keys
    assert set(missing) <= {"fc_norm.weight", "fc_norm.bias"}, missing
    return reference.eval()


def timm_tokens(reference: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    x = reference.patch_embed(images)
    x = torch.cat((reference.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    for block in reference.blocks:
        x = block(x)
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=896, help="window side in pixels (the card's: 896)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--skip-timm", action="store_true", help="time segscope only")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_model(ZOO[CARD].config).eval()
    built = time.perf_counter() - start
    parameters = sum(p.numel() for p in model.parameters())
    model = model.to(device, dtype)
    images = torch.randn(1, 3, args.size, args.size, device=device, dtype=dtype)
    print(f"{CARD}: {parameters / 1e6:.0f}M parameters, built in {built:.1f} s; {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads, window {args.size} x {args.size}")

    with torch.inference_mode():
        features = model.backbone(images)
        mask_features, multi_scale = model.pixel_decoder(features)
        rows = [
            ("ViT-Adapter backbone", lambda: model.backbone(images)),
            ("pixel decoder", lambda: model.pixel_decoder(features)),
            ("transformer decoder", lambda: model.transformer_decoder(multi_scale, mask_features)),
            ("whole model", lambda: model(images)),
        ]
        print(f"{'stage':<24} {'seconds':>8}")
        for name, run in rows:
            print(f"{name:<24} {median_seconds(run, args.repeats, device):8.3f}", flush=True)

        if args.skip_timm:
            return
        reference = timm_trunk(model.float().cpu(), args.size).to(device, dtype)
        model = model.to(device, dtype)
        difference = (model.backbone.vit(images).float() - timm_tokens(reference, images).float()).abs().max()
        ours = median_seconds(lambda: model.backbone.vit(images), args.repeats, device)
        theirs = median_seconds(lambda: timm_tokens(reference, images), args.repeats, device)
        print(f"BEiT-L trunk: timm {theirs:.3f} s, segscope {ours:.3f} s, ratio {theirs / ours:.2f} "
              f"(max |token diff| {difference:.1e})")


if __name__ == "__main__":
    main()
