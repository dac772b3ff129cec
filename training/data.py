"""Training data held in device memory: CIFAR-10 from the python-batch files, or a synthetic
CIFAR-shaped stand-in, with augmentation and batching done on the device.

* ``load_cifar10(path)`` reads the standard ``cifar-10-batches-py`` directory (``data_batch_1`` ..
  ``data_batch_5``, ``test_batch``, optional ``batches.meta``), checks every file and says exactly
  what is wrong (missing file, unreadable pickle, missing keys, wrong shape or dtype, labels out of
  range). The pickles are read with an unpickler that only accepts numpy arrays and plain Python
  values, so a data file cannot run code.
* ``make_synthetic()`` builds a deterministic, learnable CIFAR-shaped set (50,000 train / 10,000
  test by default): image ``i`` depends only on (seed, split, i), so the data are bit-identical
  on every device and a subset is a prefix of the full set.
* ``load_dataset(kind, path)`` resolves ``--dataset``/``--data``: an explicit path or the
  ``LOWRANK_CIFAR10`` environment variable must hold valid data; otherwise a few standard places
  are searched, and ``kind="auto"`` falls back to the synthetic set, saying so.
* ``DeviceLoader`` yields normalised float batches from the uint8 images on the device: a seeded
  shuffle per epoch, random crop with 4-pixel zero padding and horizontal flip (the usual CIFAR
  augmentation, applied before normalisation as the torchvision pipeline does), and sharding of
  each global batch across distributed ranks.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

ENV_VAR = "LOWRANK_CIFAR10"
BATCH_DIR = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"
EXPECTED_FILES = (*TRAIN_FILES, TEST_FILE)
IMAGE_SHAPE = (3, 32, 32)
IMAGE_SIZE = 3 * 32 * 32
NUM_CLASSES = 10
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
# Per-channel mean and standard deviation of the CIFAR-10 training images (pixel values in [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
SYNTHETIC_TRAIN_SIZE = 50_000
SYNTHETIC_TEST_SIZE = 10_000
SYNTHETIC_NOTE = ("SYNTHETIC data: a deterministic CIFAR-shaped stand-in (class templates + "
                  "distractors + noise), not CIFAR-10; accuracy and rank figures from it say "
                  "nothing about CIFAR-10")

REPO_ROOT = Path(__file__).resolve().parents[1]


class DatasetError(ValueError):
    """The data set is missing, unreadable or malformed; the message names the path and problem."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """No CIFAR-10 directory at the given or searched places."""


@dataclass
class ImageSet:
    """Images as uint8 (N, 3, 32, 32) and labels as int64 (N,), on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, n: int | None) -> "ImageSet":
        if n is None or n >= len(self):
            return self
        return ImageSet(self.images[:n], self.labels[:n])

    def to(self, device) -> "ImageSet":
        return ImageSet(self.images.to(device), self.labels.to(device))


@dataclass
class Dataset:
    """A train/test pair plus what a run needs to report about it."""

    name: str                 # "cifar10" or "synthetic"
    train: ImageSet
    test: ImageSet
    source: str               # the directory read, or how the synthetic set was made
    classes: tuple = CIFAR10_CLASSES
    mean: tuple = CIFAR10_MEAN
    std: tuple = CIFAR10_STD
    note: str = ""
    full_size: tuple = (50_000, 10_000)  # of the complete data set, for "subset" notices

    @property
    def is_synthetic(self) -> bool:
        return self.name == "synthetic"

    def describe(self) -> str:
        sizes = f"{len(self.train)} train / {len(self.test)} test images"
        if self.is_synthetic:
            return f"{SYNTHETIC_NOTE}; {sizes} ({self.source})"
        text = f"CIFAR-10 from {self.source}: {sizes}"
        if (len(self.train), len(self.test)) != self.full_size:
            text += f" (a subset of the full {self.full_size[0]:,} / {self.full_size[1]:,})"
        return text


# ------------------------------------------------------------------------------------ CIFAR-10
def _numpy_reconstruct():
    try:  # numpy >= 2 moved the implementation to numpy._core
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _numpy_scalar():
    try:
        from numpy._core.multiarray import scalar
    except ImportError:
        from numpy.core.multiarray import scalar
    return scalar


def _numpy_frombuffer():
    try:
        from numpy._core.numeric import _frombuffer
    except ImportError:
        from numpy.core.numeric import _frombuffer
    return _frombuffer


def _codecs_encode():
    import codecs
    return codecs.encode


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays, and refuses anything else: a
    pickle can otherwise name any importable callable and run it while loading."""

    _ALLOWED = {
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
        # Arrays pickled by Python 3 with protocol 5, and bytes with protocol 2 (as in a file
        # re-written by Python 3), go through these.
        ("numpy.core.numeric", "_frombuffer"): _numpy_frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _numpy_frombuffer,
        ("_codecs", "encode"): _codecs_encode,
    }

    def find_class(self, module, name):
        factory = self._ALLOWED.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds "
                                         "only numpy arrays, lists and strings")
        return factory()


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayOnlyUnpickler(f, encoding="latin1").load()
    except OSError as err:
        raise DatasetError(f"cannot read {path}: {err.strerror or err}") from err
    except Exception as err:  # truncated or foreign files raise many different types
        raise DatasetError(f"{path} is not a readable CIFAR-10 python batch "
                           f"({type(err).__name__}: {err})") from err
    if not isinstance(obj, dict):
        raise DatasetError(f"{path} holds a {type(obj).__name__}, expected the dict of a CIFAR-10 "
                           "python batch (keys 'data' and 'labels')")
    # Pickles written by Python 3 with bytes keys come back as bytes under encoding="latin1".
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def read_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One python-batch file as (uint8 images (N, 3, 32, 32), int64 labels (N,)), validated."""
    path = Path(path)
    batch = _read_pickle(path)
    missing = [key for key in ("data", "labels") if key not in batch]
    if missing:
        hint = (" (it has 'fine_labels': this looks like CIFAR-100, not CIFAR-10)"
                if "fine_labels" in batch else "")
        raise DatasetError(f"{path} lacks key(s) {missing}; a CIFAR-10 batch has 'data' "
                           f"(N x 3072 uint8) and 'labels' (N ints), found keys {sorted(map(str, batch))}{hint}")
    data, labels = batch["data"], batch["labels"]
    if not isinstance(data, np.ndarray):
        raise DatasetError(f"{path}: 'data' is a {type(data).__name__}, expected a numpy uint8 array N x 3072")
    if data.dtype != np.uint8:
        raise DatasetError(f"{path}: 'data' has dtype {data.dtype}, expected uint8 (pixel values 0..255)")
    if data.ndim != 2 or data.shape[1] != IMAGE_SIZE:
        raise DatasetError(f"{path}: 'data' has shape {data.shape}, expected (N, {IMAGE_SIZE}) "
                           "(one row per image: 1024 red, 1024 green, 1024 blue values)")
    try:
        labels = np.asarray(labels)
    except Exception as err:
        raise DatasetError(f"{path}: 'labels' cannot be read as an array ({err})") from err
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path}: 'labels' must be a flat list of integers, got dtype "
                           f"{labels.dtype} and shape {labels.shape}")
    if labels.shape[0] != data.shape[0]:
        raise DatasetError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    if data.shape[0] == 0:
        raise DatasetError(f"{path} holds no images")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DatasetError(f"{path}: labels must lie in 0..{NUM_CLASSES - 1}, "
                           f"found {int(labels.min())}..{int(labels.max())}")
    return data.reshape(-1, *IMAGE_SHAPE), labels.astype(np.int64)


def _read_classes(directory: Path) -> tuple:
    path = directory / META_FILE
    if not path.exists():
        return CIFAR10_CLASSES
    meta = _read_pickle(path)
    names = meta.get("label_names")
    if not isinstance(names, (list, tuple)) or len(names) != NUM_CLASSES:
        raise DatasetError(f"{path}: 'label_names' should list {NUM_CLASSES} class names, "
                           f"got {names!r:.80}")
    return tuple(str(n) for n in names)


def _batch_dir(path: Path) -> Path:
    """``path`` itself when it holds the batch files, else its ``cifar-10-batches-py`` folder."""
    if (path / BATCH_DIR).is_dir() and not any((path / name).exists() for name in EXPECTED_FILES):
        return path / BATCH_DIR
    return path


def check_cifar10_dir(path: str | os.PathLike) -> Path:
    """The batch directory at or under ``path``; raises DatasetNotFoundError naming what is
    missing. Accepts the ``cifar-10-batches-py`` folder or the folder that contains it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetNotFoundError(f"CIFAR-10 directory {path} does not exist; expected a "
                                   f"'{BATCH_DIR}' folder with {', '.join(EXPECTED_FILES)}")
    if not path.is_dir():
        raise DatasetNotFoundError(f"{path} is a file; pass the '{BATCH_DIR}' directory "
                                   f"(extract cifar-10-python.tar.gz first), which holds "
                                   f"{', '.join(EXPECTED_FILES)}")
    directory = _batch_dir(path)
    missing = [name for name in EXPECTED_FILES if not (directory / name).is_file()]
    if missing:
        raise DatasetNotFoundError(f"{directory} is not a CIFAR-10 python-batch directory: missing "
                                   f"{', '.join(missing)} (expected {', '.join(EXPECTED_FILES)}, "
                                   f"plus optional {META_FILE})")
    return directory


def load_cifar10(path: str | os.PathLike, device="cpu", train_subset: int | None = None,
                 test_subset: int | None = None) -> Dataset:
    """CIFAR-10 from its python-batch directory, moved to ``device`` as uint8 once.

    ``train_subset``/``test_subset`` keep the first N images of each split (file order)."""
    directory = check_cifar10_dir(path)
    parts = [read_batch(directory / name) for name in TRAIN_FILES]
    test_x, test_y = read_batch(directory / TEST_FILE)
    train = ImageSet(torch.from_numpy(np.concatenate([x for x, _ in parts])),
                     torch.from_numpy(np.concatenate([y for _, y in parts])))
    test = ImageSet(torch.from_numpy(np.ascontiguousarray(test_x)), torch.from_numpy(test_y))
    return Dataset("cifar10", train.subset(train_subset).to(device), test.subset(test_subset).to(device),
                   source=str(directory), classes=_read_classes(directory))


def default_search_paths() -> list[Path]:
    """Places searched for CIFAR-10 when neither ``--data`` nor ``LOWRANK_CIFAR10`` is given,
    in order: ``./data/cifar-10-batches-py`` (the current directory), the same under the
    repository, and the shared subset beside the repository (``../shared/data/cifar10-subset``)."""
    places = [Path.cwd() / "data" / BATCH_DIR, REPO_ROOT / "data" / BATCH_DIR,
              REPO_ROOT.parent / "shared" / "data" / "cifar10-subset" / BATCH_DIR]
    return list(dict.fromkeys(p.resolve() for p in places))


def find_cifar10(path: str | os.PathLike | None = None) -> Path | None:
    """The CIFAR-10 directory to use: ``path`` when given, else ``$LOWRANK_CIFAR10``, else the
    first of ``default_search_paths()`` that exists; None when nothing is found. A given path or
    environment variable that does not hold valid files is an error, not a silent fallback."""
    if path is not None:
        return check_cifar10_dir(path)
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            return check_cifar10_dir(env)
        except DatasetNotFoundError as err:
            raise DatasetNotFoundError(f"${ENV_VAR}={env}: {err}") from None
    for candidate in default_search_paths():
        if candidate.exists():
            return check_cifar10_dir(candidate)
    return None


# ------------------------------------------------------------------------------------ synthetic
_CHUNK = 1024  # images per random stream: image i lives in stream i // _CHUNK


def _random_bytes(seed: int, split: int, stream: int, count: int) -> np.ndarray:
    """``count`` random bytes of one stream, from numpy's PCG64 bit generator, whose raw output
    numpy keeps stable across versions (the distribution methods on top of it may change)."""
    bits = np.random.PCG64(np.random.SeedSequence([seed, split, stream]))
    return bits.random_raw(-(-count // 8)).view(np.uint8)[:count]


def _smooth_patterns(seed: int, kind: int, count: int, grid: int = 4) -> torch.Tensor:
    """``count`` smooth 3 x 32 x 32 patterns in [-1, 1] (random grid x grid values, bilinearly
    upsampled), computed on the CPU in float64 so they are the same everywhere."""
    raw = _random_bytes(seed, 100 + kind, 0, count * 3 * grid * grid)
    coarse = torch.from_numpy(raw.astype(np.float64) / 127.5 - 1).reshape(count, 3, grid, grid)
    fine = F.interpolate(coarse, size=IMAGE_SHAPE[1:], mode="bilinear", align_corners=True)
    return fine / fine.abs().amax(dim=(1, 2, 3), keepdim=True)


# Amplitudes in grey levels: a class template, a per-image mix of shared distractor patterns,
# a per-image brightness shift per channel and per-pixel noise. The class signal is weak next to
# the rest, so a model has to learn which directions matter; a linear read-out fitted to 5,000
# images gets about 90% on held-out ones, class means alone under 50%.
_TEMPLATE_AMPLITUDE = 24
_NUM_DISTRACTORS = 16
_DISTRACTOR_AMPLITUDE = 12
_BRIGHTNESS_RANGE = 40  # uniform in -40..40 (from one byte: byte * 81 // 256 - 40)


def _synthetic_split(count: int, seed: int, split: int, device) -> ImageSet:
    templates = torch.round(_smooth_patterns(seed, 0, NUM_CLASSES) * _TEMPLATE_AMPLITUDE)
    distractors = torch.round(_smooth_patterns(seed, 1, _NUM_DISTRACTORS) * _DISTRACTOR_AMPLITUDE)
    templates = templates.to(torch.int32).to(device)
    # float32 for the matmul (integer matmul does not exist on CUDA); every product and partial sum
    # is a small integer (|sum| <= 16 * 2 * 12), exact in float32 and even in TF32.
    distractors = distractors.to(torch.float32).reshape(_NUM_DISTRACTORS, -1).to(device)
    images = torch.empty((count, *IMAGE_SHAPE), dtype=torch.uint8, device=device)
    labels = torch.arange(count, dtype=torch.int64, device=device) % NUM_CLASSES
    per_image = _NUM_DISTRACTORS + 3 + 2 * IMAGE_SIZE  # coefficients, brightness, noise bytes
    for stream, start in enumerate(range(0, count, _CHUNK)):
        # A whole stream is drawn even when fewer images are needed, so that image i is the
        # same whatever ``count`` is.
        raw = _random_bytes(seed, split, stream, _CHUNK * per_image).reshape(_CHUNK, per_image)
        n = min(_CHUNK, count - start)
        raw = torch.from_numpy(raw[:n].copy()).to(device).to(torch.int32)
        coeffs = raw[:, :_NUM_DISTRACTORS] % 5 - 2                                    # -2..2
        brightness = raw[:, _NUM_DISTRACTORS:_NUM_DISTRACTORS + 3] * (2 * _BRIGHTNESS_RANGE + 1) // 256 \
            - _BRIGHTNESS_RANGE
        noise_bytes = raw[:, _NUM_DISTRACTORS + 3:].reshape(n, 2, *IMAGE_SHAPE)
        # Sum of two uniform bytes, halved: triangular, standard deviation about 52 grey levels.
        noise = (noise_bytes[:, 0] + noise_bytes[:, 1] - 255).div(2, rounding_mode="floor")
        mixed = (coeffs.to(torch.float32) @ distractors).round_().to(torch.int32)
        value = (128 + templates[labels[start:start + n]] + mixed.reshape(n, *IMAGE_SHAPE)
                 + brightness[:, :, None, None] + noise)
        images[start:start + n] = value.clamp_(0, 255).to(torch.uint8)
    return ImageSet(images, labels)


def make_synthetic(device="cpu", train_size: int = SYNTHETIC_TRAIN_SIZE, test_size: int = SYNTHETIC_TEST_SIZE,
                   seed: int = 0) -> Dataset:
    """The synthetic CIFAR-shaped data set, composed on ``device`` in chunks of 1024 images.

    The random bits come from numpy's PCG64 on the CPU and all arithmetic is exact, so
    every device produces the same bytes; image i of a split depends only on (seed, split, i),
    so a subset is a prefix of the full set. Labels cycle 0..9 (balanced classes)."""
    for name, value in (("train_size", train_size), ("test_size", test_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    train = _synthetic_split(train_size, seed, 0, device)
    test = _synthetic_split(test_size, seed, 1, device)
    return Dataset("synthetic", train, test, source=f"generated, seed {seed}",
                   classes=tuple(f"class_{i}" for i in range(NUM_CLASSES)),
                   note=SYNTHETIC_NOTE, full_size=(SYNTHETIC_TRAIN_SIZE, SYNTHETIC_TEST_SIZE))


# ------------------------------------------------------------------------------------ resolving
DATASET_KINDS = ("auto", "cifar10", "synthetic")


def load_dataset(kind: str = "auto", path: str | os.PathLike | None = None, device="cpu",
                 train_subset: int | None = None, test_subset: int | None = None,
                 synthetic_seed: int = 0, log: Callable[[str], None] = print) -> Dataset:
    """Resolve ``--dataset``/``--data`` and load the data onto ``device``.

    * ``cifar10``: ``path``, else ``$LOWRANK_CIFAR10``, else the default places; an error naming
      every place tried when nothing is found.
    * ``synthetic``: the synthetic set (``path`` must not be given).
    * ``auto``: CIFAR-10 when a directory is given or found, else the synthetic set, announced
      through ``log``.
    """
    if kind not in DATASET_KINDS:
        raise ValueError(f"dataset must be one of {DATASET_KINDS}, got {kind!r}")
    for name, value in (("train_subset", train_subset), ("test_subset", test_subset)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if kind == "synthetic":
        if path is not None:
            raise DatasetError(f"--data {path} is given with --dataset synthetic; drop one of them")
        return make_synthetic(device, train_subset or SYNTHETIC_TRAIN_SIZE, test_subset or SYNTHETIC_TEST_SIZE,
                              seed=synthetic_seed)
    directory = find_cifar10(path)
    if directory is None:
        searched = "\n  ".join(str(p) for p in default_search_paths())
        if kind == "cifar10":
            raise DatasetNotFoundError(
                f"no CIFAR-10 directory found. Pass --data PATH or set ${ENV_VAR} to a "
                f"'{BATCH_DIR}' folder ({', '.join(EXPECTED_FILES)}); searched:\n  {searched}")
        log(f"No CIFAR-10 directory given or found (searched: {', '.join(map(str, default_search_paths()))}); "
            f"using SYNTHETIC data. Pass --data PATH or set ${ENV_VAR} to train on CIFAR-10.")
        return make_synthetic(device, train_subset or SYNTHETIC_TRAIN_SIZE, test_subset or SYNTHETIC_TEST_SIZE,
                              seed=synthetic_seed)
    return load_cifar10(directory, device, train_subset, test_subset)


# ------------------------------------------------------------------------------------ batches
def crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Random-crop-with-padding and horizontal flip of a uint8 batch (B, C, H, W), on its device.

    ``offsets`` (B, 2) in [0, 2*padding] pick the crop's top-left corner in the zero-padded image;
    ``flips`` (B,) bool mirror the crop left-right. One gather for the whole batch."""
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = offsets[:, 0, None] + torch.arange(h, device=images.device)           # (B, H)
    cols = offsets[:, 1, None] + torch.arange(w, device=images.device)           # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def epoch_seed(seed: int, epoch: int) -> int:
    """A per-epoch seed: the shuffle and augmentation of epoch e depend on (seed, e) only, so a
    resumed run sees exactly the batches an uninterrupted one would."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class DeviceLoader:
    """Batches of normalised float images from an on-device ImageSet.

    Training (``shuffle=True``): each epoch draws a permutation (and, with ``augment``, crop
    offsets and flips) from a CPU generator seeded by (seed, epoch), so the order is the same on
    every device and every rank; incomplete last batches are dropped (every step sees
    ``batch_size`` examples). With ``world_size`` > 1 each rank takes its contiguous share of
    every global batch. Evaluation (``shuffle=False``): every example once, in order, split into
    contiguous per-rank ranges.
    """

    data: ImageSet
    batch_size: int
    shuffle: bool = True
    augment: bool = False
    seed: int = 0
    mean: tuple = CIFAR10_MEAN
    std: tuple = CIFAR10_STD
    rank: int = 0
    world_size: int = 1
    channels_last: bool = False
    _scale: torch.Tensor = field(init=False, repr=False)
    _shift: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside 0..{self.world_size - 1}")
        if self.shuffle:
            if self.batch_size % self.world_size:
                raise ValueError(f"the global batch size {self.batch_size} must be divisible by the "
                                 f"number of processes {self.world_size}")
            if self.batch_size > len(self.data):
                raise ValueError(f"batch size {self.batch_size} exceeds the {len(self.data)} training "
                                 "examples; lower --batch-size or raise --train-subset")
        device = self.data.images.device
        std = torch.tensor(self.std, dtype=torch.float32, device=device)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device)
        # x = (u8 / 255 - mean) / std, as scale * u8 + shift
        self._scale = (1.0 / (255.0 * std)).reshape(1, -1, 1, 1)
        self._shift = (-mean / std).reshape(1, -1, 1, 1)

    def __len__(self) -> int:
        """Batches per epoch (global batches; each rank sees a share of each)."""
        if self.shuffle:
            return len(self.data) // self.batch_size
        lo, hi = self._local_range()
        return -(-(hi - lo) // self.batch_size)

    def _local_range(self) -> tuple[int, int]:
        n = len(self.data)
        return n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32) * self._scale + self._shift
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def epoch(self, epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of one epoch as (float images, int64 labels) on the data's device."""
        images, labels = self.data.images, self.data.labels
        device = images.device
        if not self.shuffle:
            lo, hi = self._local_range()
            for start in range(lo, hi, self.batch_size):
                stop = min(start + self.batch_size, hi)
                yield self.normalize(images[start:stop]), labels[start:stop]
            return
        n = len(self.data)
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        order = torch.randperm(n, generator=generator)
        if self.augment:
            offsets = torch.randint(0, 9, (n, 2), generator=generator)
            flips = torch.randint(0, 2, (n,), generator=generator).bool()
            offsets, flips = offsets.to(device), flips.to(device)
        order = order.to(device)
        local = self.batch_size // self.world_size
        for b in range(len(self)):
            lo = b * self.batch_size + self.rank * local
            positions = slice(lo, lo + local)
            index = order[positions]
            batch = images[index]
            if self.augment:
                batch = crop_flip(batch, offsets[positions], flips[positions])
            yield self.normalize(batch), labels[index]
