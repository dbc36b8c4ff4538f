"""CSS loading on fixtures the tests write themselves, in the real on-disk format."""

import os
import pickle
import re
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from test_real_datasets import huge_png_bytes  # a PNG header claiming a huge image

import datasets

OBJ = {"shape": "circle", "color": "red", "size": "large", "pos": (0.5, 0.5)}


def write_py2_npy(path, payload, protocol=2):
    """A .npy holding a pickled 0-d object array, as Python 2's np.save wrote CSS."""
    array = np.empty((), dtype=object)
    array[()] = payload
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "|O", "fortran_order": False, "shape": ()}
        )
        pickle.dump(array, f, protocol=protocol)


def css_split(n_images=5):
    objects = [[dict(OBJ, pos=(0.2 + 0.1 * i, 0.5))] for i in range(n_images)]
    mods = [
        {"from": [0, 1], "to": [2, 3], "to_str": "make circle small"},
        {"from": [0], "to": [4], "to_str": "add blue square to top-left"},
        {"from": [2], "to": [np.int64(3)], "to_str": "remove red object"},  # numpy scalar id
    ]
    return {"objects_img": objects, "mods": mods, "labels": [0, 1, 2, 3, 2][:n_images]}


@pytest.fixture
def css_dir(tmp_path):
    write_py2_npy(tmp_path / datasets.CSS_NPY, {"train": css_split(), "test": css_split()})
    return tmp_path


def test_loads_real_format_with_expected_queries(css_dir):
    ds = datasets.CSSDataset(str(css_dir), "train")
    assert len(ds.imgs) == 5 and len(ds) == 5
    assert not ds.synthetic
    queries = ds.get_test_queries()
    assert len(queries) == 4  # every (from, to) pair of every mod
    assert [(q["source_img_id"], q["mod"]["str"]) for q in queries] == [
        (0, "make circle small"),
        (1, "make circle small"),
        (0, "add blue square to top-left"),
        (2, "remove red object"),
    ]
    assert queries[0]["target_caption"] == "2"  # str(label)
    assert ds.gallery_labels() == ["0", "1", "2", "3", "2"]  # duplicate scenes share a label
    assert ds.get_all_texts() == [
        "make circle small",
        "add blue square to top-left",
        "remove red object",
    ]


def test_training_queries_are_deterministic_and_paired(css_dir):
    ds = datasets.CSSDataset(str(css_dir), "train", transform=datasets.to_uint8_tensor)
    first = [ds.sample_query(i) for i in range(200)]
    assert first == [ds.sample_query(i) for i in range(200)]
    assert first != [ds.sample_query(i, seed=1) for i in range(200)]
    pairs = {
        (0, 2, "make circle small"),
        (1, 3, "make circle small"),
        (0, 4, "add blue square to top-left"),
        (2, 3, "remove red object"),
    }
    for i in range(0, 200, 2):
        a, b = first[i], first[i + 1]
        assert (a["source_img_id"], a["target_img_id"], a["mod"]["str"]) in pairs
        assert (b["source_img_id"], b["target_img_id"], b["mod"]["str"]) in pairs
        assert a["source_img_id"] == b["source_img_id"]  # the second query shares the source
        if a["source_img_id"] == 0:  # image 0 has two mods: the pair uses both
            assert a["mod"]["str"] != b["mod"]["str"]
    item = ds[7]  # image 1 has one mod only: no infinite loop, the mod repeats
    assert item["source_img_data"].shape == (3, 64, 64)
    assert item["source_img_data"].dtype == torch.uint8
    batch = datasets.collate_queries([ds[0], ds[1]])
    assert batch["source_img_data"].shape == (2, 3, 64, 64) and len(batch["mod"]) == 2


def test_2d_render_and_png_images(css_dir):
    ds = datasets.CSSDataset(str(css_dir), "test")
    img = np.asarray(ds.get_img(0))
    assert img.shape == (64, 64, 3)
    y, x = int(0.2 * 64), 32
    assert tuple(img[y, x]) == (244, 35, 35) and tuple(img[63, 0]) == (255, 255, 255)
    os.makedirs(css_dir / "images")
    for i in range(5):
        PIL.Image.new("RGB", (32, 32), (i, 0, 0)).save(css_dir / "images" / f"css_test_{i:06d}.png")
    ds = datasets.CSSDataset(str(css_dir), "test")
    assert np.asarray(ds.get_img(3))[0, 0, 0] == 3
    os.remove(css_dir / "images" / "css_test_000004.png")  # a missing image is a bad image
    with pytest.warns(datasets.BadImageWarning, match="css_test_000004.png: image file missing"):
        ds.get_img(4)
    strict = datasets.CSSDataset(str(css_dir), "test", on_bad_image="fail")
    with pytest.raises(datasets.BadImageError, match="css_test_000004.png: image file missing"):
        strict.get_img(4)


def test_missing_file_names_the_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=datasets.CSS_NPY):
        datasets.CSSDataset(str(tmp_path), "train")


class Payload:
    """Unpickling this would create a folder: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickle_with_code_is_refused_and_not_run(tmp_path):
    marker = str(tmp_path / "pwned")
    split = css_split()
    split["mods"][0]["to_str"] = Payload(marker)
    write_py2_npy(tmp_path / datasets.CSS_NPY, {"train": split, "test": css_split()})
    with pytest.raises(datasets.DatasetFormatError, match="posix.mkdir|os.mkdir|refusing"):
        datasets.CSSDataset(str(tmp_path), "train")
    assert not os.path.exists(marker)


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda d: d["train"]["mods"][1].update({"to": [4, 1]}), "parallel"),
        (lambda d: d["train"]["mods"][1].update({"to": [9]}), "outside"),
        (lambda d: d["train"]["mods"][1].update({"to_str": "  "}), "non-empty"),
        (lambda d: d["train"].update({"labels": [0, 1]}), "labels"),
        (lambda d: d.pop("train"), "'train' split"),
    ],
)
def test_malformed_content_is_a_clear_error(tmp_path, break_it, message):
    data = {"train": css_split(), "test": css_split()}
    break_it(data)
    write_py2_npy(tmp_path / datasets.CSS_NPY, data)
    with pytest.raises(datasets.DatasetFormatError, match=message):
        datasets.CSSDataset(str(tmp_path), "train")


def test_garbage_and_truncated_files(tmp_path):
    path = tmp_path / datasets.CSS_NPY
    path.write_bytes(b"not a numpy file at all")
    with pytest.raises(datasets.DatasetFormatError, match="not a .npy"):
        datasets.CSSDataset(str(tmp_path), "train")
    write_py2_npy(path, {"train": css_split(), "test": css_split()})
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(datasets.DatasetFormatError, match="unreadable"):
        datasets.CSSDataset(str(tmp_path), "train")


def test_loads_files_written_by_numpy_save(tmp_path):
    np.save(
        tmp_path / datasets.CSS_NPY, {"train": css_split(), "test": css_split()}, allow_pickle=True
    )
    assert len(datasets.CSSDataset(str(tmp_path), "test").get_test_queries()) == 4


def query_key(q):
    return (q["source_img_id"], q["target_img_id"], q["mod"]["str"])


def test_training_sample_is_distinct_queries_without_replacement(css_dir):
    ds = datasets.CSSDataset(str(css_dir), "train")
    every = {query_key(q) for q in ds.get_test_queries()}  # the split's 4 (from, to) pairs
    for n in (10_000, 1, 3, 4):
        sample = ds.sample_training_queries(n, seed=10_000_019)
        keys = [query_key(q) for q in sample]
        assert len(keys) == len(set(keys)) == min(n, 4)  # no query twice
        assert set(keys) <= every
        assert sample == ds.sample_training_queries(n, seed=10_000_019)  # a function of the seed
        assert all(
            q["target_caption"] == ds.imgs[q["target_img_id"]]["captions"][0] for q in sample
        )
    orders = {tuple(map(query_key, ds.sample_training_queries(2, seed))) for seed in range(20)}
    assert len(orders) > 1  # the seed picks which queries
    assert ds.sample_training_queries(0, seed=1) == []
    assert ds.distinct_training_query_count() == len(every) == 4
    # the pool is what training draws from: every query sample_query can give, once
    assert {query_key(ds.sample_query(i)) for i in range(400)} == every


@pytest.fixture
def css_with_bad_pngs(css_dir):
    """The CSS fixture with 3D images (40x30 PNGs), three of each split broken: random bytes,
    a truncated PNG, and a header claiming 20000 x 20000 pixels."""
    os.makedirs(css_dir / "images")
    bad = {}
    for split in ("train", "test"):
        for i in range(5):
            path = css_dir / "images" / f"css_{split}_{i:06d}.png"
            rng = np.random.default_rng(i)
            PIL.Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(path)
        names = [css_dir / "images" / f"css_{split}_{i:06d}.png" for i in (1, 2, 3)]
        names[0].write_bytes(np.random.default_rng(7).bytes(300))
        names[1].write_bytes(names[1].read_bytes()[:200])
        names[2].write_bytes(huge_png_bytes(20000, 20000))
        bad[split] = {1: str(names[0]), 2: str(names[1]), 3: str(names[2])}
    return css_dir, bad


def test_bad_css_pngs_are_skipped_and_counted(css_with_bad_pngs):
    css_dir, bad = css_with_bad_pngs
    ds = datasets.CSSDataset(str(css_dir), "test", transform=datasets.to_uint8_tensor)
    assert ds.get_img(0).shape == (3, 30, 40)
    with pytest.warns(datasets.BadImageWarning) as record:
        for idx in bad["test"]:
            grey = ds.get_img(idx)  # a grey stand-in of the split's size: the gallery batches
            assert grey.shape == (3, 30, 40)
            assert grey[:, 0, 0].tolist() == [124, 116, 104] and (grey == grey[:, :1, :1]).all()
    messages = " ".join(str(w.message) for w in record)
    assert all(path in messages for path in bad["test"].values())
    assert "refusing a decompression bomb" in messages
    assert ds.bad_image_count() == 3 and sorted(ds.bad_image_paths()) == sorted(
        bad["test"].values()
    )
    assert "3 in test" in datasets.bad_image_summary(ds)
    # training queries that touch a bad image are redrawn
    train = datasets.CSSDataset(str(css_dir), "train", transform=datasets.to_uint8_tensor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", datasets.BadImageWarning)
        items = [train[i] for i in range(40)]
    for item in items:
        assert item["source_img_id"] not in bad["train"]
        assert item["target_img_id"] not in bad["train"]


def test_bad_css_pngs_fail_naming_the_file(css_with_bad_pngs):
    css_dir, bad = css_with_bad_pngs
    ds = datasets.CSSDataset(str(css_dir), "test", datasets.to_uint8_tensor, on_bad_image="fail")
    for idx, path in bad["test"].items():
        with pytest.raises(datasets.BadImageError, match=re.escape(path)):
            ds.get_img(idx)
    with pytest.raises(datasets.BadImageError, match="refusing a decompression bomb"):
        ds.get_img(3)
    with pytest.raises(ValueError, match="on_bad_image"):
        datasets.CSSDataset(str(css_dir), "test", on_bad_image="ignore")


def test_progress_bars_in_a_log_file_are_redrawn_rarely():
    """In a log file (not a terminal) a bar is drawn at the start and the end only, not every
    0.1 s; on a terminal it is redrawn as usual."""
    import io
    import time

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    redraws = {}
    for name, file in (("log", io.StringIO()), ("terminal", Terminal())):
        for _ in datasets.progress(range(40), file=file, desc="encode"):
            time.sleep(0.02)  # 0.8 s in all
        redraws[name] = file.getvalue().count("\r")
    assert redraws["log"] <= 3 < redraws["terminal"], redraws


def test_nested_progress_bars_in_a_log_file_write_no_cursor_movement():
    import io

    log = io.StringIO()
    for _ in datasets.progress(range(2), file=log, desc="train"):
        for _ in datasets.progress(range(3), file=log, desc="eval"):
            pass
    assert "eval: 100%" in log.getvalue() and "train: 100%" in log.getvalue()
    assert "\x1b[" not in log.getvalue()
