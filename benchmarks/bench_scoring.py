"""Scoring throughput vs the bare image encoder on the same batch (not a test).

``score()`` = one encoder pass with four tapped layers + probabilities + bilinear up-sampling + Gaussian blur
(σ = 4). The bare encoder is ``backbone.model.encode_image`` on the same normalised batch. Target: score costs at
most 15 % more than encoding. Random weights (``pretrained=None``): weight values do not change speed.

Run: ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_scoring.py [--images 32] [--repeats 5] [--models ...]``
Do not run it next to other torch work: two torch processes on few cores slow each other several-fold.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install -e .`
import apt_lab  # noqa: E402
from apt_lab.config import APTConfig  # noqa: E402
from apt_lab.scoring import score  # noqa: E402


def timed_pair(first, second, repeats: int) -> tuple[float, float]:
    """Median seconds of each, measured alternately so that load from other processes hits both alike."""
    first(), second()  # warm-up
    a, b = [], []
    for _ in range(repeats):
        for fn, out in ((first, a), (second, b)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["apt-tiny", "ViT-B-16"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.images} images, "
          f"median of {args.repeats} repeats")
    for name in args.models:
        backbone = apt_lab.load_backbone(name, pretrained=None)
        size = backbone.image_size
        images = torch.rand(args.images, 3, size, size, generator=torch.Generator().manual_seed(0))
        text = F.normalize(torch.randn(2, backbone.embed_dim, generator=torch.Generator().manual_seed(1)), dim=-1)
        config = APTConfig().replace(score__batch_size=args.images)
        x = backbone.normalize(images.to(backbone.device))

        def encode():
            with torch.no_grad():
                backbone.model.encode_image(x)
            if backbone.device.type == "cuda":
                torch.cuda.synchronize()

        def run_score():
            score(backbone, text, images, config)

        t_encode, t_score = timed_pair(encode, run_score, args.repeats)
        ratio = t_score / t_encode
        verdict = "ok" if ratio <= 1.15 else "ABOVE the 1.15 target"
        print(f"{name:10s} {backbone.device.type}: encode_image {t_encode * 1000:8.1f} ms   "
              f"score {t_score * 1000:8.1f} ms   ratio {ratio:.3f} ({verdict}); {args.images / t_score:.1f} images/s scored")


if __name__ == "__main__":
    main()
