"""Prepare a folder or .zip of PNG/JPG images as one uint8 .npy array, so training never decodes images per epoch.

    python -m trainer.prepare SRC OUT --resolution 64 [--channels 3] [--limit N] [--workers W]

SRC is a folder (searched recursively) or a .zip of images (.png, .jpg, .jpeg, .webp, .bmp). Every image is
decoded exactly as training decodes files (`trainer.data.load_image`: converted to L or RGB, the short side
resized to the resolution, then center-cropped) by a pool of worker processes, and written in sorted file order
into OUT, an array of shape (N, C, R, R) uint8 that `data.source=OUT` loads directly (see
`trainer.data.load_prepared`). A corrupt or unreadable image is skipped with a warning naming it; the number
skipped is reported at the end. The array is written to a temporary file next to OUT and renamed into place
only when complete, so an interrupted run never leaves a partial OUT.

FFHQ (https://github.com/NVlabs/ffhq-dataset) at 64x64, from the 1024x1024 images (the folder, or a zip of
it), or from the 128x128 thumbnails (much faster to download and to decode; a different, though close, result):

    python -m trainer.prepare ~/data/ffhq-images1024x1024 data/ffhq64.npy --resolution 64
    python -m trainer.prepare ~/data/thumbnails128x128.zip data/ffhq64.npy --resolution 64

then train with `data.source=data/ffhq64.npy data.resolution=64`. The 70,000 images take 860 MB at 64 px
(3 * 64 * 64 bytes each) and 13.8 GB at 256 px; the output is a memory map, so RAM use stays small.

Options: --channels 1 writes grayscale; --limit N stops after N images (a quick trial); --workers W decoding
processes (default min(8, CPU count); 0 decodes in this process).
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import secrets
import signal
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: make the repository importable without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.data import IMAGE_EXTENSIONS, FileSource, list_image_files
from trainer.errors import USER_ERROR_EXIT_CODE, ArgumentParser, DataError, UserError, report_user_error

USAGE = "python -m trainer.prepare SRC OUT.npy --resolution R [--channels 1|3] [--limit N] [--workers W]"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m trainer.prepare", description=__doc__, usage_line=USAGE)
    parser.add_argument("src", metavar="SRC", help="Folder (searched recursively) or .zip of PNG/JPG images.")
    parser.add_argument("out", metavar="OUT", help="Output .npy file, (N, C, R, R) uint8.")
    parser.add_argument("--resolution", type=int, required=True, help="Output side R in pixels (data.resolution).")
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3), help="1 (grayscale) or 3 (RGB).")
    parser.add_argument("--limit", type=int, default=None, help="Write at most this many images.")
    parser.add_argument(
        "--workers", type=int, default=min(8, os.cpu_count() or 1), help="Decoding processes (0: in this process)."
    )
    args = parser.parse_args(argv)
    if args.resolution < 1:
        raise UserError(f"--resolution must be a positive number of pixels, got {args.resolution}.")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}.")
    if args.workers < 0:
        raise UserError(f"--workers must be 0 (decode in this process) or more, got {args.workers}.")
    if not args.out.endswith(".npy"):
        raise UserError(
            f"OUT = '{args.out}' must end in .npy (training recognises a prepared array by that suffix). "
            f"Usage: {USAGE}."
        )
    return args


def find_images(src: Path) -> tuple[list[str], bool]:
    """The sorted image names under SRC and whether it is a zip; a DataError naming SRC if there are none."""
    if not src.exists():
        raise DataError(
            f"SRC = '{src}' does not exist. Give a folder or a .zip of PNG/JPG images, e.g. the FFHQ images "
            f"from https://github.com/NVlabs/ffhq-dataset. Usage: {USAGE}."
        )
    if not src.is_dir() and not zipfile.is_zipfile(src):
        raise DataError(f"SRC = '{src}' is neither a folder nor a .zip file of images. Usage: {USAGE}.")
    try:
        files, is_zip = list_image_files(src)
    except (OSError, zipfile.BadZipFile) as error:
        raise DataError(f"SRC = '{src}' cannot be read: {error}.") from None
    if not files:
        raise DataError(
            f"SRC = '{src}' contains no images (looked for {', '.join(IMAGE_EXTENSIONS)}"
            f"{'' if is_zip else ' in all subfolders'})."
        )
    return files, is_zip


# --------------------------------------------------------------------------------------------------------------
# Decoding, in worker processes. FileSource.read is what training uses (load_image; zip members opened lazily,
# one ZipFile per process).

_SOURCE: FileSource | None = None


def _init_worker(source: FileSource, ignore_interrupt: bool = False) -> None:
    global _SOURCE
    _SOURCE = source
    if ignore_interrupt:  # Ctrl-C is handled once, by the main process (which ends the pool and cleans up)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _decode(index: int) -> tuple[int, np.ndarray | None, str]:
    """(index, image, "") or (index, None, why it could not be read), never raising for one bad file."""
    assert _SOURCE is not None
    try:
        return index, _SOURCE.read(index), ""
    except Exception as error:  # one unreadable file (DataError from load_image, or a bad zip member) is skipped
        cause = error.__context__ if isinstance(error, DataError) and error.__context__ is not None else error
        return index, None, f"{type(cause).__name__}: {cause}"


def decode_all(source: FileSource, workers: int) -> Iterator[tuple[int, np.ndarray | None, str]]:
    """Decoded images in file order, from `workers` processes (0: in this process)."""
    if workers == 0:
        _init_worker(source)
        yield from map(_decode, range(len(source)))
        return
    chunksize = max(1, min(64, len(source) // (workers * 8)))
    with multiprocessing.get_context().Pool(workers, initializer=_init_worker, initargs=(source, True)) as pool:
        yield from pool.imap(_decode, range(len(source)), chunksize=chunksize)
        # Leaving the `with` (also on an early stop or an error) terminates the pool.


def display_name(source: FileSource, index: int) -> str:
    """How load_image names a file in its errors: PATH/NAME, or ZIP:NAME inside an archive."""
    name = source.files[index]
    return f"{source.path}:{name}" if source.is_zip else str(source.path / name)


# --------------------------------------------------------------------------------------------------------------
# Writing.


def shrink_npy(path: Path, count: int) -> None:
    """Cut the .npy at `path` to its first `count` rows in place: rewrite the shape in the header, truncate.

    The new header is padded with spaces to the old header's length, so the data offset does not move (a shorter
    shape never needs more characters); numpy reads such padding like its own.
    """
    with open(path, "r+b") as file:
        version = np.lib.format.read_magic(file)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = reader(file)
        data_offset = file.tell()
        prefix = 6 + 2 + (2 if version == (1, 0) else 4)  # magic, version, header length
        descr = np.lib.format.dtype_to_descr(dtype)
        header = repr({"descr": descr, "fortran_order": fortran_order, "shape": (count, *shape[1:])})
        room = data_offset - prefix - 1  # the header ends with a newline
        if len(header) > room:  # cannot happen: count <= shape[0]
            raise RuntimeError(f"cannot shrink the .npy header of {path}")
        file.seek(prefix)
        file.write((header.ljust(room) + "\n").encode("latin1"))
        file.truncate(data_offset + count * int(np.prod(shape[1:])) * dtype.itemsize)


def prepare(
    src: Path,
    out: Path,
    resolution: int,
    channels: int = 3,
    limit: int | None = None,
    workers: int = 0,
    progress: bool = True,
) -> dict:
    """Decode the images under SRC into OUT (atomically); returns a summary. DataError if none is readable."""
    started = time.perf_counter()
    files, is_zip = find_images(src)
    source = FileSource(src, files, resolution, channels, is_zip)
    capacity = len(files) if limit is None else min(limit, len(files))
    workers = min(workers, len(files))
    if out.is_dir():
        raise DataError(f"OUT = '{out}' is a folder; give the path of the .npy file to write.")
    # A hidden temporary file in OUT's folder (so the final rename is atomic), with the usual permissions.
    temp = out.parent / f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.partial"
    written, skipped = 0, []
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            array = np.lib.format.open_memmap(
                temp, mode="w+", dtype=np.uint8, shape=(capacity, channels, resolution, resolution)
            )
        except OSError as error:
            raise DataError(f"Cannot write OUT = '{out}': {error}.") from None
        with tqdm(
            total=capacity, desc=f"preparing {src.name}", unit="img", disable=not progress, file=sys.stderr
        ) as bar:
            for index, image, why in decode_all(source, workers):
                bar.update()
                if image is None:
                    name = display_name(source, index)
                    if limit is not None:  # one more file to read to reach the limit
                        bar.total = min(len(files), bar.total + 1)
                        bar.refresh()
                    skipped.append(name)
                    tqdm.write(f"warning: skipped the unreadable image '{name}' ({why}).", file=sys.stderr)
                    continue
                array[written] = image
                written += 1
                if written == capacity:
                    break
        array.flush()
        del array  # close the memory map before resizing or renaming the file
        if written == 0:
            raise DataError(
                f"SRC = '{src}' holds {len(files)} image files, but none could be read (all "
                f"{len(skipped)} skipped, e.g. '{skipped[0]}'). Check that they are valid PNG/JPG images."
            )
        if written < capacity:
            shrink_npy(temp, written)
        os.replace(temp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
    return {
        "out": out,
        "images": written,
        "skipped": skipped,
        "shape": (written, channels, resolution, resolution),
        "bytes": out.stat().st_size,
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        summary = prepare(
            Path(args.src).expanduser(),
            Path(args.out).expanduser(),
            args.resolution,
            args.channels,
            args.limit,
            args.workers,
        )
    except UserError as error:
        report_user_error(error)
        return USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted; nothing was written.", file=sys.stderr)
        return 130
    size, skipped = summary["bytes"], len(summary["skipped"])
    print(
        f"wrote {summary['images']} images to {summary['out']}: shape {summary['shape']} uint8, {size:,} bytes "
        f"({size / 2**20:.1f} MiB), {summary['seconds']:.1f} s; skipped {skipped} unreadable "
        f"image{'' if skipped == 1 else 's'}{' (named above)' if skipped else ''}.",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
