"""End to end: main.main runs what the command line runs, on the small synthetic CSS."""

import json
import os

import pytest
import torch
from tb_events import read_scalars

import main


def small_run_args(tmp_path, *extra, log_dir=None):
    return [
        "--dataset",
        "css3d",
        "--synthetic_size",
        "small",
        "--data_dir",
        str(tmp_path.parent / "shared_data"),
        "--log_dir",
        str(log_dir or tmp_path / "logs"),
        "--batch_size",
        "8",
        "--num_iters",
        "6",
        "--eval_every",
        "3",
        "--train_eval_queries",
        "40",
        "--loader_num_workers",
        "0",
        "--comment",
        "e2e",
        *extra,
    ]


def only_run_dir(log_dir):
    (name,) = os.listdir(log_dir)
    return os.path.join(log_dir, name)


def test_end_to_end_writes_metrics_checkpoints_and_tensorboard(tmp_path, capsys):
    result = main.main(small_run_args(tmp_path, "--model", "tirg"))
    run_dir = only_run_dir(tmp_path / "logs")
    assert run_dir.endswith("_e2e")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [(m["iteration"], m["split"]) for m in lines] == [
        (3, "train"),
        (3, "test"),
        (6, "train"),
        (6, "test"),
    ]
    for m in lines:
        assert m["synthetic"] is True
        assert set(m) >= {"R@1", "R@5", "R@10", "M", "M_s", "M_t", "WHM"}
        assert 0.0 <= m["R@1"] <= m["R@5"] <= m["R@10"] <= 100.0
        assert m["M"] == pytest.approx((m["R@1"] + m["R@5"] + m["R@10"]) / 3)
    assert lines[-1]["M_t"] == pytest.approx(result["test"]["M"])
    assert set(lines[2]["loss"]) >= {"ce", "total"}  # the train line holds the step's terms
    with open(os.path.join(run_dir, "args.json")) as f:
        assert json.load(f)["model"] == "tirg"
    for name in ("latest.pt", "best.pt"):
        state = torch.load(os.path.join(run_dir, name), weights_only=True)
        assert state["args"]["model"] == "tirg" and "optimizer" in state
    assert torch.load(os.path.join(run_dir, "latest.pt"), weights_only=True)["iteration"] == 6
    tags = set(read_scalars(run_dir))
    assert {
        "train/total",
        "train/ce",
        "train/lr",
        "eval/test/R1",
        "eval/train/M",
        "eval/WHM",
    } <= tags
    out = capsys.readouterr().out.strip().splitlines()
    assert "SYNTHETIC" in out[-1] and "R@1" in out[-1]  # the last line: final test metrics
    assert sum(line.startswith("test results at iteration 6") for line in out) == 1  # once


def test_same_seed_same_metrics_and_test_only_reproduces_them(tmp_path):
    args = small_run_args(tmp_path, "--model", "tirg", "--loss", "soft_triplet")
    main.main(args + ["--log_dir", str(tmp_path / "a")])
    main.main(args + ["--log_dir", str(tmp_path / "b")])
    main.main(args + ["--log_dir", str(tmp_path / "c"), "--seed", "1"])
    a, b, c = (
        open(os.path.join(only_run_dir(tmp_path / x), "metrics.jsonl")).read() for x in "abc"
    )
    assert a == b
    assert a != c
    checkpoint = os.path.join(only_run_dir(tmp_path / "a"), "latest.pt")
    result = main.main(
        small_run_args(
            tmp_path,
            "--model",
            "tirg",
            "--test_only",
            "--model_checkpoint",
            checkpoint,
            log_dir=tmp_path / "t",
        )
    )
    final = [json.loads(line) for line in a.splitlines()][-1]
    assert result["test"]["M"] == pytest.approx(final["M_t"], abs=1e-9)
    # Labelled as what was trained: the checkpoint's iteration and settings (--loss came from it)
    test_dir = only_run_dir(tmp_path / "t")
    with open(os.path.join(test_dir, "metrics.jsonl")) as f:
        assert {json.loads(line)["iteration"] for line in f} == {6}
    with open(os.path.join(test_dir, "args.json")) as f:
        assert json.load(f)["loss"] == "soft_triplet"


def test_test_only_refuses_a_flag_that_conflicts_with_the_checkpoint(tmp_path, capsys):
    main.main(small_run_args(tmp_path, "--model", "tirg", "--ga", "--num_iters", "2",
                             "--eval_every", "2"))  # fmt: skip
    checkpoint = os.path.join(only_run_dir(tmp_path / "logs"), "latest.pt")
    with pytest.raises(SystemExit) as exit_info:
        main.parse_args(["--test_only", "--model_checkpoint", checkpoint, "--ga", "False"])
    assert exit_info.value.code == 2
    assert "--ga False conflicts with the checkpoint" in capsys.readouterr().err
    args = main.parse_args(["--test_only", "--model_checkpoint", checkpoint])
    assert args.ga is True and args.ga_adv_eps == 1e-6 and args.comment == "e2e"


@pytest.mark.parametrize("model", ["imgonly", "textonly", "concat", "tirg_lastconv"])
def test_every_model_trains_a_few_steps(tmp_path, model):
    result = main.main(
        small_run_args(tmp_path, "--model", model, "--num_iters", "2", "--eval_every", "2")
    )
    assert 0.0 <= result["test"]["R@1"] <= 100.0


def test_boolean_flags_accept_both_spellings():
    assert main.parse_args(["--test_only", "False"]).test_only is False
    assert main.parse_args(["--ga"]).ga is True
    assert main.parse_args(["--ga", "False"]).ga is False
    args = main.parse_args(["--ga", "True", "--sim_weight", "0"])
    assert args.sim_weight == 0.0 and args.ga_adv_eps == 1e-6 and args.ga_iso_gamma == 0.01
    assert main.parse_args([]).sim_weight == 0.0
    assert main.parse_args([]).pretrained is False
    with pytest.raises(SystemExit):
        main.parse_args(["--ga", "maybe"])
    with pytest.raises(SystemExit):
        main.parse_args(["--model", "no_such_model"])
    with pytest.raises(SystemExit):
        main.parse_args(["--dataset", "css3d", "--use_complete_text_query"])


def test_explicit_dataset_path_with_missing_files_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.main(
            [
                "--dataset",
                "css3d",
                "--dataset_path",
                str(tmp_path / "nowhere"),
                "--log_dir",
                str(tmp_path / "logs"),
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "css_toy_dataset_novel2_small.dup.npy" in err and "nowhere" in err
    assert not os.path.exists(tmp_path / "logs")  # nothing half-written


def test_pretrained_without_cached_weights_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    with pytest.raises(SystemExit):
        main.main(small_run_args(tmp_path, "--pretrained", "True"))
    err = capsys.readouterr().err
    assert "resnet18-f37072fd.pth" in err and "--pretrained False" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch_size", "1"], "--batch_size must be >= 2"),  # crashed inside BatchNorm
        (["--num_iters", "0"], "--num_iters must be >= 1"),  # exited 0 having done nothing
    ],
)
def test_arguments_that_cannot_train_are_refused_when_parsed(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.parse_args(flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_help_shows_every_default_once(capsys):
    with pytest.raises(SystemExit):
        main.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split()).split(" options: ", 1)[1]
    for flag, default in [("--num_iters", "210000"), ("--batch_size", "32"),
                          ("--learning_rate", "0.01"), ("--weight_decay", "1e-06"),
                          ("--seed", "0"), ("--log_dir", "./logs"), ("--device", "auto"),
                          ("--image_embed_dim", "512")]:  # fmt: skip
        help_text = text.split(f"{flag} ", 1)[1].split(" --", 1)[0]
        assert help_text.count("default") == 1 and f"(default: {default})" in help_text, flag
    sim = text.split("--sim_weight SIM_WEIGHT", 1)[1].split(" --", 1)[0]
    assert "None" not in sim and sim.count("default") == 1


def test_args_json_has_no_image_size_where_no_photographs_are_read():
    assert main.parse_args(["--dataset", "css3d"]).image_size is None
    assert main.parse_args(["--dataset", "mitstates"]).image_size == 224
