"""Generate images from a checkpoint.

    python -m trainer.sample --checkpoint runs/ffhq64/checkpoints/iter-0200000 --n 64 --seed 0 --out grid.png
    python -m trainer.sample --checkpoint runs/ffhq64 --n 1000 --out samples/   # one PNG per image
    python -m trainer.sample --checkpoint DIR --raw ...                          # G instead of EMA-G

--checkpoint is a checkpoint directory (iter-NNNNNNN) or a run directory (its newest complete checkpoint is used).
--out is a file or a directory: a path ending in .png gets one grid of all images; an existing directory, or a path
without a suffix, gets one PNG per image (000000.png, 000001.png, ...); any other suffix is an error. Images are
generated and written in batches, so memory stays small for any --n (the grid form holds the uint8 images only).

Only `generator_ema.safetensors` (or `generator.safetensors` with --raw) and `config.yaml` are read, after the
checkpoint's checksums are verified; nothing is unpickled. --device auto (the default) runs on CUDA when available,
else the CPU.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from trainer.checkpoint import load_generator
from trainer.errors import USER_ERROR_EXIT_CODE, ArgumentParser, UserError, plain_warnings, report_user_error
from trainer.evaluate import pick_device, resolve_checkpoint

USAGE = "python -m trainer.sample --checkpoint DIR [--n N] [--seed S] [--raw] [--device auto|cpu|cuda] --out PATH"


@torch.no_grad()
def generate_batches(generator, z_dim: int, n: int, seed: int, device, batch: int = 256) -> Iterator[torch.Tensor]:
    """n images in [-1, 1] on the CPU, `batch` at a time, from z ~ N(0, I) drawn for all n at once with `seed`."""
    z = torch.randn((n, z_dim), generator=torch.Generator().manual_seed(seed))
    for chunk in z.split(batch):
        yield generator(chunk.to(device)).float().cpu()


def generate(generator, z_dim: int, n: int, seed: int, device, batch: int = 256) -> torch.Tensor:
    """n images in [-1, 1] from z ~ N(0, I) drawn with `seed` (the same images on any device count)."""
    return torch.cat(list(generate_batches(generator, z_dim, n, seed, device, batch)))


def uint8_grid(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) uint8 -> one (H', W', C) uint8 grid, nearly square (as `trainer.tracking.sample_grid`)."""
    from torchvision.utils import make_grid

    grid = make_grid(images, nrow=max(1, math.isqrt(images.shape[0] - 1) + 1), padding=2)
    array = grid.permute(1, 2, 0).numpy()
    return array[..., :1] if images.shape[1] == 1 else array


def output_form(text: str) -> str:
    """What --out asks for: "grid" (one PNG file) or "folder" (one PNG per image); a UserError for anything else.

    A trailing slash always means a folder (`--out samples.v2/`).
    """
    out = Path(text).expanduser()
    if out.is_dir() or text.endswith("/"):
        return "folder"
    if out.suffix.lower() == ".png":
        if out.exists() and not out.is_file():
            raise UserError(f"--out {out}: exists and is not a regular file, so no grid can be written there.")
        return "grid"
    if out.suffix:
        raise UserError(
            f"--out {out}: a path with a suffix is a file, and only .png is written. Give a .png path (e.g. "
            f"--out {out.with_suffix('.png')}) for one grid of all images, or a directory (an existing one, or a path "
            f"without a suffix, e.g. --out {out.with_suffix('')}/) for one PNG per image."
        )
    if out.exists():
        raise UserError(
            f"--out {out}: exists and is a file, not a directory. Give a directory for one PNG per image, or a .png "
            f"path (e.g. --out {out}.png) for one grid."
        )
    return "folder"


def save_png(array: np.ndarray, path: Path) -> None:
    """As `trainer.tracking.save_png` (written whole, then renamed), without importing torchvision for it."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(temporary, format="PNG")
    temporary.replace(path)


def write_samples(batches: Iterator[torch.Tensor], out: Path, form: str) -> None:
    """Write each batch as it comes (folder form), or collect uint8 images and write one grid."""
    from trainer.data import to_uint8

    if form == "grid":
        save_png(uint8_grid(torch.cat([to_uint8(images) for images in batches])), out)
        return
    out.mkdir(parents=True, exist_ok=True)
    index = 0
    for images in batches:
        for image in to_uint8(images).permute(0, 2, 3, 1).numpy():
            save_png(image, out / f"{index:06d}.png")
            index += 1


def main(argv: list[str] | None = None) -> int:
    plain_warnings()
    parser = ArgumentParser(prog="python -m trainer.sample", description=__doc__, usage_line=USAGE)
    parser.add_argument("--checkpoint", required=True, help="A checkpoint directory (iter-NNNNNNN) or run directory.")
    parser.add_argument("--n", type=int, default=64, help="Number of images.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of z.")
    parser.add_argument("--out", required=True, help="A .png file (one grid) or a directory (one PNG each).")
    parser.add_argument("--raw", action="store_true", help="Use G instead of the EMA generator.")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="Where to run.")
    try:
        args = parser.parse_args(argv)
        if args.n < 1:
            raise UserError(f"--n {args.n}: the number of images must be at least 1.")
        out = Path(args.out).expanduser()
        form = output_form(args.out)
        path = resolve_checkpoint(args.checkpoint)
        device = pick_device(args.device)
        generator, cfg = load_generator(path, ema=not args.raw, device=device)
        batches = generate_batches(generator, cfg.model.z_dim, args.n, args.seed, device)
        try:
            write_samples(batches, out, form)
        except OSError as error:
            raise UserError(
                f"--out {out}: cannot write there ({error}). Give a writable .png path or directory."
            ) from None
        print(f"wrote {args.n} images from {path} to {out}{'' if form == 'grid' else '/'}")
        return 0
    except UserError as error:
        report_user_error(error)
        return USER_ERROR_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
