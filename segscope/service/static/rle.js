// COCO compressed RLE (pycocotools' string form) decoded into a per-pixel segment index map.
"use strict";

/** The run lengths of a pycocotools ``counts`` string (rleFrString in maskApi.c). */
function rleCounts(text) {
  const counts = [];
  let p = 0;
  while (p < text.length) {
    let x = 0, k = 0, more = 1;
    while (more) {
      const c = text.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      p++;
      k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

/** Paint segment ``index`` into ``map`` (row-major Int32Array of H*W) wherever its RLE mask is set. */
function paintRle(rle, index, map) {
  const [height, width] = rle.size;
  const counts = typeof rle.counts === "string" ? rleCounts(rle.counts) : rle.counts;
  let position = 0;  // column-major position, as COCO stores masks
  for (let i = 0; i < counts.length; i++) {
    const end = position + counts[i];
    if (i % 2 === 1) {
      for (let q = position; q < end; q++) {
        const y = q % height, x = (q - y) / height;
        map[y * width + x] = index;
      }
    }
    position = end;
  }
}

if (typeof module !== "undefined") module.exports = { rleCounts, paintRle };
