"""Generate images from a checkpoint.

    python -m trainer.sample --checkpoint runs/ffhq64/checkpoints/iter-0200000 --n 64 --seed 0 --out grid.png
    python -m trainer.sample --checkpoint DIR --n 1000 --out samples/      # one PNG per image
    python -m trainer.sample --checkpoint DIR --raw ...                     # G instead of EMA-G

Only `generator_ema.safetensors` (or `generator.safetensors` with --raw) and `config.yaml` are read, after the
checkpoint's checksums are verified; nothing is unpickled. Runs on CUDA when available, else the CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from trainer.checkpoint import load_generator
from trainer.errors import USER_ERROR_EXIT_CODE, ArgumentParser, UserError, report_user_error


@torch.no_grad()
def generate(generator, z_dim: int, n: int, seed: int, device, batch: int = 256) -> torch.Tensor:
    """n images in [-1, 1] from z ~ N(0, I) drawn with `seed` (the same images on any device count)."""
    z = torch.randn((n, z_dim), generator=torch.Generator().manual_seed(seed))
    return torch.cat([generator(chunk.to(device)).float().cpu() for chunk in z.split(batch)])


USAGE = "python -m trainer.sample --checkpoint DIR [--n N] [--seed S] [--raw] --out PATH"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__, usage_line=USAGE)
    parser.add_argument("--checkpoint", required=True, type=Path, help="A checkpoint directory (iter-NNNNNNN).")
    parser.add_argument("--n", type=int, default=64, help="Number of images.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of z.")
    parser.add_argument("--out", required=True, type=Path, help="A .png file (one grid) or a directory (one PNG each).")
    parser.add_argument("--raw", action="store_true", help="Use G instead of the EMA generator.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    try:
        args = parser.parse_args(argv)
        if args.n < 1:
            raise UserError(f"--n {args.n}: the number of images must be at least 1.")
        from trainer.data import to_uint8
        from trainer.tracking import sample_grid, save_png

        generator, cfg = load_generator(args.checkpoint, ema=not args.raw, device=args.device)
        images = generate(generator, cfg.model.z_dim, args.n, args.seed, args.device)
        if args.out.suffix.lower() == ".png":
            save_png(sample_grid(images), args.out)
        else:
            args.out.mkdir(parents=True, exist_ok=True)
            pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()
            for index, image in enumerate(pixels):
                save_png(image, args.out / f"{index:06d}.png")
        print(f"wrote {args.n} images to {args.out}")
        return 0
    except UserError as error:
        report_user_error(error)
        return USER_ERROR_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
