"""The qualitative figure of a run: its title line names the run, the iteration and the data."""

import os
import shutil
import types

import PIL.Image
import pytest
from tensorboardX import SummaryWriter

import css_generator
import datasets
import visualize


@pytest.fixture(scope="module")
def css_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("css")
    css_generator.generate(root, seed=0, size=2)
    return root


def ranked_lists(dataset, n_queries=2, k=10):
    out = []
    for q in range(n_queries):
        target = dataset.get_test_queries()[q]["target_img_id"]
        ids = [(target + j) % len(dataset.imgs) for j in range(k)]
        out.append({"query_index": q, "gallery_ids": ids, "correct": [j == 0 for j in range(k)]})
    return out


def write_figure(tmp_path, dataset, iteration):
    run_dir = tmp_path / "20240102-030405_css3d_tirg"
    run_dir.mkdir()
    run = types.SimpleNamespace(dir=str(run_dir), writer=SummaryWriter(str(run_dir)))
    try:
        result = {"ranked": ranked_lists(dataset)}
        return visualize.log_qualitative(run, dataset, result, iteration)
    finally:
        run.writer.close()


def test_title_names_run_iteration_and_the_synthetic_stand_in(tmp_path, css_root):
    dataset = datasets.CSSDataset(str(css_root), "test", datasets.to_uint8_tensor)
    assert dataset.synthetic
    path = write_figure(tmp_path, dataset, 300)
    assert path == str(tmp_path / "20240102-030405_css3d_tirg" / visualize.PNG_NAME)
    with PIL.Image.open(path) as png:
        assert png.text["Title"] == (
            "20240102-030405_css3d_tirg | iteration 300 | SYNTHETIC CSS stand-in (not the real "
            "CSS data)"
        )


def test_title_of_real_data_has_no_synthetic_note(tmp_path, css_root):
    real = tmp_path / "real"  # the same files without the stand-in's SYNTHETIC.json marker
    real.mkdir()
    shutil.copy(css_root / datasets.CSS_NPY, real / datasets.CSS_NPY)
    dataset = datasets.CSSDataset(str(real), "test", datasets.to_uint8_tensor)
    assert not dataset.synthetic
    path = write_figure(tmp_path, dataset, 0)
    with PIL.Image.open(path) as png:
        assert png.text["Title"] == "20240102-030405_css3d_tirg | iteration 0"
    assert visualize.title_parts("logs/run_a/", 5, True) == [
        "run_a",
        "iteration 5",
        visualize.SYNTHETIC_NOTE,
    ]
    assert os.path.getsize(path) > 5_000
