"""The page's RLE decoder (static/rle.js) against pycocotools, run with Node when it is installed."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'segscope[serve]'")

import json
import shutil
import subprocess

import numpy as np

from segscope.evaluation.rle import masks_to_rle
from segscope.service.app import STATIC


def test_rle_js_decodes_what_pycocotools_encodes() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed")
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 37, 53), dtype=bool)
    masks[0] = rng.random((37, 53)) < 0.3  # many short runs, negative deltas in the encoding
    masks[1, 5:30, 10:50] = True  # long runs
    masks[2, -1, -1] = True  # the last pixel only
    script = (
        f"const {{ paintRle }} = require({json.dumps(str(STATIC / 'rle.js'))});"
        f"const rles = {json.dumps(masks_to_rle(masks))};"
        "const out = rles.map((rle) => { const m = new Int32Array(rle.size[0] * rle.size[1]).fill(-1);"
        "paintRle(rle, 1, m); return Array.from(m, (v) => v === 1 ? 1 : 0); });"
        "process.stdout.write(JSON.stringify(out));"
    )
    decoded = json.loads(subprocess.run([node, "-e", script], capture_output=True, check=True, timeout=60).stdout)
    assert np.array_equal(np.array(decoded, dtype=bool).reshape(masks.shape), masks)
