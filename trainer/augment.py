"""Differentiable augmentation of every critic input (DiffAugment; the geometric subset of ADA), as pure functions.

On a small data set the critic memorises the real images and G collapses. Augmenting every image the critic sees,
real and fake, in both steps, with the same distribution of transforms on both sides, lets D learn the augmented
distribution instead (Zhao et al. 2020, "Differentiable Augmentation"; Karras et al. 2020, "ADA"). G's gradient
flows through the transforms of the generator step, so they are differentiable in the images.

Transforms (`augment.policy`, applied in the order listed; x in [-1, 1], (N, C, R, R), square):
- `color`: DiffAugment's brightness x + (u - 1/2), saturation (x - mean_c) 2u + mean_c, contrast
  (x - mean) (u + 1/2) + mean, u ~ U[0, 1) per sample and per transform (mean_c over channels, mean over all);
- `translation`: DiffAugment's shift by integers in [-R/8, R/8] on each axis, zero padding (grey at 0);
- `cutout`: DiffAugment's square of side R/2 set to 0, its centre uniform over the image;
- `xflip`, `rotate90`, `int_translation`: ADA's geometric subset: a horizontal flip with probability 1/2, a
  rotation by k * 90 degrees with k uniform in {0, 1, 2, 3}, an integer shift in [-R/8, R/8] with reflection
  padding. At p near 1 flips and rotations "leak" (G learns flipped/rotated images, since D cannot tell an
  augmented image from a real one); ADA keeps p below about 0.8 for them. DiffAugment's three do not leak at p = 1.

Each transform is applied to each sample with probability p (`augment.p`, fixed, or adapted: see `adjust_p`); a
sample that does not get it gets the identity. p may be a device tensor, so adapting it never waits for the host.

Draws come from the counter-based streams for the GLOBAL batch (`draw(..., count=global rows)`) and each rank
applies the rows it holds (`select`), so N processes augment exactly as one process does, and resume is exact.

The penalty is taken with respect to the augmented input the critic sees: the critic step augments real and
fake first and builds its penalty points from the augmented images, so the gradient penalty constrains D where
D is evaluated (on the augmented distribution), exactly as the unaugmented method constrains D on the data.
"""

from __future__ import annotations

import torch

POLICIES = ("color", "translation", "cutout", "xflip", "rotate90", "int_translation")
TRANSLATION_RATIO = 1 / 8  # DiffAugment's and ADA's maximum shift, as a fraction of the side
CUTOUT_RATIO = 1 / 2  # DiffAugment's cutout side, as a fraction of the side

Draws = dict[str, torch.Tensor]


def draw(policy: list[str], count: int, resolution: int, p, generator: torch.Generator, device) -> Draws:
    """The random parameters of `count` samples for every transform of `policy`, identity where not applied.

    Every transform draws its coins (u < p applies it) and its parameters for all `count` samples, in the policy's
    order, from `generator`, so the same (generator seed, count) gives the same draws whatever the process count.
    """
    draws: Draws = {}

    def uniform(*shape) -> torch.Tensor:
        return torch.rand((count, *shape), generator=generator, device=device)

    def applied() -> torch.Tensor:
        return uniform() < p

    def shift() -> torch.Tensor:
        limit = int(resolution * TRANSLATION_RATIO + 0.5)
        return torch.randint(-limit, limit + 1, (count, 2), generator=generator, device=device)

    for name in policy:
        if name == "color":
            for key, identity, scale, offset in (("brightness", 0.0, 1.0, -0.5), ("saturation", 1.0, 2.0, 0.0),
                                                 ("contrast", 1.0, 1.0, 0.5)):  # fmt: skip
                on = applied()
                draws[key] = torch.where(on, uniform() * scale + offset, identity)
        elif name in ("translation", "int_translation"):
            on = applied()
            draws[name] = torch.where(on[:, None], shift(), 0)
        elif name == "cutout":
            on = applied()
            side = int(resolution * CUTOUT_RATIO + 0.5)
            centre = torch.randint(0, resolution + (1 - side % 2), (count, 2), generator=generator, device=device)
            draws["cutout"] = torch.where(on[:, None], centre, -resolution)  # -R: a square outside the image
        elif name == "xflip":
            on = applied()
            draws["xflip"] = on & (uniform() < 0.5)
        elif name == "rotate90":
            on = applied()
            draws["rotate90"] = torch.where(on, torch.randint(0, 4, (count,), generator=generator, device=device), 0)
        else:
            raise ValueError(f"unknown augmentation {name!r}; allowed: {', '.join(POLICIES)}")
    return draws


def select(draws: Draws, rows: slice) -> Draws:
    """This process's rows of the global batch's draws."""
    return {key: value[rows] for key, value in draws.items()}


def apply(images: torch.Tensor, draws: Draws) -> torch.Tensor:
    """The images transformed by `draws` (made for exactly these rows), in the order they were drawn.

    Differentiable in `images`: every transform is elementwise arithmetic, a gather or a mask.
    """
    x = images
    for key, value in draws.items():
        if key == "brightness":
            x = x + value.view(-1, 1, 1, 1).to(x.dtype)
        elif key in ("saturation", "contrast"):  # (x - m) v + m, written so that v = 1 gives x exactly
            mean = x.mean(dim=1 if key == "saturation" else (1, 2, 3), keepdim=True)
            x = x + (x - mean) * (value.view(-1, 1, 1, 1).to(x.dtype) - 1)
        elif key == "translation":
            x = shift_images(x, value, reflect=False)
        elif key == "int_translation":
            x = shift_images(x, value, reflect=True)
        elif key == "cutout":
            x = x * cutout_mask(x.shape[-1], value).to(x.dtype)
        elif key == "xflip":
            x = torch.where(value.view(-1, 1, 1, 1), x.flip(-1), x)
        elif key == "rotate90":
            rotated = x
            for k in (1, 2, 3):
                rotated = torch.where((value == k).view(-1, 1, 1, 1), torch.rot90(x, k, dims=(2, 3)), rotated)
            x = rotated
    return x


def shift_images(images: torch.Tensor, shifts: torch.Tensor, reflect: bool) -> torch.Tensor:
    """out[n, :, i, j] = in[n, :, i - dy_n, j - dx_n]; outside the image: 0, or the mirrored pixel if `reflect`.

    `shifts` is (N, 2) integers (dy, dx) with |d| < R. A gather, so the gradient flows back to the source pixels.
    """
    n, c, h, w = images.shape
    rows = torch.arange(h, device=images.device).view(1, h, 1) - shifts[:, 0].view(n, 1, 1)
    cols = torch.arange(w, device=images.device).view(1, 1, w) - shifts[:, 1].view(n, 1, 1)
    if reflect:  # mirror without repeating the edge (d c b | a b c d | c b a), as ADA's reflect padding
        rows, cols = _mirror(rows, h), _mirror(cols, w)
        inside = None
    else:
        inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    index = (rows * w + cols).reshape(n, 1, h * w).expand(n, c, h * w)
    out = images.reshape(n, c, h * w).gather(2, index).view(n, c, h, w)
    return out if inside is None else out * inside.view(n, 1, h, w).to(out.dtype)


def _mirror(index: torch.Tensor, size: int) -> torch.Tensor:
    index = index.abs()
    return (size - 1) - (size - 1 - index).abs()


def cutout_mask(resolution: int, centres: torch.Tensor) -> torch.Tensor:
    """(N, 1, R, R): 0 inside each sample's square of side R/2 around its centre (clipped to the image), else 1."""
    side = int(resolution * CUTOUT_RATIO + 0.5)
    low = centres - side // 2  # DiffAugment's offset: the square covers [low, low + side)
    positions = torch.arange(resolution, device=centres.device)
    in_rows = (positions.view(1, -1) >= low[:, :1]) & (positions.view(1, -1) < low[:, :1] + side)
    in_cols = (positions.view(1, -1) >= low[:, 1:]) & (positions.view(1, -1) < low[:, 1:] + side)
    return (~(in_rows[:, None, :, None] & in_cols[:, None, None, :])).float()


def overfitting(d_train: torch.Tensor, d_heldout: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """ADA's validation heuristic r_v = (E[D(train)] - E[D(held-out)]) / (E[D(train)] - E[D(fake)]).

    0 when D scores held-out real images as it scores the training images (no memorising), 1 when it scores them
    as it scores fakes. A ratio of differences, so it is unchanged by a shift or a positive scale of D's outputs:
    what an unbounded WGAN critic needs (its outputs have no fixed zero; see `adjust_p`). Where D does not yet
    separate real from fake (denominator <= 0) it is 0, so p does not rise. The inputs are means over the global
    batch (identical on every rank).
    """
    gap = d_train - d_fake
    return torch.where(gap > 0, (d_train - d_heldout) / gap.clamp(min=1e-12), torch.zeros_like(gap))


def adjust_p(p: torch.Tensor, signal: torch.Tensor, target: float, images: int, speed_kimg: float) -> torch.Tensor:
    """ADA's controller: p + sign(signal - target) * images / (speed_kimg * 1000), clamped to [0, 1].

    `images` is the number of real images shown to D since the last adjustment, so p can cross [0, 1] in
    `speed_kimg` thousand images. ADA's own signal, r_t = E[sign(D(real))], assumes a critic whose output sign
    means real vs fake; a WGAN critic's loss E[D(fake)] - E[D(real)] and its gradient penalty are unchanged when
    a constant is added to D, so the sign of D(real) follows an arbitrary, drifting offset. The signal here is
    therefore `overfitting` (r_v), which only compares D's outputs with each other.
    """
    step = images / (speed_kimg * 1000)
    return (p + torch.sign(signal - target) * step).clamp(0.0, 1.0)
