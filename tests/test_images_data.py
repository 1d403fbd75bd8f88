"""Image data preparation: every source kind, fitting, corrupt files, atomic output."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from aigc.data.images import ImageDataConfig, load_prepared_images, prepare_images
from aigc.errors import AigcError


def write_idx(path, array: np.ndarray) -> None:
    """MNIST IDX format: 0x0000, dtype 0x08 (ubyte), ndim, big-endian dims, raw bytes."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_digits_prepare_and_load(tmp_path):
    meta = prepare_images("digits", tmp_path / "d", overrides=["size=16"])
    assert meta["count"] == 1797 and meta["shape"] == [1, 16, 16]
    assert meta["classes"] == [str(i) for i in range(10)] and sum(meta["label_counts"]) == 1797
    data = load_prepared_images(tmp_path / "d")
    assert data.images.shape == (1797, 1, 16, 16) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int64 and set(data.labels.tolist()) == set(range(10))
    x = data.as_float()
    assert x.dtype == np.float32 and x.min() == -1.0 and x.max() == 1.0
    assert (tmp_path / "d" / "config.json").is_file()
    # same source -> same hash (the hash names the data, not the run)
    assert (
        prepare_images("digits", tmp_path / "d2", overrides={"size": 8})["source_hash"] == meta["source_hash"]
    )


def test_value_range_and_native_size(tmp_path):
    prepare_images("digits", tmp_path / "d", ImageDataConfig(value_range=(0.0, 1.0), limit=10))
    data = load_prepared_images(tmp_path / "d")
    assert data.images.shape == (10, 1, 8, 8)  # size None keeps the source size
    assert data.as_float().min() == 0.0 and data.as_float().max() == 1.0


def test_fit_modes(tmp_path):
    x = np.full((2, 8, 8), 255, np.uint8)
    np.savez(tmp_path / "a.npz", images=x, labels=np.array([0, 1]))
    prepare_images(str(tmp_path / "a.npz"), tmp_path / "pad", overrides=["size=16", "fit=pad"])
    pad = load_prepared_images(tmp_path / "pad").images[0, 0]
    assert (
        pad[4:12, 4:12].min() == 255 and pad[:4].max() == 0 and pad[:, 12:].max() == 0
    )  # centred, black border
    prepare_images(str(tmp_path / "a.npz"), tmp_path / "rs", overrides=["size=16"])
    assert load_prepared_images(tmp_path / "rs").images.min() == 255  # resize fills the frame
    prepare_images(str(tmp_path / "a.npz"), tmp_path / "rgb", overrides=["channels=3"])
    assert load_prepared_images(tmp_path / "rgb").images.shape == (2, 3, 8, 8)


def test_npz_layouts_and_floats(tmp_path):
    x = np.random.default_rng(0).random((5, 3, 8, 8)).astype(np.float32)  # (N, C, H, W) in [0, 1]
    np.savez(tmp_path / "f.npz", images=x)
    meta = prepare_images(str(tmp_path / "f.npz"), tmp_path / "o")
    assert meta["shape"] == [3, 8, 8] and meta["classes"] == []
    got = load_prepared_images(tmp_path / "o").images
    np.testing.assert_array_equal(got, np.rint(x * 255).astype(np.uint8))
    np.savez(tmp_path / "bad.npz", images=x, labels=np.arange(3))
    with pytest.raises(AigcError, match="5 images but 3 labels"):
        prepare_images(str(tmp_path / "bad.npz"), tmp_path / "o2")


def test_idx_directory_and_file(tmp_path):
    rng = np.random.default_rng(1)
    imgs, labs = rng.integers(0, 256, (6, 28, 28)), np.array([3, 1, 4, 1, 5, 9])
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", imgs)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labs)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs[:2])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labs[:2])
    meta = prepare_images(str(tmp_path), tmp_path / "out")
    data = load_prepared_images(tmp_path / "out")
    np.testing.assert_array_equal(data.images[:, 0], imgs)
    np.testing.assert_array_equal(data.labels, labs)
    assert meta["num_classes"] == 10
    assert prepare_images(str(tmp_path), tmp_path / "all", overrides=["split=all"])["count"] == 8
    one = prepare_images(
        str(tmp_path / "t10k-images-idx3-ubyte.gz"), tmp_path / "one", overrides=["size=32", "fit=pad"]
    )
    assert one["count"] == 2 and one["shape"] == [1, 32, 32]
    np.testing.assert_array_equal(load_prepared_images(tmp_path / "one").images[:, 0, 2:30, 2:30], imgs[:2])


def test_folder_classes_and_corrupt_files(tmp_path):
    src = tmp_path / "src"
    for cls, color in (("cat", 200), ("dog", 50)):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12 + i, 10), (color, color, 0)).save(src / cls / f"{i}.png")
    (src / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (src / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    meta = prepare_images(str(src), tmp_path / "out", overrides=["size=8", "fit=crop"])
    assert meta["count"] == 6 and meta["classes"] == ["cat", "dog"]
    assert meta["skipped"] == 2 and sorted(meta["skipped_files"]) == ["broken.jpg", "broken.png"]
    data = load_prepared_images(tmp_path / "out")
    assert data.images.shape == (6, 3, 8, 8)
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.images[0, 0].mean() > data.images[3, 0].mean()  # cat red 200 vs dog red 50


def test_folder_mixed_sizes_need_a_size(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("L", (8, 8)).save(src / "a.png")
    Image.new("L", (9, 8)).save(src / "b.png")
    with pytest.raises(AigcError, match="different sizes.*--set size="):
        prepare_images(str(src), tmp_path / "out")
    assert prepare_images(str(src), tmp_path / "out", overrides=["size=8"])["shape"] == [
        1,
        8,
        8,
    ]  # grayscale kept


def test_only_corrupt_files_is_an_error_and_writes_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(7):
        (src / f"x{i}.png").write_bytes(b"junk")
    with pytest.raises(AigcError, match=r"no usable images.*all 7 files were unreadable \(e\.g\. x0.png"):
        prepare_images(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging left behind


def test_bad_sources_and_out_dir(tmp_path):
    with pytest.raises(AigcError, match="not found.*built-in source"):
        prepare_images(str(tmp_path / "nope"), tmp_path / "o")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(AigcError, match="unsupported image source"):
        prepare_images(str(tmp_path / "x.txt"), tmp_path / "o")
    with pytest.raises(AigcError, match="channels must be 1"):
        prepare_images("digits", tmp_path / "o", overrides=["channels=2"])
    with pytest.raises(AigcError, match="unknown config key"):
        prepare_images("digits", tmp_path / "o", overrides=["sise=16"])
    prepare_images("digits", tmp_path / "o", overrides=["limit=5"])
    with pytest.raises(AigcError, match="--overwrite"):
        prepare_images("digits", tmp_path / "o", overrides=["limit=5"])
    assert prepare_images("digits", tmp_path / "o", overrides=["limit=3"], overwrite=True)["count"] == 3
    with pytest.raises(AigcError, match="not a prepared image data set"):
        load_prepared_images(tmp_path)


def test_mnist_from_data_path(data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("AIGC_DATA_PATH", str(data_root))
    meta = prepare_images("mnist", tmp_path / "m", overrides=["limit=100"])
    assert meta["shape"] == [1, 28, 28] and meta["count"] == 100 and meta["num_classes"] == 10
    data = load_prepared_images(tmp_path / "m")
    assert data.labels[:5].tolist() == [5, 0, 4, 1, 9]  # MNIST's well-known first training labels


def test_mnist_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("AIGC_DATA_PATH", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AigcError, match="MNIST not found.*AIGC_DATA_PATH"):
        prepare_images("mnist", tmp_path / "m")
