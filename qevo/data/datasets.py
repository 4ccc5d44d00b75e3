"""Image-classification datasets as in-memory uint8 arrays, decoded once and cached.

`load_dataset` returns a `Dataset` for one of:

- ``"mnist"``: 28x28x1, 10 classes, 60,000 train / 10,000 test.
- ``"cifar10"``: 32x32x3, 10 classes in CIFAR-10's own order, 50,000 / 10,000.
- ``"imagenette"``: 224x224x3 (from the offline copy), 10 classes, 9,469 / 3,925; its
  official ``val`` split serves as the test split.
- ``"image_folder"``: the user's own ``<root>/{train,test}/<class>/*.{jpg,jpeg,png}``,
  either as a folder or as a ``.tar.gz`` of one (a single top-level folder inside the
  archive is fine); classes sorted alphabetically; a folder of only grayscale images
  loads with one channel, any other as RGB (``channels=`` overrides).

Sources (``source=``):

- ``"local"``: the distributed archives under ``data_dir`` (the argument, else
  ``$QEVO_DATA_DIR``)::

      <data_dir>/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
      <data_dir>/cifar10/CIFAR-10-images-jpg.tar.gz
      <data_dir>/imagenette/imagenette-224-{train,val}.tar.gz

  Each file's size and md5 are checked before it is first decoded.
- ``"tfds"``: tensorflow-datasets (``pip install 'qevo[tfds]'``), downloading as usual;
  for MNIST, ``<data_dir>/mnist`` is given to tfds as its manual folder, which lets it
  prepare MNIST offline.
- ``"auto"`` (default): ``"local"`` when a data folder is known, else ``"tfds"``.

Decoded arrays are cached as an uncompressed ``.npz`` under ``cache_dir`` (the argument,
else ``$QEVO_CACHE_DIR``, else ``~/.cache/qevo``), keyed by dataset, image size and the
source files' names, sizes and modification times; a later call loads the cache instead
of decoding. A validation split is carved from train with a fixed seed, so model search
never looks at the test split.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import gzip
import hashlib
import importlib.util
import io
import json
import logging
import multiprocessing
import os
import pathlib
import runpy
import socket
import sys
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from qevo.errors import ConfigError, DataError, QevoError
from qevo.files import atomic_path, unwritable

if TYPE_CHECKING:  # annotations only: the worker processes decoding images never import jax
    import jax

DATASET_NAMES = ("mnist", "cifar10", "imagenette", "image_folder")
LABEL_KINDS = ("classes", "any")  # Dataset.from_arrays(labels=...)
SOURCES = ("auto", "local", "tfds")
DATA_DIR_ENV = "QEVO_DATA_DIR"
CACHE_DIR_ENV = "QEVO_CACHE_DIR"

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
IMAGENETTE_CLASSES = (
    "n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
    "n03394916", "n03417042", "n03425413", "n03445777", "n03888257",
)
MNIST_CLASSES = tuple(str(d) for d in range(10))

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_CACHE_FORMAT = 2
_CHUNK = 1000  # images per decode task sent to a worker process
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")  # PIL modes decoded with one channel
_MAX_WORKERS = 8
_IMAGENETTE_TFDS_SIZE = 224  # size of the offline copy; tfds images vary in size


@dataclasses.dataclass(frozen=True)
class _Archive:
    """One distributed source file: its path under data_dir, size in bytes and md5."""

    relpath: str
    size: int
    md5: str


_ARCHIVES = {
    "mnist": (
        _Archive("mnist/train-images-idx3-ubyte.gz", 9_912_422, "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        _Archive("mnist/train-labels-idx1-ubyte.gz", 28_881, "d53e105ee54ea40749a09fcbcd1e9432"),
        _Archive("mnist/t10k-images-idx3-ubyte.gz", 1_648_877, "9fb629c4189551a2d022fa330f9573f3"),
        _Archive("mnist/t10k-labels-idx1-ubyte.gz", 4_542, "ec29112dd5afa0611ce80d1b7f02629c"),
    ),
    "cifar10": (
        _Archive("cifar10/CIFAR-10-images-jpg.tar.gz", 19_435_776, "adf37386f8f1c3971a941f1f9f8a8487"),
    ),
    "imagenette": (
        _Archive("imagenette/imagenette-224-train.tar.gz", 93_307_097, "26dd1a3f1062f2dcee7cc167aa742725"),
        _Archive("imagenette/imagenette-224-val.tar.gz", 38_914_658, "c1b3eff17ec8bf5c5054445fbafb1e02"),
    ),
}

_TFDS_BUILDERS = {"mnist": "mnist", "cifar10": "cifar10", "imagenette": "imagenette/320px-v2"}
# Where tensorflow-datasets downloads each one from: probed before a download, so that a
# machine without the internet gets one line at once instead of minutes of retries.
_TFDS_HOSTS = {"mnist": "storage.googleapis.com", "cifar10": "www.cs.toronto.edu", "imagenette": "s3.amazonaws.com"}


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset held in memory: a classification dataset, or a user's arrays with labels of their own kind.

    Images are uint8 arrays ``[N, H, W, C]`` (pixel values 0..255, C = 1 for MNIST, 3
    otherwise; :meth:`from_arrays` also takes float inputs). Labels are int32 ``[N]`` in
    ``0..num_classes-1``; or, from :meth:`from_arrays` with ``labels="any"``, int32 or
    float32 ``[N, ...]`` of any shape per example (multi-label targets ``[N, K]``, regression
    targets), read only by a user's ``loss=`` and ``metric=`` (:mod:`qevo.models.losses`), with
    ``num_classes`` None and no ``class_names``. ``val_*`` are carved from the original train
    split, ``train_*`` is the rest. ``mean``/``std`` are per channel, over the ``train_*``
    pixels scaled to [0, 1]; pass them to `normalize`.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int | None
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(images [N,H,W,C] uint8, labels [N] int32 (or [N, ...]))`` of ``"train"``, ``"val"`` or ``"test"``."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; expected 'train', 'val' or 'test'")
        return getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")

    @classmethod
    def from_arrays(cls, train: tuple, test: tuple, val: tuple | None = None, *, val_size: int = 0,
                    seed: int = 0, num_classes: int | None = None, normalize: bool = True,
                    name: str = "arrays", labels: str = "classes") -> Dataset:
        """A dataset of a user's own arrays.

        Args:
          train: ``(inputs [N, ...], labels)``. Inputs are uint8 (0..255, as images)
            or float. Labels as ``labels`` says: int ``[N]`` class indices, or any kind.
          test: ``(inputs, labels)`` of the test split, as ``train``.
          val: ``(inputs, labels)`` of a validation split; None carves ``val_size``
            examples from ``train`` in a seeded random order (as :func:`load_dataset` does).
          val_size: examples carved from ``train`` as the validation split.
          seed: the seed of the carving's random order.
          num_classes: with class labels, default ``max(label) + 1`` over every split.
          normalize: standardize each channel (the last axis) with the mean and standard
            deviation of the train split; False feeds uint8 inputs as ``x / 255`` and float
            inputs as they are (up to float32 rounding).
          name: the dataset's name in results.
          labels: ``"classes"`` (integers in ``0..num_classes-1``, one per example, what
            qevo's default cross-entropy and top-1 read) or ``"any"``: integer, float or
            bool labels ``[N, ...]`` of the same shape per example in every split (e.g.
            ``[N, K]`` multi-label targets), kept as int32 or float32 (bool as 0/1 float32),
            for a ``loss=`` and ``metric=`` of the user's (:mod:`qevo.models.losses`); the
            dataset then has ``num_classes`` None.

        Raises:
          ConfigError: ``labels`` not one of those two, or ``num_classes`` with ``labels="any"``.
          DataError: a split that is not an ``(inputs, labels)`` pair, mismatched lengths, labels
            out of range, NaN or infinite inputs (or float labels), other dtypes, or splits whose
            examples differ in shape.
        """
        if labels not in LABEL_KINDS:
            raise ConfigError(f"labels={labels!r} is not one of {LABEL_KINDS}")
        if labels == "any" and num_classes is not None:
            raise ConfigError("num_classes counts class labels; leave it out with labels='any'")
        splits = {"train": train, "test": test, **({"val": val} if val is not None else {})}
        checked = {k: _checked_split(k, *_pair(v, k), labels) for k, v in splits.items()}
        for part, what in ((0, "inputs"), (1, "labels")):
            first = checked["train"][part]
            for k, arrays in checked.items():
                a = arrays[part]
                if a.shape[1:] != first.shape[1:] or a.dtype != first.dtype:
                    raise DataError(f"{k} {what} are {a.dtype} {a.shape[1:]} per example, train {what} {first.dtype} "
                                    f"{first.shape[1:]}; give every split the same shape and dtype")
        shape = checked["train"][0].shape[1:]
        if labels == "classes":
            top = max(int(y.max(initial=-1)) for _, y in checked.values()) + 1
            num_classes = top if num_classes is None else num_classes
            for k, (_, y) in checked.items():
                if y.size and y.max() >= num_classes:
                    raise DataError(f"{k} labels hold {int(y.max())} (at example {int(y.argmax())}), outside "
                                    f"[0, num_classes={num_classes}); pass the right num_classes or fix the labels")
        x, y = checked["train"]
        if val is None:
            if not 0 <= val_size < len(y):
                raise DataError(f"val_size={val_size} must be in 0..{len(y) - 1} (the train split has {len(y)})")
            val_idx, train_idx = _carve(len(y), val_size, seed)
            checked["val"] = (x[val_idx], y[val_idx])
            x, y = x[train_idx], y[train_idx]
        channels = shape[-1] if shape else 1
        if normalize:  # normalize() divides by 255 first: statistics in those units
            values = x.reshape(-1, channels).astype(np.float64)
            mean, std = values.mean(axis=0) / 255.0, np.maximum(values.std(axis=0), 1e-12) / 255.0
        else:
            mean, std = np.zeros(channels), np.full(channels, 1.0 if x.dtype == np.uint8 else 1.0 / 255.0)
        return cls(name=name, train_images=x, train_labels=y, val_images=checked["val"][0],
                   val_labels=checked["val"][1], test_images=checked["test"][0], test_labels=checked["test"][1],
                   num_classes=num_classes, class_names=tuple(str(i) for i in range(num_classes or 0)),
                   mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))

    @classmethod
    def from_batches(cls, train, test, val=None, **kwargs) -> Dataset:
        """:meth:`from_arrays` of iterables of ``(inputs, labels)`` batches (a ``tf.data``
        pipeline as numpy, a PyTorch ``DataLoader``, a generator): each split's batches are
        read once and joined; keyword arguments as :meth:`from_arrays`.

        Raises:
          DataError: a split with no batch, a batch that is not an ``(inputs, labels)`` pair (of
            equal lengths), batches of inputs that differ in shape, or as :meth:`from_arrays`.
        """

        def joined(split: str, batches) -> tuple[np.ndarray, np.ndarray]:
            xs, ys = [], []
            for i, batch in enumerate(batches):
                where = f"{split} batch {i}"
                x, y = _checked_lengths(where, *_pair(batch, where), kwargs.get("labels", "classes"))
                if xs and x.shape[1:] != xs[0].shape[1:]:
                    raise DataError(f"{split} batch {i} holds inputs of shape {x.shape[1:]}, batch 0 of "
                                    f"{xs[0].shape[1:]}; give every batch inputs of one shape")
                xs.append(x)
                ys.append(y)
            if not xs:
                raise DataError(f"the {split} iterable gave no batch")
            return np.concatenate(xs), np.concatenate(ys)

        return cls.from_arrays(joined("train", train), joined("test", test),
                               None if val is None else joined("val", val), **kwargs)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{s}={getattr(self, f'{s}_images').shape}" for s in ("train", "val", "test"))
        return f"Dataset({self.name!r}, {shapes}, num_classes={self.num_classes})"


def _pair(value, where: str) -> tuple[Any, Any]:
    """``value``, an ``(inputs, labels)`` pair, as a tuple; else a DataError naming ``where``."""
    if not isinstance(value, tuple | list) or len(value) != 2:
        got = f"{type(value).__name__} of {len(value)}" if isinstance(value, tuple | list) else type(value).__name__
        raise DataError(f"{where} must be an (inputs, labels) pair, got a {got}")
    return value[0], value[1]


def _checked_lengths(where: str, inputs, labels, kind: str = "classes") -> tuple[np.ndarray, np.ndarray]:
    """``(inputs [N, ...], labels)`` as numpy arrays, one label per input: class labels
    ``[N]`` (``kind="classes"``), or ``[N, ...]`` (``"any"``); refuses other shapes or lengths."""
    x, y = np.asarray(inputs), np.asarray(labels)
    classes = kind == "classes"
    if classes and y.ndim == 2 and x.ndim >= 1 and len(x) == len(y):
        raise DataError(f"{where} labels are {y.shape}, one row per input (one-hot?); give one integer class "
                        "per input, shape [N] (e.g. labels.argmax(-1)), or labels='any' with a loss= and "
                        "metric= of yours")
    if x.ndim < 1 or y.ndim < 1 or (classes and y.ndim != 1) or len(x) != len(y):
        want = "one integer label per input" if classes else "labels [N, ...], one per input"
        raise DataError(f"{where} has {len(x) if x.ndim else 0} inputs and {len(y) if y.ndim else 0} labels "
                        f"(shapes {x.shape} and {y.shape}); give {want}")
    return x, y


def _checked_split(split: str, inputs, labels, kind: str = "classes") -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, labels)`` of one split of :meth:`Dataset.from_arrays`, checked: class labels
    as int32 ``[N]``; with ``kind="any"``, int32 or float32 ``[N, ...]``."""
    x, y = _checked_lengths(split, inputs, labels, kind)
    classes = kind == "classes"
    if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{split} inputs are {x.dtype}; give uint8 (0..255) or float inputs")
    if np.issubdtype(x.dtype, np.floating):
        bad = ~np.isfinite(x)
        if bad.any():
            rows = bad.any(axis=tuple(range(1, x.ndim)))
            raise DataError(f"{split} inputs hold {int(bad.sum())} NaN or infinite values, in {int(rows.sum())} "
                            f"of {len(x)} examples (the first: example {int(rows.argmax())}); clean or drop those "
                            "examples")
        x = x.astype(np.float32)
    if not classes:
        return x, _checked_any_labels(split, y)
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{split} labels are {y.dtype}; give integer class labels, or pass labels='any' for "
                        "labels of another kind with a loss= and metric= of yours")
    if y.size and y.min() < 0:
        raise DataError(f"{split} labels hold {int(y.min())} (at example {int(y.argmin())}), outside "
                        "[0, num_classes); fix the labels")
    return x, y.astype(np.int32)


def _checked_any_labels(split: str, y: np.ndarray) -> np.ndarray:
    """Labels of ``labels="any"``: integers as int32, floats (finite) and bools as float32."""
    if y.dtype == np.bool_:
        return y.astype(np.float32)
    if np.issubdtype(y.dtype, np.integer):
        return y.astype(np.int32)
    if not np.issubdtype(y.dtype, np.floating):
        raise DataError(f"{split} labels are {y.dtype}; give integer, float or bool labels")
    if not np.all(np.isfinite(y)):
        raise DataError(f"{split} labels hold {int(np.sum(~np.isfinite(y)))} NaN or infinite values; "
                        "clean or drop those examples")
    return y.astype(np.float32)


def normalize(images, mean, std):
    """uint8 images ``[..., C]`` -> float32 ``(images / 255 - mean) / std``, per channel.

    Accepts numpy or jax arrays (also under `jax.jit`); ``mean`` and ``std`` are length-C
    sequences in [0, 1] units, e.g. ``Dataset.mean``/``Dataset.std``. Returns a jax array.
    """
    # Imported here so that the worker processes decoding images never import jax.
    import jax.numpy as jnp

    x = jnp.asarray(images, jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def augment(key: jax.Array, images: jax.Array) -> jax.Array:
    """Random 4-pixel-padded crop and horizontal flip of uint8 ``[B, H, W, C]`` (CIFAR style)."""
    # Imported here so that the worker processes decoding images never import jax.
    import jax
    import jax.numpy as jnp

    b, h, w, c = images.shape
    crop_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(crop_key, (b, 2), 0, 9)
    padded = jnp.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    crop = jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c)))(padded, offsets)
    flip = jax.random.bernoulli(flip_key, 0.5, (b,))
    return jnp.where(flip[:, None, None, None], crop[:, :, ::-1], crop)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    val_size: int = 5000,
    seed: int = 0,
    image_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    source: str = "auto",
    channels: int | None = None,
) -> Dataset:
    """Load a dataset, carve ``val_size`` validation images from train, compute statistics.

    Args:
      name: one of `DATASET_NAMES`.
      data_dir: for the named datasets, the folder holding ``mnist/``, ``cifar10/``,
        ``imagenette/`` (default ``$QEVO_DATA_DIR``); for ``"image_folder"``, the image
        folder itself or a ``.tar.gz`` of it (required).
      val_size: number of train images moved to the validation split (0 allowed).
      seed: seed of the permutation that picks the validation images and orders both splits.
      image_size: if given, every image is resized to ``image_size x image_size`` pixels
        (PIL bilinear; JPEGs much larger than that are first decoded at reduced scale).
      cache_dir: where decoded arrays are cached (default ``$QEVO_CACHE_DIR``, else
        ``~/.cache/qevo``).
      source: ``"auto"``, ``"local"`` or ``"tfds"`` (see the module docstring).
      channels: None keeps the stored channels (MNIST and grayscale image folders 1, the
        rest 3); 3 repeats a gray channel, 1 takes the luma of RGB (ITU-R 601-2, as PIL's
        ``convert("L")``).

    Raises:
      ValueError: bad arguments. DataError (a ValueError): missing or corrupt data.
    """
    if isinstance(val_size, bool) or not isinstance(val_size, (int, np.integer)) or val_size < 0:
        raise ConfigError(f"val_size must be a non-negative integer, got {val_size!r}")
    if channels not in (None, 1, 3):
        raise ConfigError(f"channels must be None, 1 or 3, got {channels!r}")
    raw = _load_raw(name, data_dir, image_size, cache_dir, source)
    if channels is not None:
        raw = dataclasses.replace(raw, train_images=to_channels(raw.train_images, channels),
                                  test_images=to_channels(raw.test_images, channels))
    return _make_dataset(name, raw, int(val_size), seed)


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` with C in (1, 3) as ``channels`` channels: a gray channel repeated,
    or the ITU-R 601-2 luma of RGB in PIL's integer arithmetic (``convert("L")``)."""
    if images.shape[-1] == channels:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=-1)
    rgb = images.astype(np.uint32)
    luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return luma.astype(np.uint8)[..., None]


def write_image_folder(
    name: str,
    out: str | os.PathLike,
    image_size: int | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    source: str = "auto",
    quality: int | None = 90,
) -> dict:
    """Write dataset ``name`` as an image-folder archive that ``load_dataset("image_folder", out)`` reads.

    The archive ``out`` (``.tar.gz``) holds ``<stem>/{train,test}/<class>/<index>.jpg``
    (``.png`` with ``quality=None``, lossless), every image resized to ``image_size`` (as
    :func:`load_dataset` resizes). Files are numbered in the dataset's own order, so the
    reloaded splits keep that order and the same seed carves the same validation images.
    Use it to carry a smaller copy of a dataset to another machine (a GPU host with a cap on
    its inputs). Written to a temporary file beside ``out``, then renamed.

    Args:
      name: as :func:`load_dataset`.
      out: the archive's path; it must end in ``.tar.gz`` or ``.tgz``, and this process must
        be able to write it (checked before any image is read).
      image_size: side in pixels, or None to keep the stored size.
      data_dir: as :func:`load_dataset`.
      cache_dir: as :func:`load_dataset`.
      source: as :func:`load_dataset`.
      quality: JPEG quality 1..95, or None for PNG.

    Returns:
      ``{"path", "images", "bytes", "image_size"}`` of the written archive.
    """
    out = pathlib.Path(out).expanduser()
    if not out.name.endswith((".tar.gz", ".tgz")):
        raise ConfigError(f"archive name {out.name!r} must end in .tar.gz or .tgz")
    if quality is not None and (isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95):
        raise ConfigError(f"quality must be an int in 1..95 (JPEG) or None (PNG), got {quality!r}")
    if (problem := unwritable(out, "--out")) is not None:
        raise ConfigError(problem)
    raw = _load_raw(name, data_dir, image_size, cache_dir, source)
    stem = out.name.removesuffix(".gz").removesuffix(".tar").removesuffix(".tgz")
    if quality is None:
        suffix, options = ".png", {"format": "PNG"}
    else:
        suffix, options = ".jpg", {"format": "JPEG", "quality": quality}
    with atomic_path(out) as tmp, tarfile.open(tmp, "w:gz") as tar:
        for split, images, labels in (("train", raw.train_images, raw.train_labels),
                                      ("test", raw.test_images, raw.test_labels)):
            for i, (image, label) in enumerate(zip(images, labels, strict=True)):
                buffer = io.BytesIO()
                Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buffer, **options)
                member = tarfile.TarInfo(f"{stem}/{split}/{raw.class_names[label]}/{i:06d}{suffix}")
                member.size = buffer.tell()
                buffer.seek(0)
                tar.addfile(member, buffer)
    images = len(raw.train_labels) + len(raw.test_labels)
    return {"path": str(out), "images": images, "bytes": out.stat().st_size,
            "image_size": int(raw.train_images.shape[1])}


def _load_raw(name: str, data_dir, image_size: int | None, cache_dir, source: str) -> _Raw:
    """The decoded train and test splits of ``name`` (arguments as :func:`load_dataset`'s)."""
    if name not in DATASET_NAMES:
        raise ConfigError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    if source not in SOURCES:
        raise ConfigError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1
    ):
        raise ConfigError(f"image_size must be a positive integer or None, got {image_size!r}")
    image_size = None if image_size is None else int(image_size)
    cache = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()

    if name == "image_folder":
        if source == "tfds":
            raise ConfigError("source='tfds' does not apply to 'image_folder'; use source='local' or 'auto'")
        if data_dir is None:
            raise ConfigError("'image_folder' needs data_dir: a folder <root>/{train,test}/<class>/ "
                              "or a .tar.gz of one")
        return _load_image_folder(pathlib.Path(data_dir).expanduser(), image_size, cache)
    origin = "data_dir argument"
    if data_dir is None and os.environ.get(DATA_DIR_ENV):
        data_dir, origin = os.environ[DATA_DIR_ENV], f"${DATA_DIR_ENV}"
    root = None if data_dir is None else pathlib.Path(data_dir).expanduser()
    if source == "tfds" or (source == "auto" and root is None):
        return _load_tfds(name, root, image_size, cache)
    if root is None:
        raise DataError(
            f"no data folder for {name!r}: pass data_dir= or set ${DATA_DIR_ENV} to the folder "
            "holding mnist/, cifar10/, imagenette/ (or use source='tfds')"
        )
    return _load_local(name, root, origin, image_size, cache)


# --------------------------------------------------------------------------- assembly


@dataclasses.dataclass(frozen=True)
class _Raw:
    """Decoded train and test splits before the validation carve."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]


def _make_dataset(name: str, raw: _Raw, val_size: int, seed: int) -> Dataset:
    n = len(raw.train_labels)
    if val_size >= n:
        raise ConfigError(
            f"val_size={val_size} leaves no training images: {name!r} has {n} train images; "
            f"choose val_size < {n} (about 10% of them, {n // 10}, is usual; 0 disables validation)"
        )
    # Both splits keep the seeded random order, so that any prefix (``max_train_images``,
    # a search's ``eval_images``) is a class-balanced sample even of a class-sorted archive.
    val_idx, train_idx = _carve(n, val_size, seed)
    train_images = raw.train_images[train_idx]
    mean, std = _channel_stats(train_images)
    return Dataset(
        name=name,
        train_images=train_images,
        train_labels=raw.train_labels[train_idx],
        val_images=raw.train_images[val_idx],
        val_labels=raw.train_labels[val_idx],
        test_images=raw.test_images,
        test_labels=raw.test_labels,
        num_classes=len(raw.class_names),
        class_names=raw.class_names,
        mean=mean,
        std=std,
    )


def _carve(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(validation, train)`` indices of ``n`` train examples: a seeded random order, its
    first ``val_size`` for validation."""
    perm = np.random.default_rng(seed).permutation(n)
    return perm[:val_size], perm[val_size:]


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 ``[N, H, W, C]`` pixels / 255, from exact histograms."""
    channels = images.shape[-1]
    pixels = images.reshape(-1, channels)
    hist = np.zeros((channels, 256), np.int64)
    step = 1 << 22
    for start in range(0, len(pixels), step):
        block = pixels[start : start + step]
        for c in range(channels):
            hist[c] += np.bincount(block[:, c], minlength=256)
    values = np.arange(256) / 255.0
    count = hist.sum(axis=1)
    mean = hist @ values / count
    var = (hist * (values[None, :] - mean[:, None]) ** 2).sum(axis=1) / count
    return tuple(float(m) for m in mean), tuple(float(s) for s in np.sqrt(var))


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> pathlib.Path:
    """qevo's cache folder: ``$QEVO_CACHE_DIR``, else ``~/.cache/qevo``."""
    return pathlib.Path(os.environ.get(CACHE_DIR_ENV) or "~/.cache/qevo").expanduser()


def _cached(cache: pathlib.Path, name: str, image_size: int | None, key: object, build) -> _Raw:
    """Load ``_Raw`` from the cache entry for ``key``, or ``build()`` it and store it atomically."""
    digest = hashlib.sha1(json.dumps([_CACHE_FORMAT, name, image_size, key]).encode()).hexdigest()[:16]
    path = cache / f"{name}-{image_size or 'orig'}-{digest}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return _Raw(
                    z["train_images"], z["train_labels"], z["test_images"], z["test_labels"],
                    tuple(str(c) for c in z["class_names"]),
                )
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            warnings.warn(f"ignoring unreadable cache file {path} ({e}); decoding again", stacklevel=1)
    raw = build()
    try:
        with atomic_path(path) as tmp, tmp.open("wb") as f:
            np.savez(
                f, train_images=raw.train_images, train_labels=raw.train_labels,
                test_images=raw.test_images, test_labels=raw.test_labels,
                class_names=np.array(raw.class_names, dtype=str),
            )
    except OSError as e:
        warnings.warn(
            f"could not write the dataset cache {path} ({e}); set ${CACHE_DIR_ENV} to a writable folder", stacklevel=1
        )
    return raw


# --------------------------------------------------------------------------- local files


def _load_local(name: str, root: pathlib.Path, origin: str, image_size: int | None, cache: pathlib.Path) -> _Raw:
    files = [root / a.relpath for a in _ARCHIVES[name]]
    for path in files:
        if not path.is_file():
            raise DataError(
                f"{name} data not found: {path} does not exist (data folder {root}, from the {origin}). "
                f"Point data_dir or ${DATA_DIR_ENV} at the folder holding mnist/, cifar10/, imagenette/, "
                "or use source='tfds' to download with tensorflow-datasets"
            )
    key = [[a.relpath, a.md5, *_stat(p)] for a, p in zip(_ARCHIVES[name], files, strict=True)]

    def build() -> _Raw:
        for archive, path in zip(_ARCHIVES[name], files, strict=True):
            _verify(path, archive)
        if name == "mnist":
            return _decode_mnist(files, image_size)
        if name == "cifar10":
            return _decode_tars([(files[0], "train", "train"), (files[0], "test", "test")], CIFAR10_CLASSES, image_size)
        return _decode_tars([(files[0], "train", "train"), (files[1], "val", "test")], IMAGENETTE_CLASSES, image_size)

    return _cached(cache, name, image_size, key, build)


def _stat(path: pathlib.Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _verify(path: pathlib.Path, archive: _Archive) -> None:
    """Raise DataError unless ``path`` has the size and md5 the archive table lists."""
    md5 = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            md5.update(block)
    actual, size = md5.hexdigest(), path.stat().st_size
    if actual != archive.md5:
        state = "truncated" if size < archive.size else "corrupt"
        raise DataError(
            f"{path} is {state}: md5 {actual} ({size:,} bytes), expected md5 {archive.md5} "
            f"({archive.size:,} bytes). Download it again, or point data_dir / ${DATA_DIR_ENV} "
            "at a folder holding an intact copy"
        )


def _decode_mnist(files: list[pathlib.Path], image_size: int | None) -> _Raw:
    train_x, train_y, test_x, test_y = (_read_idx(p) for p in files)
    if image_size is not None:
        train_x, test_x = _resize_stack(train_x, image_size), _resize_stack(test_x, image_size)
    return _Raw(train_x, train_y.astype(np.int32), test_x, test_y.astype(np.int32), MNIST_CLASSES)


def _read_idx(path: pathlib.Path) -> np.ndarray:
    """A gzipped idx file -> uint8 ``[N]`` labels or ``[N, 28, 28, 1]`` images."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is not a readable gzip file ({e}); download it again") from e
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3) or len(data) < 4 + 4 * ndim:
        raise DataError(f"{path} is not an idx file of uint8 data (magic {magic:#x})")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path} holds {body.size} bytes of data, its header promises {dims}")
    return body.reshape(dims) if ndim == 1 else body.reshape(*dims, 1)


def _resize_stack(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` -> ``[N, size, size, C]``, each image resized with PIL bilinear."""
    if images.shape[1:3] == (size, size):
        return images
    out = np.empty((len(images), size, size, images.shape[-1]), np.uint8)
    for i, img in enumerate(images):
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        out[i] = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR)).reshape(size, size, -1)
    return out


# --------------------------------------------------------------------------- image folders


def _load_image_folder(root: pathlib.Path, image_size: int | None, cache: pathlib.Path) -> _Raw:
    if root.is_file():
        if not root.name.endswith((".tar.gz", ".tgz")):
            raise DataError(f"image_folder archive {root} is not a .tar.gz or .tgz file")
        return _cached(cache, "image_folder", image_size, [str(root.resolve()), *_stat(root)],
                       lambda: _decode_tars([(root, "train", "train"), (root, "test", "test")], None, image_size))
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; "
                        "pass data_dir=<root> holding train/<class>/ and test/<class>/")
    files = {}
    for split in ("train", "test"):
        if not (root / split).is_dir():
            found = sorted(p.name for p in root.iterdir())
            raise DataError(f"image folder {root} has no {split}/ subfolder (found: {found or 'nothing'}); "
                            "expected <root>/train/<class>/*.jpg|png and <root>/test/<class>/*.jpg|png")
        files[split] = sorted(
            p for p in (root / split).glob("*/*")
            if p.suffix.lower() in _IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
        )
    key = [str(root.resolve())] + [[str(p.relative_to(root)), *_stat(p)] for s in files for p in files[s]]

    def blobs() -> Iterator[tuple[str, str, str, bytes]]:
        for split, paths in files.items():
            for p in paths:
                yield split, p.parent.name, str(p), p.read_bytes()

    return _cached(cache, "image_folder", image_size, key, lambda: _assemble(str(root), blobs(), None, image_size))


def _decode_tars(parts: list[tuple[pathlib.Path, str, str]], classes: tuple[str, ...] | None,
                 image_size: int | None) -> _Raw:
    """Decode ``(archive, folder name inside, split)`` triples laid out as ``<top>/<folder>/<class>/<file>``."""
    def blobs() -> Iterator[tuple[str, str, str, bytes]]:
        by_archive: dict[pathlib.Path, dict[str, str]] = {}
        for path, folder, split in parts:
            by_archive.setdefault(path, {})[folder] = split
        for path, folders in by_archive.items():
            yield from _tar_images(path, folders)

    where = ", ".join(sorted({str(p) for p, _, _ in parts}))
    return _assemble(where, blobs(), classes, image_size)


def _tar_images(path: pathlib.Path, folders: dict[str, str]) -> Iterator[tuple[str, str, str, bytes]]:
    """Stream ``(split, class, "<archive>:<member>", bytes)`` of the images in a .tar.gz, without extracting it.

    The gzip stream is read to its end, so that a truncated archive fails its CRC and length
    check even where the cut falls after the last image.
    """
    top = None
    try:
        with gzip.open(path, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                parts = member.name.strip("/").split("/")
                if not member.isfile() or len(parts) < 3 or parts[-3] not in folders:
                    continue
                if not parts[-1].lower().endswith(_IMAGE_SUFFIXES) or parts[-1].startswith("."):
                    continue
                prefix = parts[:-3]
                if top is None:
                    top = prefix
                elif prefix != top:
                    raise DataError(f"{path} holds image folders under both {'/'.join(top) or '.'} and "
                                    f"{'/'.join(prefix) or '.'}; pack a single <root>/{{train,test}}/<class>/ tree")
                file = tar.extractfile(member)
                assert file is not None  # a regular file's member (isfile above)
                yield folders[parts[-3]], parts[-2], f"{path}:{member.name}", file.read()
            while stream.read(1 << 20):
                pass
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is truncated or not a readable tar archive ({e}); replace the file") from e


def _assemble(where: str, blobs: Iterable[tuple[str, str, str, bytes]], classes: tuple[str, ...] | None,
              image_size: int | None) -> _Raw:
    """Decode ``(split, class, file, bytes)`` items into a `_Raw`, each split sorted by (class, file).

    ``where`` names the source in messages; ``classes`` fixes the class order, None means
    the sorted names of the class folders found.
    """
    meta: list[tuple[str, str, str]] = []

    def encoded() -> Iterator[tuple[str, bytes]]:
        for split, cls, fname, data in blobs:
            meta.append((split, cls, fname))
            yield fname, data

    images = _decode_all(encoded(), image_size)
    if any(x.shape[-1] == 3 for x in images):  # a few grayscale images among colour ones
        images = [np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x for x in images]
    found = sorted({cls for _, cls, _ in meta})
    if classes is None:
        classes = tuple(found)
    elif unknown := sorted(set(found) - set(classes)):
        raise DataError(f"{where}: unexpected class folders {unknown}; expected only {list(classes)}")
    if untrained := sorted({cls for s, cls, _ in meta if s == "test"} - {cls for s, cls, _ in meta if s == "train"}):
        raise DataError(f"{where}: class folders {untrained} have test images but no train images; "
                        "add <root>/train/<class>/ images for them or remove their test folders")
    index = {c: i for i, c in enumerate(classes)}
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in ("train", "test"):
        rows = sorted((index[cls], fname, i) for i, (s, cls, fname) in enumerate(meta) if s == split)
        if not rows:
            raise DataError(f"{where}: no {split} images found; expected <root>/{split}/<class>/*.jpg|jpeg|png")
        shapes = {images[i].shape for _, _, i in rows}
        if len(shapes) > 1:
            raise DataError(f"{where}: {split} images differ in size ({sorted(shapes)[:3]}...); "
                            "pass image_size=N to resize them all to N x N")
        splits[split] = (np.stack([images[i] for _, _, i in rows]), np.array([r[0] for r in rows], np.int32))
    if splits["train"][0].shape[1:] != splits["test"][0].shape[1:]:
        raise DataError(f"{where}: train images are {splits['train'][0].shape[1:]} but test images are "
                        f"{splits['test'][0].shape[1:]}; pass image_size=N to resize them all to N x N")
    return _Raw(*splits["train"], *splits["test"], classes)


def _decode_all(items: Iterable[tuple[str, bytes]], image_size: int | None) -> list[np.ndarray]:
    """Decode ``(description, encoded bytes)`` items to uint8 ``[H, W, C]`` arrays, in order
    (C = 1 for grayscale images, else 3; see :func:`_decode_chunk`).

    Chunks of `_CHUNK` images go to a pool of worker processes (one per available core)
    while the items are still being read; fewer images than a chunk decode in-process.
    Workers are started with "spawn", which re-runs the main script unless it is guarded
    by ``if __name__ == "__main__":``; where they cannot start, decoding continues here.
    """
    pool, broken = None, False
    pending: list[tuple[list[tuple[str, bytes]], concurrent.futures.Future | None]] = []
    try:
        for chunk in _batched(items, _CHUNK):
            if pool is None and len(chunk) == _CHUNK and _num_workers() > 1:
                pool = _decode_pool()
            future = None
            if pool is not None and not broken:
                try:
                    future = pool.submit(_decode_chunk, chunk, image_size)
                except concurrent.futures.BrokenExecutor:
                    broken = True
            pending.append((chunk, future))
        out = []
        for chunk, future in pending:
            if future is not None and not broken:
                try:
                    out.extend(future.result())
                    continue
                except concurrent.futures.BrokenExecutor:
                    broken = True
            out.extend(_decode_chunk(chunk, image_size))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if broken:
        warnings.warn(
            "image-decoding worker processes could not start, so images were decoded in this process "
            "(slower). Worker processes re-run the main script: call load_dataset under "
            "`if __name__ == '__main__':`, and not from a script read from standard input",
            stacklevel=1,
        )
    return out


def _decode_pool() -> concurrent.futures.ProcessPoolExecutor:
    """One worker process per available core, started with "spawn"; each runs
    ``qevo/decode_worker.py`` first, so that it imports ``qevo.data.datasets`` without JAX."""
    return concurrent.futures.ProcessPoolExecutor(
        _num_workers(), mp_context=multiprocessing.get_context("spawn"),
        initializer=runpy.run_path, initargs=(str(pathlib.Path(__file__).with_name("decode_worker.py")),))


def _batched(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _num_workers() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, _MAX_WORKERS)


def _decode_chunk(chunk: list[tuple[str, bytes]], image_size: int | None) -> list[np.ndarray]:
    """Decode encoded images to uint8 ``[H, W, 1]`` (grayscale modes) or ``[H, W, 3]`` (any
    other, converted to RGB), resized to ``image_size`` if given."""
    out = []
    for where, data in chunk:
        try:
            with Image.open(io.BytesIO(data)) as img:
                mode = "L" if img.mode in _GRAY_MODES else "RGB"
                if image_size is not None:
                    img.draft(mode, (image_size, image_size))  # JPEG: decode at reduced scale, at least this size
                rgb = img.convert(mode)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot decode image {where} ({e}); delete or replace that file") from None
        if image_size is not None and rgb.size != (image_size, image_size):
            rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
        out.append(np.asarray(rgb, np.uint8).reshape(rgb.size[1], rgb.size[0], -1))
    return out


# --------------------------------------------------------------------------- tensorflow-datasets


def _load_tfds(name: str, root: pathlib.Path | None, image_size: int | None, cache: pathlib.Path) -> _Raw:
    builder_name = _TFDS_BUILDERS[name]
    manual = root / "mnist" if name == "mnist" and root is not None and (root / "mnist").is_dir() else None
    size = _IMAGENETTE_TFDS_SIZE if name == "imagenette" and image_size is None else image_size

    def build() -> _Raw:
        where = "no data folder was given" if root is None else f"source='tfds' was asked for ({root})"
        if importlib.util.find_spec("tensorflow") is None:
            raise DataError(
                f"{name!r}: {where}, and preparing it with tensorflow-datasets needs tensorflow, which is not "
                f"installed: set ${DATA_DIR_ENV} (or data.data_dir) to the folder holding mnist/, cifar10/, "
                "imagenette/, or pip install 'qevo[tfds]'"
            )
        import tensorflow_datasets as tfds

        # Any: tfds types its builders loosely (as_dataset's decorated signature, optional features)
        builder: Any = tfds.builder(builder_name, data_dir=str(cache / "tfds"))
        host = _TFDS_HOSTS[name]
        if manual is None and not _resolves(host) and not _prepared(builder):
            raise DataError(
                f"{name!r}: {where}, and tensorflow-datasets cannot download it ({host} does not resolve: "
                f"no internet here?): set ${DATA_DIR_ENV} (or data.data_dir) to the folder holding mnist/, "
                "cifar10/, imagenette/"
            )
        config = tfds.download.DownloadConfig(manual_dir=str(manual)) if manual else None
        try:
            builder.download_and_prepare(download_config=config)
        except Exception as e:  # tfds raises many kinds (network, checksum, missing manual files)
            raise DataError(
                f"tensorflow-datasets could not prepare {builder_name!r} in {cache / 'tfds'} ({e}). Without "
                f"internet, point data_dir / ${DATA_DIR_ENV} at the offline archives and use source='local'"
            ) from e
        test_split = "validation" if name == "imagenette" else "test"
        splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for split in ("train", test_split):
            if None in builder.info.features["image"].shape:
                assert size is not None  # images of varying sizes are Imagenette's, which has a size above
                pairs = [(_resize_stack(ex["image"][None], size)[0], ex["label"])
                         for ex in tfds.as_numpy(builder.as_dataset(split=split))]
                images, labels = np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs])
            else:
                batch = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
                images, labels = batch["image"], batch["label"]
                if size is not None:
                    images = _resize_stack(images, size)
            splits[split] = (images.astype(np.uint8), labels.astype(np.int32))
        return _Raw(*splits["train"], *splits[test_split], tuple(builder.info.features["label"].names))

    return _cached(cache, name, size, ["tfds", builder_name], build)


def _prepared(builder) -> bool:
    """Whether a tensorflow-datasets builder's data is in place, without its warning that an
    empty folder holds no dataset_info.json."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return builder.is_prepared()
    finally:
        log.setLevel(level)


def _resolves(host: str) -> bool:
    """Whether ``host``'s name resolves (a quick test for the internet)."""
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------- command


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


class _OneLineParser(argparse.ArgumentParser):
    """Refuses bad arguments with one line (what was wrong, and where the usage is), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    """``python -m qevo.data --name imagenette --image-size 128 --out imagenette-128.tar.gz``:
    :func:`write_image_folder` as a command; prints its summary as JSON. A missing or corrupt
    source ends it with one line, exit status 2."""
    parser = _OneLineParser(prog="python -m qevo.data", description=(
        "Write a dataset as an image-folder archive (resized, JPEG or PNG) that "
        "--config.data.name=image_folder --config.data.data_dir=<archive> reads back."))
    parser.add_argument("--name", required=True, choices=DATASET_NAMES)
    parser.add_argument("--out", required=True, help="the archive to write (.tar.gz)")
    parser.add_argument("--image-size", type=_positive, help="side in pixels (default: the stored size)")
    parser.add_argument("--data-dir",
                        help=f"the folder holding mnist/, cifar10/, imagenette/ (default ${DATA_DIR_ENV}); "
                        "for image_folder, the folder or archive itself")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    parser.add_argument("--png", action="store_true", help="lossless PNG instead of JPEG")
    args = parser.parse_args(argv)
    if args.name == "image_folder" and args.data_dir is None:
        parser.error("--name image_folder needs --data-dir: "
                     "the folder <root>/{train,test}/<class>/ or a .tar.gz of one")
    try:
        summary = write_image_folder(args.name, args.out, args.image_size, data_dir=args.data_dir,
                                     quality=None if args.png else args.quality)
    except QevoError as e:
        print(f"{parser.prog}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0

