"""Prepare a folder or .zip of PNG/JPG images as one uint8 .npy array, so training never decodes images per epoch.

    python -m trainer.prepare SRC OUT --resolution 64 [--channels 3] [--limit N] [--workers W] [--overwrite]

SRC is a folder (searched recursively) or a .zip of images (.png, .jpg, .jpeg, .webp, .bmp). Every image is
decoded exactly as training decodes files (`trainer.data.load_image`: converted to L or RGB, the short side
resized to the resolution, then center-cropped) by a pool of worker processes, and written in sorted file order
into OUT, an array of shape (N, C, R, R) uint8 that `data.source=OUT` loads directly (see
`trainer.data.load_prepared`). R must be a resolution training accepts (data.resolution: a power of two from 16
to 1024). 16-bit images are scaled to 8 bits. A corrupt or unreadable image is skipped with a warning naming it;
the number skipped is reported at the end.

An existing OUT is an error unless --overwrite is given (and then it is only replaced once the new array is
complete). The array is written to a hidden temporary file next to OUT (.OUT.PID-HEX.partial) and renamed into
place only when complete, so an interrupted run never leaves a partial OUT. Ctrl-C, SIGTERM and SIGHUP stop the
run cleanly: the decoding processes are ended, the temporary file is removed, one line says so, and the exit
status is 130 (Ctrl-C) or 128 + the signal number (143 for SIGTERM, 129 for SIGHUP). A run killed outright
(SIGKILL, a power cut) cannot clean up; the next run for the same OUT removes the temporary files whose process
no longer exists, and says so.

FFHQ (https://github.com/NVlabs/ffhq-dataset) at 64x64, from the 1024x1024 images (the folder, or a zip of
it), or from the 128x128 thumbnails (much faster to download and to decode; a different, though close, result):

    python -m trainer.prepare ~/data/ffhq-images1024x1024 data/ffhq64.npy --resolution 64
    python -m trainer.prepare ~/data/thumbnails128x128.zip data/ffhq64.npy --resolution 64

then train with `data.source=data/ffhq64.npy data.resolution=64`. The 70,000 images take 860 MB at 64 px
(3 * 64 * 64 bytes each) and 13.8 GB at 256 px; the output is a memory map, so RAM use stays small.

Options: --channels 1 writes grayscale; --limit N stops after N images (a quick trial); --workers W decoding
processes (default min(8, CPU count); 0 decodes in this process); --overwrite replaces an existing OUT.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import multiprocessing
import os
import re
import secrets
import signal
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

if __package__ in (None, ""):  # run as a script: make the repository importable without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import DataConfig
from trainer.data import IMAGE_EXTENSIONS, FileSource, list_image_files
from trainer.errors import USER_ERROR_EXIT_CODE, ArgumentParser, DataError, UserError, plain_warnings, report_user_error

USAGE = "python -m trainer.prepare SRC OUT.npy --resolution R [--channels 1|3] [--limit N] [--workers W] [--overwrite]"


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
    parser.add_argument("--overwrite", action="store_true", help="Replace OUT if it exists (default: an error).")
    args = parser.parse_args(argv)
    check_resolution(args.resolution)
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


def check_resolution(resolution: int) -> None:
    """A UserError unless training accepts `resolution` as data.resolution (the same bounds, a power of two)."""
    bounds = next(f.metadata for f in dataclasses.fields(DataConfig) if f.name == "resolution")
    low, high = int(bounds["min"]), int(bounds["max"])
    if low <= resolution <= high and resolution & (resolution - 1) == 0:
        return
    allowed = [2**k for k in range(high.bit_length()) if low <= 2**k <= high]
    raise UserError(
        f"--resolution {resolution}: training accepts only a data.resolution that is a power of two from {low} to "
        f"{high}, so the prepared array must have one of those sizes; allowed: "
        f"{', '.join(map(str, allowed[:-1]))} or {allowed[-1]}."
    )


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
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _init_worker(source: FileSource, parent: int | None = None) -> None:
    """Set up decoding in this process; `parent`: the main process's pid, when this is a pool worker."""
    global _SOURCE
    _SOURCE = source
    if parent is None:
        return
    # Ctrl-C reaches the whole process group; it is handled once, by the main process (which ends the pool and
    # cleans up). SIGTERM and SIGHUP get their default action back (the main process's handlers are inherited
    # through fork): Pool.terminate() ends the workers with SIGTERM, and a signal sent to the whole process group
    # must end them at once and quietly, without a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        # If the main process dies without ending the pool (SIGKILL), a worker would go on decoding and then print a
        # BrokenPipeError traceback on sending its result; instead, it gets a SIGTERM from the kernel.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the main process died before prctl took effect
            os._exit(0)


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
    context = multiprocessing.get_context()
    with context.Pool(workers, initializer=_init_worker, initargs=(source, os.getpid())) as pool:
        yield from pool.imap(_decode, range(len(source)), chunksize=chunksize)
        # Leaving the `with` (also on an early stop, an error, a stop signal or close()) terminates the pool.


def display_name(source: FileSource, index: int) -> str:
    """How load_image names a file in its errors: PATH/NAME, or ZIP:NAME inside an archive."""
    name = source.files[index]
    return f"{source.path}:{name}" if source.is_zip else str(source.path / name)


# --------------------------------------------------------------------------------------------------------------
# Stop signals and temporary files.

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stopped(BaseException):
    """SIGTERM or SIGHUP in the main process: unwinds like Ctrl-C (the pool is ended, the temporary file removed)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise `Stopped` in this (main) thread; later ones are ignored (cleanup runs
    once); a worker forked before its initializer restored the defaults exits quietly."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers can only be set there
        yield
        return
    owner, stopping = os.getpid(), []

    def handler(signum: int, _frame) -> None:
        if os.getpid() != owner:
            os._exit(128 + signum)
        if not stopping:
            stopping.append(signum)
            raise Stopped(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def temporary_path(out: Path) -> Path:
    """A hidden temporary file in OUT's folder (so that the final rename is atomic), named after this process."""
    return out.parent / f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.partial"


def process_exists(pid: int) -> bool:
    """Whether `pid` is a live process (not a zombie) other than this one."""
    if pid == os.getpid():  # pids are reused (containers start from 1): this run has written nothing yet
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    with contextlib.suppress(OSError, IndexError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the temporary files for OUT that runs killed outright left behind (their process is gone)."""
    prefix, removed = f".{out.name}.", []
    try:
        candidates = sorted(out.parent.iterdir())
    except OSError:  # no folder yet: nothing left behind
        return removed
    for path in candidates:
        match = re.fullmatch(r"(\d+)-[0-9a-f]+\.partial", path.name.removeprefix(prefix))
        if not path.name.startswith(prefix) or match is None or process_exists(int(match[1])):
            continue
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:  # another run removed it first
            continue
        except OSError as error:
            raise DataError(f"Cannot remove the stale temporary file '{path}': {error}.") from None
        removed.append(path)
        print(
            f"removed '{path}' ({size:,} bytes): the temporary file of an earlier run for this OUT that was killed "
            f"(its process {match[1]} no longer exists).",
            file=sys.stderr,
            flush=True,
        )
    return removed


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


def check_not_there(out: Path, overwrite: bool) -> None:
    if not overwrite and (out.exists() or out.is_symlink()):
        raise UserError(
            f"OUT = '{out}' already exists; it was left untouched. Pass --overwrite to replace it (only once the new "
            f"array is complete), or give another OUT. Usage: {USAGE}."
        )


def prepare(
    src: Path,
    out: Path,
    resolution: int,
    channels: int = 3,
    limit: int | None = None,
    workers: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Decode the images under SRC into OUT (atomically); returns a summary. DataError if none is readable.

    An existing OUT is a UserError (and left untouched) unless `overwrite`.
    """
    started = time.perf_counter()
    check_resolution(resolution)
    files, is_zip = find_images(src)
    source = FileSource(src, files, resolution, channels, is_zip)
    capacity = len(files) if limit is None else min(limit, len(files))
    workers = min(workers, len(files))
    if out.is_dir():
        raise DataError(f"OUT = '{out}' is a folder; give the path of the .npy file to write.")
    remove_stale_temporaries(out)
    check_not_there(out, overwrite)
    temp = temporary_path(out)
    written, skipped = 0, []
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            array = np.lib.format.open_memmap(
                temp, mode="w+", dtype=np.uint8, shape=(capacity, channels, resolution, resolution)
            )
        except OSError as error:
            raise DataError(f"Cannot write OUT = '{out}': {error}.") from None
        with (
            tqdm(
                total=capacity, desc=f"preparing {src.name}", unit="img", disable=not progress, file=sys.stderr
            ) as bar,
            contextlib.closing(decode_all(source, workers)) as decoded,  # closed: the pool ends before cleanup
        ):
            for index, image, why in decoded:
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
        check_not_there(out, overwrite)  # written by someone else while this run was decoding
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
    plain_warnings()
    try:
        with stop_signals_raise():
            args = parse_args(sys.argv[1:] if argv is None else argv)
            summary = prepare(
                Path(args.src).expanduser(),
                Path(args.out).expanduser(),
                args.resolution,
                args.channels,
                args.limit,
                args.workers,
                overwrite=args.overwrite,
            )
    except UserError as error:
        report_user_error(error)
        return USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted; nothing was written (the temporary file was removed).", file=sys.stderr, flush=True)
        return 130
    except Stopped as stop:
        name = signal.Signals(stop.signum).name
        print(f"stopped by {name}; nothing was written (the temporary file was removed).", file=sys.stderr, flush=True)
        return 128 + stop.signum
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
