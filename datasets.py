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

import json
import os
import pickle
import random

import numpy as np
import PIL.Image
import torch

from css_generator import render_2d

CSS_NPY = "css_toy_dataset_novel2_small.dup.npy"
SYNTHETIC_MARKER = "SYNTHETIC.json"


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

    def sample_query(self, index: int, seed: int | None = None) -> dict:
        """The training query at ``index`` (deterministic in ``seed`` and ``index``)."""
        seed = self.seed if seed is None else seed
        # Queries come in pairs sharing a source image (TIRG's sampling); the pair shares an rng.
        rng = random.Random(f"{seed}:{index // 2}")
        query = self.training_query(rng, index)
        query.setdefault("target_caption", self.imgs[query["target_img_id"]]["captions"][0])
        return query

    def sample_training_queries(self, n: int, seed: int) -> list[dict]:
        """A fixed sample of n training queries, to measure training accuracy (M_s)."""
        return [self.sample_query(i, seed) for i in range(n)]

    def __getitem__(self, index: int) -> dict:
        query = self.sample_query(index)
        query["source_img_data"] = self.get_img(query["source_img_id"])
        query["target_img_data"] = self.get_img(query["target_img_id"])
        return query

    def __len__(self) -> int:
        return len(self.imgs)


# --------------------------------------------------------------------------- CSS


class CSSDataset(BaseDataset):
    """CSS (Vo et al.): scenes of coloured shapes, one modification text per query.

    Reads ``<path>/css_toy_dataset_novel2_small.dup.npy``. Images come from
    ``<path>/images/css_<split>_<idx:06d>.png`` (the 3D version) when that folder exists, and are
    otherwise drawn in 2D from the object lists, as TIRG does. A hit is any image with the
    target's label (duplicate scenes share a label).
    """

    def __init__(self, path: str, split: str = "train", transform=None):
        super().__init__(path, split, transform)
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

        self.img_dir = os.path.join(path, "images")
        self.has_png = os.path.isdir(self.img_dir)

    def get_all_texts(self) -> list[str]:
        return [mod["to_str"] for mod in self.mods]

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

    def _load_img(self, idx):
        if self.has_png:
            file = os.path.join(self.img_dir, f"css_{self.split}_{idx:06d}.png")
            try:
                with PIL.Image.open(file) as img:
                    return img.convert("RGB")
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"CSS image missing: {file} (the images/ folder exists, "
                    f"so every image of the split is expected there)"
                ) from None
        return PIL.Image.fromarray(render_2d(self.imgs[idx]["objects"]))


DATASETS = {"css3d": CSSDataset}


def describe(dataset: BaseDataset) -> str:
    kind = "SYNTHETIC stand-in" if dataset.synthetic else "real data"
    return (
        f"{type(dataset).__name__}[{dataset.split}] ({kind}) at {dataset.path}: "
        f"{len(dataset.imgs)} images, {len(dataset.test_queries)} queries"
    )


def read_synthetic_marker(path: str) -> dict | None:
    marker = os.path.join(path, SYNTHETIC_MARKER)
    if not os.path.isfile(marker):
        return None
    with open(marker) as f:
        return json.load(f)
