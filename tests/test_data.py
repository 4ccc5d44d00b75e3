"""Tests of qevo.data.datasets on the stored real datasets and on small image folders made here."""

import importlib.util
import io
import pathlib
import shutil
import tarfile

import jax
import numpy as np
import pytest
from PIL import Image

import qevo.data.datasets
from qevo.data.datasets import CIFAR10_CLASSES, DataError, Dataset, load_dataset, normalize
from qevo.errors import ConfigError

CIFAR_MEAN = (0.4913, 0.4821, 0.4465)


def row_keys(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Sorted byte strings of (label, image) rows: equal arrays <=> same multiset of examples."""
    rows = np.concatenate([labels.astype(np.uint8)[:, None], images.reshape(len(images), -1)], axis=1)
    return np.sort(np.ascontiguousarray(rows).view(np.dtype((np.void, rows.shape[1]))).ravel())


@pytest.fixture(scope="session")
def mnist_cache(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("mnist-cache")


@pytest.fixture(scope="session")
def mnist(data_dir, mnist_cache) -> Dataset:
    return load_dataset("mnist", data_dir, cache_dir=mnist_cache)


@pytest.fixture(scope="session")
def cifar_cache(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("cifar-cache")


@pytest.fixture(scope="session")
def cifar(data_dir, cifar_cache) -> Dataset:
    return load_dataset("cifar10", data_dir, cache_dir=cifar_cache)


def test_mnist_shapes_labels_and_stats(mnist):
    assert mnist.train_images.shape == (55000, 28, 28, 1) and mnist.train_images.dtype == np.uint8
    assert mnist.val_images.shape == (5000, 28, 28, 1)
    assert mnist.test_images.shape == (10000, 28, 28, 1)
    for split in ("train", "val", "test"):
        images, labels = mnist.split(split)
        assert labels.dtype == np.int32 and len(labels) == len(images)
        counts = np.bincount(labels, minlength=10)
        assert len(counts) == 10 and counts.min() > 0.07 * len(labels) and counts.max() < 0.13 * len(labels)
    assert mnist.num_classes == 10 and mnist.class_names == tuple("0123456789")
    assert abs(mnist.mean[0] - 0.1307) < 1e-3 and abs(mnist.std[0] - 0.3081) < 1e-3


def test_val_split_is_a_seeded_partition_of_train(data_dir, mnist, mnist_cache):
    full = load_dataset("mnist", data_dir, val_size=0, cache_dir=mnist_cache)
    assert full.train_images.shape == (60000, 28, 28, 1) and full.val_images.shape == (0, 28, 28, 1)
    carved = (np.concatenate([mnist.train_images, mnist.val_images]),
              np.concatenate([mnist.train_labels, mnist.val_labels]))
    assert np.array_equal(row_keys(*carved), row_keys(full.train_images, full.train_labels))

    again = load_dataset("mnist", data_dir, cache_dir=mnist_cache)
    assert np.array_equal(again.val_images, mnist.val_images) and np.array_equal(again.val_labels, mnist.val_labels)
    other = load_dataset("mnist", data_dir, seed=1, cache_dir=mnist_cache)
    assert not np.array_equal(other.val_images, mnist.val_images)


def test_split_rejects_unknown_name(mnist):
    with pytest.raises(ValueError, match="'train', 'val' or 'test'"):
        mnist.split("validation")


def test_normalize_numpy_jax_and_jit(mnist):
    batch = mnist.test_images[:8]
    expected = (batch.astype(np.float64) / 255 - mnist.mean[0]) / mnist.std[0]
    for out in (normalize(batch, mnist.mean, mnist.std),
                jax.jit(normalize)(jax.numpy.asarray(batch), mnist.mean, mnist.std)):
        assert out.dtype == np.float32 and out.shape == batch.shape
        np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_env_vars_give_data_and_cache_dirs(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QEVO_DATA_DIR", str(data_dir))
    monkeypatch.setenv("QEVO_CACHE_DIR", str(tmp_path))
    ds = load_dataset("mnist", val_size=100)
    assert ds.train_images.shape == (59900, 28, 28, 1)
    assert len(list(tmp_path.glob("mnist-orig-*.npz"))) == 1


@pytest.mark.slow
def test_mnist_image_size_resizes(data_dir, mnist_cache):
    ds = load_dataset("mnist", data_dir, image_size=32, cache_dir=mnist_cache)
    assert ds.train_images.shape == (55000, 32, 32, 1) and ds.test_images.shape == (10000, 32, 32, 1)


def test_cifar10_shapes_classes_and_stats(cifar):
    assert cifar.train_images.shape == (45000, 32, 32, 3) and cifar.train_images.dtype == np.uint8
    assert cifar.val_images.shape == (5000, 32, 32, 3) and cifar.test_images.shape == (10000, 32, 32, 3)
    assert cifar.class_names == CIFAR10_CLASSES and cifar.num_classes == 10
    assert np.array_equal(np.bincount(cifar.test_labels), np.full(10, 1000))
    assert np.array_equal(np.bincount(np.concatenate([cifar.train_labels, cifar.val_labels])), np.full(10, 5000))
    np.testing.assert_allclose(cifar.mean, CIFAR_MEAN, atol=1e-3)


def test_cifar10_labels_match_the_class_folders(cifar, data_dir):
    """Test images sort by (class in CIFAR-10 order, file index): compare a few with the archive's files."""
    wanted = {"CIFAR-10-images/test/airplane/0000.jpg": 0, "CIFAR-10-images/test/cat/0007.jpg": 3007,
              "CIFAR-10-images/test/truck/0999.jpg": 9999}
    with tarfile.open(data_dir / "cifar10" / "CIFAR-10-images-jpg.tar.gz", "r|gz") as tar:
        for member in tar:
            if member.name in wanted:
                index = wanted.pop(member.name)
                image = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
                assert np.array_equal(cifar.test_images[index], image)
                assert CIFAR10_CLASSES[cifar.test_labels[index]] == member.name.split("/")[2]
            if not wanted:
                break
    assert not wanted, f"not in the archive: {wanted}"


def test_cifar10_second_load_hits_the_cache(cifar, data_dir, cifar_cache, monkeypatch):
    def no_decoding(*args):
        raise AssertionError("decoded again instead of loading the cache")

    monkeypatch.setattr(qevo.data.datasets, "_decode_all", no_decoding)
    again = load_dataset("cifar10", data_dir, cache_dir=cifar_cache)
    assert np.array_equal(again.train_images, cifar.train_images) and again.mean == cifar.mean
    assert len(list(cifar_cache.glob("*.npz"))) == 1 and not list(cifar_cache.glob("*.tmp"))


def test_unknown_dataset_and_source():
    with pytest.raises(ValueError, match="mnist, cifar10, imagenette, image_folder"):
        load_dataset("svhn")
    with pytest.raises(ValueError, match="auto, local, tfds"):
        load_dataset("mnist", source="web")


def test_missing_data_folder_names_path_and_env_var(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="QEVO_DATA_DIR") as err:
        load_dataset("cifar10", missing, cache_dir=tmp_path)
    assert str(missing / "cifar10" / "CIFAR-10-images-jpg.tar.gz") in str(err.value)


def copy_mnist(data_dir: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    shutil.copytree(data_dir / "mnist", dest / "mnist")
    for f in (dest / "mnist").iterdir():
        f.chmod(0o644)
    return dest / "mnist"


def test_truncated_archive_is_reported(data_dir, tmp_path):
    bad = copy_mnist(data_dir, tmp_path) / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:10000])
    with pytest.raises(DataError, match="truncated") as err:
        load_dataset("mnist", tmp_path, cache_dir=tmp_path / "cache")
    assert str(bad) in str(err.value) and "d53e105ee54ea40749a09fcbcd1e9432" in str(err.value)


def test_md5_mismatch_is_reported(data_dir, tmp_path):
    bad = copy_mnist(data_dir, tmp_path) / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(bad.read_bytes())
    data[100] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError, match="expected md5 ec29112dd5afa0611ce80d1b7f02629c") as err:
        load_dataset("mnist", tmp_path, cache_dir=tmp_path / "cache")
    assert str(bad) in str(err.value) and "Download it again" in str(err.value)


@pytest.mark.parametrize("val_size", [60000, 70000, -1, 2.5])
def test_bad_val_size(data_dir, mnist_cache, val_size):
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("mnist", data_dir, val_size=val_size, cache_dir=mnist_cache)


COLORS = {"zebra": (0, 0, 255), "ant": (255, 0, 0)}  # class folders, sorted: ant=0, zebra=1


def make_image_folder(root: pathlib.Path, size=(6, 5)) -> pathlib.Path:
    """train: 3 images per class, test: 2; one grayscale PNG; a stray README."""
    for split, n in (("train", 3), ("test", 2)):
        for cls, color in COLORS.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", size, color).save(root / split / cls / f"{i}.png")
    Image.new("L", size, 128).save(root / "train" / "ant" / "gray.png")
    (root / "README.txt").write_text("not an image")
    return root


def check_image_folder(ds: Dataset):
    assert ds.class_names == ("ant", "zebra") and ds.num_classes == 2
    assert ds.train_images.shape[0] + ds.val_images.shape[0] == 7 and ds.test_images.shape == (4, 5, 6, 3)
    assert np.array_equal(ds.test_labels, [0, 0, 1, 1])
    for images, labels in (ds.split("train"), ds.split("test")):
        for image, label in zip(images, labels, strict=True):
            pixel = tuple(image[0, 0])
            assert pixel == COLORS[ds.class_names[label]] or pixel == (128, 128, 128)


def test_image_folder_directory_and_tar(tmp_path):
    root = make_image_folder(tmp_path / "pets")
    check_image_folder(load_dataset("image_folder", root, val_size=2, cache_dir=tmp_path / "cache"))
    archive = tmp_path / "pets.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="pets")
    from_tar = load_dataset("image_folder", archive, val_size=2, cache_dir=tmp_path / "cache")
    check_image_folder(from_tar)
    assert len(list((tmp_path / "cache").glob("image_folder-*.npz"))) == 2


def test_unreadable_cache_file_is_rebuilt(tmp_path):
    root = make_image_folder(tmp_path / "pets")
    first = load_dataset("image_folder", root, val_size=0, cache_dir=tmp_path / "cache")
    (cached,) = (tmp_path / "cache").glob("*.npz")
    cached.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable cache file"):
        again = load_dataset("image_folder", root, val_size=0, cache_dir=tmp_path / "cache")
    assert np.array_equal(again.train_images, first.train_images)
    assert np.array_equal(load_dataset("image_folder", root, val_size=0, cache_dir=tmp_path / "cache").test_labels,
                          first.test_labels)


def test_image_folder_sizes_must_agree_unless_resized(tmp_path):
    root = make_image_folder(tmp_path / "pets")
    Image.new("RGB", (9, 9), COLORS["zebra"]).save(root / "test" / "zebra" / "big.png")
    with pytest.raises(DataError, match="image_size"):
        load_dataset("image_folder", root, val_size=0, cache_dir=tmp_path / "cache")
    ds = load_dataset("image_folder", root, val_size=0, image_size=4, cache_dir=tmp_path / "cache")
    assert ds.train_images.shape == (7, 4, 4, 3) and ds.test_images.shape == (5, 4, 4, 3)


def test_image_folder_errors(tmp_path):
    root = make_image_folder(tmp_path / "pets")
    bad = root / "train" / "zebra" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"broken\.png"):
        load_dataset("image_folder", root, val_size=0, cache_dir=tmp_path / "cache")
    shutil.rmtree(root / "test")
    with pytest.raises(DataError, match="no test/ subfolder"):
        load_dataset("image_folder", root, val_size=0, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="needs data_dir"):
        load_dataset("image_folder")


def test_decoding_workers_import_no_jax_and_decode_as_this_process():
    """qevo.data.datasets's pool of image-decoding processes: each runs qevo/decode_worker.py first, so
    it imports qevo.data.datasets without qevo's __init__ (no JAX, no models; this process's main is not
    re-run there), decodes as this process does, and a bad image there is a DataError here."""
    items = []
    for i, (mode, color) in enumerate([("RGB", (10, 200, 30)), ("L", 77), ("RGBA", (1, 2, 3, 4))]):
        buf = io.BytesIO()
        Image.new(mode, (7, 5), color).save(buf, "PNG")
        items.append((f"{i}.png", buf.getvalue()))
    here = qevo.data.datasets._decode_chunk(items, 4)
    with qevo.data.datasets._decode_pool() as pool:
        imported = pool.submit(eval, "__import__('qevo.data.datasets') and "  # as unpickling a decoding task does
                               "sorted({'jax', 'flax', 'qevo.models.zoo'} & set(__import__('sys').modules))")
        decoded = pool.submit(qevo.data.datasets._decode_chunk, items, 4).result()
        with pytest.raises(DataError, match=r"cannot decode image bad\.png"):
            pool.submit(qevo.data.datasets._decode_chunk, [("bad.png", b"not an image")], None).result()
        assert imported.result() == []
    assert [x.shape for x in decoded] == [(4, 4, 3), (4, 4, 1), (4, 4, 3)]
    for ours, theirs in zip(here, decoded, strict=True):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("cut", [4, 200])  # 4 bytes: only the gzip trailer, after every image
def test_truncated_image_folder_tar(tmp_path, cut):
    root = make_image_folder(tmp_path / "pets", size=(64, 64))
    archive = tmp_path / "pets.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="pets")
    archive.write_bytes(archive.read_bytes()[:-cut])
    with pytest.raises(DataError, match=r"pets\.tar\.gz"):
        load_dataset("image_folder", archive, val_size=0, cache_dir=tmp_path / "cache")


@pytest.mark.slow
def test_tfds_mnist_from_manual_dir_equals_idx_files(data_dir, mnist_cache, tmp_path):
    via_tfds = load_dataset("mnist", data_dir, val_size=0, source="tfds", cache_dir=tmp_path)
    local = load_dataset("mnist", data_dir, val_size=0, cache_dir=mnist_cache)
    for split in ("train", "test"):
        assert np.array_equal(row_keys(*via_tfds.split(split)), row_keys(*local.split(split)))
    assert via_tfds.class_names == local.class_names and via_tfds.mean == local.mean


@pytest.mark.slow
def test_imagenette_at_64_pixels(data_dir, tmp_path):
    ds = load_dataset("imagenette", data_dir, val_size=1000, image_size=64, cache_dir=tmp_path)
    assert ds.train_images.shape == (9469 - 1000, 64, 64, 3)
    assert ds.val_images.shape == (1000, 64, 64, 3) and ds.test_images.shape == (3925, 64, 64, 3)
    assert ds.num_classes == 10 and ds.class_names[0] == "n01440764"
    counts = np.bincount(ds.test_labels, minlength=10)
    assert counts.min() > 300 and counts.sum() == 3925


def test_split_prefixes_are_class_balanced_even_for_class_sorted_archives(data_dir):
    """CIFAR-10's archive is sorted by class; the first 2,000 train and 500 validation images hold every class."""
    ds = load_dataset("cifar10", data_dir, val_size=5000, seed=0)
    for labels, n in ((ds.train_labels, 2000), (ds.val_labels, 500)):
        counts = np.bincount(labels[:n], minlength=10)
        assert counts.min() >= n // 20, counts


def make_noise_folder(root: pathlib.Path, counts: dict[str, tuple[int, int]], size=(7, 5)) -> pathlib.Path:
    """Distinct smooth images (a random plane per image), ``counts[class] = (train, test)``."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[: size[1], : size[0]]
    for cls, (n_train, n_test) in counts.items():
        for split, n in (("train", n_train), ("test", n_test)):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a, b, c = rng.uniform(0, 12, 3), rng.uniform(0, 12, 3), rng.uniform(20, 150, 3)
                image = (c + a * yy[..., None] + b * xx[..., None]).astype(np.uint8)
                Image.fromarray(image).save(root / split / cls / f"img{i:02d}.png")
    return root


@pytest.mark.parametrize("quality", [None, 95])
def test_written_image_folder_reloads_to_the_same_splits(tmp_path, quality):
    """Order, labels, validation carve and (PNG) pixels survive the round trip; JPEG stays close."""
    root = make_noise_folder(tmp_path / "src", {"cat": (5, 2), "ant": (4, 3), "bee": (6, 1)})
    source = load_dataset("image_folder", root, val_size=4, seed=3, cache_dir=tmp_path / "cache")
    out = tmp_path / "copy.tar.gz"
    summary = qevo.data.datasets.write_image_folder("image_folder", out, data_dir=root, cache_dir=tmp_path / "cache",
                                           quality=quality)
    assert summary["images"] == 21 and summary["bytes"] == out.stat().st_size and summary["image_size"] == 5
    with tarfile.open(out) as tar:
        names = tar.getnames()
    suffix = ".png" if quality is None else ".jpg"
    assert f"copy/train/ant/000000{suffix}" in names and f"copy/test/cat/000005{suffix}" in names
    copy = load_dataset("image_folder", out, val_size=4, seed=3, cache_dir=tmp_path / "cache")
    assert copy.class_names == source.class_names == ("ant", "bee", "cat")
    for split in ("train", "val", "test"):
        (a, la), (b, lb) = source.split(split), copy.split(split)
        assert np.array_equal(la, lb)
        error = np.abs(a.astype(int) - b.astype(int))
        assert error.max() == 0 if quality is None else error.mean() < 3, (split, error.mean())


def _data_command(tmp_path, *args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "qevo.data", *args], capture_output=True, text=True, cwd=tmp_path,
                          env={**__import__("os").environ, "QEVO_CACHE_DIR": str(tmp_path / "cache")}, check=False)


def test_data_command_writes_a_resized_archive_and_refuses_bad_input(tmp_path):
    root = make_noise_folder(tmp_path / "src", {"ant": (3, 1), "bee": (2, 2)})
    out = _data_command(tmp_path, "--name", "image_folder", "--data-dir", str(root), "--image-size", "4", "--png",
                        "--out", "m.tar.gz")
    assert out.returncode == 0, out.stderr
    ds = load_dataset("image_folder", tmp_path / "m.tar.gz", val_size=0, cache_dir=tmp_path / "cache")
    assert ds.train_images.shape == (5, 4, 4, 3) and ds.test_images.shape == (3, 4, 4, 3)
    assert ds.class_names == ("ant", "bee") and np.array_equal(ds.test_labels, [0, 1, 1])
    # the other refusals, each a command of its own, in the full suite (below)
    bad = _data_command(tmp_path, "--name", "mnist", "--out", "m.tar.gz/m.tar.gz")
    message = "--out m.tar.gz/m.tar.gz cannot be written (m.tar.gz is a file); pass a file path"
    assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--name", "mnist", "--out", "m.zip"], "must end in .tar.gz"),
    (["--name", "mnist", "--out", "m.tar.gz", "--quality", "100"], "an int in 1..95"),
    (["--name", "image_folder", "--out", "m.tar.gz"], "needs --data-dir"),
    (["--name", "cifar10", "--data-dir", "{tmp_path}/nowhere", "--out", "c.tar.gz"], "nowhere"),
    (["--name", "mnist", "--out", "/proc/qevo/m.tar.gz"],
     "--out /proc/qevo/m.tar.gz cannot be written (no file can be made in /proc: "),
])
def test_data_command_refuses_bad_input_in_one_line(tmp_path, args, message):
    bad = _data_command(tmp_path, *(a.format(tmp_path=tmp_path) for a in args))
    assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_no_data_folder_and_no_tensorflow_is_a_data_error(monkeypatch, tmp_path):
    monkeypatch.delenv("QEVO_DATA_DIR", raising=False)
    find_spec = importlib.util.find_spec  # a machine without tensorflow, whether or not this one has it
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorflow" else find_spec(name, *a))
    with pytest.raises(DataError, match=r"'mnist': no data folder was given, .* set \$QEVO_DATA_DIR"):
        load_dataset("mnist", cache_dir=tmp_path)



def test_no_data_folder_and_no_internet_is_one_line_at_once(monkeypatch, tmp_path):
    import socket

    monkeypatch.delenv("QEVO_DATA_DIR", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: (_ for _ in ()).throw(socket.gaierror("no network")))
    with pytest.raises(DataError, match=r"'mnist': no data folder was given, and tensorflow-datasets cannot download "
                                        r"it \(storage.googleapis.com does not resolve: no internet here\?\): set"):
        load_dataset("mnist", cache_dir=tmp_path)

def test_test_class_without_train_images_is_refused(tmp_path):
    root = make_noise_folder(tmp_path / "src", {"ant": (3, 1), "bee": (2, 2), "cat": (0, 2)})
    with pytest.raises(DataError, match=r"class folders \['cat'\] have test images but no train images"):
        load_dataset("image_folder", root, val_size=1, cache_dir=tmp_path / "cache")


def _files(root: pathlib.Path) -> list[pathlib.Path]:
    """The image files of a folder in the loader's order: split, class, file name."""
    return [f for split in ("train", "test") for f in sorted((root / split).glob("*/*"))]


def _gray(root: pathlib.Path, names=None):
    """Rewrite the PNGs of ``root`` (or only ``names``) as single-channel grayscale (mode L)."""
    for f in _files(root):
        if names is None or f.name in names:
            Image.open(f).convert("L").save(f)


def test_grayscale_folder_loads_with_one_channel(tmp_path):
    root = make_noise_folder(tmp_path / "src", {"ant": (3, 1), "bee": (2, 2)})
    expected = np.stack([np.asarray(Image.open(f).convert("L")) for f in _files(root)])  # PIL's luma, as oracle
    _gray(root)
    ds = load_dataset("image_folder", root, val_size=0, cache_dir=tmp_path / "cache")
    assert ds.train_images.shape == (5, 5, 7, 1) and ds.test_images.shape == (3, 5, 7, 1) and len(ds.mean) == 1
    loaded = np.concatenate([ds.train_images, ds.test_images])[..., 0]  # splits come in a seeded order
    assert sorted(map(bytes, loaded)) == sorted(map(bytes, expected))
    three = load_dataset("image_folder", root, val_size=0, cache_dir=tmp_path / "cache", channels=3)
    assert three.train_images.shape == (5, 5, 7, 3)
    np.testing.assert_array_equal(three.train_images, np.repeat(ds.train_images, 3, axis=-1))


def test_mixed_folder_loads_as_rgb_and_channels_1_is_pils_luma(tmp_path):
    root = make_noise_folder(tmp_path / "src", {"ant": (3, 1), "bee": (2, 2)})
    colour = {f.name: np.asarray(Image.open(f)) for f in _files(root) if f.parent.name == "ant"}
    luma = np.stack([np.asarray(Image.open(f).convert("L")) for f in _files(root)])
    _gray(root, names={"img01.png"})  # one grayscale image per class folder among colour ones
    ds = load_dataset("image_folder", root, val_size=0, cache_dir=tmp_path / "cache", seed=0)
    assert ds.train_images.shape[-1] == 3 and len(ds.mean) == 3
    one = load_dataset("image_folder", root, val_size=0, cache_dir=tmp_path / "cache", channels=1)
    assert one.train_images.shape[-1] == 1
    assert sorted(map(bytes, np.concatenate([one.train_images, one.test_images]))) == sorted(map(bytes, luma))
    assert any(np.array_equal(x, colour["img00.png"]) for x in np.concatenate([ds.train_images, ds.test_images]))


def _split(n=12, shape=(3, 3, 1), dtype=np.uint8, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape)).astype(dtype), rng.integers(0, classes, n)


def _bad(case):
    """``(train, test, keyword arguments)`` of :meth:`Dataset.from_arrays` with one bad input."""
    (x, y), test = _split(), _split(5, seed=1)
    if case == "not a pair":
        return (x,), test, {}
    if case == "lengths":
        return (x, y[:11]), test, {}
    if case == "one-hot":
        return (x, np.eye(4, dtype=np.int64)[y]), test, {}
    if case == "label too high":
        y_test = test[1].copy()
        y_test[3] = 7
        return (x, y), (test[0], y_test), {"num_classes": 4}
    if case == "negative label":
        y = y.copy()
        y[5] = -2
        return (x, y), test, {}
    x = x.astype(np.float32)
    x[4, 1, 2, 0], x[4, 0, 0, 0], x[9, 2, 2, 0] = np.nan, np.inf, -np.inf
    return (x, y), (test[0].astype(np.float32), test[1]), {}


BAD_INPUT = {
    "not a pair": "train must be an (inputs, labels) pair, got a tuple of 1",
    "lengths": "train has 12 inputs and 11 labels (shapes (12, 3, 3, 1) and (11,)); give one integer label per input",
    "one-hot": "train labels are (12, 4), one row per input (one-hot?); give one integer class per input, shape [N] "
               "(e.g. labels.argmax(-1)), or labels='any' with a loss= and metric= of yours",
    "label too high": "test labels hold 7 (at example 3), outside [0, num_classes=4); pass the right num_classes "
                      "or fix the labels",
    "negative label": "train labels hold -2 (at example 5), outside [0, num_classes); fix the labels",
    "non-finite": "train inputs hold 3 NaN or infinite values, in 2 of 12 examples (the first: example 4); clean or "
                  "drop those examples",
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_from_arrays_names_the_bad_input_in_one_line(case):
    train, test, kwargs = _bad(case)
    with pytest.raises(DataError) as err:
        Dataset.from_arrays(train, test, **kwargs)
    assert str(err.value) == BAD_INPUT[case]


@pytest.mark.parametrize("case", ["label too high", "negative label", "non-finite"])
def test_from_batches_checks_the_joined_splits_as_from_arrays(case):
    """Batches of 5, 5 and 2: the example named is the position in the joined split."""
    (x, y), (tx, ty), kwargs = _bad(case)
    with pytest.raises(DataError) as err:
        Dataset.from_batches([(x[i:i + 5], y[i:i + 5]) for i in (0, 5, 10)], [(tx[:3], ty[:3]), (tx[3:], ty[3:])],
                             **kwargs)
    assert str(err.value) == BAD_INPUT[case]


def test_from_batches_names_the_bad_batch_in_one_line():
    x, y = _split()
    cases = [
        ([(x[:5], y[:5]), (x[5:], y[5:11])],
         "train batch 1 has 7 inputs and 6 labels (shapes (7, 3, 3, 1) and (6,)); give one integer label per input"),
        ([(x[:5], y[:5]), (x[5:, :2], y[5:])],
         "train batch 1 holds inputs of shape (2, 3, 1), batch 0 of (3, 3, 1); give every batch inputs of one shape"),
    ]
    for train, message in cases:
        with pytest.raises(DataError) as err:
            Dataset.from_batches(train, [(x, y)])
        assert str(err.value) == message


def test_labels_any_keeps_multi_label_arrays_and_carves_them_with_their_inputs():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 4, 4, 1)).astype(np.uint8)
    y = rng.random((30, 3)) < 0.5
    ds = Dataset.from_arrays((x, y), (x[:5], y[:5]), val_size=6, seed=2, labels="any")
    perm = np.random.default_rng(2).permutation(30)  # the carve's seeded order, as for class labels
    assert ds.train_labels.dtype == np.float32 and ds.train_labels.shape == (24, 3)
    np.testing.assert_array_equal(ds.val_labels, y[perm[:6]].astype(np.float32))
    np.testing.assert_array_equal(ds.train_images, x[perm[6:]])
    np.testing.assert_array_equal(ds.train_labels, y[perm[6:]].astype(np.float32))
    assert ds.num_classes is None and ds.class_names == ()
    counts = Dataset.from_arrays((x, y.astype(np.int64) * 7), (x[:5], y[:5].astype(np.int64)), labels="any")
    assert counts.train_labels.dtype == np.int32 and counts.train_labels.max() == 7  # no class range to fit
    targets = Dataset.from_arrays((x, y[:, 0] * 2.5), (x[:5], y[:5, 0] * 1.0), labels="any")
    assert targets.test_labels.shape == (5,) and targets.test_labels.dtype == np.float32


@pytest.mark.parametrize("train_labels, test_labels, kind, match", [
    (np.zeros((6, 3)), np.zeros((2, 3)), "classes", r"train labels are \(6, 3\), one row per input \(one-hot\?\)"),
    (np.zeros(6), np.zeros(2), "classes", r"train labels are float64; give integer class labels, or pass labels='any'"),
    (np.zeros((6, 3)), np.zeros((2, 2)), "any", r"test labels are float32 \(2,\) per example, train labels float32 "
                                                r"\(3,\)"),
    (np.zeros((6, 3)), np.zeros((2, 3), np.int32), "any", r"test labels are int32 \(3,\) per example, train labels "
                                                          r"float32"),
    (np.full((6, 3), np.nan), np.zeros((2, 3)), "any", r"train labels hold 18 NaN or infinite values"),
    (np.array(["a"] * 6), np.zeros(2), "any", r"train labels are <U1; give integer, float or bool labels"),
])
def test_labels_of_another_kind_are_refused_in_one_line(train_labels, test_labels, kind, match):
    x = np.zeros((6, 2), np.uint8)
    with pytest.raises(DataError, match=match):
        Dataset.from_arrays((x, train_labels), (x[:2], test_labels), labels=kind)


def test_labels_argument_is_checked():
    x, y = np.zeros((6, 2), np.uint8), np.zeros(6, int)
    with pytest.raises(ConfigError, match=r"labels='multi' is not one of \('classes', 'any'\)"):
        Dataset.from_arrays((x, y), (x, y), labels="multi")
    with pytest.raises(ConfigError, match="num_classes counts class labels; leave it out with labels='any'"):
        Dataset.from_arrays((x, y), (x, y), labels="any", num_classes=3)
