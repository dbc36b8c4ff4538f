"""Synthetic stand-in for the CSS dataset ("CSS3D"), in the real on-disk format, and its renderer.

The real CSS data (Vo et al., CVPR 2019) is ``css_toy_dataset_novel2_small.dup.npy``: a pickled dict
with splits ``train`` and ``test``, each holding ``objects_img`` (per image, a list of
``{shape, color, size, pos}``), ``mods`` (``{from: [ids], to: [ids], to_str: text}``, from and to
parallel) and ``labels`` (duplicate scenes share a label). This module writes a file of exactly
that format from a seeded generator, plus ``SYNTHETIC.json`` so the stand-in is never mistaken for
the real data. Images are not stored: ``render_2d`` (TIRG's 2D drawing) or ``render_3d`` draws
them from the object lists.

How the data are built, per split (train and test use independent random streams):
- A *cluster* starts from a fresh scene of 2-5 objects, each in its own cell of a 3x3 grid. It is
  the source of 10-16 pairs, each a different single edit (add / remove / change size / change
  colour), so every source has 10-16 near-identical siblings in the gallery and an image-only
  model can only guess among them.
- A few of those targets become sources themselves. Each gets the inverse edit (whose target is
  the cluster's first scene again) and the other chained sources' edits (whose targets coincide
  pairwise), so targets often equal an existing scene: the split has fewer images than queries.
  A target equal to an existing scene reuses that image id, or now and then becomes a new image
  (new jitter) with the same label, as in the real ``.dup`` file.
- The object an edit refers to is named by attributes among shape, colour, size, row and column
  ("top-left" names both row and column). ``naming='unique'`` (default) uses a random set of
  attributes that picks the object out uniquely in the source scene ("make middle-left small
  gray object large"), which gives about 6K distinct texts per split, as the real CSS has.
  ``naming='fewest'`` uses the fewest such attributes; since every object has its own cell, a
  position word nearly always suffices, and a split then has only about 1.2K distinct texts.
- Every (source, target) pair with the same text is one mod.
- Compositional split: the ``heldout_pairs`` (shape, colour) combinations never occur in any
  training image, source or target; the test split has them.

Examples:
    python css_generator.py --out data/css_synthetic --seed 0
    python css_generator.py --out /tmp/css_small --seed 1 --size small --preview /tmp/css.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import tempfile
import time
from itertools import combinations

import numpy as np

NPY_NAME = "css_toy_dataset_novel2_small.dup.npy"
META_NAME = "SYNTHETIC.json"

SHAPES = ("rectangle", "circle", "triangle")
COLORS = {
    "gray": (87, 87, 87),
    "red": (244, 35, 35),
    "blue": (42, 75, 215),
    "green": (29, 205, 20),
    "brown": (129, 74, 25),
    "purple": (129, 38, 192),
    "cyan": (41, 208, 208),
    "yellow": (255, 238, 51),
}
SIZES = {"small": 4, "large": 8}  # half-width in pixels on a 64x64 canvas
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
CELL_CENTRES = (0.2, 0.5, 0.8)  # fractional centre of each row / column
POS_JITTER = 0.02  # +-; keeps large objects inside the canvas and off their neighbours

#: (shape, colour) combinations never shown in training (the compositional "novel" split).
DEFAULT_HELDOUT = (("rectangle", "purple"), ("circle", "cyan"), ("triangle", "brown"))
#: ``size`` presets: number of source scenes per split.
SIZE_PRESETS = {"full": 1464, "small": 30}
NAMINGS = ("fewest", "unique")

_COLOR_NAMES = tuple(COLORS)
_SIZE_NAMES = tuple(SIZES)
_MIN_OBJECTS, _MAX_OBJECTS = 2, 6  # per image; fresh scenes have 2-5
_FRESH_OBJECTS = (2, 5)
_SIBLINGS = (10, 16)  # pairs per source, inclusive
_CHAINED = (2, 3, 4)  # targets of a cluster's first scene that become sources
_REUSE_PROB = 0.8  # a target equal to a known scene reuses its id, else is a new same-label image
_FAMILIES = ("add", "remove", "size", "color")
_FAMILY_WEIGHTS = (1.0, 1.0, 1.0, 1.0)

# Attributes used to name an object: bit i of a mask names attribute i.
_SHAPE, _COLOR, _SIZE, _ROW, _COL = 1, 2, 4, 8, 16
_N_ATTRS = 5
_MASKS_BY_SIZE = tuple(
    sum(1 << a for a in subset)
    for k in range(_N_ATTRS + 1)
    for subset in combinations(range(_N_ATTRS), k)
)

# A discrete object is (shape index, colour index, size index, cell); cell = 3 * row + column.
# An edit is ("add", obj), ("remove", cell), ("size", cell, new size) or
# ("color", cell, new colour).


# ----------------------------------------------------------------------------------- rendering


def _shape_footprint(shape, y, x, s):
    """Pixels of one shape, following TIRG's 2D drawing.

    Args:
        shape: one of SHAPES.
        y, x: centre in pixels (row, column); s: half-width in pixels.
    Returns:
        (row0, col0, mask): mask is a (H, W) bool array whose [0, 0] is canvas pixel (row0, col0);
        it is not clipped to the canvas.
    """
    if shape == "rectangle":
        row0, row1 = math.trunc(y - s), math.trunc(y + s)
        col0, col1 = math.trunc(x - s), math.trunc(x + s)
        return row0, col0, np.ones((max(row1 - row0, 0), max(col1 - col0, 0)), dtype=bool)
    if shape == "circle":  # TIRG's "circle" is a diamond
        rows = np.arange(math.trunc(y - s), math.trunc(y + s) + 1)
        half = np.abs(rows - y) - s
        starts, ends = np.trunc(x + half), np.trunc(x - half)
    elif shape == "triangle":  # apex at the top, base at the bottom
        rows = np.arange(math.trunc(y - s), math.trunc(y + s))
        x0 = x + (rows - y + s) / 2.0
        x1 = 2.0 * x - x0
        starts, ends = np.trunc(np.minimum(x0, x1)), np.trunc(np.maximum(x0, x1))
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if rows.size == 0:
        return 0, 0, np.zeros((0, 0), dtype=bool)
    col0, col1 = int(starts.min()), int(ends.max())
    cols = np.arange(col0, max(col1, col0))
    mask = (cols[None, :] >= starts[:, None]) & (cols[None, :] < ends[:, None])
    return int(rows[0]), col0, mask


def _clip(row0, col0, mask, size):
    """Clip a footprint to a size x size canvas: (canvas slices, clipped mask)."""
    r0, c0 = max(row0, 0), max(col0, 0)
    r1, c1 = min(row0 + mask.shape[0], size), min(col0 + mask.shape[1], size)
    if r1 <= r0 or c1 <= c0:
        return None, None
    return (slice(r0, r1), slice(c0, c1)), mask[r0 - row0 : r1 - row0, c0 - col0 : c1 - col0]


def _object_geometry(obj, size):
    scale = size / 64.0
    y, x = float(obj["pos"][0]) * size, float(obj["pos"][1]) * size
    try:
        s = SIZES[obj["size"]] * scale
        color = COLORS[obj["color"]]
    except KeyError as err:
        raise ValueError(f"unknown size or colour {err} in object {obj!r}") from None
    return y, x, s, color


def render_2d(objects, size=64):
    """Draw a scene as TIRG's 2D CSS images: flat shapes on white.

    Args:
        objects: list of ``{'shape', 'color', 'size', 'pos': (y, x)}`` with pos fractional.
        size: canvas side in pixels; shapes scale with it (half-width 4 or 8 px at 64).
    Returns:
        (size, size, 3) uint8 array.
    """
    img = np.full((size, size, 3), 255, dtype=np.uint8)
    for obj in objects:
        y, x, s, color = _object_geometry(obj, size)
        window, mask = _clip(*_shape_footprint(obj["shape"], y, x, s), size)
        if window is not None:
            img[window][mask] = color
    return img


def render_3d(objects, size=64):
    """Draw a scene with pseudo-3D shading: a lit floor, soft shadows and shaded objects.

    Same footprints as ``render_2d``; each object is lit from the top left and casts a blurred
    shadow to the bottom right. Args and return as ``render_2d``.
    """
    rows = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    img = np.broadcast_to(228.0 + 24.0 * rows, (size, size, 3)).astype(np.float32)
    shadow = np.zeros((size + 2, size + 2), dtype=np.float32)  # 1-px border for the blur
    geometry = [_object_geometry(obj, size) for obj in objects]
    for obj, (y, x, s, _) in zip(objects, geometry):
        offset = 0.35 * s
        row0, col0, mask = _shape_footprint(obj["shape"], y + offset, x + offset, s)
        window, mask = _clip(row0 + 1, col0 + 1, mask, size + 2)
        if window is not None:
            shadow[window][mask] = 1.0
    blurred = (
        sum(
            shadow[1 + dr : 1 + dr + size, 1 + dc : 1 + dc + size]
            for dr in (-1, 0, 1)
            for dc in (-1, 0, 1)
        )
        / 9.0
    )
    img *= (1.0 - 0.35 * blurred)[:, :, None]
    for obj, (y, x, s, color) in zip(objects, geometry):
        row0, col0, mask = _shape_footprint(obj["shape"], y, x, s)
        window, mask = _clip(row0, col0, mask, size)
        if window is None:
            continue
        rr, cc = np.mgrid[window]
        dist = np.hypot(rr - (y - 0.6 * s), cc - (x - 0.6 * s)) / (2.4 * max(s, 1e-6))
        light = 1.15 - 0.55 * np.clip(dist, 0.0, 1.0)
        shaded = np.asarray(color, dtype=np.float32) * light[:, :, None]
        img[window][mask] = shaded[mask]
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------- scenes, text


def _attribute_values(obj):
    return (obj[0], obj[1], obj[2], obj[3] // 3, obj[3] % 3)


def _identifying_masks(objs, index):
    """Attribute masks that pick objs[index] out uniquely, fewest attributes first."""
    target = _attribute_values(objs[index])
    differ = []
    for j, other in enumerate(objs):
        if j != index:
            values = _attribute_values(other)
            differ.append(sum(1 << a for a in range(_N_ATTRS) if values[a] != target[a]))
    return [m for m in _MASKS_BY_SIZE if all(m & d for d in differ)]


def _choose_naming(objs, index, naming, rng):
    masks = _identifying_masks(objs, index)
    if naming == "fewest":
        fewest = bin(masks[0]).count("1")
        masks = [m for m in masks if bin(m).count("1") == fewest]
    else:
        masks = [m for m in masks if m]
    return masks[rng.randrange(len(masks))]


def _describe(obj, mask):
    """Noun phrase for obj naming the attributes in mask, e.g. 'middle-left small gray object'."""
    row, col = divmod(obj[3], 3)
    words = []
    if mask & _ROW and mask & _COL:
        words.append(f"{ROWS[row]}-{COLUMNS[col]}")
    elif mask & _ROW:
        words.append(ROWS[row])
    elif mask & _COL:
        words.append(COLUMNS[col])
    if mask & _SIZE:
        words.append(_SIZE_NAMES[obj[2]])
    if mask & _COLOR:
        words.append(_COLOR_NAMES[obj[1]])
    words.append(SHAPES[obj[0]] if mask & _SHAPE else "object")
    return " ".join(words)


def _cell_name(cell):
    return f"{ROWS[cell // 3]}-{COLUMNS[cell % 3]}"


def _edit_text(objs, edit, naming, rng):
    if edit[0] == "add":
        shape, color, size, cell = edit[1]
        return (
            f"add {_SIZE_NAMES[size]} {_COLOR_NAMES[color]} {SHAPES[shape]} to {_cell_name(cell)}"
        )
    index = _index_of_cell(objs, edit[1])
    phrase = _describe(objs[index], _choose_naming(objs, index, naming, rng))
    if edit[0] == "remove":
        return f"remove {phrase}"
    value = _SIZE_NAMES[edit[2]] if edit[0] == "size" else _COLOR_NAMES[edit[2]]
    return f"make {phrase} {value}"


def _index_of_cell(objs, cell):
    for i, obj in enumerate(objs):
        if obj[3] == cell:
            return i
    return -1


def _is_valid(objs, edit, banned):
    kind = edit[0]
    if kind == "add":
        shape, color, _, cell = edit[1]
        return (
            len(objs) < _MAX_OBJECTS
            and _index_of_cell(objs, cell) < 0
            and (shape, color) not in banned
        )
    index = _index_of_cell(objs, edit[1])
    if index < 0:
        return False
    obj = objs[index]
    if kind == "remove":
        return len(objs) > _MIN_OBJECTS
    if kind == "size":
        return edit[2] != obj[2]
    return edit[2] != obj[1] and (obj[0], edit[2]) not in banned


def _apply(objs, positions, edit):
    """Scene after edit; a new object's position is None (to be jittered)."""
    if edit[0] == "add":
        return objs + (edit[1],), positions + (None,)
    index = _index_of_cell(objs, edit[1])
    if edit[0] == "remove":
        return objs[:index] + objs[index + 1 :], positions[:index] + positions[index + 1 :]
    shape, color, size, cell = objs[index]
    changed = (shape, color, edit[2], cell) if edit[0] == "size" else (shape, edit[2], size, cell)
    return objs[:index] + (changed,) + objs[index + 1 :], positions


def _inverse(objs, edit):
    """The edit that undoes edit applied to objs."""
    if edit[0] == "add":
        return ("remove", edit[1][3])
    obj = objs[_index_of_cell(objs, edit[1])]
    if edit[0] == "remove":
        return ("add", obj)
    return (edit[0], edit[1], obj[2] if edit[0] == "size" else obj[1])


def _edit_options(objs, banned):
    """All valid edits of a scene, by family (in _FAMILIES order)."""
    occupied = {obj[3] for obj in objs}
    add = []
    if len(objs) < _MAX_OBJECTS:
        add = [
            ("add", (shape, color, size, cell))
            for cell in range(9)
            if cell not in occupied
            for shape in range(len(SHAPES))
            for color in range(len(COLORS))
            if (shape, color) not in banned
            for size in range(len(SIZES))
        ]
    remove = [("remove", obj[3]) for obj in objs] if len(objs) > _MIN_OBJECTS else []
    size = [("size", obj[3], 1 - obj[2]) for obj in objs]
    color = [
        ("color", obj[3], c)
        for obj in objs
        for c in range(len(COLORS))
        if c != obj[1] and (obj[0], c) not in banned
    ]
    return [add, remove, size, color]


class _SplitBuilder:
    """Images, labels and (source, target, text) pairs of one split."""

    def __init__(self, rng, banned, naming):
        self.rng = rng
        self.banned = banned
        self.naming = naming
        self.objs = []  # per image: tuple of discrete objects
        self.positions = []  # per image: tuple of (y, x)
        self.labels = []
        self.first_id_of_scene = {}  # sorted discrete scene -> first image id
        self.pairs = []  # (source id, target id, text)
        self.n_sources = 0

    def _jitter(self, cell):
        row, col = divmod(cell, 3)
        return (
            round(CELL_CENTRES[row] + self.rng.uniform(-POS_JITTER, POS_JITTER), 4),
            round(CELL_CENTRES[col] + self.rng.uniform(-POS_JITTER, POS_JITTER), 4),
        )

    def _new_image(self, objs, positions, label):
        positions = tuple(
            p if p is not None else self._jitter(o[3]) for o, p in zip(objs, positions)
        )
        self.objs.append(objs)
        self.positions.append(positions)
        self.labels.append(label)
        return len(self.objs) - 1

    def fresh_scene(self, forced_object=None):
        """A new random scene not seen before in this split; returns its image id."""
        while True:
            n = self.rng.randint(*_FRESH_OBJECTS)
            cells = self.rng.sample(range(9), n)
            objs = []
            for cell in cells:
                while True:
                    obj = (
                        self.rng.randrange(len(SHAPES)),
                        self.rng.randrange(len(COLORS)),
                        self.rng.randrange(len(SIZES)),
                        cell,
                    )
                    if obj[:2] not in self.banned:
                        break
                objs.append(obj)
            if forced_object is not None:
                objs[0] = forced_object[:2] + (objs[0][2], objs[0][3])
            key = tuple(sorted(objs))
            if key not in self.first_id_of_scene:
                label = len(self.first_id_of_scene)
                image = self._new_image(tuple(objs), (None,) * n, label)
                self.first_id_of_scene[key] = image
                return image

    def _target(self, source, edit):
        """Image id of source after edit, and whether that image was created by this call."""
        objs, positions = _apply(self.objs[source], self.positions[source], edit)
        key = tuple(sorted(objs))
        first = self.first_id_of_scene.get(key)
        if first is None:
            label = len(self.first_id_of_scene)
            image = self._new_image(objs, positions, label)
            self.first_id_of_scene[key] = image
            return image, True
        if self.rng.random() < _REUSE_PROB:
            return first, False
        return self._new_image(objs, (None,) * len(objs), self.labels[first]), False

    def _sample_edits(self, objs, forced):
        """forced edits plus random others (by family weight), 10-16 in all, all distinct."""
        k = self.rng.randint(*_SIBLINGS)
        edits = list(forced)
        options = _edit_options(objs, self.banned)
        options = [[e for e in family if e not in edits] for family in options]
        while len(edits) < k:
            weights = [w if family else 0.0 for w, family in zip(_FAMILY_WEIGHTS, options)]
            family = options[self.rng.choices(range(len(_FAMILIES)), weights)[0]]
            edits.append(family.pop(self.rng.randrange(len(family))))
        return edits

    def add_source(self, source, forced=()):
        """Make image `source` the source of 10-16 pairs; returns [(edit, target, created)]."""
        objs = self.objs[source]
        results = []
        for edit in self._sample_edits(objs, forced):
            text = _edit_text(objs, edit, self.naming, self.rng)
            target, created = self._target(source, edit)
            self.pairs.append((source, target, text))
            results.append((edit, target, created))
        self.n_sources += 1
        return results

    def add_cluster(self, max_sources, forced_object=None):
        first = self.fresh_scene(forced_object)
        first_objs = self.objs[first]
        created = [(e, t) for e, t, new in self.add_source(first) if new]
        n_chained = min(self.rng.choice(_CHAINED), max_sources - 1, len(created))
        chained = self.rng.sample(created, n_chained)
        for edit, target in chained:
            objs = self.objs[target]
            forced = [_inverse(first_objs, edit)]
            forced += [e for e, _ in chained if e != edit and _is_valid(objs, e, self.banned)]
            self.add_source(target, forced)

    def to_split(self):
        mods = {}
        for source, target, text in self.pairs:
            mod = mods.setdefault(text, {"from": [], "to": [], "to_str": text})
            mod["from"].append(source)
            mod["to"].append(target)
        objects_img = [
            [
                {
                    "shape": SHAPES[o[0]],
                    "color": _COLOR_NAMES[o[1]],
                    "size": _SIZE_NAMES[o[2]],
                    "pos": (float(p[0]), float(p[1])),
                }
                for o, p in zip(objs, positions)
            ]
            for objs, positions in zip(self.objs, self.positions)
        ]
        split = {"objects_img": objects_img, "mods": list(mods.values()), "labels": self.labels}
        counts = {
            "images": len(self.objs),
            "mods": len(mods),
            "queries": len(self.pairs),
            "sources": self.n_sources,
        }
        return split, counts


def _build_split(seed, split, n_sources, heldout, naming):
    rng = random.Random(f"css_generator:{seed}:{split}")  # str seeds are hashed with sha512
    banned = set(heldout) if split == "train" else set()
    builder = _SplitBuilder(rng, banned, naming)
    cluster = 0
    while builder.n_sources < n_sources:
        forced = heldout[cluster] if split == "test" and cluster < len(heldout) else None
        builder.add_cluster(n_sources - builder.n_sources, forced)
        cluster += 1
    return builder.to_split()


def _n_sources(size):
    if isinstance(size, str) and size in SIZE_PRESETS:
        return SIZE_PRESETS[size]
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    raise ValueError(
        f"size must be one of {sorted(SIZE_PRESETS)} or a positive number of source scenes per"
        f" split, got {size!r}"
    )


def _heldout_indices(heldout_pairs):
    indices = []
    for pair in heldout_pairs:
        shape, color = pair
        if shape not in SHAPES or color not in COLORS:
            raise ValueError(
                f"held-out pair {pair!r} must be (shape, colour) with shape in {SHAPES} and"
                f" colour in {_COLOR_NAMES}"
            )
        indices.append((SHAPES.index(shape), _COLOR_NAMES.index(color)))
    return tuple(indices)


def _write_atomic(path, write):
    """Call write(file) on a temporary file beside path, then rename it over path. The file gets
    the mode open() would give it (0o666 less the umask), not mkstemp's private 0o600."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path), suffix=".tmp")
    try:
        umask = os.umask(0)  # reading the umask means setting it: put it straight back
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def generate(out_dir, seed=0, size="full", heldout_pairs=DEFAULT_HELDOUT, naming="unique"):
    """Write a synthetic CSS dataset to out_dir and return its SYNTHETIC.json content.

    Args:
        out_dir: folder for ``css_toy_dataset_novel2_small.dup.npy`` and ``SYNTHETIC.json``;
            created if missing.
        seed: int; the same seed and arguments give byte-identical files.
        size: 'full' (about 19K queries per split), 'small' (a few hundred) or an int number of
            source scenes per split (each the source of 10-16 queries).
        heldout_pairs: (shape, colour) pairs that never occur in training images.
        naming: 'fewest' or 'unique', how edits name the object they change (module docstring).
    Returns:
        dict with synthetic, generator, seed, size, naming, heldout_pairs and counts
        ({split: {images, mods, queries, sources}}).
    """
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {NAMINGS}, got {naming!r}")
    n_sources = _n_sources(size)
    heldout = _heldout_indices(heldout_pairs)
    data, counts = {}, {}
    for split in ("train", "test"):
        data[split], counts[split] = _build_split(int(seed), split, n_sources, heldout, naming)
    meta = {
        "synthetic": True,
        "generator": "css_generator",
        "seed": int(seed),
        "size": size,
        "naming": naming,
        "heldout_pairs": [[shape, color] for shape, color in heldout_pairs],
        "counts": counts,
    }
    os.makedirs(out_dir, exist_ok=True)
    _write_atomic(os.path.join(out_dir, NPY_NAME), lambda f: np.save(f, data, allow_pickle=True))
    _write_atomic(
        os.path.join(out_dir, META_NAME),
        lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode("utf-8")),
    )
    return meta


# ------------------------------------------------------------------------------------------ CLI


def _write_preview(split_data, path, n_sources=4, n_targets=5, cell=128):
    """PNG grid: per row a source image, then some of its targets captioned with the text."""
    from PIL import Image, ImageDraw

    by_source = {}
    for mod in split_data["mods"]:
        for source, target in zip(mod["from"], mod["to"]):
            by_source.setdefault(source, []).append((mod["to_str"], target))
    sources = sorted(by_source)[:n_sources]
    width, caption = 200, 36
    sheet = Image.new("RGB", (width * (n_targets + 1), (cell + caption) * len(sources)), "white")
    draw = ImageDraw.Draw(sheet)
    objects = split_data["objects_img"]
    for row, source in enumerate(sources):
        tiles = [(f"source {source}", source)] + by_source[source][:n_targets]
        for col, (text, image_id) in enumerate(tiles):
            img = Image.fromarray(render_2d(objects[image_id])).resize((cell, cell), Image.NEAREST)
            left, top = col * width + (width - cell) // 2, row * (cell + caption)
            sheet.paste(img, (left, top))
            draw.rectangle([left, top, left + cell - 1, top + cell - 1], outline=(200, 200, 200))
            words, lines = text.split(), [""]
            for word in words:
                if len(lines[-1]) + len(word) + 1 > 32:
                    lines.append("")
                lines[-1] = (lines[-1] + " " + word).strip()
            for i, line in enumerate(lines[:2]):
                draw.text((col * width + 4, top + cell + 2 + 14 * i), line, fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _write_atomic(path, lambda f: sheet.save(f, format="PNG"))


def _parse_size(text):
    if text in SIZE_PRESETS:
        return text
    try:
        return _n_sources(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected one of {sorted(SIZE_PRESETS)} or a positive integer, got {text!r}"
        ) from None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--size",
        type=_parse_size,
        default="full",
        help="full, small, or a number of source scenes per split",
    )
    parser.add_argument("--naming", choices=NAMINGS, default="unique")
    parser.add_argument("--preview", help="also write a PNG of a few test queries here")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    meta = generate(args.out, seed=args.seed, size=args.size, naming=args.naming)
    elapsed = time.perf_counter() - start
    print(f"synthetic CSS stand-in (seed {args.seed}, size {args.size}) -> {args.out}")
    for split, counts in meta["counts"].items():
        print(
            f"  {split}: {counts['images']} images, {counts['mods']} mods, "
            f"{counts['queries']} queries, {counts['sources']} sources "
            f"({counts['queries'] / counts['sources']:.1f} queries per source)"
        )
    print(f"  held out of train: {', '.join(f'{s} {c}' for s, c in meta['heldout_pairs'])}")
    print(f"generated in {elapsed:.1f} s")
    if args.preview:
        data = np.load(os.path.join(args.out, NPY_NAME), allow_pickle=True).item()
        _write_preview(data["test"], args.preview)
        print(f"preview: {args.preview}")
    return meta


if __name__ == "__main__":
    main()
