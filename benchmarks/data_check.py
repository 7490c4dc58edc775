"""Time `data check` on a LLaVA-mix-sized file and on a dataset with real images, against `json.load`.

    .venv/bin/python benchmarks/data_check.py [--samples 665000] [--image-samples 10000] [--keep DIR]

Writes, in a temp dir removed at the end, (1) a JSON list shaped like llava_v1_5_mix665k.json (image
QA samples with 1-8 rounds plus ~6% long text-only conversations), checked without images, and (2)
10k samples with one real PNG each, checked with --image-folder (every image opened and decoded).
Each measurement runs in a fresh process so its peak RSS is its own; `check_file` is called in that
process directly (no CLI start-up). The baseline is a plain `json.load` of the same file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTIONS = ["What is the man holding in his hand?", "How many people are in the picture?",
             "What color is the bus?", "Is the plate on the table empty?", "Who wrote this book?",
             "What is written on the sign?", "Describe the image concisely.", "Where is the cat sitting?"]
WORDS = "the a of in on with and is are image shows person table near large small red blue two".split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def make_mix(path: Path, samples: int, seed: int = 0) -> None:
    """A LLaVA-1.5-mix-like list: 94% image QA (COCO/GQA/OCR-VQA/VG style), 6% ShareGPT-style text."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        fh.write("[\n")
        for i in range(samples):
            if rng.random() < 0.06:
                conv = []
                for _ in range(rng.randint(1, 4)):
                    conv += [{"from": "human", "value": _text(rng, rng.randint(10, 80))},
                             {"from": "gpt", "value": _text(rng, rng.randint(80, 400))}]
                sample = {"id": f"sharegpt-{i}", "conversations": conv}
            else:
                conv = []
                for r in range(rng.randint(1, 8)):
                    q = rng.choice(QUESTIONS) + (" Answer the question using a single word or phrase." if r else "")
                    conv += [{"from": "human", "value": ("<image>\n" if r == 0 else "") + q},
                             {"from": "gpt", "value": _text(rng, rng.randint(1, 30))}]
                sample = {"id": f"{i:012d}", "image": f"coco/train2017/{i:012d}.jpg", "conversations": conv}
            fh.write(("" if i == 0 else ",\n") + json.dumps(sample))
        fh.write("\n]\n")


def make_image_set(root: Path, samples: int, seed: int = 0) -> None:
    from PIL import Image

    rng = random.Random(seed)
    images = root / "images"
    images.mkdir()
    data = []
    for i in range(samples):
        w, h = rng.randint(48, 160), rng.randint(48, 160)
        img = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
        img.paste(tuple(rng.randrange(256) for _ in range(3)), (w // 4, h // 4, w // 2, h // 2))
        img.save(images / f"{i:06d}.png")
        data.append({"id": f"img-{i}", "image": f"{i:06d}.png",
                     "conversations": [{"from": "human", "value": "<image>\n" + rng.choice(QUESTIONS)},
                                       {"from": "gpt", "value": _text(rng, rng.randint(1, 20))}]})
    (root / "images.json").write_text(json.dumps(data))


WORKERS = min(8, os.cpu_count() or 1)  # the CLI's default
_CHECK = """
import sys, time
from llava_cluster.data.check import check_file
t = time.perf_counter()
r = check_file(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None,
               workers=int(sys.argv[3]) if len(sys.argv) > 3 else 1)
print(time.perf_counter() - t, r.samples, len(r.defects))
"""
_LOAD = """
import json, sys, time
t = time.perf_counter()
with open(sys.argv[1]) as fh:
    data = json.load(fh)
print(time.perf_counter() - t, len(data), 0)
"""


def measure(code: str, *args: str) -> dict[str, float]:
    """Run `code` in a fresh interpreter: its printed seconds/samples/defects, its CPU time and peak RSS.

    CPU time is reported too because wall time on a shared machine measures the neighbours as well.
    """
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"measurement failed ({proc.returncode}): {code.strip().splitlines()[2]}")
    seconds, samples, defects = out.split()
    return {"seconds": float(seconds), "samples": int(samples), "defects": int(defects),
            "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=665_000)
    parser.add_argument("--image-samples", type=int, default=10_000)
    parser.add_argument("--keep", type=Path, help="generate into this folder and keep it (reused when present)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-data-check-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        mix = root / "mix.json"
        images_json, images = root / "images.json", root / "images"
        t = time.perf_counter()
        if not (mix.exists() and images_json.exists()):  # a --keep folder from an earlier run is reused
            make_mix(mix, args.samples)
            make_image_set(root, args.image_samples)
        print(f"data ready in {time.perf_counter() - t:.0f} s: {mix.stat().st_size / 2**20:,.0f} MiB mix, "
              f"{args.image_samples:,} PNGs", file=sys.stderr)
        mib = {p: p.stat().st_size / 2**20 for p in (mix, images_json)}
        rows = [
            (f"{args.samples:,} samples, no images", "json.load (baseline)", mib[mix], measure(_LOAD, str(mix))),
            (f"{args.samples:,} samples, no images", "data check", mib[mix], measure(_CHECK, str(mix))),
            (f"{args.image_samples:,} samples + PNGs", "json.load (baseline)", mib[images_json],
             measure(_LOAD, str(images_json))),
            (f"{args.image_samples:,} samples + PNGs", "data check --image-folder --workers 1", mib[images_json],
             measure(_CHECK, str(images_json), str(images), "1")),
            (f"{args.image_samples:,} samples + PNGs", f"data check --image-folder --workers {WORKERS}",
             mib[images_json], measure(_CHECK, str(images_json), str(images), str(WORKERS))),
        ]
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)

    from rich.console import Console
    from rich.table import Table

    table = Table(title="data check vs json.load (each in a fresh process)")
    for col in ("dataset", "what", "file MiB", "wall s", "CPU s", "samples/CPU s", "peak RSS MiB", "RSS / file"):
        table.add_column(col, justify="left" if col in ("dataset", "what") else "right")
    for dataset, what, size, m in rows:
        table.add_row(dataset, what, f"{size:,.1f}", f"{m['seconds']:.1f}", f"{m['cpu_seconds']:.1f}",
                      f"{m['samples'] / m['cpu_seconds']:,.0f}",
                      f"{m['peak_rss_mb']:,.0f}", f"{m['peak_rss_mb'] / size:.1f}x")
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
