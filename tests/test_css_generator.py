import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import css_generator

ROWS = {"top": 0, "middle": 1, "bottom": 2}
COLUMNS = {"left": 0, "center": 1, "right": 2}
ATTRS = ("shape", "color", "size", "row", "col")


@pytest.fixture(scope="module", params=["fewest", "unique"])
def dataset(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"css_{request.param}")
    meta = css_generator.generate(out, seed=3, size="small", naming=request.param)
    data = np.load(out / css_generator.NPY_NAME, allow_pickle=True, encoding="latin1").item()
    return out, meta, data


def discrete(obj):
    """(shape, color, size, row, col) of an object dict, the cell read back from its position."""
    row, col = (int(np.argmin([abs(p - c) for c in (0.2, 0.5, 0.8)])) for p in obj["pos"])
    return (obj["shape"], obj["color"], obj["size"], row, col)


def scene(objects):
    return tuple(sorted(discrete(o) for o in objects))


def parse_phrase(words):
    """Named attributes of a noun phrase like ['middle-left', 'small', 'gray', 'object']."""
    named = {}
    *modifiers, noun = words
    if noun != "object":
        assert noun in css_generator.SHAPES, words
        named["shape"] = noun
    if modifiers and modifiers[0] not in css_generator.SIZES | css_generator.COLORS:
        position = modifiers.pop(0)
        if "-" in position:
            row, col = position.split("-")
            named["row"], named["col"] = ROWS[row], COLUMNS[col]
        elif position in ROWS:
            named["row"] = ROWS[position]
        else:
            named["col"] = COLUMNS[position]
    if modifiers and modifiers[0] in css_generator.SIZES:
        named["size"] = modifiers.pop(0)
    if modifiers and modifiers[0] in css_generator.COLORS:
        named["color"] = modifiers.pop(0)
    assert not modifiers, words
    return named


def matches(obj, named):
    return all(obj[ATTRS.index(a)] == v for a, v in named.items())


def apply_text(source, text):
    """Independent reading of a modification text: (target scene, named attributes or None)."""
    words = text.split()
    if words[0] == "add":
        size, color, shape, to, position = words[1:]
        assert to == "to"
        row, col = position.split("-")
        new = (shape, color, size, ROWS[row], COLUMNS[col])
        assert all(o[3:] != new[3:] for o in source), "add to an occupied cell"
        return tuple(sorted(source + (new,))), None
    if words[0] == "remove":
        named = parse_phrase(words[1:])
        hits = [o for o in source if matches(o, named)]
        assert len(hits) == 1, (text, source)
        return tuple(o for o in source if o != hits[0]), named
    assert words[0] == "make", text
    named, value = parse_phrase(words[1:-1]), words[-1]
    hits = [o for o in source if matches(o, named)]
    assert len(hits) == 1, (text, source)
    changed = list(hits[0])
    index = ATTRS.index("size" if value in css_generator.SIZES else "color")
    assert value in css_generator.SIZES or value in css_generator.COLORS, text
    assert changed[index] != value, f"'{text}' changes nothing"
    changed[index] = value
    return tuple(sorted([o for o in source if o != hits[0]] + [tuple(changed)])), named


def pairs(split):
    for mod in split["mods"]:
        for source, target in zip(mod["from"], mod["to"]):
            yield source, target, mod["to_str"]


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        css_generator.generate(tmp_path / name, seed=seed, size=12)
    read = {name: (tmp_path / name / css_generator.NPY_NAME).read_bytes() for name in "abc"}
    assert read["a"] == read["b"] and read["a"] != read["c"]
    meta = (tmp_path / "a" / css_generator.META_NAME).read_bytes()
    assert meta == (tmp_path / "b" / css_generator.META_NAME).read_bytes()


def test_bytes_do_not_depend_on_string_hashing(tmp_path):
    root = os.path.dirname(os.path.abspath(css_generator.__file__))
    code = "import css_generator, sys; css_generator.generate(sys.argv[1], seed=1, size=8)"
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / hash_seed)], cwd=root, env=env, check=True
        )
    assert (tmp_path / "1" / css_generator.NPY_NAME).read_bytes() == (
        tmp_path / "2" / css_generator.NPY_NAME
    ).read_bytes()


def assert_plain(value, where="data"):
    if isinstance(value, dict):
        assert type(value) is dict, where
        for key, item in value.items():
            assert type(key) is str, where
            assert_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        assert type(value) in (list, tuple), where
        for i, item in enumerate(value):
            assert_plain(item, f"{where}[{i}]")
    else:
        assert type(value) in (str, int, float, bool), f"{where} is {type(value)}"


def test_file_format_is_the_real_css_format(dataset):
    out, meta, data = dataset
    raw = np.load(out / css_generator.NPY_NAME, allow_pickle=True, encoding="latin1")
    assert raw.shape == () and raw.dtype == object
    assert sorted(data) == ["test", "train"]
    assert_plain(data)
    for split_name, split in data.items():
        assert sorted(split) == ["labels", "mods", "objects_img"]
        n = len(split["objects_img"])
        assert len(split["labels"]) == n
        for objects in split["objects_img"]:
            assert 2 <= len(objects) <= 6
            assert len({discrete(o)[3:] for o in objects}) == len(objects)  # one object per cell
            for obj in objects:
                assert sorted(obj) == ["color", "pos", "shape", "size"]
                assert type(obj["pos"]) is tuple and len(obj["pos"]) == 2
                assert all(type(p) is float and 0.0 <= p <= 1.0 for p in obj["pos"])
                assert obj["shape"] in css_generator.SHAPES
                assert obj["color"] in css_generator.COLORS
                assert obj["size"] in css_generator.SIZES
        texts = [mod["to_str"] for mod in split["mods"]]
        assert len(texts) == len(set(texts)), "one mod per distinct text"
        for mod in split["mods"]:
            assert len(mod["from"]) == len(mod["to"]) >= 1
            assert all(type(i) is int and 0 <= i < n for i in mod["from"] + mod["to"])
        seen = set()
        for source, target, _ in pairs(split):
            assert (source, target) not in seen
            seen.add((source, target))
        counts = meta["counts"][split_name]
        assert counts["images"] == n and counts["mods"] == len(split["mods"])
        assert counts["queries"] == len(seen)
    assert json.loads((out / css_generator.META_NAME).read_text()) == meta
    assert meta["synthetic"] is True and meta["generator"] == "css_generator"
    assert [name for name in os.listdir(out) if name.endswith(".tmp")] == []


def test_labels_are_the_discrete_scenes(dataset):
    _, _, data = dataset
    for split in data.values():
        label_of_scene, scene_of_label = {}, {}
        for objects, label in zip(split["objects_img"], split["labels"]):
            key = scene(objects)
            assert label_of_scene.setdefault(key, label) == label
            assert scene_of_label.setdefault(label, key) == key
        assert len(split["labels"]) > len(label_of_scene), "some duplicate images expected"


def test_every_target_is_its_source_with_the_text_applied(dataset):
    _, meta, data = dataset
    families = set()
    for split in data.values():
        objects = split["objects_img"]
        for source, target, text in pairs(split):
            expected, _ = apply_text(scene(objects[source]), text)
            assert scene(objects[target]) == expected, (text, objects[source], objects[target])
            families.add(text.split()[0] + (text.split()[-1] in css_generator.SIZES) * " size")
    assert families == {"add", "remove", "make", "make size"}


def test_objects_are_named_uniquely_and_minimally(dataset):
    _, meta, data = dataset
    lengths, recurring = [], 0
    for split in data.values():
        objects = split["objects_img"]
        for mod in split["mods"]:
            sources = {scene(objects[i]) for i in mod["from"]}
            recurring += mod["to_str"].startswith(("remove", "make")) and len(sources) > 1
        for source, _, text in pairs(split):
            src = scene(objects[source])
            _, named = apply_text(src, text)  # asserts that exactly one object matches
            if named is None:
                continue
            lengths.append(len(named))
            if meta["naming"] != "fewest":
                continue
            target = next(o for o in src if matches(o, named))
            for k in range(len(named)):  # no set of fewer attributes picks it out
                for attrs in itertools.combinations(range(len(ATTRS)), k):
                    hits = [o for o in src if all(o[a] == target[a] for a in attrs)]
                    assert len(hits) > 1, f"'{text}' in {src}: {attrs} would do"
    assert recurring > 10, "the same phrase should fit several scenes"
    if meta["naming"] == "fewest":
        assert max(lengths) >= 2 and np.mean(lengths) < 1.5
    else:
        assert np.mean(lengths) > 2.0


def test_heldout_pairs_never_in_train_but_in_test(dataset):
    _, meta, data = dataset
    heldout = {tuple(p) for p in meta["heldout_pairs"]}
    assert heldout == set(css_generator.DEFAULT_HELDOUT)

    def combos(split):
        return {(o["shape"], o["color"]) for objs in split["objects_img"] for o in objs}

    assert not combos(data["train"]) & heldout
    assert combos(data["test"]) >= heldout
    assert len(combos(data["train"])) == 3 * 8 - len(heldout)


def test_each_source_has_ten_to_sixteen_siblings(dataset):
    _, meta, data = dataset
    for split_name, split in data.items():
        per_source = {}
        for source, _, _ in pairs(split):
            per_source[source] = per_source.get(source, 0) + 1
        assert len(per_source) == meta["counts"][split_name]["sources"] == 30
        assert min(per_source.values()) >= 10 and max(per_source.values()) <= 16
        assert 10 <= np.mean(list(per_source.values())) <= 16
        targets = {t for _, t, _ in pairs(split)}
        assert targets & set(per_source), "some targets are sources too"


def test_sizes_and_bad_arguments(tmp_path):
    meta = css_generator.generate(tmp_path, seed=0, size=5, heldout_pairs=[("circle", "red")])
    assert meta["counts"]["train"]["sources"] == 5 and meta["heldout_pairs"] == [["circle", "red"]]
    with pytest.raises(ValueError, match="size"):
        css_generator.generate(tmp_path, size="huge")
    with pytest.raises(ValueError, match="held-out"):
        css_generator.generate(tmp_path, size=2, heldout_pairs=[("star", "red")])
    with pytest.raises(ValueError, match="naming"):
        css_generator.generate(tmp_path, size=2, naming="longest")


def reference_render(objects, size=64):
    """TIRG's 2D drawing, pixel by pixel."""
    img = np.full((size, size, 3), 255, dtype=np.uint8)

    def put(r, c, color):
        if 0 <= r < size and 0 <= c < size:
            img[r, c] = color

    for obj in objects:
        s = css_generator.SIZES[obj["size"]] * size / 64
        y, x = obj["pos"][0] * size, obj["pos"][1] * size
        color = css_generator.COLORS[obj["color"]]
        if obj["shape"] == "rectangle":
            for r in range(int(y - s), int(y + s)):
                for c in range(int(x - s), int(x + s)):
                    put(r, c, color)
        elif obj["shape"] == "circle":
            for r in range(int(y - s), int(y + s) + 1):
                for c in range(int(x + (abs(r - y) - s)), int(x - (abs(r - y) - s))):
                    put(r, c, color)
        else:
            for r in range(int(y - s), int(y + s)):
                x0 = x + (r - y + s) / 2
                x1 = 2 * x - x0
                for c in range(int(min(x0, x1)), int(max(x0, x1))):
                    put(r, c, color)
    return img


def test_render_2d_single_object():
    obj = {"shape": "rectangle", "color": "red", "size": "large", "pos": (0.5, 0.25)}
    img = css_generator.render_2d([obj])
    assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
    assert tuple(img[32, 16]) == (244, 35, 35)
    assert tuple(img[32, 50]) == (255, 255, 255) and tuple(img[5, 5]) == (255, 255, 255)
    assert (img != 255).any(axis=2).sum() == 16 * 16
    big = css_generator.render_2d([dict(obj, shape="circle", color="cyan")], size=128)
    assert big.shape == (128, 128, 3) and tuple(big[64, 32]) == (41, 208, 208)


def test_render_2d_matches_tirg_drawing(dataset):
    _, _, data = dataset
    scenes = data["test"]["objects_img"][:40]
    edge = [  # partly outside the canvas
        {"shape": s, "color": "blue", "size": "large", "pos": (y, x)}
        for s, (y, x) in zip(css_generator.SHAPES, [(0.02, 0.97), (0.99, 0.03), (-0.05, 0.5)])
    ]
    for objects in scenes + [edge]:
        for size in (64, 37, 128):
            np.testing.assert_array_equal(
                css_generator.render_2d(objects, size), reference_render(objects, size)
            )
    triangle = css_generator.render_2d(
        [{"shape": "triangle", "color": "green", "size": "large", "pos": (0.5, 0.5)}]
    )
    ink = (triangle != 255).any(axis=2)
    assert ink[27].sum() < ink[38].sum(), "the triangle points up"


def test_render_3d_draws_the_same_scene():
    objects = [
        {"shape": "circle", "color": "yellow", "size": "large", "pos": (0.2, 0.2)},
        {"shape": "triangle", "color": "purple", "size": "small", "pos": (0.8, 0.5)},
    ]
    img = css_generator.render_3d(objects)
    assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
    flat = css_generator.render_2d(objects)
    ink = (flat != 255).any(axis=2)
    assert np.abs(img[ink].astype(int) - flat[ink]).mean() < 60  # coloured where the shapes are
    assert img[~ink].min() > 120  # background and shadows stay light


def test_cli_writes_dataset_and_preview(tmp_path, capsys):
    meta = css_generator.main(
        [
            "--out",
            str(tmp_path / "d"),
            "--seed",
            "2",
            "--size",
            "6",
            "--preview",
            str(tmp_path / "p.png"),
        ]
    )
    printed = capsys.readouterr().out
    assert "train:" in printed and "test:" in printed and "generated in" in printed
    assert meta["size"] == 6 and (tmp_path / "d" / css_generator.META_NAME).exists()
    from PIL import Image

    assert Image.open(tmp_path / "p.png").size[0] > 0
    with pytest.raises(SystemExit):
        css_generator.main(["--out", str(tmp_path), "--size", "0"])


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_umasks_normal_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        css_generator.main(["--out", str(tmp_path / "css"), "--size", "2", "--preview",
                            str(tmp_path / "preview.png")])  # fmt: skip
    finally:
        os.umask(old)
    written = sorted(os.listdir(tmp_path / "css"))
    assert written == sorted([css_generator.NPY_NAME, "SYNTHETIC.json"])
    for path in [tmp_path / "css" / name for name in written] + [tmp_path / "preview.png"]:
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask, path  # as open() would make it
