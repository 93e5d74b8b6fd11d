"""Data: image sources, decoding, the global order, per-rank batches, and `python -m trainer.prepare`."""

from __future__ import annotations

import io
import itertools
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import prepare
from trainer.data import (
    ArraySource,
    FileSource,
    GlobalOrder,
    RealBatches,
    list_image_files,
    load_image,
    open_source,
    shard,
    split_source,
    to_uint8,
)
from trainer.errors import DataError
from trainer.randomness import Streams

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


def solid(color: tuple[int, int, int], height: int = 12, width: int = 12) -> np.ndarray:
    return np.broadcast_to(np.array(color, dtype=np.uint8), (height, width, 3)).copy()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def random_images(root: Path, count: int, size: int = 8, seed: int = 0) -> list[np.ndarray]:
    """`count` random RGB PNGs img00.png, img01.png, ... (size x size, so decoding is lossless and exact)."""
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(count)]
    for i, array in enumerate(arrays):
        write(root / f"img{i:02d}.png", png_bytes(array))
    return arrays


def truncated_png() -> bytes:
    """A PNG cut in half: its header is fine, its pixel data is not (as a broken download would be)."""
    data = png_bytes(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    return data[: len(data) // 2]


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


# --------------------------------------------------------------------------------------------------------------
# Sources and decoding.

NESTED = {  # relative name -> (format, colour)
    "b/x.png": ("PNG", RED),
    "a/c/y.jpg": ("JPEG", GREEN),
    "z.PNG": ("PNG", BLUE),
    "a/c/d/w.jpeg": ("JPEG", WHITE),
}
NESTED_SORTED = ["a/c/d/w.jpeg", "a/c/y.jpg", "b/x.png", "z.PNG"]


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_nested_folder_and_zip_sources_are_found_and_decoded(tmp_path, kind):
    if kind == "folder":
        source_path = tmp_path / "images"
        for name, (fmt, color) in NESTED.items():
            write(source_path / name, png_bytes(solid(color, 12, 16), fmt))
        write(source_path / "a" / "notes.txt", b"not an image")
        (source_path / "empty.png.d").mkdir()
    else:
        source_path = tmp_path / "images.zip"
        with zipfile.ZipFile(source_path, "w") as archive:
            archive.writestr("a/", b"")  # a directory entry
            for name, (fmt, color) in NESTED.items():
                archive.writestr(name, png_bytes(solid(color, 12, 16), fmt))
            archive.writestr("a/readme.txt", b"not an image")

    files, is_zip = list_image_files(source_path)
    assert files == NESTED_SORTED
    assert is_zip == (kind == "zip")

    source = open_source(str(source_path), 8, 3)
    assert isinstance(source, FileSource) and len(source) == 4
    for index, name in enumerate(NESTED_SORTED):
        image = source.read(index)
        assert image.shape == (3, 8, 8) and image.dtype == np.uint8
        color = np.array(NESTED[name][1]).reshape(3, 1, 1)
        assert np.abs(image.astype(int) - color).max() <= 8, name  # JPEG is lossy; PNG is exact
    batch = source[[3, 0]]
    assert batch.shape == (2, 3, 8, 8) and batch.dtype == torch.uint8
    assert torch.equal(batch[0], torch.from_numpy(source.read(3).copy()))


def test_center_crop_without_resize_is_exact(tmp_path):
    # 40 wide x 20 high, every column distinct: at resolution 20 nothing is resized and columns 10..29 remain.
    wide = np.tile((np.arange(40) * 6).astype(np.uint8), (20, 1))
    out = load_image(write(tmp_path / "wide.png", png_bytes(wide)), 20, 1, "wide.png")
    assert out.shape == (1, 20, 20)
    np.testing.assert_array_equal(out[0], wide[:, 10:30])
    # The same, transposed: a tall image keeps rows 10..29.
    tall = np.ascontiguousarray(wide.T)
    out = load_image(write(tmp_path / "tall.png", png_bytes(tall)), 20, 1, "tall.png")
    np.testing.assert_array_equal(out[0], tall[10:30, :])


def test_resize_short_side_then_center_crop(tmp_path):
    # 40x20 in four vertical bands red | green | blue | white. Short side 20 -> 10 gives 20x10 with bands of 5;
    # the center crop keeps x in [5, 15): green on the left half, blue on the right half. (Squashing 40x20 into
    # 10x10 instead would show all four bands; a crop without resize would show green only.)
    bands = np.concatenate([solid(c, 20, 10) for c in (RED, GREEN, BLUE, WHITE)], axis=1)
    out = load_image(png_bytes(bands), 10, 3, "bands.png")
    assert out.shape == (3, 10, 10) and out.dtype == np.uint8
    dominant = out.astype(int).argmax(axis=0)  # channel index with the most intensity, per pixel
    assert (dominant[:, :3] == 1).all(), dominant  # green
    assert (dominant[:, 7:] == 2).all(), dominant  # blue
    assert out[0].max() < 60, "no red or white may survive the crop"
    # Exactly PIL's LANCZOS resize of the short side followed by the center crop.
    reference = Image.fromarray(bands).resize((20, 10), Image.Resampling.LANCZOS).crop((5, 0, 15, 10))
    np.testing.assert_array_equal(out, np.asarray(reference).transpose(2, 0, 1))


def test_grayscale_and_rgb_conversion(tmp_path):
    red = png_bytes(solid(RED, 8, 8))
    gray = png_bytes(np.full((8, 8), 200, dtype=np.uint8))
    rgba = png_bytes(np.full((8, 8, 4), (10, 20, 30, 128), dtype=np.uint8))
    # RGB -> 1 channel: ITU-R 601 luma, L = 0.299 R + 0.587 G + 0.114 B.
    out = load_image(red, 8, 1, "red.png")
    assert out.shape == (1, 8, 8) and (out == 76).all()
    # Grayscale -> 3 channels: the value repeated.
    out = load_image(gray, 8, 3, "gray.png")
    assert out.shape == (3, 8, 8) and (out == 200).all()
    # Grayscale stays 1 channel; RGB stays RGB; RGBA drops alpha.
    assert (load_image(gray, 8, 1, "gray.png") == 200).all()
    np.testing.assert_array_equal(load_image(red, 8, 3, "red.png")[:, 0, 0], RED)
    out = load_image(rgba, 8, 3, "rgba.png")
    assert out.shape == (3, 8, 8)
    np.testing.assert_array_equal(out[:, 0, 0], (10, 20, 30))


# --------------------------------------------------------------------------------------------------------------
# 16-bit images and macOS metadata.


def png_16_bit_rgb(array: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (bit depth 16, colour type 2) of an (H, W, 3) uint16 array; Pillow cannot write one."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = array.shape[:2]
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(height))  # filter type 0 per row
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def to_8_bits(values: np.ndarray) -> np.ndarray:
    """The expected 8-bit value of a 16-bit one: round(value * 255 / 65535)."""
    return np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)


GRAY16 = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)
GRAY16[0, 0] = 40000  # 155.6 -> 156 (convert("L") alone clips it to 255)
WIDE16 = np.tile(np.linspace(1000, 64000, 32).round().astype(np.uint16), (24, 1))  # resized and cropped
RGB16 = np.random.default_rng(5).integers(0, 65536, (16, 16, 3), dtype=np.uint16)
RGB16[0, 0] = (40000, 0, 65535)


@pytest.mark.parametrize(("kind", "workers"), [("folder", 0), ("zip", 2)])
def test_16_bit_gray_and_rgb_pngs_are_scaled_to_8_bits(tmp_path, kind, workers):
    files = {"gray16.png": png_bytes(GRAY16), "rgb16.png": png_16_bit_rgb(RGB16), "wide16.png": png_bytes(WIDE16)}
    assert Image.open(io.BytesIO(files["gray16.png"])).mode.startswith("I")  # really 16-bit files
    assert files["rgb16.png"][24:26] == b"\x10\x02"  # bit depth 16, colour type 2
    if kind == "folder":
        path = tmp_path / "scans"
        for name, data in files.items():
            write(path / name, data)
    else:
        path = tmp_path / "scans.zip"
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in files.items():
                archive.writestr(name, data)
    gray8, rgb8 = to_8_bits(GRAY16), to_8_bits(RGB16).transpose(2, 0, 1)
    for channels in (1, 3):
        source = open_source(str(path), 16, channels)
        assert isinstance(source, FileSource) and source.files == sorted(files)
        decoded = {name: source.read(index) for index, name in enumerate(source.files)}
        np.testing.assert_array_equal(decoded["gray16.png"], np.repeat(gray8[None], channels, axis=0))
        assert decoded["gray16.png"][0, 0, 0] == 156
        # Scaled first, then converted, resized (short side, LANCZOS) and cropped like any 8-bit image.
        wide8 = load_image(png_bytes(to_8_bits(WIDE16)), 16, channels, "wide8.png")
        np.testing.assert_array_equal(decoded["wide16.png"], wide8)
        # Pillow reduces 16-bit RGB itself (keeping the high byte): at most one level from the exact scaling.
        exact = rgb8 if channels == 3 else load_image(png_bytes(rgb8.transpose(1, 2, 0)), 16, 1, "rgb8.png")
        assert np.abs(decoded["rgb16.png"].astype(int) - exact).max() <= 1
        if channels == 3:
            np.testing.assert_array_equal(decoded["rgb16.png"][:, 0, 0], (156, 0, 255))
        # Training batches hold the same values.
        batches = RealBatches(source, Streams(0), len(source), 0, 1, CPU, workers=workers)
        try:
            batch = to_uint8(batches.next(0))
            for row, index in enumerate(batches.order.indices(0, len(source)).tolist()):
                assert torch.equal(batch[row], torch.from_numpy(decoded[source.files[index]].copy())), source.files[
                    index
                ]
        finally:
            del batches  # shut the workers down
        # So does a prepared array (python -m trainer.prepare, here in this process).
        out = tmp_path / f"prepared{channels}.npy"
        argv = [str(path), str(out), "--resolution", "16", "--channels", str(channels), "--workers", str(workers)]
        assert prepare.main(argv) == 0
        np.testing.assert_array_equal(np.load(out), np.stack([decoded[name] for name in source.files]))


def apple_double() -> bytes:
    """An AppleDouble resource-fork file as macOS writes for `._photo.png` (magic 0x00051607): not an image."""
    return struct.pack(">II16sH", 0x00051607, 0x00020000, b"Mac OS X", 2) + bytes(64)


FINDER_ZIP = {  # what Finder's "Compress" puts in a zip of a folder `photos`
    "photos/": b"",
    "photos/a.png": png_bytes(solid(RED)),
    "photos/b.png": png_bytes(solid(BLUE)),
    "__MACOSX/": b"",
    "__MACOSX/photos/": b"",
    "__MACOSX/photos/._a.png": apple_double(),
    "__MACOSX/photos/._b.png": apple_double(),
}


@pytest.mark.parametrize("kind", ["zip", "folder"])
def test_macos_metadata_in_a_finder_zip_or_folder_is_skipped(tmp_path, kind, capsys):
    if kind == "zip":
        path = tmp_path / "photos.zip"
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in FINDER_ZIP.items():
                archive.writestr(name, data)
    else:  # the same zip unpacked by a non-Apple tool, plus a `._` file that macOS writes on a FAT or exFAT disk
        path = tmp_path / "photos"
        for name, data in FINDER_ZIP.items():
            if not name.endswith("/"):
                write(path / name, data)
        write(path / "photos" / "._c.png", apple_double())
    assert list_image_files(path) == (["photos/a.png", "photos/b.png"], kind == "zip")
    source = open_source(str(path), 8, 3)
    assert len(source) == 2
    batches = RealBatches(source, Streams(0), 2, 0, 1, CPU)
    assert batches.next(0).shape == (2, 3, 8, 8)  # nothing unreadable to fail on
    out = tmp_path / "photos.npy"
    assert prepare.main([str(path), str(out), "--resolution", "16", "--workers", "0"]) == 0
    assert "skipped 0 unreadable images" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(out)[:, :, 0, 0], [RED, BLUE])


# --------------------------------------------------------------------------------------------------------------
# Corrupt images at train time.


def corrupt_source(tmp_path: Path, kind: str) -> tuple[FileSource, str]:
    """Five good images and one truncated PNG, in a folder or a zip; returns the source and the bad file's name."""
    good = [png_bytes(solid(c, 8, 8)) for c in (RED, GREEN, BLUE, WHITE, RED)]
    if kind == "folder":
        for i, data in enumerate(good):
            write(tmp_path / "src" / f"img{i}.png", data)
        bad = write(tmp_path / "src" / "sub" / "broken.png", truncated_png())
        return open_source(str(tmp_path / "src"), 8, 3), str(bad)
    path = tmp_path / "src.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for i, data in enumerate(good):
            archive.writestr(f"img{i}.png", data)
        archive.writestr("sub/broken.png", truncated_png())
    return open_source(str(path), 8, 3), f"{path}:sub/broken.png"


@pytest.mark.parametrize("kind", ["folder", "zip"])
@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_in_training_raises_data_error_naming_the_file(tmp_path, kind, workers):
    source, bad_name = corrupt_source(tmp_path, kind)
    # One global batch holds every image, so the first batch must read the broken one.
    batches = RealBatches(source, Streams(0), len(source), 0, 1, CPU, workers=workers)
    try:
        with pytest.raises(DataError) as caught:
            batches.next(0)
    finally:
        del batches  # shut the workers down
    message = str(caught.value)
    assert f"'{bad_name}'" in message
    assert message.startswith("Cannot read the image"), message
    assert "Traceback" not in message and "worker" not in message and "\n" not in message, message


def test_zip_member_with_bad_crc_raises_data_error_naming_it(tmp_path):
    path = tmp_path / "src.zip"
    good = png_bytes(solid(GREEN, 8, 8))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("a.png", good)
        archive.writestr("b.png", good)
    raw = bytearray(path.read_bytes())
    raw[raw.find(b"IDAT", raw.find(b"b.png")) + 6] ^= 0xFF  # flip a byte of b.png's data: its CRC no longer matches
    path.write_bytes(bytes(raw))
    batches = RealBatches(open_source(str(path), 8, 3), Streams(0), 2, 0, 1, CPU)
    with pytest.raises(DataError, match=r"src\.zip:b\.png"):
        batches.next(0)


# --------------------------------------------------------------------------------------------------------------
# Errors for missing or mismatched sources.


def test_open_source_of_a_missing_path_explains_ffhq_and_prepare(tmp_path):
    missing = tmp_path / "ffhq"
    with pytest.raises(DataError) as caught:
        open_source(str(missing), 64, 3)
    message = str(caught.value)
    assert str(missing) in message and "FFHQ" in message and "trainer.prepare" in message


def test_prepared_array_with_the_wrong_resolution_names_both(tmp_path):
    path = tmp_path / "faces.npy"
    np.save(path, np.zeros((3, 3, 8, 8), dtype=np.uint8))
    assert len(open_source(str(path), 8, 3)) == 3
    with pytest.raises(DataError) as caught:
        open_source(str(path), 16, 3)
    message = str(caught.value)
    assert "(3, 3, 8, 8)" in message and "data.resolution = 16" in message and str(path) in message
    with pytest.raises(DataError, match=r"data\.channels = 1"):
        open_source(str(path), 8, 1)


# --------------------------------------------------------------------------------------------------------------
# The global order, shards and per-rank batches.


def test_every_epoch_is_a_permutation_and_epochs_differ():
    n = 11
    stream = GlobalOrder(n, Streams(3)).indices(0, 4 * n)
    epochs = stream.view(4, n)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(n))
    assert len({tuple(e.tolist()) for e in epochs}) == 4
    assert not torch.equal(epochs[0], torch.arange(n))


def test_indices_resume_at_any_position():
    n, total = 7, 40
    whole = GlobalOrder(n, Streams(5)).indices(0, total)
    for cuts in ([3, 9, 14, 21, 28], [1, 2, 7, 8, 13, 20, 30, 39], list(range(1, total))):
        order = GlobalOrder(n, Streams(5))  # one object: its cached permutation must not leak across calls
        bounds = [0, *cuts, total]
        pieces = [order.indices(a, b - a) for a, b in itertools.pairwise(bounds)]
        assert torch.equal(torch.cat(pieces), whole), cuts
    # A fresh object starting anywhere (a resumed run) sees the same stream, also going backwards.
    for start in (0, 6, 7, 15, 33):
        assert torch.equal(GlobalOrder(n, Streams(5)).indices(start, total - start), whole[start:])
    order = GlobalOrder(n, Streams(5))
    assert torch.equal(order.indices(30, 5), whole[30:35])
    assert torch.equal(order.indices(2, 9), whole[2:11])


def test_same_seed_same_stream_other_seed_other_stream():
    a = GlobalOrder(50, Streams(1)).indices(0, 120)
    assert torch.equal(a, GlobalOrder(50, Streams(1)).indices(0, 120))
    assert not torch.equal(a, GlobalOrder(50, Streams(2)).indices(0, 120))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_shards_are_disjoint_and_cover_the_global_batch(world_size):
    global_batch = 3 * world_size
    rows = [list(range(global_batch))[shard(global_batch, r, world_size)] for r in range(world_size)]
    assert all(len(r) == global_batch // world_size for r in rows)
    assert all(set(a).isdisjoint(b) for a, b in itertools.combinations(rows, 2))
    assert list(itertools.chain(*rows)) == list(range(global_batch))  # covers it: contiguous, in rank order


def small_array_source(count: int = 10) -> ArraySource:
    images = torch.arange(count * 3 * 4 * 4, dtype=torch.int64).reshape(count, 3, 4, 4) % 251
    return ArraySource(images.to(torch.uint8), "test")


@pytest.fixture
def file_source(tmp_path) -> FileSource:
    random_images(tmp_path / "files", 10, size=4)
    return open_source(str(tmp_path / "files"), 4, 3)


@pytest.mark.parametrize("kind", ["array", "files"])
@pytest.mark.parametrize("hflip", [False, True])
def test_two_ranks_return_the_two_halves_of_one_rank(kind, hflip, request):
    source = small_array_source() if kind == "array" else request.getfixturevalue("file_source")
    global_batch, steps = 4, 7  # 10 images: batches 2 and 4 straddle an epoch boundary
    streams = Streams(11)
    whole = RealBatches(source, streams, global_batch, 0, 1, CPU, hflip=hflip)
    ranks = [RealBatches(source, Streams(11), global_batch, r, 2, CPU, hflip=hflip) for r in range(2)]
    for step in range(steps):
        expected = whole.next(step)
        halves = [rank.next(step) for rank in ranks]
        assert expected.shape == (4, 3, 4, 4) and halves[0].shape == (2, 3, 4, 4)
        assert torch.equal(torch.cat(halves), expected), step
    assert whole.position == ranks[0].position == ranks[1].position == global_batch * steps
    if hflip:  # the flips are real: some samples differ from the unflipped stream
        plain = RealBatches(source, Streams(11), global_batch, 0, 1, CPU)
        flipped = RealBatches(source, Streams(11), global_batch, 0, 1, CPU, hflip=True)
        batches = [(plain.next(s), flipped.next(s)) for s in range(steps)]
        assert any(not torch.equal(a, b) for a, b in batches)
        assert all(torch.equal(a[i], b[i]) or torch.equal(a[i].flip(-1), b[i]) for a, b in batches for i in range(4))


@pytest.mark.parametrize("kind", ["array", "files"])
@pytest.mark.parametrize(("rank", "world_size"), [(0, 1), (1, 2)])
def test_real_batches_resumed_at_a_position_equal_continuing(kind, rank, world_size, request):
    source = small_array_source() if kind == "array" else request.getfixturevalue("file_source")
    global_batch = 4
    continuous = RealBatches(source, Streams(2), global_batch, rank, world_size, CPU, hflip=True)
    expected = [continuous.next(step) for step in range(6)]
    resumed = RealBatches(
        source, Streams(2), global_batch, rank, world_size, CPU, position=3 * global_batch, hflip=True
    )
    for step in range(3, 6):
        assert torch.equal(resumed.next(step), expected[step]), step
    assert resumed.position == continuous.position


@pytest.mark.parametrize("kind", ["array", "files"])
def test_limit_and_heldout_are_disjoint_fixed_subsets(kind, request):
    source = small_array_source() if kind == "array" else request.getfixturevalue("file_source")
    everything = source.take(torch.arange(10))
    train, held = split_source(source, limit=4, heldout=3)
    assert len(train) == 4 and held.shape == (3, 3, 4, 4)
    train_images = train.take(torch.arange(4))
    rows = {bytes(x.numpy()) for x in everything}
    picked = [bytes(x.numpy()) for x in train_images] + [bytes(x.numpy()) for x in held]
    assert len(set(picked)) == 7 and set(picked) <= rows  # disjoint images of the source
    again, held_again = split_source(source, limit=4, heldout=3)  # fixed: no seed involved
    assert torch.equal(again.take(torch.arange(4)), train_images) and torch.equal(held_again, held)
    alone, _ = split_source(source, limit=4)  # the same training images without held-out ones
    assert torch.equal(alone.take(torch.arange(4)), train_images)
    more, _ = split_source(source, limit=6, heldout=3)  # a larger limit extends the same subset
    assert {bytes(x.numpy()) for x in train_images} <= {bytes(x.numpy()) for x in more.take(torch.arange(6))}
    # batches of the subset only ever hold its images
    batches = RealBatches(train, Streams(0), 4, 0, 1, CPU)
    seen = {bytes(to_uint8(batches.next(s)).numpy()[i]) for s in range(3) for i in range(4)}
    assert seen <= {bytes(x.numpy()) for x in train_images}
    assert split_source(source) == (source, None)


def test_heldout_larger_than_the_source_and_a_large_limit_are_explained():
    with pytest.raises(DataError, match=r"holds 10 images, but augment.heldout = 10"):
        split_source(small_array_source(), heldout=10)
    with pytest.raises(DataError, match=r"holds 10 images, but data.limit = 8 plus augment.heldout = 3"):
        split_source(small_array_source(), limit=8, heldout=3)
    with pytest.warns(UserWarning, match="data.limit = 50 is more than the 10 images"):
        train, _ = split_source(small_array_source(), limit=50)
    assert len(train) == 10


def test_bundled_mnist_loads_5000_images_at_the_requested_resolution():
    source = open_source("bundled:mnist", 32, 1)
    assert isinstance(source, ArraySource)
    assert tuple(source.images.shape) == (5000, 1, 32, 32) and source.images.dtype == torch.uint8
    assert source.images.float().mean() > 10  # digits, not an empty array
    assert not torch.equal(source.images[0], source.images[1])


# --------------------------------------------------------------------------------------------------------------
# python -m trainer.prepare


def test_prepare_cli_skips_a_corrupt_file_and_writes_the_rest(tmp_path):
    src = tmp_path / "ffhq"
    random_images(src / "00000", 4, size=12, seed=3)
    random_images(src / "01000", 2, size=12, seed=4)
    bad = write(src / "00000" / "img01b.png", truncated_png())  # sorts between img01 and img02
    out = tmp_path / "out" / "ffhq16.npy"
    result = subprocess.run(
        [sys.executable, "-m", "trainer.prepare", str(src), str(out), "--resolution", "16", "--workers", "2"],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert str(bad) in result.stderr and "warning" in result.stderr
    assert "skipped 1 unreadable image" in result.stdout and "(6, 3, 16, 16)" in result.stdout
    images = np.load(out)
    assert images.shape == (6, 3, 16, 16) and images.dtype == np.uint8
    # Sorted file order, decoded exactly as training decodes them.
    names = [p for p in list_image_files(src)[0] if p != "00000/img01b.png"]
    expected = np.stack([load_image(src / name, 16, 3, name) for name in names])
    np.testing.assert_array_equal(images, expected)
    source = open_source(str(out), 16, 3)
    assert isinstance(source, ArraySource) and len(source) == 6
    assert sorted(p.name for p in out.parent.iterdir()) == ["ffhq16.npy"]  # no temporary file left behind


def test_prepare_cli_missing_src_exits_2_without_traceback(tmp_path):
    missing = tmp_path / "no-such-folder"
    result = subprocess.run(
        [sys.executable, "-m", "trainer.prepare", str(missing), str(tmp_path / "x.npy"), "--resolution", "16"],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert str(missing) in result.stderr.replace("\n", " ")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "x.npy").exists()


def test_prepare_zip_with_limit_and_grayscale(tmp_path):
    src = tmp_path / "images.zip"
    arrays = [np.full((10, 14, 3), 20 * i, dtype=np.uint8) for i in range(6)]
    with zipfile.ZipFile(src, "w") as archive:
        for i, array in reversed(list(enumerate(arrays))):  # stored out of order; the output is sorted
            archive.writestr(f"faces/{i:03d}.png", png_bytes(array))
        archive.writestr("faces/002b.png", b"garbage")
    out = tmp_path / "gray.npy"
    assert (
        prepare.main([str(src), str(out), "--resolution", "16", "--channels", "1", "--limit", "4", "--workers", "0"])
        == 0
    )
    images = np.load(out)
    assert images.shape == (4, 1, 16, 16)
    # The first four readable images in sorted order: 000, 001, 002, 003 (002b is skipped, not counted).
    np.testing.assert_array_equal(images[:, 0, 0, 0], [0, 20, 40, 60])
    assert len(open_source(str(out), 16, 1)) == 4


def test_prepare_in_process_errors_and_atomicity(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    random_images(src, 5)
    out = tmp_path / "out.npy"
    # OUT must end in .npy; an empty folder and a folder of unreadable files are errors naming SRC.
    assert prepare.main([str(src), str(tmp_path / "out.bin"), "--resolution", "16"]) == 2
    assert ".npy" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert prepare.main([str(tmp_path / "empty"), str(out), "--resolution", "16"]) == 2
    assert "contains no images" in capsys.readouterr().err
    write(tmp_path / "bad" / "a.png", b"x")
    with pytest.raises(DataError, match="none could be read"):
        prepare.prepare(tmp_path / "bad", out, 16, progress=False)
    # An interrupted run leaves neither OUT nor a temporary file.
    calls = []

    def interrupted_read(self, index):
        calls.append(index)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return load_image(self.path / self.files[index], self.resolution, self.channels, self.files[index])

    monkeypatch.setattr(FileSource, "read", interrupted_read)
    assert prepare.main([str(src), str(out), "--resolution", "16", "--workers", "0"]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "empty", "src"]
