"""Evaluate a checkpoint's generator: FID, KID, precision/recall and/or SWD against its data set, printed as one
JSON object.

    python -m trainer.evaluate --checkpoint runs/demo/checkpoints/iter-0000800 [--metrics fid,kid,pr,swd]
        [--num-images N] [--ema/--no-ema] [--inception PATH] [--device auto|cpu|cuda]

--checkpoint also takes a run directory (its newest complete checkpoint is used). G is built from the
checkpoint's config.yaml and weights (the EMA generator unless --no-ema); metrics, number of images and the
Inception file default to the checkpoint's eval.* settings; fid, kid and pr share one pass of the Inception
network. One process; stdout holds only the JSON object, e.g. {"checkpoint": ..., "iteration": 800,
"num_images": 10000, "ema": true, "metrics/kid": 0.012, "metrics/kid_se": 0.0004, "metrics/precision": 0.71,
"metrics/recall": 0.45, "metrics/swd": 12.3, ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.errors import USER_ERROR_EXIT_CODE, ArgumentParser, UserError, plain_warnings, report_user_error

USAGE = "python -m trainer.evaluate --checkpoint DIR [--metrics fid,kid,pr,swd] [--num-images N] [--ema/--no-ema]"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, usage_line=USAGE)
    parser.add_argument("--checkpoint", required=True, help="Checkpoint directory (iter-NNNNNNN) or run directory.")
    parser.add_argument(
        "--metrics",
        default=None,
        help="Comma-separated: fid, kid, pr (precision and recall), swd (default: eval.metrics).",
    )
    parser.add_argument("--num-images", type=int, default=None, help="Images to generate (default: eval.num_images).")
    parser.add_argument(
        "--ema", action=argparse.BooleanOptionalAction, default=True, help="Evaluate EMA-G (default) or raw G."
    )
    parser.add_argument("--inception", default=None, help="TorchScript Inception-v3 file (default: eval.inception).")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="Where to run.")
    parser.add_argument(
        "--real-baseline",
        action="store_true",
        help="Also score as many held-apart real images as the generator's (the next ones of the same fixed order, "
        "none of them in the real statistics): the value a perfect generator would get with this many images.",
    )
    return parser.parse_args(argv)


def resolve_checkpoint(text: str) -> Path:
    """A checkpoint directory, or a run directory's newest valid checkpoint; a UserError if there is none."""
    from trainer import checkpoint as ckpt

    path = Path(text).expanduser()
    if (path / ckpt.MANIFEST).is_file():
        return path
    if path.is_dir() and (path / ckpt.CHECKPOINT_DIR).is_dir():
        newest = ckpt.newest_valid_checkpoint(path)
        if newest is not None:
            return newest
    raise UserError(
        f"--checkpoint {text}: no checkpoint there (a checkpoint is a directory such as "
        f"runs/demo/checkpoints/iter-0000800 holding manifest.json, or pass a run directory that has "
        f"checkpoints/). Train first with `python trainer/run.py --config configs/demo.yaml`."
    )


def parse_metrics(text: str | None, default: list[str]) -> list[str]:
    from trainer.metrics import METRICS

    if text is None:
        return list(default)
    metrics = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise UserError(
            f"--metrics {text}: allowed are {', '.join(METRICS[:-1])} and {METRICS[-1]} (pr is precision and "
            f"recall), comma-separated (e.g. --metrics fid,kid,pr,swd)."
        )
    return list(dict.fromkeys(metrics))


def pick_device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here; use --device cpu or auto.")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    """Build G from the checkpoint, evaluate it, return the JSON-ready result."""
    from trainer import checkpoint as ckpt
    from trainer.metrics import LocalProcess, evaluate_generator

    path = resolve_checkpoint(args.checkpoint)
    device = pick_device(args.device)
    generator, cfg = ckpt.load_generator(path, ema=args.ema, device=device)
    if args.inception is not None:
        cfg.eval.inception = args.inception
    metrics = parse_metrics(args.metrics, cfg.eval.metrics)
    num_images = cfg.eval.num_images if args.num_images is None else args.num_images
    if num_images < 2:
        raise UserError(f"--num-images {num_images}: evaluate at least 2 images.")

    results = evaluate_generator(generator, cfg, LocalProcess(device), metrics=metrics, num_images=num_images)
    iteration = json.loads((path / ckpt.MANIFEST).read_text()).get("iteration")
    result = {"checkpoint": str(path), "iteration": iteration, "num_images": num_images, "ema": args.ema, **results}
    if args.real_baseline:
        held_apart = HeldApartReal(cfg, num_images, device)
        result["real_baseline"] = evaluate_generator(
            held_apart, cfg, LocalProcess(device), metrics=metrics, num_images=num_images
        )
    return result


class HeldApartReal:
    """A stand-in generator that returns real images [n, 2n) of the metrics' fixed real order, in order: the real
    statistics use images [0, n), so these are real images the statistics have not seen."""

    def __init__(self, cfg, num_images: int, device):
        import torch

        from trainer.data import open_source
        from trainer.metrics import real_batches, real_order

        source = open_source(cfg.data.source, cfg.data.resolution, cfg.data.channels)
        if len(source) < 2 * num_images:
            raise UserError(
                f"--real-baseline needs {2 * num_images} images (twice --num-images {num_images}), but data.source = "
                f"'{cfg.data.source}' holds {len(source)}; lower --num-images to {len(source) // 2} or less."
            )
        order = real_order(len(source), 2 * num_images)[num_images:]
        batches = real_batches(source, order, slice(0, num_images), cfg.eval.batch_size, 0, device)
        self.images = torch.cat([images for _, images in batches]).float().div(127.5).sub(1)  # exact in to_uint8
        self.next = 0
        self.training = False

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def __call__(self, z):
        batch = self.images[self.next : self.next + len(z)]
        self.next += len(z)
        return batch


def refuse_a_multi_process_launch() -> None:
    """Under `accelerate launch` / torchrun with several processes each would evaluate alone and print the same
    JSON: one process, on the GPU it picks by itself, is what this command is."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        raise UserError(
            f"python -m trainer.evaluate runs as one process, but a launcher started {world} (WORLD_SIZE={world}): "
            f"each would compute the same metrics and print the JSON again. Run it with plain `python -m "
            f"trainer.evaluate --checkpoint ...`; it uses a GPU by itself (--device auto). Periodic evaluation "
            f"during training (eval.every) is the distributed one: every process generates its share."
        )


def main(argv: list[str] | None = None) -> int:
    plain_warnings()
    try:
        refuse_a_multi_process_launch()
        args = parse_args(sys.argv[1:] if argv is None else argv)
        result = evaluate_checkpoint(args)
    except UserError as error:
        if os.environ.get("RANK", "0") in ("0", ""):  # once, not by every process of the launch
            report_user_error(error)
        return USER_ERROR_EXIT_CODE
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
