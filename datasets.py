"""Datasets for image retrieval with text feedback, with TIRG's interface.

Each dataset takes ``(path, split='train', transform=None)`` and offers ``.imgs``,
``get_test_queries()``, ``get_all_texts()``, ``get_img(idx)`` and ``__getitem__``. A training item
is a dict with ``source_img_id``, ``source_img_data``, ``target_img_id``, ``target_img_data``,
``mod: {'str': ...}`` and ``target_caption``.

Training queries are a pure function of ``(seed, index)``: the same index always yields the same
query, whatever the number of loader workers or processes, which makes runs reproducible and
resumable. (TIRG drew them from the global ``random`` state and ignored the index.)
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import signal
import sys
import warnings

import numpy as np
import PIL.Image
import torch
from tqdm import tqdm

import css_generator
from css_generator import render_2d

CSS_NPY = "css_toy_dataset_novel2_small.dup.npy"
SYNTHETIC_MARKER = "SYNTHETIC.json"


def progress(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar. In a log file (stderr is not a terminal: nohup, a batch job) it is redrawn at
    most every 30 s, so that the log shows progress without a line per batch, and a bar opened
    inside another (an evaluation during training) writes no cursor-up escapes."""
    if not (kwargs.get("file") or sys.stderr).isatty():
        kwargs.setdefault("mininterval", 30.0)
        kwargs.setdefault("position", 0)
        kwargs["maxinterval"] = max(kwargs["mininterval"], kwargs.get("maxinterval", 10.0))
    return tqdm(iterable, **kwargs)


class DatasetFormatError(ValueError):
    """A dataset file exists but does not hold what the format expects."""


# --------------------------------------------------------------------------- restricted pickle

# The only globals a CSS .npy pickle may name: numpy's array and scalar reconstruction, and
# the codec call with which protocol-2 pickles spell bytes (as torch's weights_only loader does).
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers, strings, numbers and numpy arrays; refuses anything else.

    ``find_class`` is the only way a pickle can reach code, so refusing there means nothing in a
    hostile file runs.
    """

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load '{module}.{name}': only plain data (dicts, lists, strings, "
            f"numbers, numpy arrays) is accepted"
        )


def load_data_npy(path: str):
    """Load a .npy file holding a pickled object (a Python-2 pickle is read as latin1).

    Unlike ``np.load(allow_pickle=True)``, no code named by the file is run: a pickle that names
    anything but numpy's array reconstruction raises ``DatasetFormatError``.
    """
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        except ValueError as e:
            raise DatasetFormatError(f"{path}: not a .npy file ({e})") from None
        if dtype != np.dtype(object):
            return np.fromfile(f, dtype=dtype).reshape(shape)
        try:
            array = _DataOnlyUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as e:
            raise DatasetFormatError(f"{path}: {e}") from None
        except Exception as e:  # truncated or garbled pickles raise many types
            raise DatasetFormatError(
                f"{path}: unreadable pickle payload ({type(e).__name__}: {e})"
            ) from None
    if isinstance(array, np.ndarray) and array.shape == ():
        array = array.item()
    return _to_plain(array, path)


def _to_plain(value, path):
    """numpy scalars -> Python numbers, recursively; anything unexpected is an error."""
    if isinstance(value, dict):
        return {_to_plain(k, path): _to_plain(v, path) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_plain(v, path) for v in value)
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            return [_to_plain(v, path) for v in value.tolist()]
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("latin1")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise DatasetFormatError(f"{path}: unexpected {type(value).__name__} in the data")


# --------------------------------------------------------------------------- shared helpers


def to_uint8_tensor(img) -> torch.Tensor:
    """PIL image or (H, W, 3) uint8 array -> (3, H, W) uint8 tensor, normalized later per batch."""
    array = np.array(img, dtype=np.uint8)  # a writable copy
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def worker_init(worker_id: int) -> None:
    """DataLoader worker setup (training and evaluation). Training queries are a function of
    (seed, index), so workers need no seeding; each decodes on one thread, leaving the cores to
    the model.

    Workers ignore SIGINT and SIGTERM: Ctrl-C, ``timeout`` and batch schedulers signal the whole
    process group, and a worker killed mid-step would abort the main process before it could
    finish the step and write its checkpoint. The main process stops its workers when it is
    done, and they exit on their own if it dies.
    """
    torch.set_num_threads(1)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def collate_queries(items: list[dict]) -> dict:
    """Batch training items: image tensors stacked, ids as tensors, texts as a list."""
    return {
        "source_img_id": torch.tensor([it["source_img_id"] for it in items]),
        "target_img_id": torch.tensor([it["target_img_id"] for it in items]),
        "source_img_data": torch.stack([it["source_img_data"] for it in items]),
        "target_img_data": torch.stack([it["target_img_data"] for it in items]),
        "mod": [it["mod"]["str"] for it in items],
        "target_caption": [it["target_caption"] for it in items],
    }


class BaseDataset(torch.utils.data.Dataset):
    """TIRG's dataset interface plus deterministic training-query sampling.

    Subclasses fill ``self.imgs`` (dicts with at least ``captions``), ``self.test_queries`` and
    implement ``training_query(rng, index)`` and ``_load_img(idx)``.
    """

    recall_ks: tuple[int, ...] = (1, 5, 10)
    synthetic = False

    def __init__(self, path: str, split: str = "train", transform=None):
        super().__init__()
        self.path = path
        self.split = split
        self.transform = transform
        self.seed = 0
        self.imgs: list[dict] = []
        self.test_queries: list[dict] = []

    def get_test_queries(self) -> list[dict]:
        return self.test_queries

    # Whether a test query's own source image is removed from its ranking (TIRG's protocol).
    exclude_source_in_test = True

    def evaluation_groups(self) -> list[dict]:
        """The test protocol as ``[{name, queries, gallery_ids}]``: each group's queries are
        ranked against its own gallery and its recalls reported under its name (several groups:
        their mean is the dataset's score). By default one group: every test query against
        every image of the split."""
        return [{"name": "all", "queries": self.test_queries, "gallery_ids": range(len(self.imgs))}]

    def get_all_texts(self) -> list[str]:
        raise NotImplementedError

    def gallery_labels(self) -> list[str]:
        """The label a hit is judged by, one per image."""
        return [img["captions"][0] for img in self.imgs]

    def query_label(self, query: dict) -> str:
        return query["target_caption"]

    def _load_img(self, idx: int) -> PIL.Image.Image:
        raise NotImplementedError

    def get_img(self, idx: int, raw_img: bool = False):
        img = self._load_img(int(idx))
        if raw_img or self.transform is None:
            return img
        return self.transform(img)

    def training_query(self, rng: random.Random, index: int) -> dict:
        """Image ids and text of one training query: ``{source_img_id, target_img_id, mod}``."""
        raise NotImplementedError

    def _finish_query(self, query: dict) -> dict:
        query.setdefault("target_caption", self.imgs[query["target_img_id"]]["captions"][0])
        return query

    def sample_query(self, index: int, seed: int | None = None) -> dict:
        """The training query at ``index`` (deterministic in ``seed`` and ``index``)."""
        seed = self.seed if seed is None else seed
        # Queries come in pairs sharing a source image (TIRG's sampling); the pair shares an rng.
        rng = random.Random(f"{seed}:{index // 2}")
        return self._finish_query(self.training_query(rng, index))

    def distinct_training_query_count(self) -> int:
        """How many distinct training queries the split has: every query ``training_query`` can
        draw, counted once (the pool ``sample_training_queries`` draws from)."""
        raise NotImplementedError

    def distinct_training_query(self, j: int, rng: random.Random) -> dict:
        """The j-th distinct training query, ``0 <= j < distinct_training_query_count()``;
        ``rng`` picks its target image where several images carry the target's label."""
        raise NotImplementedError

    def sample_training_queries(self, n: int, seed: int) -> list[dict]:
        """A fixed sample of training queries, to measure training accuracy (M_s).

        ``min(n, distinct_training_query_count())`` distinct queries, drawn without replacement:
        a deterministic function of ``seed``. (TIRG drew n queries with replacement: on a small
        set every target then sat many times in the gallery, and R@1 = R@5 = R@10.)
        """
        count = self.distinct_training_query_count()
        picks = random.Random(f"{seed}:M_s sample").sample(range(count), min(max(n, 0), count))
        return [
            self._finish_query(self.distinct_training_query(j, random.Random(f"{seed}:{j}")))
            for j in picks
        ]

    def __getitem__(self, index: int) -> dict:
        query = self.sample_query(index)
        query["source_img_data"] = self.get_img(query["source_img_id"])
        query["target_img_data"] = self.get_img(query["target_img_id"])
        return query

    def __len__(self) -> int:
        return len(self.imgs)


# --------------------------------------------------------------------------- image files

IMAGE_SIZE = 224
# Refuse images above PIL's own warning threshold (about 9459 x 9459) before decoding them: the
# datasets' photographs are far smaller, so anything larger is a broken or hostile file.
MAX_IMAGE_PIXELS = 89_478_485
BAD_IMAGE_POLICIES = ("skip", "fail")
MAX_QUERY_ATTEMPTS = 100
_PLACEHOLDER_RGB = (124, 116, 104)  # the ImageNet mean: normalizes to about zero


class BadImageError(DatasetFormatError):
    """An image that cannot be used: missing, undecodable, truncated, or too large to decode."""


class BadImageWarning(UserWarning):
    """An unusable image was skipped (``on_bad_image='skip'``)."""


def load_rgb_image(
    path: str, max_pixels: int = MAX_IMAGE_PIXELS, draft_size: int | None = None
) -> PIL.Image.Image:
    """Decode ``path`` fully into an RGB image, or raise ``BadImageError`` naming the file.

    The size in the header is checked before any pixel is decoded (an image bomb is refused), and
    a truncated file is an error rather than a half-grey image. With ``draft_size`` a JPEG is
    decoded at the smallest 1/2, 1/4 or 1/8 scale whose shorter side is still >= draft_size
    (DCT-domain downscaling: several times faster for photographs larger than needed).
    """
    try:
        with warnings.catch_warnings():
            # PIL warns (and above twice the limit, raises) on huge images; both are refusals.
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise BadImageError(
                        f"{path}: refusing a {width}x{height} image ({width * height} pixels, "
                        f"limit {max_pixels}) before decoding it: a decompression bomb or a "
                        f"broken header"
                    )
                if draft_size and img.format == "JPEG":
                    img.draft("RGB", (draft_size, draft_size))
                return img.convert("RGB")  # decodes every pixel, so truncation shows here
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError(f"{path}: image file missing") from None
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as e:
        raise BadImageError(f"{path}: refusing a decompression bomb ({e})") from None
    except Exception as e:  # PIL signals broken files with OSError, SyntaxError, ValueError, ...
        raise BadImageError(
            f"{path}: cannot decode image ({type(e).__name__}: {e}); the file is truncated, "
            f"corrupt or not an image"
        ) from None


class BadImagePolicy:
    """Image reading shared by the datasets whose images are files (a mixin of BaseDataset).

    - Images are decoded by ``load_rgb_image``: the size in the header is checked before
      decoding (bombs refused) and truncation is detected.
    - ``on_bad_image='skip'``: an unusable image is skipped with a ``BadImageWarning`` and
      flagged. A training query touching it is replaced by another query drawn deterministically
      from (seed, index, attempt), so runs stay reproducible; at evaluation (``get_img``) it is
      replaced by a mean-grey image so the gallery keeps its size. ``'fail'`` raises
      ``BadImageError`` naming the file.
    - The flags live in a shared-memory tensor, so images found bad in DataLoader workers are
      counted in the main process: ``bad_image_count()`` and ``bad_image_paths()``.

    A subclass calls ``_init_bad_images`` once ``imgs`` is filled and implements
    ``image_path(idx)``.
    """

    def _init_bad_images(self, on_bad_image: str, max_image_pixels: int) -> None:
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(
                f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}"
            )
        self.on_bad_image = on_bad_image
        self.max_image_pixels = max_image_pixels
        # One flag per image, in shared memory: DataLoader workers (forked or spawned) mark the
        # images they found unusable where the main process can count them. Writes are
        # idempotent (0 -> 1), so workers need no lock.
        self._bad = torch.zeros(len(self.imgs), dtype=torch.uint8).share_memory_()

    def image_path(self, idx: int) -> str:
        raise NotImplementedError

    def _read_image(self, idx: int, draft_size: int | None = None) -> PIL.Image.Image:
        """The decoded image, or BadImageError naming its file."""
        return load_rgb_image(self.image_path(idx), self.max_image_pixels, draft_size)

    def _load_img(self, idx: int) -> PIL.Image.Image:
        return self._read_image(idx)

    def placeholder_size(self) -> tuple[int, int]:
        """(width, height) of the grey image that stands in for a skipped one at evaluation."""
        size = getattr(self.transform, "size", IMAGE_SIZE)
        return size, size

    def _decode(self, idx: int, raw_img: bool = False):
        """The image (transformed unless raw), or None when it is unusable and skipped."""
        if self._bad[idx]:
            return None
        draft = None
        if not raw_img and self.transform is not None:
            draft = getattr(self.transform, "draft_size", None)
        try:
            img = self._read_image(idx, draft)
        except BadImageError as e:
            if self.on_bad_image == "fail":
                raise
            self._bad[idx] = 1
            warnings.warn(
                f"skipping an unusable image: {e} (--on_bad_image fail stops instead)",
                BadImageWarning,
                stacklevel=3,
            )
            return None
        if raw_img or self.transform is None:
            return img
        return self.transform(img)

    def get_img(self, idx: int, raw_img: bool = False):
        idx = int(idx)
        img = self._decode(idx, raw_img)
        if img is not None:
            return img
        placeholder = PIL.Image.new("RGB", self.placeholder_size(), _PLACEHOLDER_RGB)
        if raw_img or self.transform is None:
            return placeholder
        return self.transform(placeholder)

    def __getitem__(self, index: int) -> dict:
        for attempt in range(MAX_QUERY_ATTEMPTS):
            seed = self.seed if attempt == 0 else f"{self.seed}/retry{attempt}"
            query = self.sample_query(index, seed)
            source = self._decode(query["source_img_id"])
            if source is None:
                continue
            target = self._decode(query["target_img_id"])
            if target is None:
                continue
            query["source_img_data"], query["target_img_data"] = source, target
            return query
        raise BadImageError(
            f"{self.path}: {MAX_QUERY_ATTEMPTS} training queries drawn for index {index} all "
            f"touched unusable images ({self.bad_image_count()} found so far); the image files "
            f"look broken on a large scale"
        )

    def bad_image_count(self) -> int:
        """How many distinct images were found unusable and skipped, in every process."""
        return int(self._bad.sum())

    def bad_image_paths(self) -> list[str]:
        return [self.image_path(i) for i in torch.nonzero(self._bad).flatten().tolist()]


# --------------------------------------------------------------------------- CSS


class CSSDataset(BadImagePolicy, BaseDataset):
    """CSS (Vo et al.): scenes of coloured shapes, one modification text per query.

    Reads ``<path>/css_toy_dataset_novel2_small.dup.npy``. Images come from
    ``<path>/images/css_<split>_<idx:06d>.png`` (the 3D version) when that folder exists, and are
    otherwise drawn in 2D from the object lists, as TIRG does. A hit is any image with the
    target's label (duplicate scenes share a label).

    The PNGs are read under ``BadImagePolicy``: an undecodable, truncated or oversized image is
    skipped and counted (``on_bad_image='skip'``; a grey image of the split's image size at
    evaluation) or is a ``BadImageError`` naming the file (``'fail'``). A missing PNG is always an
    error: with an images/ folder, every image of the split is expected there.
    """

    def __init__(
        self,
        path: str,
        split: str = "train",
        transform=None,
        *,
        on_bad_image: str = "skip",
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ):
        super().__init__(path, split, transform)
        if on_bad_image not in BAD_IMAGE_POLICIES:  # before any file is read
            raise ValueError(
                f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}"
            )
        npy = os.path.join(path, CSS_NPY)
        if not os.path.isfile(npy):
            raise FileNotFoundError(
                f"CSS data not found: expected {npy} (the CSS release's pickled dict with "
                f"'train' and 'test' splits) and optionally {os.path.join(path, 'images')}/"
                f"css_<split>_<idx:06d>.png"
            )
        data = load_data_npy(npy)
        self.synthetic = os.path.isfile(os.path.join(path, SYNTHETIC_MARKER))
        if not isinstance(data, dict) or split not in data:
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise DatasetFormatError(f"{npy}: expected a dict with a '{split}' split, found {keys}")
        self.data = data[split]
        objects_img = self.data.get("objects_img")
        self.mods = self.data.get("mods")
        if not isinstance(objects_img, list) or not isinstance(self.mods, list):
            raise DatasetFormatError(f"{npy}: split '{split}' needs lists 'objects_img' and 'mods'")
        labels = self.data.get("labels")
        if labels is not None and len(labels) != len(objects_img):
            raise DatasetFormatError(
                f"{npy}: split '{split}' has {len(labels)} labels for {len(objects_img)} images"
            )
        for i, objects in enumerate(objects_img):
            label = labels[i] if labels is not None else i
            self.imgs.append({"objects": objects, "label": label, "captions": [str(label)]})

        self.imgid2modtarget: list[list[tuple[int, int]]] = [[] for _ in self.imgs]
        n = len(self.imgs)
        for m, mod in enumerate(self.mods):
            frm, to = mod.get("from"), mod.get("to")
            if (
                not isinstance(mod.get("to_str"), str)
                or not mod["to_str"].strip()
                or not isinstance(frm, list)
                or not isinstance(to, list)
                or len(frm) != len(to)
            ):
                raise DatasetFormatError(
                    f"{npy}: {split} mod {m} must have a non-empty 'to_str' and parallel "
                    f"'from'/'to' lists, got {mod!r:.200}"
                )
            for f, t in zip(frm, to):
                if not (0 <= f < n and 0 <= t < n):
                    raise DatasetFormatError(
                        f"{npy}: {split} mod {m} names image {f}->{t}, outside 0..{n - 1}"
                    )
                self.imgid2modtarget[f].append((m, t))
        self.test_queries = [
            {
                "source_img_id": f,
                "target_img_id": t,
                "target_caption": self.imgs[t]["captions"][0],
                "mod": {"str": mod["to_str"]},
            }
            for mod in self.mods
            for f, t in zip(mod["from"], mod["to"])
        ]
        self._mod_pairs = [
            (m, k) for m, mod in enumerate(self.mods) for k in range(len(mod["from"]))
        ]

        self.img_dir = os.path.join(path, "images")
        self.has_png = os.path.isdir(self.img_dir)
        self._placeholder_size = None
        self._init_bad_images(on_bad_image, max_image_pixels)

    def get_all_texts(self) -> list[str]:
        return [mod["to_str"] for mod in self.mods]

    def distinct_training_query_count(self):
        return len(self.test_queries)  # every (from, to) pair of every mod of the split

    def distinct_training_query(self, j, rng):
        m, k = self._mod_pairs[j]
        return {
            "source_img_id": self.mods[m]["from"][k],
            "target_img_id": self.mods[m]["to"][k],
            "mod": {"id": m, "str": self.mods[m]["to_str"]},
        }

    def training_query(self, rng, index):
        # First of a pair: a random mod, then a random (from, to) pair of it. Second of a pair:
        # another mod applied to the same source image (TIRG's sampling); an image that is the
        # source of a single mod repeats it instead of looping forever as TIRG could.
        m = rng.randrange(len(self.mods))
        k = rng.randrange(len(self.mods[m]["from"]))
        source, target = self.mods[m]["from"][k], self.mods[m]["to"][k]
        if index % 2 == 1:
            others = [mt for mt in self.imgid2modtarget[source] if mt[0] != m]
            if others:
                m, target = others[rng.randrange(len(others))]
        return {
            "source_img_id": source,
            "target_img_id": target,
            "mod": {"id": m, "str": self.mods[m]["to_str"]},
        }

    def image_path(self, idx):
        return os.path.join(self.img_dir, f"css_{self.split}_{idx:06d}.png")

    def _read_image(self, idx, draft_size=None):
        if not self.has_png:
            return PIL.Image.fromarray(render_2d(self.imgs[idx]["objects"]))
        file = self.image_path(idx)
        if not os.path.isfile(file):
            raise BadImageError(
                f"{file}: image file missing (the images/ folder exists, so every image of the "
                f"split is expected there)"
            )
        return load_rgb_image(file, self.max_image_pixels)

    def placeholder_size(self):
        """The size of the split's images: that of the first PNG whose header reads (the 2D
        render's 64x64 without PNGs), so a grey stand-in batches with the others."""
        if self._placeholder_size is None:
            self._placeholder_size = (64, 64)
            for idx in range(len(self.imgs) if self.has_png else 0):
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
                        with PIL.Image.open(self.image_path(idx)) as img:  # the header only
                            width, height = img.size
                except Exception:  # a broken file: try the next one
                    continue
                if width * height <= self.max_image_pixels:
                    self._placeholder_size = (width, height)
                    break
        return self._placeholder_size


# --------------------------------------------------------------------------- real photographs


class ResizeCenterCrop:
    """PIL image -> (3, size, size) uint8 tensor: torchvision's ``Resize(size)`` then
    ``CenterCrop(size)`` (bilinear, antialiased), done as one PIL resize of the crop's box.

    The result matches the two-step torchvision pipeline within one grey level and takes about
    half the time. ``draft_size`` tells the dataset it may decode JPEGs at a reduced scale.
    ImageNet normalization happens per batch on the device (``torch_function.normalize_images``).
    A class rather than a lambda, so DataLoader workers can unpickle it.
    """

    def __init__(self, size: int = IMAGE_SIZE):
        if size < 1:
            raise ValueError(f"image size must be positive, got {size}")
        self.size = int(size)
        self.draft_size = self.size

    def __call__(self, img: PIL.Image.Image) -> torch.Tensor:
        size = self.size
        width, height = img.size
        # torchvision's Resize(int): the shorter side becomes size, the longer is truncated.
        if width <= height:
            new_width, new_height = size, int(size * height / width)
        else:
            new_width, new_height = int(size * width / height), size
        left = int(round((new_width - size) / 2.0))  # torchvision's CenterCrop offsets
        top = int(round((new_height - size) / 2.0))
        scale_x, scale_y = width / new_width, height / new_height
        box = (
            left * scale_x,
            top * scale_y,
            (left + size) * scale_x,
            (top + size) * scale_y,
        )
        if img.mode != "RGB":
            img = img.convert("RGB")
        return to_uint8_tensor(img.resize((size, size), PIL.Image.BILINEAR, box=box))

    def __repr__(self) -> str:
        return f"ResizeCenterCrop(size={self.size})"


def _check_relative_path(rel: str, where: str) -> str:
    """A path from a label file must stay inside the dataset root: relative and without '..'."""
    parts = rel.replace("\\", "/").split("/")
    if not rel or "\0" in rel or os.path.isabs(rel) or rel.startswith("~") or ".." in parts:
        raise DatasetFormatError(
            f"{where}: refusing the image path {rel!r}: paths in label files must be relative "
            f"to the dataset root and must not leave it (no absolute paths, no '..')"
        )
    return rel


def _check_image_id(image_id, where: str) -> str:
    """A FashionIQ image id names a file in images/: a plain, non-empty name."""
    if (
        not isinstance(image_id, str)
        or not image_id
        or image_id in (".", "..")
        or any(c in image_id for c in "/\\\0")
    ):
        raise DatasetFormatError(
            f"{where}: refusing the image id {image_id!r}: ids must be plain file names "
            f"(no path separators, not '.' or '..')"
        )
    return image_id


def _read_json(path: str, layout: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found. Expected layout:\n{layout}")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise DatasetFormatError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        except UnicodeDecodeError as e:
            raise DatasetFormatError(f"{path}: not UTF-8 text ({e})") from None


def _first_word(label: str) -> str:
    return label.split(" ", 1)[0]


def _last_word(label: str) -> str:
    return label.rsplit(" ", 1)[-1]


class ImageFileDataset(BadImagePolicy, BaseDataset):
    """Shared by the datasets of photographs on disk.

    - Images are read under ``BadImagePolicy`` (``on_bad_image``: skip and count, or fail naming
      the file) and, when the transform has a ``draft_size``, JPEGs are decoded at a reduced
      scale.
    - ``use_complete_text_query``: the text of every query is the complete target description
      (``complete_text``) instead of the modification text.

    Subclasses set ``LAYOUT`` and implement ``_build()`` (fill ``imgs`` and ``test_queries``) and
    ``image_path(idx)``.
    """

    LAYOUT = ""
    SPLITS = ("train", "test")

    def __init__(
        self,
        path: str,
        split: str = "train",
        transform=None,
        *,
        on_bad_image: str = "skip",
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        use_complete_text_query: bool = False,
    ):
        super().__init__(path, split, transform)
        if split not in self.SPLITS:
            raise ValueError(
                f"{type(self).__name__}: split must be one of {self.SPLITS}, got {split!r}"
            )
        if on_bad_image not in BAD_IMAGE_POLICIES:  # before any file is read
            raise ValueError(
                f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}"
            )
        self.use_complete_text_query = use_complete_text_query
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"{type(self).__name__} data not found: {path} is not a folder. "
                f"Expected layout:\n{self.LAYOUT}"
            )
        self._build()
        if use_complete_text_query:
            for query in self.test_queries:
                query["mod"] = {**query["mod"], "str": self.complete_text(query)}
        self._init_bad_images(on_bad_image, max_image_pixels)

    def _build(self) -> None:
        raise NotImplementedError

    def complete_text(self, query: dict) -> str:
        """The complete target description used by ``--use_complete_text_query``."""
        return query["target_caption"]

    def get_all_texts(self) -> list[str]:
        return [caption for img in self.imgs for caption in img["captions"]]

    def _finish_query(self, query: dict) -> dict:
        query = super()._finish_query(query)
        if self.use_complete_text_query:
            query["mod"] = {**query["mod"], "str": self.complete_text(query)}
        return query


def bad_image_summary(*dataset_list) -> str | None:
    """One line for the run summary, or None when no image was skipped."""
    parts, examples = [], []
    for ds in dataset_list:
        if not hasattr(ds, "bad_image_count"):
            continue
        count = ds.bad_image_count()
        if count:
            parts.append(f"{count} in {ds.split}")
            examples += ds.bad_image_paths()[:3]
    if not parts:
        return None
    return (
        f"skipped unusable images ({', '.join(parts)}; e.g. {', '.join(examples[:3])}): training "
        f"queries touching them were redrawn, evaluation used a grey image in their place"
    )


# --------------------------------------------------------------------------- MIT-States

# The 49 nouns whose images form TIRG's test split (every other noun is training).
TIRG_TEST_NOUNS = (
    "armor", "bracelet", "bush", "camera", "candy", "castle", "ceramic", "cheese", "clock",
    "clothes", "coffee", "fan", "fig", "fish", "foam", "forest", "fruit", "furniture", "garden",
    "gate", "glass", "horse", "island", "laptop", "lead", "lightning", "mirror", "orange",
    "paint", "persimmon", "plastic", "plate", "potato", "road", "rubber", "sand", "shell", "sky",
    "smoke", "steel", "stream", "table", "tea", "tomato", "vacuum", "wax", "wheel", "window",
    "wool",
)  # fmt: skip


class MITStates(ImageFileDataset):
    """MIT-States (Isola et al.): objects in states, one folder per "adjective noun".

    Split: images of TIRG's 49 test nouns are the test split, all others train (folders
    ``adj <noun>``, which hold images without a state, are skipped, as TIRG does). A query is an
    image plus the name of another adjective of its noun ("melted"); the target is any image of
    "<that adjective> <noun>", so hits are judged by caption. Training queries come in pairs that
    share the source image and ask for two different adjectives (TIRG's sampling). The test
    queries are every test image with every other adjective of its noun.
    """

    LAYOUT = (
        "  <path>/images/<adj> <noun>/*.jpg   (MIT-States release_dataset.zip: one folder per "
        "adjective-noun pair, e.g. 'images/ripe apple/*.jpg')"
    )
    recall_ks = (1, 5, 10)

    def _build(self):
        images_dir = os.path.join(self.path, "images")
        if not os.path.isdir(images_dir):
            raise FileNotFoundError(
                f"MIT-States images not found: {images_dir} is not a folder. "
                f"Expected layout:\n{self.LAYOUT}"
            )
        test_nouns = set(TIRG_TEST_NOUNS)
        for folder in sorted(os.listdir(images_dir)):
            full = os.path.join(images_dir, folder)
            if " " not in folder or not os.path.isdir(full):
                continue
            words = folder.split()
            if len(words) != 2:
                raise DatasetFormatError(
                    f"{full}: expected a folder named '<adjective> <noun>' (two words)"
                )
            adj, noun = words
            if adj == "adj" or (noun in test_nouns) != (self.split == "test"):
                continue
            for name in sorted(os.listdir(full)):
                if name.lower().endswith((".jpg", ".jpeg")):
                    self.imgs.append(
                        {
                            "file_path": os.path.join(full, name),
                            "captions": [f"{adj} {noun}"],
                            "adj": adj,
                            "noun": noun,
                        }
                    )
        if not self.imgs:
            raise DatasetFormatError(
                f"{images_dir}: no '<adj> <noun>/*.jpg' images for the {self.split} split (its "
                f"nouns are {'' if self.split == 'test' else 'all but '}TIRG's 49 test nouns). "
                f"Expected layout:\n{self.LAYOUT}"
            )
        self.caption2imgids: dict[str, list[int]] = {}
        self.noun2adjs: dict[str, list[str]] = {}
        for i, img in enumerate(self.imgs):
            self.caption2imgids.setdefault(img["captions"][0], []).append(i)
            adjs = self.noun2adjs.setdefault(img["noun"], [])
            if img["adj"] not in adjs:
                adjs.append(img["adj"])
        for noun, adjs in self.noun2adjs.items():
            if len(adjs) < 2:
                raise DatasetFormatError(
                    f"{images_dir}: the noun '{noun}' has images of a single adjective "
                    f"('{adjs[0]} {noun}') in the {self.split} split; a query needs another "
                    f"adjective of the same noun"
                )
        if self.split == "test":
            for idx, img in enumerate(self.imgs):
                for target_adj in self.noun2adjs[img["noun"]]:
                    if target_adj != img["adj"]:
                        self.test_queries.append(
                            {
                                "source_img_id": idx,
                                "source_caption": img["captions"][0],
                                "target_caption": f"{target_adj} {img['noun']}",
                                "noun": img["noun"],
                                "mod": {"str": target_adj},
                            }
                        )

    def image_path(self, idx):
        return self.imgs[idx]["file_path"]

    def extra_label_views(self) -> dict:
        """TIRG's extra MIT-States recalls: the adjective alone and the noun alone."""
        return {"adj": _first_word, "noun": _last_word}

    def _query_offsets(self) -> np.ndarray:
        """offsets[i]: how many distinct queries the images before i have (one per other
        adjective of their noun); offsets[-1] is the total."""
        if getattr(self, "_offsets", None) is None:
            per_image = [len(self.noun2adjs[img["noun"]]) - 1 for img in self.imgs]
            self._offsets = np.concatenate([[0], np.cumsum(per_image, dtype=np.int64)])
        return self._offsets

    def distinct_training_query_count(self):
        return int(self._query_offsets()[-1])

    def distinct_training_query(self, j, rng):
        # (source image, another adjective of its noun); the target is an image of that caption.
        offsets = self._query_offsets()
        source = int(np.searchsorted(offsets, j, side="right")) - 1
        img = self.imgs[source]
        others = [a for a in self.noun2adjs[img["noun"]] if a != img["adj"]]
        adj = others[j - int(offsets[source])]
        return {
            "source_img_id": source,
            "target_img_id": rng.choice(self.caption2imgids[f"{adj} {img['noun']}"]),
            "source_caption": img["captions"][0],
            "noun": img["noun"],
            "mod": {"str": adj},
        }

    def training_query(self, rng, index):
        # The loader shuffles in TIRG, so the source is a uniformly drawn image. Both queries of a
        # pair draw the same source (shared rng) and two different other adjectives; a noun with
        # only two adjectives repeats the one other adjective. TIRG drew the target adjective
        # among all adjectives of the noun, the source's own included (an identity query); here
        # it is always another one, as in the test queries.
        source = rng.randrange(len(self.imgs))
        img = self.imgs[source]
        others = [a for a in self.noun2adjs[img["noun"]] if a != img["adj"]]
        adjs = rng.sample(others, 2) if len(others) >= 2 else [others[0], others[0]]
        targets = [rng.choice(self.caption2imgids[f"{a} {img['noun']}"]) for a in adjs]
        k = index % 2
        return {
            "source_img_id": source,
            "target_img_id": targets[k],
            "source_caption": img["captions"][0],
            "noun": img["noun"],
            "mod": {"str": adjs[k]},
        }


# --------------------------------------------------------------------------- Fashion200k


def _fashion200k_caption(text: str) -> str:
    """TIRG's caption clean-up: punctuation kept as words, since the tokenizer drops it."""
    return (
        text.strip()
        .replace(".", "dotmark")
        .replace("?", "questionmark")
        .replace("&", "andmark")
        .replace("*", "starmark")
    )


def different_word(source_caption: str, target_caption: str) -> tuple[str, str]:
    """TIRG's word difference: the first source word missing from the target and the first
    target word missing from the source (the last word when none is missing, as TIRG)."""
    source_words, target_words = source_caption.split(), target_caption.split()
    source_word = next((w for w in source_words if w not in target_words), source_words[-1])
    target_word = next((w for w in target_words if w not in source_words), target_words[-1])
    return source_word, target_word


def _independent_rng(rng: random.Random, index: int) -> random.Random:
    """BaseDataset gives the two queries of a pair one rng; datasets whose queries are
    independent (TIRG shuffled Fashion200k's) derive one per index from it."""
    return random.Random(f"{rng.getrandbits(64)}:{index % 2}")


class Fashion200k(ImageFileDataset):
    """Fashion200k (Han et al.): product photos with attribute-like captions.

    Each image has one caption ("black midi dress"). A training query changes one word: its
    target has a caption that differs from the source's by one word, found through TIRG's
    parent-caption index (a parent is a caption with one word removed; children of the same
    parent differ by one word), and the text is "replace <source word> with <target word>". The
    test queries are the (source, target) path pairs of ``test_queries.txt`` (TIRG's standard
    file). Hits are judged by caption: any image with the target's caption counts.
    """

    LAYOUT = (
        "  <path>/labels/<category>_train_detect_all.txt, <category>_test_detect_all.txt\n"
        "        (one image a line: <image path>\\t<detection score>\\t<caption>)\n"
        "  <path>/women/<category>/<subcategory>/<id>/<id>_<n>.jpeg   (the paths in the labels)\n"
        "  <path>/test_queries.txt   (test split: '<source image path> <target image path>' a line)"
    )
    recall_ks = (1, 10, 50)

    def _build(self):
        labels_dir = os.path.join(self.path, "labels")
        if not os.path.isdir(labels_dir):
            raise FileNotFoundError(
                f"Fashion200k labels not found: {labels_dir} is not a folder. "
                f"Expected layout:\n{self.LAYOUT}"
            )
        suffix = f"_{self.split}_detect_all.txt"
        label_files = sorted(f for f in os.listdir(labels_dir) if f.endswith(suffix))
        if not label_files:
            raise FileNotFoundError(
                f"Fashion200k: no {labels_dir}/*{suffix} label files. Expected layout:\n"
                f"{self.LAYOUT}"
            )
        for name in label_files:
            self._read_label_file(os.path.join(labels_dir, name))
        if not self.imgs:
            raise DatasetFormatError(f"{labels_dir}/*{suffix}: the label files list no images")
        self.caption2imgids: dict[str, list[int]] = {}
        for i, img in enumerate(self.imgs):
            self.caption2imgids.setdefault(img["captions"][0], []).append(i)
        if self.split == "train":
            self._index_parent_captions()
        else:
            self._read_test_queries()

    def _read_label_file(self, file: str) -> None:
        with open(file, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                fields = line.split("\t")
                where = f"{file}:{line_no}"
                if len(fields) < 3 or not fields[0].strip() or not fields[2].strip():
                    raise DatasetFormatError(
                        f"{where}: expected '<image path>\\t<detection score>\\t<caption>', "
                        f"got {line[:200]!r}"
                    )
                try:
                    score = float(fields[1])
                except ValueError:
                    raise DatasetFormatError(
                        f"{where}: the detection score {fields[1][:50]!r} is not a number"
                    ) from None
                self.imgs.append(
                    {
                        "file_path": _check_relative_path(fields[0].strip(), where),
                        "detection_score": score,
                        "captions": [_fashion200k_caption(fields[2])],
                    }
                )

    def _read_test_queries(self) -> None:
        file = os.path.join(self.path, "test_queries.txt")
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"Fashion200k test queries not found: {file} (TIRG's standard test_queries.txt, "
                f"https://storage.googleapis.com/image_retrieval_css/test_queries.txt). "
                f"Expected layout:\n{self.LAYOUT}"
            )
        file2imgid: dict[str, int] = {}
        for i, img in enumerate(self.imgs):
            file2imgid.setdefault(img["file_path"], i)
        with open(file, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    continue
                where = f"{file}:{line_no}"
                if len(fields) != 2:
                    raise DatasetFormatError(
                        f"{where}: expected '<source image path> <target image path>', "
                        f"got {line.strip()[:200]!r}"
                    )
                ids = []
                for image in fields:
                    if image not in file2imgid:
                        raise DatasetFormatError(
                            f"{where}: the image {image!r} is not listed in any "
                            f"labels/*_test_detect_all.txt"
                        )
                    ids.append(file2imgid[image])
                source, target = ids
                source_caption = self.imgs[source]["captions"][0]
                target_caption = self.imgs[target]["captions"][0]
                source_word, target_word = different_word(source_caption, target_caption)
                self.test_queries.append(
                    {
                        "source_img_id": source,
                        "target_img_id": target,
                        "source_caption": source_caption,
                        "target_caption": target_caption,
                        "mod": {"str": f"replace {source_word} with {target_word}"},
                    }
                )

    def _index_parent_captions(self) -> None:
        """TIRG's parent/child caption index, over word tokens.

        A parent is a caption with one word removed; ``parent2children[p]`` lists (child
        caption, the word added to p). Two children of one parent make a query when their added
        words differ and neither occurs in the parent, so each caption lacks a word of the other
        and "replace <w> with <w2>" names exactly the difference. (TIRG removed the word with
        ``str.replace``, which also cut it out of longer words, e.g. 'red' from 'embroidered'.)
        """
        self.parent2children: dict[str, list[tuple[str, str]]] = {}
        for caption in self.caption2imgids:
            words = caption.split()
            for i, word in enumerate(words):
                parent_words = words[:i] + words[i + 1 :]
                if word in parent_words:
                    continue  # a repeated word: removing it leaves the word in the parent
                children = self.parent2children.setdefault(" ".join(parent_words), [])
                if (caption, word) not in children:
                    children.append((caption, word))
        # caption -> [(parent, the caption's own added word)] with at least one other word
        self.caption_parents: dict[str, list[tuple[str, str]]] = {}
        for parent, children in self.parent2children.items():
            if len({w for _, w in children}) < 2:
                continue
            for caption, word in children:
                self.caption_parents.setdefault(caption, []).append((parent, word))
        for img in self.imgs:
            img["modifiable"] = img["captions"][0] in self.caption_parents
        self.modifiable_ids = [i for i, img in enumerate(self.imgs) if img["modifiable"]]
        if not self.modifiable_ids:
            raise DatasetFormatError(
                f"{self.path}/labels/*_train_detect_all.txt: no two captions differ by one word, "
                f"so no training query can be formed"
            )

    def image_path(self, idx):
        return os.path.join(self.path, self.imgs[idx]["file_path"])

    def _caption_queries(self, caption: str) -> list[tuple[str, str, str]]:
        """The distinct queries from a source of ``caption``: (its word, target caption, the
        target's word), every child of every parent whose added word differs."""
        options = (
            (word, target_caption, target_word)
            for parent, word in self.caption_parents[caption]
            for target_caption, target_word in self.parent2children[parent]
            if target_word != word
        )
        return list(dict.fromkeys(options))

    def _query_offsets(self) -> np.ndarray:
        """offsets[i]: how many distinct queries the modifiable images before the i-th have."""
        if getattr(self, "_offsets", None) is None:
            counts = {c: len(self._caption_queries(c)) for c in self.caption_parents}
            per_image = [counts[self.imgs[i]["captions"][0]] for i in self.modifiable_ids]
            self._offsets = np.concatenate([[0], np.cumsum(per_image, dtype=np.int64)])
        return self._offsets

    def distinct_training_query_count(self):
        return int(self._query_offsets()[-1])

    def distinct_training_query(self, j, rng):
        # (modifiable source image, target caption, text); the target is an image of the caption.
        offsets = self._query_offsets()
        k = int(np.searchsorted(offsets, j, side="right")) - 1
        source = self.modifiable_ids[k]
        caption = self.imgs[source]["captions"][0]
        word, target_caption, target_word = self._caption_queries(caption)[j - int(offsets[k])]
        return {
            "source_img_id": source,
            "target_img_id": rng.choice(self.caption2imgids[target_caption]),
            "source_caption": caption,
            "mod": {"str": f"replace {word} with {target_word}"},
        }

    def training_query(self, rng, index):
        # TIRG drew a (shuffled) image, moved to a random one until it was modifiable: a uniform
        # modifiable image. Then, as TIRG, a random parent of its caption and a random child of
        # that parent, drawn again until the child differs (every listed parent has another
        # word, so this ends), and a random image of the child caption.
        rng = _independent_rng(rng, index)
        source = rng.choice(self.modifiable_ids)
        caption = self.imgs[source]["captions"][0]
        while True:
            parent, word = rng.choice(self.caption_parents[caption])
            target_caption, target_word = rng.choice(self.parent2children[parent])
            if target_word != word:
                break
        return {
            "source_img_id": source,
            "target_img_id": rng.choice(self.caption2imgids[target_caption]),
            "source_caption": caption,
            "mod": {"str": f"replace {word} with {target_word}"},
        }


# --------------------------------------------------------------------------- FashionIQ

FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")


class FashionIQ(ImageFileDataset):
    """FashionIQ (Wu et al.): a reference garment, two relative captions, a target garment.

    Training uses the triplets of ``captions/cap.<category>.train.json`` of the three
    categories together (as ComposeAE), or of one ``category``. The text of a triplet is
    ComposeAE's join of its two captions, "<category> <caption 1> and it <caption 2>",
    lower-cased. The test split is the *validation* split (the test targets were never released):
    its queries are the val triplets, and each category is ranked against its own gallery, every
    image of ``image_splits/split.<category>.val.json`` (the original FashionIQ protocol), with
    hits judged by image id. ``evaluation_groups()`` gives one group per category; the papers
    report R@10 and R@50 per category and their mean.
    """

    LAYOUT = (
        "  <path>/captions/cap.<category>.<train|val>.json   (lists of {'candidate': id, "
        "'target': id, 'captions': [text, text]})\n"
        "  <path>/image_splits/split.<category>.<train|val>.json   (lists of image ids)\n"
        "  <path>/images/<image id>.png\n"
        "  with <category> in dress, shirt, toptee"
    )
    recall_ks = (10, 50)
    SPLITS = ("train", "val", "test")
    exclude_source_in_test = False  # the public FashionIQ code ranks the reference image too

    def __init__(self, path, split="train", transform=None, *, category="all", **kwargs):
        if category != "all" and category not in FASHIONIQ_CATEGORIES:
            raise ValueError(
                f"FashionIQ category must be 'all' or one of {FASHIONIQ_CATEGORIES}, "
                f"got {category!r}"
            )
        self.category = category
        super().__init__(path, split, transform, **kwargs)

    @property
    def categories(self) -> tuple[str, ...]:
        return FASHIONIQ_CATEGORIES if self.category == "all" else (self.category,)

    def _build(self):
        images_dir = os.path.join(self.path, "images")
        if not os.path.isdir(images_dir):
            raise FileNotFoundError(
                f"FashionIQ images not found: {images_dir} is not a folder. "
                f"Expected layout:\n{self.LAYOUT}"
            )
        file_split = "train" if self.split == "train" else "val"
        self.category_img_ids: dict[str, list[int]] = {}
        self.triplets: list[dict] = []
        for category in self.categories:
            split_file = os.path.join(
                self.path, "image_splits", f"split.{category}.{file_split}.json"
            )
            ids = _read_json(split_file, self.LAYOUT)
            if not isinstance(ids, list):
                raise DatasetFormatError(f"{split_file}: expected a list of image ids")
            row: dict[str, int] = {}
            for k, image_id in enumerate(ids):
                _check_image_id(image_id, f"{split_file}: entry {k}")
                if image_id not in row:
                    row[image_id] = len(self.imgs)
                    self.imgs.append(
                        {"asin": image_id, "category": category, "captions": [image_id]}
                    )
            self.category_img_ids[category] = list(row.values())
            caption_file = os.path.join(self.path, "captions", f"cap.{category}.{file_split}.json")
            entries = _read_json(caption_file, self.LAYOUT)
            if not isinstance(entries, list):
                raise DatasetFormatError(f"{caption_file}: expected a list of triplets")
            for k, entry in enumerate(entries):
                where = f"{caption_file}: entry {k}"
                if (
                    not isinstance(entry, dict)
                    or not isinstance(entry.get("captions"), list)
                    or not entry["captions"]
                    or not all(isinstance(c, str) for c in entry["captions"])
                ):
                    raise DatasetFormatError(
                        f"{where}: expected {{'candidate': id, 'target': id, 'captions': "
                        f"[text, text]}}, got {str(entry)[:200]}"
                    )
                ids = []
                for key in ("candidate", "target"):
                    image_id = _check_image_id(entry.get(key), f"{where} ('{key}')")
                    if image_id not in row:
                        raise DatasetFormatError(
                            f"{where}: the {key} image {image_id!r} is not in {split_file}"
                        )
                    ids.append(row[image_id])
                text = f"{category} " + " and it ".join(c.strip() for c in entry["captions"])
                self.triplets.append(
                    {
                        "source_img_id": ids[0],
                        "target_img_id": ids[1],
                        "target_caption": entry["target"],
                        "category": category,
                        "captions": list(entry["captions"]),
                        "mod": {"str": text.lower()},
                    }
                )
        if not self.triplets:
            raise DatasetFormatError(
                f"{self.path}/captions: no {file_split} triplets for {', '.join(self.categories)}"
            )
        if self.split != "train":
            self.test_queries = [dict(t, mod=dict(t["mod"])) for t in self.triplets]

    def image_path(self, idx):
        base = os.path.join(self.path, "images", self.imgs[idx]["asin"])
        # The common release has PNGs; ComposeAE's copy had JPEGs.
        if not os.path.exists(base + ".png") and os.path.exists(base + ".jpg"):
            return base + ".jpg"
        return base + ".png"

    def complete_text(self, query):
        return query["mod"]["str"]  # FashionIQ has no target description: the captions are all

    def get_all_texts(self):
        return [t["mod"]["str"] for t in self.triplets]

    def distinct_training_query_count(self):
        return len(self.triplets)

    def distinct_training_query(self, j, rng):
        return self._triplet_query(self.triplets[j])

    def training_query(self, rng, index):
        rng = _independent_rng(rng, index)  # the triplets are independent (shuffled in ComposeAE)
        return self._triplet_query(rng.choice(self.triplets))

    def _triplet_query(self, t: dict) -> dict:
        return {
            "source_img_id": t["source_img_id"],
            "target_img_id": t["target_img_id"],
            "target_caption": t["target_caption"],
            "category": t["category"],
            "mod": dict(t["mod"]),
        }

    def evaluation_groups(self) -> list[dict]:
        """One group per category: its val queries against every image of its val split."""
        return [
            {
                "name": category,
                "queries": [q for q in self.test_queries if q["category"] == category],
                "gallery_ids": self.category_img_ids[category],
            }
            for category in self.categories
        ]


DATASETS = {
    "css3d": CSSDataset,
    "mitstates": MITStates,
    "fashion200k": Fashion200k,
    "fashioniq": FashionIQ,
}


def describe(dataset: BaseDataset) -> str:
    kind = "SYNTHETIC stand-in" if dataset.synthetic else "real data"
    if hasattr(dataset, "test_queries"):
        size = f"{len(dataset.imgs)} images, {len(dataset.test_queries)} queries"
    elif hasattr(dataset, "captions"):  # precomputed region features
        size = f"{dataset.n_images} images, {len(dataset.captions)} captions"
    else:
        size = f"{len(dataset)} images"
    return f"{type(dataset).__name__}[{dataset.split}] ({kind}) at {dataset.path}: {size}"


# ============================================================================================
# Learning to hash (issue 17): class-labelled image sets for image-to-image retrieval.
#
# Each image has one class; the test split holds the queries and the training split is the
# database (the protocol of CUB-200-2011 / Stanford Dogs hashing papers). The classes reuse
# ImageFileDataset's hardened reading: images decoded by ``load_rgb_image`` (bombs refused,
# truncation detected), unusable images skipped and counted (``--on_bad_image``), paths from
# label files refused when they leave the dataset root (``_check_relative_path``).
# ============================================================================================

HASHING_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
HASHING_SYNTHETIC_GENERATOR = "hashing_synthetic"


def collate_labelled_images(items: list[dict]) -> dict:
    """Batch ``{image_id, image, label}`` items: ``images`` (B, 3, H, W) uint8, ``labels`` (B,)
    int64, ``image_ids`` (B,) int64."""
    return {
        "images": torch.stack([it["image"] for it in items]),
        "labels": torch.tensor([it["label"] for it in items], dtype=torch.int64),
        "image_ids": torch.tensor([it["image_id"] for it in items], dtype=torch.int64),
    }


class ClassImageDataset(ImageFileDataset):
    """Images with one class each (``self.imgs[i] = {file_path, label, captions: [class name]}``).

    Indexing:
    - by default ``dataset[i]`` is image i: ``{image_id, image, label}`` (an unusable image is a
      mean-grey placeholder, as at evaluation elsewhere);
    - after ``use_class_balanced_batches(batch_size, classes_per_batch)``, ``dataset[index]`` is
      a training item drawn as a pure function of ``(seed, index)``: batch ``index //
      batch_size`` holds ``classes_per_batch`` classes with an equal share of images each (the
      first ``batch_size % classes_per_batch`` classes get one more), drawn without replacement
      from each class when it has enough images. An unusable image is redrawn from the same
      class, deterministically, so the balance holds.

    ``labels`` are 0-based class numbers, consistent between the splits of one dataset.
    """

    collate_fn = staticmethod(collate_labelled_images)

    def __init__(self, path: str, split: str = "train", transform=None, **options):
        self.class_names: list[str] = []
        self.batch_size = 0
        self.classes_per_batch = 0
        super().__init__(path, split, transform, **options)
        self.labels = [img["label"] for img in self.imgs]
        self.class_to_img_ids: dict[int, list[int]] = {}
        for i, label in enumerate(self.labels):
            self.class_to_img_ids.setdefault(label, []).append(i)
        if split == "test":  # every test image is a query (TIRG's interface)
            self.test_queries = [
                {"source_img_id": i, "target_caption": img["captions"][0], "mod": {"str": ""}}
                for i, img in enumerate(self.imgs)
            ]

    def _add_image(self, file_path: str, label: int) -> None:
        self.imgs.append(
            {"file_path": file_path, "label": int(label), "captions": [self.class_names[label]]}
        )

    def image_path(self, idx: int) -> str:
        return self.imgs[idx]["file_path"]

    def get_all_texts(self) -> list[str]:
        return list(self.class_names)

    # ----------------------------------------------------------------- sampling

    def use_class_balanced_batches(self, batch_size: int, classes_per_batch: int) -> None:
        """Switch ``__getitem__`` to class-balanced training batches (see the class docstring)."""
        eligible = [c for c, ids in self.class_to_img_ids.items() if len(ids) >= 2]
        if batch_size < 2 or not 2 <= classes_per_batch <= batch_size:
            raise ValueError(
                f"class-balanced batches need batch_size >= 2 and 2 <= classes_per_batch <= "
                f"batch_size (a triplet needs two classes and two images of one), got "
                f"batch_size={batch_size}, classes_per_batch={classes_per_batch}"
            )
        if len(eligible) < classes_per_batch:
            raise DatasetFormatError(
                f"{self.path}: the {self.split} split has {len(eligible)} classes with at least "
                f"two images, fewer than --classes_per_batch {classes_per_batch}"
            )
        self._eligible_classes = sorted(eligible)
        self.batch_size = int(batch_size)
        self.classes_per_batch = int(classes_per_batch)

    def batch_plan(self, batch: int, seed=None) -> list[tuple[int, int]]:
        """The (class, image id) of every position of training batch ``batch``."""
        seed = self.seed if seed is None else seed
        rng = random.Random(f"{seed}:hash-batch:{batch}")
        classes = rng.sample(self._eligible_classes, self.classes_per_batch)
        share, extra = divmod(self.batch_size, self.classes_per_batch)
        plan = []
        for k, c in enumerate(classes):
            ids = self.class_to_img_ids[c]
            count = share + (k < extra)
            if count <= len(ids):
                chosen = rng.sample(ids, count)
            else:  # a small class repeats images rather than leaving the batch short
                chosen = [rng.choice(ids) for _ in range(count)]
            plan += [(c, i) for i in chosen]
        return plan

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not self.batch_size:
            return {"image_id": index, "image": self.get_img(index), "label": self.labels[index]}
        label, img_id = self.batch_plan(index // self.batch_size)[index % self.batch_size]
        ids = self.class_to_img_ids[label]
        for attempt in range(MAX_QUERY_ATTEMPTS):
            if attempt:
                img_id = random.Random(f"{self.seed}:hash-retry:{index}:{attempt}").choice(ids)
            image = self._decode(img_id)
            if image is not None:
                return {"image_id": img_id, "image": image, "label": label}
        raise BadImageError(
            f"{self.path}: {MAX_QUERY_ATTEMPTS} images of class {self.class_names[label]!r} "
            f"drawn for training index {index} were all unusable ({self.bad_image_count()} found "
            f"so far); the image files look broken on a large scale"
        )

    def __len__(self) -> int:
        return len(self.imgs)


def _read_id_table(path: str, layout: str, n_fields: int = 2) -> list[tuple[int, list[str], str]]:
    """Lines ``<id> <field> ...`` of a CUB text file -> [(id, fields, 'file:line')]."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found. Expected layout:\n{layout}")
    rows, seen = [], {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            fields = line.split(None, n_fields - 1) if n_fields > 1 else line.split()
            fields = [x.strip() for x in fields]
            if len(fields) != n_fields or not fields[0].isdigit():
                raise DatasetFormatError(
                    f"{where}: expected '<integer id> <value>', got {line.rstrip()!r}"
                )
            image_id = int(fields[0])
            if image_id in seen:
                raise DatasetFormatError(
                    f"{where}: id {image_id} already given at line {seen[image_id]}"
                )
            seen[image_id] = lineno
            rows.append((image_id, fields[1:], where))
    return rows


class CUB200(ClassImageDataset):
    """CUB-200-2011 (Wah et al.): 11,788 bird photos of 200 species, 5,994 train / 5,794 test
    (``train_test_split.txt``). Class numbers in ``image_class_labels.txt`` are 1-based ids of
    ``classes.txt``."""

    LAYOUT = (
        "  <path>/images.txt               <image id> <relative path>\n"
        "  <path>/train_test_split.txt     <image id> <1: train, 0: test>\n"
        "  <path>/image_class_labels.txt   <image id> <class id>\n"
        "  <path>/classes.txt              <class id> <class name>\n"
        "  <path>/images/<class>/<file>.jpg   (CUB_200_2011.tgz, extracted)"
    )

    def _build(self):
        root = self.path
        classes = _read_id_table(os.path.join(root, "classes.txt"), self.LAYOUT)
        class_ids = sorted(cid for cid, _, _ in classes)
        class_index = {cid: k for k, cid in enumerate(class_ids)}
        names = {cid: fields[0] for cid, fields, _ in classes}
        self.class_names = [names[cid] for cid in class_ids]
        paths = _read_id_table(os.path.join(root, "images.txt"), self.LAYOUT)
        split_file = os.path.join(root, "train_test_split.txt")
        splits = {i: (f[0], w) for i, f, w in _read_id_table(split_file, self.LAYOUT)}
        labels_file = os.path.join(root, "image_class_labels.txt")
        labels = {i: (f[0], w) for i, f, w in _read_id_table(labels_file, self.LAYOUT)}
        want = "1" if self.split == "train" else "0"
        for image_id, (rel,), where in paths:
            if image_id not in splits:
                raise DatasetFormatError(f"{where}: image id {image_id} is not in {split_file}")
            if image_id not in labels:
                raise DatasetFormatError(f"{where}: image id {image_id} is not in {labels_file}")
            is_train, split_where = splits[image_id]
            if is_train not in ("0", "1"):
                raise DatasetFormatError(
                    f"{split_where}: expected is_train 1 (train) or 0 (test), got {is_train!r}"
                )
            label, label_where = labels[image_id]
            if not label.isdigit() or int(label) not in class_index:
                raise DatasetFormatError(
                    f"{label_where}: class {label!r} is not a class id of "
                    f"{os.path.join(root, 'classes.txt')} (ids {class_ids[0]}..{class_ids[-1]})"
                )
            if is_train != want:
                continue
            rel = _check_relative_path(rel, where)
            self._add_image(os.path.join(root, "images", rel), class_index[int(label)])
        if not self.imgs:
            raise DatasetFormatError(f"{split_file}: no {self.split} images listed")


def _load_mat(path: str, layout: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found. Expected layout:\n{layout}")
    import scipy.io  # only the Stanford Dogs lists need it

    try:
        return scipy.io.loadmat(path)
    except Exception as e:  # scipy raises ValueError, TypeError, MatReadError, ... on bad files
        raise DatasetFormatError(
            f"{path}: cannot read it as a MATLAB .mat file ({type(e).__name__}: {e})"
        ) from None


def _mat_string(cell) -> str | None:
    """A MATLAB cell holding one string, as ``loadmat`` gives it (nested object arrays)."""
    value = cell
    for _ in range(4):
        if isinstance(value, str):
            return value
        if isinstance(value, np.ndarray) and value.size == 1:
            value = value.reshape(-1)[0]
        else:
            return None
    return value if isinstance(value, str) else None


class StanfordDogs(ClassImageDataset):
    """Stanford Dogs (Khosla et al.): 20,580 photos of 120 breeds, 12,000 train / 8,580 test.
    The lists are ``lists/{train,test}_list.mat`` (or the same files at the root, as lists.tar
    extracts them) with ``file_list`` (cells of paths relative to ``Images/``) and 1-based
    ``labels``. The classes are the breed folders of ``Images/``, in sorted order."""

    LAYOUT = (
        "  <path>/Images/<wnid>-<breed>/*.jpg   (images.tar, extracted)\n"
        "  <path>/lists/train_list.mat, <path>/lists/test_list.mat   (lists.tar: 'file_list' "
        "cells of paths relative to Images/, 1-based 'labels'; also accepted at <path>/)"
    )

    def _build(self):
        images_dir = os.path.join(self.path, "Images")
        if not os.path.isdir(images_dir):
            raise FileNotFoundError(
                f"{images_dir} is not a folder. Expected layout:\n{self.LAYOUT}"
            )
        self.class_names = sorted(
            d for d in os.listdir(images_dir) if os.path.isdir(os.path.join(images_dir, d))
        )
        n_classes = len(self.class_names)
        name = f"{self.split}_list.mat"
        mat_path = os.path.join(self.path, "lists", name)
        if not os.path.isfile(mat_path) and os.path.isfile(os.path.join(self.path, name)):
            mat_path = os.path.join(self.path, name)
        mat = _load_mat(mat_path, self.LAYOUT)
        if "file_list" not in mat or "labels" not in mat:
            raise DatasetFormatError(
                f"{mat_path}: expected the variables 'file_list' and 'labels', found "
                f"{sorted(k for k in mat if not k.startswith('__'))}"
            )
        files = np.asarray(mat["file_list"], dtype=object).reshape(-1)
        labels = np.asarray(mat["labels"]).reshape(-1)
        if len(files) != len(labels):
            raise DatasetFormatError(
                f"{mat_path}: {len(files)} entries in 'file_list' but {len(labels)} 'labels'"
            )
        for k, (cell, label) in enumerate(zip(files, labels)):
            where = f"{mat_path}: entry {k + 1}"
            rel = _mat_string(cell)
            if rel is None:
                raise DatasetFormatError(f"{where}: 'file_list' holds {cell!r}, not a path string")
            rel = _check_relative_path(rel, where)
            try:
                number = float(label)
            except (TypeError, ValueError):
                number = float("nan")
            if not (1 <= number <= n_classes and number == int(number)):  # NaN fails too
                raise DatasetFormatError(
                    f"{where} ({rel}): label {label!r} is out of range; labels are 1-based "
                    f"class numbers in 1..{n_classes}, one per breed folder of {images_dir}"
                )
            self._add_image(os.path.join(images_dir, rel), int(number) - 1)
        if not self.imgs:
            raise DatasetFormatError(f"{mat_path}: 'file_list' is empty")


class ImageFolderClasses(ClassImageDataset):
    """Any class-labelled set as ``train/<class>/*`` and ``test/<class>/*``. Class numbers come
    from the sorted class folder names of both splits together, so they agree between splits.
    Files whose real path leaves the dataset root (symbolic links) are refused."""

    LAYOUT = (
        "  <path>/train/<class name>/<image>.{jpg,png,...}\n"
        "  <path>/test/<class name>/<image>.{jpg,png,...}"
    )

    def _build(self):
        root_real = os.path.realpath(self.path)
        folders = {}
        for split in self.SPLITS:
            split_dir = os.path.join(self.path, split)
            if not os.path.isdir(split_dir):
                raise FileNotFoundError(
                    f"{split_dir} is not a folder. Expected layout:\n{self.LAYOUT}"
                )
            folders[split] = sorted(
                d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d))
            )
        self.class_names = sorted(set(folders["train"]) | set(folders["test"]))
        class_index = {name: k for k, name in enumerate(self.class_names)}
        split_dir = os.path.join(self.path, self.split)
        for name in folders[self.split]:
            class_dir = os.path.join(split_dir, name)
            for file in sorted(os.listdir(class_dir)):
                full = os.path.join(class_dir, file)
                if not file.lower().endswith(HASHING_IMAGE_EXTENSIONS):
                    continue
                real = os.path.realpath(full)
                if os.path.commonpath([root_real, real]) != root_real:
                    raise DatasetFormatError(
                        f"{full}: refusing an image whose real path {real} is outside the "
                        f"dataset root {root_real}"
                    )
                self._add_image(full, class_index[name])
        if not self.imgs:
            raise DatasetFormatError(
                f"{split_dir}: no images ({', '.join(HASHING_IMAGE_EXTENSIONS)}) in its class "
                f"folders. Expected layout:\n{self.LAYOUT}"
            )


#: (shape, colour) of the main object of each synthetic class, in class order.
HASHING_SYNTHETIC_CLASSES = tuple(
    (shape, color) for color in css_generator.COLORS for shape in css_generator.SHAPES
)[:20]


def _render_hashing_image(rng: np.random.Generator, shape: str, color: str, size: int):
    """A (size, size, 3) uint8 scene: 1-3 small clutter objects drawn with css_generator's 2D
    renderer, then the class's large main object (half-width 9-13 px at 64 px, random centre)."""
    clutter = []
    for _ in range(int(rng.integers(1, 4))):
        clutter.append(
            {
                "shape": css_generator.SHAPES[int(rng.integers(len(css_generator.SHAPES)))],
                "color": list(css_generator.COLORS)[int(rng.integers(len(css_generator.COLORS)))],
                "size": "small",
                "pos": (float(rng.uniform(0.08, 0.92)), float(rng.uniform(0.08, 0.92))),
            }
        )
    img = css_generator.render_2d(clutter, size=size)
    half = float(rng.uniform(9.0, 13.0)) * size / 64.0
    y, x = (float(v) * size for v in rng.uniform(0.3, 0.7, size=2))
    row0, col0, mask = css_generator._shape_footprint(shape, y, x, half)
    window, mask = css_generator._clip(row0, col0, mask, size)
    if window is not None:
        img[window][mask] = css_generator.COLORS[color]
    return img


def generate_hashing_synthetic(
    out_dir: str, seed: int = 0, train_per_class: int = 64, test_per_class: int = 20, size: int = 64
) -> dict:
    """Write the synthetic class-labelled stand-in in the ``image_folder`` layout and return its
    ``SYNTHETIC.json`` content.

    20 classes, each a (shape, colour) of a large main object (``HASHING_SYNTHETIC_CLASSES``), at
    a random position and size with 1-3 small clutter objects, PNG, ``size`` x ``size``. The same
    arguments give byte-identical files. The folder is written under a temporary name and renamed
    into place, so a reader never sees half of it; when another process got there first its copy
    is kept.
    """
    import shutil
    import tempfile

    out_dir = os.path.abspath(out_dir)
    meta = {
        "synthetic": True,
        "generator": HASHING_SYNTHETIC_GENERATOR,
        "seed": int(seed),
        "classes": [f"{shape}_{color}" for shape, color in HASHING_SYNTHETIC_CLASSES],
        "train_per_class": int(train_per_class),
        "test_per_class": int(test_per_class),
        "image_size": int(size),
    }
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(out_dir) + ".")
    try:
        for split_no, (split, count) in enumerate(
            (("train", train_per_class), ("test", test_per_class))
        ):
            for c, (shape, color) in enumerate(HASHING_SYNTHETIC_CLASSES):
                class_dir = os.path.join(tmp, split, f"{c:02d}_{shape}_{color}")
                os.makedirs(class_dir)
                for i in range(count):
                    rng = np.random.default_rng([int(seed), split_no, c, i])
                    pixels = _render_hashing_image(rng, shape, color, size)
                    PIL.Image.fromarray(pixels).save(os.path.join(class_dir, f"{i:05d}.png"))
        with open(os.path.join(tmp, SYNTHETIC_MARKER), "w", encoding="utf-8") as f:
            f.write(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not os.path.isfile(os.path.join(out_dir, SYNTHETIC_MARKER)):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return meta


class HashingSynthetic(ImageFolderClasses):
    """The synthetic stand-in, read by the image_folder loader; ``synthetic`` is True when the
    folder carries ``SYNTHETIC.json``."""

    def _build(self):
        super()._build()
        self.synthetic = os.path.isfile(os.path.join(self.path, SYNTHETIC_MARKER))


HASHING_DATASETS = {
    "cub200": CUB200,
    "stanford_dogs": StanfordDogs,
    "image_folder": HashingSynthetic,
    "hashing_synthetic": HashingSynthetic,
}


# ===================================================================================== ESA
# Image-text matching on precomputed region features (issue 16). Everything below this line
# belongs to the ESA task (esa.py); nothing above depends on it.
#
# Layout (SCAN / VSE-infinity), for --dataset f30k_precomp and coco_precomp:
#   <path>/precomp/{split}_ims.npy   float (N, R, D), R = 36 and D = 2048 for the BUTD features;
#                                    read with np.load(mmap_mode="r"), never unpickled
#   <path>/precomp/{split}_caps.txt  one caption per line, captions_per_image consecutive lines
#                                    per image (5; 1 when the counts are equal)
# Splits: train, dev, test, and for COCO testall (5-fold 1K and 5K).

import re  # noqa: E402  (this section is appended; the imports above are left untouched)

from css_generator import _write_atomic  # noqa: E402

PRECOMP_SPLITS = {
    "f30k_precomp": ("train", "dev", "test"),
    "coco_precomp": ("train", "dev", "test", "testall"),
}
#: The split each dataset is tested on (ESA's eval.py): Flickr30K's 1K test, COCO's testall.
PRECOMP_TEST_SPLIT = {"f30k_precomp": "test", "coco_precomp": "testall"}
PRECOMP_LAYOUT = (
    "  <path>/precomp/{split}_ims.npy   float32 (N, 36, 2048) region features\n"
    "  <path>/precomp/{split}_caps.txt  5 captions per image, one per line (or 1 per image)"
)
CAPTION_SPECIAL_TOKENS = ("<pad>", "<start>", "<end>", "<unk>", "<mask>")
_CAPTION_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def tokenize_caption(text: str) -> list[str]:
    """Lower-case words and punctuation marks, each a token ("top-left." -> top - left .).

    Our stand-in for SCAN's nltk word_tokenize (no download); digits count as word letters."""
    return _CAPTION_TOKEN.findall(text.lower())


class CaptionVocab:
    """Word <-> id map for the BiGRU, built from the training captions.

    Ids 0..4 are ``<pad> <start> <end> <unk> <mask>`` (``<pad>`` = 0 pads batches); the words
    follow in sorted order, so the vocabulary is a function of the training captions alone.
    Words seen fewer than ``min_count`` times map to ``<unk>`` (SCAN's vocabularies use 4).
    """

    def __init__(self, words: list[str]):
        self.words = list(CAPTION_SPECIAL_TOKENS) + [
            w for w in words if w not in CAPTION_SPECIAL_TOKENS
        ]
        self.word2id = {w: i for i, w in enumerate(self.words)}
        self.pad_id, self.start_id, self.end_id, self.unk_id, self.mask_id = range(5)
        self.n_special = len(CAPTION_SPECIAL_TOKENS)

    @classmethod
    def from_captions(cls, captions, min_count: int = 1) -> CaptionVocab:
        counts: dict[str, int] = {}
        for caption in captions:
            for word in tokenize_caption(caption):
                counts[word] = counts.get(word, 0) + 1
        return cls(sorted(w for w, c in counts.items() if c >= min_count))

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        """``<start>`` word ids ``<end>`` (unknown words -> ``<unk>``), as SCAN/ESA encode."""
        ids = [self.word2id.get(w, self.unk_id) for w in tokenize_caption(text)]
        return [self.start_id, *ids, self.end_id]


def load_word_vectors(
    path: str, vocab: CaptionVocab, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a GloVe text file (``word v_1 ... v_dim`` per line) for the vocabulary's words.

    Returns ``(vectors (len(vocab), dim), found (len(vocab),) bool)``; rows of words not in the
    file are zero, and the caller keeps its own initialisation there. A word missing from the file
    is looked up again without ``- . '`` and before a ``/``, as ESA does. A line with a wrong
    number of values is an error naming ``path:line``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--word_vectors {path} not found: expected a GloVe text file, one 'word v_1 ... "
            f"v_{dim}' line per word"
        )
    table: dict[str, np.ndarray] = {}
    wanted = set(vocab.words)
    wanted |= {_glove_fallback(w) for w in vocab.words}
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for line_no, line in enumerate(f, 1):
                parts = line.rstrip("\n").rstrip(" ").split(" ")
                if len(parts) == 2 and line_no == 1 and all(p.isdigit() for p in parts):
                    continue  # a word2vec-style "count dim" header
                if len(parts) < dim + 1:
                    raise DatasetFormatError(
                        f"{path}:{line_no}: expected a word and {dim} numbers (--word_dim), "
                        f"found {len(parts)} fields"
                    )
                word = " ".join(parts[:-dim])
                if word not in wanted or word in table:
                    continue
                try:
                    table[word] = np.asarray(parts[-dim:], dtype=np.float32)
                except ValueError:
                    raise DatasetFormatError(
                        f"{path}:{line_no}: the {dim} values after {word!r} are not all numbers"
                    ) from None
        except UnicodeDecodeError as e:
            raise DatasetFormatError(f"{path}: not UTF-8 text ({e})") from None
    vectors = torch.zeros(len(vocab), dim)
    found = torch.zeros(len(vocab), dtype=torch.bool)
    for i, word in enumerate(vocab.words):
        row = table.get(word, table.get(_glove_fallback(word)))
        if row is not None:
            vectors[i] = torch.from_numpy(row)
            found[i] = True
    return vectors, found


def _glove_fallback(word: str) -> str:
    word = word.replace("-", "").replace(".", "").replace("'", "")
    return word.split("/")[0] if "/" in word else word


def _open_region_features(path: str) -> np.ndarray:
    """(N, R, D) float region features, memory-mapped; object or pickled files are refused."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found. Expected layout:\n{PRECOMP_LAYOUT}")
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        except ValueError as e:
            raise DatasetFormatError(
                f"{path}: not a .npy array file ({e}); expected float32 (N, 36, 2048) region "
                f"features"
            ) from None
    if dtype.hasobject or dtype.kind != "f":
        raise DatasetFormatError(
            f"{path}: holds {dtype} data (a pickled or object array is never loaded); expected "
            f"float32 (N, 36, 2048) region features"
        )
    if len(shape) != 3 or 0 in shape:
        raise DatasetFormatError(
            f"{path}: region features of shape {tuple(shape)}; expected (N images, regions, "
            f"feature dim), e.g. (N, 36, 2048)"
        )
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _read_captions(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found. Expected layout:\n{PRECOMP_LAYOUT}")
    captions = []
    with open(path, encoding="utf-8") as f:
        try:
            for line_no, line in enumerate(f, 1):
                caption = line.strip()
                if not tokenize_caption(caption):
                    raise DatasetFormatError(
                        f"{path}:{line_no}: empty caption; expected one caption per line"
                    )
                captions.append(caption)
        except UnicodeDecodeError as e:
            raise DatasetFormatError(f"{path}: not UTF-8 text ({e})") from None
    return captions


class PrecompDataset(torch.utils.data.Dataset):
    """One split of precomputed region features and captions (SCAN / VSE-infinity layout).

    ``images`` is the memory-mapped (N, R, D) array, ``captions`` the caption strings; caption j
    belongs to image ``j // captions_per_image``. ``vocab`` (a ``CaptionVocab``) defaults to the
    one built from this split's captions: pass the training split's to the others.

    As a training set, item ``index`` is a pure function of ``(seed, index)``: epoch
    ``e = index // n_captions`` visits every caption once in the order of a permutation drawn
    from ``(seed, e)`` (ESA's shuffled loader over captions), and the item says which epoch
    (``index / n_captions``) it belongs to, for SEL's warm-up.
    """

    synthetic = False

    def __init__(
        self,
        path: str,
        split: str = "train",
        transform=None,
        *,
        vocab: CaptionVocab | None = None,
        vocab_min_count: int = 1,
        seed: int = 0,
        feature_shape: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.path, self.split, self.transform, self.seed = path, split, transform, seed
        root = os.path.join(path, "precomp")
        ims_file = os.path.join(root, f"{split}_ims.npy")
        caps_file = os.path.join(root, f"{split}_caps.txt")
        self.images = _open_region_features(ims_file)
        if feature_shape is not None and tuple(self.images.shape[1:]) != tuple(feature_shape):
            raise DatasetFormatError(
                f"{ims_file}: regions of shape {tuple(self.images.shape[1:])}, but the training "
                f"split's are {tuple(feature_shape)}; every split must have the same (R, D)"
            )
        self.captions = _read_captions(caps_file)
        n_images, n_captions = len(self.images), len(self.captions)
        if n_captions == n_images:
            self.captions_per_image = 1
        elif n_captions == 5 * n_images:
            self.captions_per_image = 5
        else:
            raise DatasetFormatError(
                f"{caps_file}: {n_captions} captions for the {n_images} images of {ims_file}; "
                f"expected 5 consecutive captions per image ({5 * n_images} lines) or one each"
            )
        self.synthetic = os.path.isfile(os.path.join(path, SYNTHETIC_MARKER))
        self.vocab = vocab or CaptionVocab.from_captions(self.captions, vocab_min_count)
        self._permutation: tuple[int, np.ndarray] | None = None

    # --------------------------------------------------------------- sizes and features
    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def n_regions(self) -> int:
        return int(self.images.shape[1])

    @property
    def feature_dim(self) -> int:
        return int(self.images.shape[2])

    def region_features(self, image_ids) -> torch.Tensor:
        """(len(image_ids), R, D) float32 tensor of the given images (sorted reads of the map)."""
        ids = np.asarray(image_ids, dtype=np.int64)
        return torch.from_numpy(np.asarray(self.images[ids], dtype=np.float32))

    def get_all_texts(self) -> list[str]:
        return self.captions

    # --------------------------------------------------------------- training items
    def caption_order(self, epoch: int) -> np.ndarray:
        if self._permutation is None or self._permutation[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._permutation = (epoch, rng.permutation(len(self.captions)))
        return self._permutation[1]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict:
        n = len(self.captions)
        epoch, position = divmod(int(index), n)
        caption_id = int(self.caption_order(epoch)[position])
        image_id = caption_id // self.captions_per_image
        caption = self.captions[caption_id]
        return {
            "regions": torch.from_numpy(np.array(self.images[image_id], dtype=np.float32)),
            "tokens": self.vocab.encode(caption),
            "caption": caption,
            "image_id": image_id,
            "caption_id": caption_id,
            "epoch": int(index) / n,
        }

    @staticmethod
    def collate_fn(items: list[dict]) -> dict:
        """regions (B, R, D); tokens (B, T) padded with ``<pad>`` = 0; lengths (B,)."""
        lengths = torch.tensor([len(it["tokens"]) for it in items])
        tokens = torch.zeros(len(items), int(lengths.max()), dtype=torch.long)
        for row, it in enumerate(items):
            tokens[row, : len(it["tokens"])] = torch.tensor(it["tokens"])
        return {
            "regions": torch.stack([it["regions"] for it in items]),
            "tokens": tokens,
            "lengths": lengths,
            "captions": [it["caption"] for it in items],
            "image_ids": torch.tensor([it["image_id"] for it in items]),
            "caption_ids": torch.tensor([it["caption_id"] for it in items]),
            "epoch": min(it["epoch"] for it in items),
        }


def load_precomp(
    name: str,
    path: str,
    splits,
    *,
    seed: int = 0,
    vocab_min_count: int = 1,
) -> dict[str, PrecompDataset]:
    """The named splits of ``name`` (f30k_precomp or coco_precomp) at ``path``; the vocabulary
    is built from the training captions, and every split must match the training (R, D)."""
    allowed = PRECOMP_SPLITS[name]
    for split in splits:
        if split not in allowed:
            raise ValueError(f"{name} has the splits {', '.join(allowed)}; not {split!r}")
    train = PrecompDataset(path, "train", seed=seed, vocab_min_count=vocab_min_count)
    out = {"train": train}
    for split in splits:
        if split != "train":
            out[split] = PrecompDataset(
                path,
                split,
                vocab=train.vocab,
                seed=seed,
                feature_shape=train.images.shape[1:],
            )
    return out


# ----------------------------------------------------------------- the synthetic stand-in

#: Images per split of the generated stand-in (f30k: train/dev/test; coco adds testall).
PRECOMP_SYNTHETIC_SIZES = {
    "full": {"train": 2000, "dev": 200, "test": 500, "testall": 1000},
    "small": {"train": 60, "dev": 10, "test": 20, "testall": 40},
}
_SYNTH_ATTRS = 3 + 8 + 2 + 3 + 3 + 2  # one-hot shape, colour, size, row, column; (y, x)


def _synthetic_scene(rng: random.Random):
    """2-5 CSS objects (shape, colour, size, row, column, y, x), each in its own cell."""
    from css_generator import CELL_CENTRES, COLORS, POS_JITTER, SHAPES, SIZES

    cells = rng.sample(range(9), rng.randint(2, 5))
    objects = []
    for cell in cells:
        row, col = divmod(cell, 3)
        objects.append(
            (
                rng.randrange(len(SHAPES)),
                rng.randrange(len(COLORS)),
                rng.randrange(len(SIZES)),
                row,
                col,
                CELL_CENTRES[row] + rng.uniform(-POS_JITTER, POS_JITTER),
                CELL_CENTRES[col] + rng.uniform(-POS_JITTER, POS_JITTER),
            )
        )
    return objects


def _synthetic_captions(objects, rng: random.Random) -> list[str]:
    """Five template captions of a scene, differing in word order and in detail."""
    from css_generator import COLORS, COLUMNS, ROWS, SHAPES, SIZES

    colors, sizes = tuple(COLORS), tuple(SIZES)

    def name(o, size=True, color=True):
        words = ([sizes[o[2]]] if size else []) + ([colors[o[1]]] if color else [])
        return " ".join(words + [SHAPES[o[0]]])

    def where(o):
        return f"{ROWS[o[3]]}-{COLUMNS[o[4]]}"

    objs = list(objects)
    reordered = objs[:]
    rng.shuffle(reordered)
    return [
        " and ".join(f"a {name(o)} at {where(o)}" for o in objs) + " .",
        "there is " + " , ".join(f"a {name(o, size=False)}" for o in reversed(objs)) + " .",
        f"{len(objs)} objects : "
        + " ; ".join(f"{name(o, color=False)} in the {ROWS[o[3]]} {COLUMNS[o[4]]}" for o in objs),
        " and ".join(
            f"a {SHAPES[o[0]]} that is {sizes[o[2]]} and {colors[o[1]]}" for o in reordered
        )
        + " .",
        f"a scene of {len(objs)} shapes , with a {name(objs[0])} on the {COLUMNS[objs[0][4]]}",
    ]


def _object_code(o) -> np.ndarray:
    code = np.zeros(_SYNTH_ATTRS, dtype=np.float64)
    code[o[0]] = code[3 + o[1]] = code[11 + o[2]] = code[13 + o[3]] = code[16 + o[4]] = 1.0
    code[19:21] = o[5], o[6]
    return code


def generate_precomp_synthetic(
    out_dir: str,
    name: str = "f30k_precomp",
    seed: int = 0,
    size="full",
    feature_dim: int = 2048,
    n_regions: int = 12,
    noise: float = 0.3,
) -> str:
    """Write a CSS-like stand-in for ``name`` in the precomp layout under ``out_dir``.

    Each image is a scene of 2-5 CSS objects. Its regions are one per object plus background
    regions up to ``n_regions``, in a random order; an object's region is a fixed random
    projection (drawn from ``seed``) of its (shape, colour, size, row, column, y, x) code plus
    Gaussian noise, and a background region the projection of a random code; all through a ReLU,
    like pooled CNN activations. Five template captions per scene. Deterministic: the same
    arguments give the same bytes. Writes ``SYNTHETIC.json`` (the marker that labels results
    synthetic) last, and returns ``out_dir``.
    """
    sizes = PRECOMP_SYNTHETIC_SIZES[size] if isinstance(size, str) else None
    if sizes is None:
        n = int(size)
        sizes = {"train": n, "dev": max(n // 10, 5), "test": max(n // 4, 5)}
        sizes["testall"] = 2 * sizes["test"]
    if n_regions < 5:
        raise ValueError(f"n_regions must be at least 5 (scenes have up to 5 objects): {n_regions}")
    root = os.path.join(out_dir, "precomp")
    os.makedirs(root, exist_ok=True)
    projection_rng = np.random.default_rng([seed, 16])
    projection = projection_rng.standard_normal((_SYNTH_ATTRS, feature_dim)) / np.sqrt(3.0)
    for split_no, split in enumerate(PRECOMP_SPLITS[name]):
        rng = random.Random(f"esa-synthetic:{seed}:{split}")
        noise_rng = np.random.default_rng([seed, split_no])
        n_images = sizes[split]
        features = np.empty((n_images, n_regions, feature_dim), dtype=np.float32)
        captions = []
        for i in range(n_images):
            objects = _synthetic_scene(rng)
            codes = np.zeros((n_regions, _SYNTH_ATTRS))
            for r, o in enumerate(objects):
                codes[r] = _object_code(o)
            codes[len(objects) :] = noise_rng.uniform(
                0, 1, (n_regions - len(objects), _SYNTH_ATTRS)
            )
            codes = codes[noise_rng.permutation(n_regions)]
            regions = codes @ projection + noise * noise_rng.standard_normal(
                (n_regions, feature_dim)
            )
            features[i] = np.maximum(regions, 0.0)
            captions.extend(_synthetic_captions(objects, rng))

        def write_npy(f, features=features):
            np.save(f, features, allow_pickle=False)

        def write_caps(f, captions=captions):
            f.write("".join(c + "\n" for c in captions).encode("utf-8"))

        _write_atomic(os.path.join(root, f"{split}_ims.npy"), write_npy)
        _write_atomic(os.path.join(root, f"{split}_caps.txt"), write_caps)
    marker = {
        "synthetic": True,
        "generator": "datasets.generate_precomp_synthetic",
        "dataset": name,
        "seed": seed,
        "sizes": sizes,
        "feature_dim": feature_dim,
        "n_regions": n_regions,
        "noise": noise,
    }
    _write_atomic(
        os.path.join(out_dir, SYNTHETIC_MARKER),
        lambda f: f.write(json.dumps(marker, indent=1, sort_keys=True).encode()),
    )
    return out_dir


def precomp_synthetic_dir(data_dir: str, name: str, seed: int, size="full") -> str:
    """The stand-in's folder, generated there on first use (a folder without the marker, left by
    an interrupted generation, is generated again)."""
    tag = "" if size == "full" else f"_{size}"
    out_dir = os.path.join(data_dir, f"{name}_synthetic_seed{seed}{tag}")
    if not os.path.isfile(os.path.join(out_dir, SYNTHETIC_MARKER)):
        generate_precomp_synthetic(out_dir, name, seed, size)
    return out_dir


DATASETS_PRECOMP = tuple(PRECOMP_SPLITS)


# ============================================================================================
# Composed retrieval on CLIP (issue 19, clip4cir.py): CIRR and CIRCO in their released JSON
# layouts, CLIP4Cir's TargetPad, and a synthetic CIRR drawn from the CSS generator. The
# loaders reuse BadImagePolicy (skip and count, or fail naming the file) and refuse image
# paths that leave the dataset root.
# ============================================================================================


class ClipImageTransform:
    """PIL image -> (3, size, size) uint8 tensor: CLIP's resize (shorter side, bicubic) and
    centre crop, after CLIP4Cir's TargetPad when ``target_ratio`` is set: an image whose aspect
    ratio exceeds it is padded with black on its shorter sides to that ratio. Normalisation with
    CLIP's mean and std happens per batch on the device (``clip4cir.ClipComposer.normalize``)."""

    def __init__(self, size: int, target_ratio: float | None = None):
        self.size = int(size)
        self.target_ratio = target_ratio
        self.draft_size = self.size

    def pad(self, img: PIL.Image.Image) -> PIL.Image.Image:
        w, h = img.size
        if not self.target_ratio or max(w, h) / min(w, h) < self.target_ratio:
            return img
        side = max(w, h) / self.target_ratio
        hp, vp = max(int((side - w) / 2), 0), max(int((side - h) / 2), 0)
        out = PIL.Image.new("RGB", (w + 2 * hp, h + 2 * vp), (0, 0, 0))
        out.paste(img.convert("RGB"), (hp, vp))
        return out

    def __call__(self, img: PIL.Image.Image) -> torch.Tensor:
        img = self.pad(img.convert("RGB"))
        w, h = img.size
        scale = self.size / min(w, h)
        nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        img = img.resize((nw, nh), PIL.Image.BICUBIC)
        left, top = int(round((nw - self.size) / 2.0)), int(round((nh - self.size) / 2.0))
        img = img.crop((left, top, left + self.size, top + self.size))
        return to_uint8_tensor(img)

    def __repr__(self) -> str:
        return f"ClipImageTransform(size={self.size}, target_ratio={self.target_ratio})"


# ----------------------------------------------------------------------------------- data

CIRR_LAYOUT = (
    "  <path>/captions/cap.rc2.<train|val|test1>.json   (lists of {'pairid', 'reference', "
    "'target_hard', 'caption', 'img_set': {'members': [6 names]}}; test1 without targets)\n"
    "  <path>/image_splits/split.rc2.<train|val|test1>.json   ({name: './dev/...png'})\n"
    "  (or both under <path>/cirr/, as in CIRR's release); image paths relative to <path>"
)
CIRCO_LAYOUT = (
    "  <path>/annotations/<val|test>.json   (lists of {'id', 'reference_img_id', "
    "'relative_caption', 'target_img_id', 'gt_img_ids'}; test without targets)\n"
    "  <path>/COCO2017_unlabeled/annotations/image_info_unlabeled2017.json\n"
    "  <path>/COCO2017_unlabeled/unlabeled2017/<file_name>"
)


class _QueryImages(BadImagePolicy, torch.utils.data.Dataset):
    """Shared by CIRR and CIRCO: ``imgs`` (dicts with ``name`` and ``file``), ``queries``
    (dicts with ``reference``, ``target`` (-1 without), ``caption`` and per dataset more), the
    hardened image reading of BadImagePolicy, and the training items."""

    synthetic = False
    load_images = True

    def image_path(self, idx: int) -> str:
        return os.path.join(self.image_root, self.imgs[idx]["file"])

    def placeholder_size(self):
        return self.transform.size, self.transform.size

    def get_all_texts(self) -> list[str]:
        return [q["caption"] for q in self.queries]

    @property
    def test_queries(self) -> list[dict]:  # what describe counts
        return self.queries

    def __len__(self) -> int:
        return len(self.queries)

    def _epoch_order(self, epoch: int, seed) -> np.ndarray:
        key = (epoch, seed)
        if getattr(self, "_order_key", None) != key:
            digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            self._order, self._order_key = rng.permutation(len(self.queries)), key
        return self._order

    def training_triplet(self, index: int, seed) -> int:
        """The triplet of training item ``index``: epochs of shuffled triplets (a pure function
        of seed and index)."""
        n = len(self.queries)
        return int(self._epoch_order(index // n, seed)[index % n])

    def __getitem__(self, index: int) -> dict:
        for attempt in range(MAX_QUERY_ATTEMPTS):
            seed = self.seed if attempt == 0 else f"{self.seed}/retry{attempt}"
            j = self.training_triplet(index, seed)
            q = self.queries[j]
            item = {"triplet": j, "reference": q["reference"], "target": q["target"]}
            item["caption"] = q["caption"]
            if not self.load_images:
                if self._bad[q["reference"]] or self._bad[q["target"]]:
                    continue
                return item
            reference = self._decode(q["reference"])
            target = self._decode(q["target"]) if reference is not None else None
            if target is None:
                continue
            item["reference_img_data"], item["target_img_data"] = reference, target
            return item
        raise BadImageError(
            f"{self.path}: {MAX_QUERY_ATTEMPTS} training triplets drawn for index "
            f"{index} all touched unusable images"
        )

    @staticmethod
    def collate_fn(items: list[dict]) -> dict:
        batch = {
            key: torch.tensor([it[key] for it in items])
            for key in ("triplet", "reference", "target")
        }
        batch["caption"] = [it["caption"] for it in items]
        for key in ("reference_img_data", "target_img_data"):
            if key in items[0]:
                batch[key] = torch.stack([it[key] for it in items])
        return batch


def _entry_error(where: str, message: str):
    return DatasetFormatError(f"{where}: {message}")


def _cirr_meta_dir(path: str) -> str:
    nested = os.path.join(path, "cirr")
    return nested if os.path.isdir(os.path.join(nested, "captions")) else path


class CIRRDataset(_QueryImages):
    """CIRR (Liu et al., ICCV 2021), release rc2, one split (train, val or test1).

    ``imgs``: every image of ``image_splits/split.rc2.<split>.json`` in file order; ``queries``:
    the triplets of ``captions/cap.rc2.<split>.json`` with ``pairid``, ``reference`` and
    ``target`` (image indices; -1 in test1), ``caption`` and ``members`` (the img_set's images
    other than the reference). Errors name the file and the entry.
    """

    LAYOUT = CIRR_LAYOUT
    SPLITS = ("train", "val", "test1")

    def __init__(
        self, path, split="train", transform=None, *, on_bad_image="skip", load_images=True
    ):
        if split not in self.SPLITS:
            raise ValueError(f"CIRR split must be one of {self.SPLITS}, got {split!r}")
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"CIRR data not found: {path} is not a folder. Expected layout:\n{self.LAYOUT}"
            )
        self.path, self.split, self.transform, self.seed = path, split, transform, 0
        self.load_images = load_images
        self.image_root = path
        self.synthetic = os.path.isfile(os.path.join(path, SYNTHETIC_MARKER))
        meta = _cirr_meta_dir(path)
        split_file = os.path.join(meta, "image_splits", f"split.rc2.{split}.json")
        names = _read_json(split_file, self.LAYOUT)
        if not isinstance(names, dict):
            raise DatasetFormatError(f"{split_file}: expected {{name: relative path}}")
        self.imgs, self.index = [], {}
        for name, rel in names.items():
            where = f"{split_file}: entry {name!r}"
            if not isinstance(rel, str):
                raise _entry_error(where, f"expected a relative path, got {rel!r}")
            self.index[name] = len(self.imgs)
            self.imgs.append({"name": name, "file": _check_relative_path(rel, where)})
        caption_file = os.path.join(meta, "captions", f"cap.rc2.{split}.json")
        entries = _read_json(caption_file, self.LAYOUT)
        if not isinstance(entries, list):
            raise DatasetFormatError(f"{caption_file}: expected a list of triplets")
        self.queries = [
            self._triplet(e, f"{caption_file}: entry {k}", split_file)
            for k, e in enumerate(entries)
        ]
        if not self.queries:
            raise DatasetFormatError(f"{caption_file}: no triplets")
        self._init_bad_images(on_bad_image, MAX_IMAGE_PIXELS)

    def _image(self, name, where, what, split_file) -> int:
        if not isinstance(name, str) or name not in self.index:
            raise _entry_error(where, f"{what} {name!r} is not an image of {split_file}")
        return self.index[name]

    def _triplet(self, entry, where, split_file) -> dict:
        if not isinstance(entry, dict):
            raise _entry_error(where, f"expected a triplet object, got {str(entry)[:100]}")
        if "pairid" in entry:
            where = f"{where} (pairid {entry['pairid']})"
        needed = ("pairid", "reference", "caption", "img_set")
        needed += () if self.split == "test1" else ("target_hard",)
        missing = [key for key in needed if key not in entry]
        if missing:
            raise _entry_error(where, f"missing {', '.join(missing)}")
        if not isinstance(entry["caption"], str) or not isinstance(entry["pairid"], int):
            raise _entry_error(where, "expected an integer pairid and a caption string")
        if not entry["caption"].strip():
            raise _entry_error(where, "empty caption")
        members = entry["img_set"].get("members") if isinstance(entry["img_set"], dict) else None
        if not isinstance(members, list):
            raise _entry_error(where, "img_set.members must be a list of image names")
        reference = self._image(entry["reference"], where, "the reference", split_file)
        target = -1
        if self.split != "test1":
            target = self._image(entry["target_hard"], where, "target_hard", split_file)
        member_ids = [self._image(m, where, "img_set member", split_file) for m in members]
        return {
            "pairid": entry["pairid"],
            "reference": reference,
            "target": target,
            "caption": entry["caption"],
            "members": list(dict.fromkeys(m for m in member_ids if m != reference)),
        }


class CIRCODataset(_QueryImages):
    """CIRCO (Baldrati et al., ICCV 2023), evaluation only: the val or test annotations, the
    gallery of COCO 2017 unlabeled images. ``queries``: ``id``, ``reference``, ``caption``
    (the relative caption), ``target`` and ``gt`` (gallery indices of every ground truth; none
    in test)."""

    LAYOUT = CIRCO_LAYOUT
    SPLITS = ("val", "test")

    def __init__(self, path, split="val", transform=None, *, on_bad_image="skip"):
        if split not in self.SPLITS:
            raise ValueError(f"CIRCO split must be one of {self.SPLITS}, got {split!r}")
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"CIRCO data not found: {path} is not a folder. Expected layout:\n{self.LAYOUT}"
            )
        self.path, self.split, self.transform, self.seed = path, split, transform, 0
        self.image_root = os.path.join(path, "COCO2017_unlabeled", "unlabeled2017")
        self.synthetic = os.path.isfile(os.path.join(path, SYNTHETIC_MARKER))
        info_file = os.path.join(
            path, "COCO2017_unlabeled", "annotations", "image_info_unlabeled2017.json"
        )
        info = _read_json(info_file, self.LAYOUT)
        if not isinstance(info, dict) or not isinstance(info.get("images"), list):
            raise DatasetFormatError(f"{info_file}: expected {{'images': [...]}}")
        self.imgs, self.index = [], {}
        for k, image in enumerate(info["images"]):
            where = f"{info_file}: images[{k}]"
            if not isinstance(image, dict) or not isinstance(image.get("id"), int):
                raise _entry_error(where, "expected {'id': int, 'file_name': str}")
            rel = _check_relative_path(str(image.get("file_name", "")), where)
            self.index[image["id"]] = len(self.imgs)
            self.imgs.append({"name": image["id"], "file": rel})
        ann_file = os.path.join(path, "annotations", f"{split}.json")
        entries = _read_json(ann_file, self.LAYOUT)
        if not isinstance(entries, list) or not entries:
            raise DatasetFormatError(f"{ann_file}: expected a list of queries")
        self.queries = [self._query(e, f"{ann_file}: entry {k}") for k, e in enumerate(entries)]
        self._init_bad_images(on_bad_image, MAX_IMAGE_PIXELS)

    def _image(self, image_id, where, what) -> int:
        if image_id not in self.index:
            raise _entry_error(where, f"{what} {image_id!r} is not in the COCO unlabeled gallery")
        return self.index[image_id]

    def _query(self, entry, where) -> dict:
        if not isinstance(entry, dict) or "id" not in entry:
            raise _entry_error(where, f"expected a query object with an id, got {str(entry)[:100]}")
        where = f"{where} (id {entry['id']})"
        for key in ("reference_img_id", "relative_caption"):
            if key not in entry:
                raise _entry_error(where, f"missing {key}")
        if not isinstance(entry["relative_caption"], str) or not entry["relative_caption"].strip():
            raise _entry_error(where, "relative_caption must be a non-empty string")
        query = {
            "id": entry["id"],
            "reference": self._image(entry["reference_img_id"], where, "reference_img_id"),
            "caption": str(entry["relative_caption"]),
            "target": -1,
            "gt": [],
        }
        if self.split == "val":
            if "target_img_id" not in entry or not isinstance(entry.get("gt_img_ids"), list):
                raise _entry_error(where, "val queries need target_img_id and gt_img_ids")
            query["target"] = self._image(entry["target_img_id"], where, "target_img_id")
            gt = [self._image(i, where, "gt_img_ids member") for i in entry["gt_img_ids"]]
            query["gt"] = list(dict.fromkeys([query["target"], *gt]))
        return query


# ------------------------------------------------------------------ the synthetic CIRR stand-in


def generate_cirr_synthetic(out_dir: str, seed: int = 0, size="small") -> str:
    """Write a SYNTHETIC CIRR stand-in in the real rc2 layout and return ``out_dir``.

    Scenes and edit texts come from the CSS generator (``css_generator.generate``): its train
    split becomes CIRR's train, its test split is divided by source scene (alternately) into
    val and test1.
    Each triplet's img_set holds the reference, the target and up to four other targets of the
    same source (CSS's near-identical siblings, like CIRR's subsets), filled to six members from
    the split. Images are 64x64 PNGs drawn by ``css_generator.render_2d``.
    """
    css_dir = os.path.join(out_dir, "css")
    if not os.path.isfile(os.path.join(css_dir, CSS_NPY)):
        css_generator.generate(css_dir, seed=seed, size=size)
    data = load_data_npy(os.path.join(css_dir, CSS_NPY))
    os.makedirs(os.path.join(out_dir, "captions"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "image_splits"), exist_ok=True)
    pairid = 0
    for split, css_split, part in (
        ("train", "train", None),
        ("val", "test", 0),
        ("test1", "test", 1),
    ):
        rng = random.Random(f"cirr-synthetic:{seed}:{split}")
        scenes = data[css_split]["objects_img"]
        pairs = [
            (s, t, mod["to_str"])
            for mod in data[css_split]["mods"]
            for s, t in zip(mod["from"], mod["to"])
        ]
        if part is not None:  # every other source scene, in order
            sources = {s: k % 2 for k, s in enumerate(sorted({p[0] for p in pairs}))}
            pairs = [p for p in pairs if sources[p[0]] == part]
        used = sorted({i for s, t, _ in pairs for i in (s, t)})
        prefix = "dev" if split == "val" else split
        names = {i: f"{prefix}-{i}-img0" for i in used}
        files = {names[i]: f"./{prefix}/{i % 10}/{names[i]}.png" for i in used}
        for i in used:
            file = os.path.join(out_dir, files[names[i]])
            if not os.path.isfile(file):
                os.makedirs(os.path.dirname(file), exist_ok=True)
                img = PIL.Image.fromarray(css_generator.render_2d(scenes[i], 64))
                css_generator._write_atomic(file, lambda f, img=img: img.save(f, format="PNG"))
        siblings: dict[int, list[int]] = {}
        for s, t, _ in pairs:
            siblings.setdefault(s, []).append(t)
        triplets = []
        for s, t, text in pairs:
            others = [x for x in dict.fromkeys(siblings[s]) if x not in (s, t)]
            rng.shuffle(others)
            members = [s, t, *others[:4]]
            while len(members) < 6 and len(members) < len(used):
                extra = rng.choice(used)
                if extra not in members:
                    members.append(extra)
            rng.shuffle(members)
            entry = {
                "pairid": pairid,
                "reference": names[s],
                "caption": text,
                "img_set": {"id": s, "members": [names[m] for m in members]},
            }
            if split != "test1":
                entry["target_hard"] = names[t]
                entry["target_soft"] = {names[t]: 1.0}
            triplets.append(entry)
            pairid += 1
        for folder, name, content in (
            ("captions", "cap", triplets),
            ("image_splits", "split", files),
        ):
            text = json.dumps(content, indent=1).encode()
            file = os.path.join(out_dir, folder, f"{name}.rc2.{split}.json")
            css_generator._write_atomic(file, lambda f, text=text: f.write(text))
    meta = {
        "synthetic": True,
        "generator": "datasets.generate_cirr_synthetic",
        "seed": seed,
        "size": size,
        "note": "SYNTHETIC stand-in in CIRR's layout, not CIRR",
    }
    text = json.dumps(meta, indent=2).encode()  # written last: marks a complete stand-in
    css_generator._write_atomic(os.path.join(out_dir, SYNTHETIC_MARKER), lambda f: f.write(text))
    return out_dir
