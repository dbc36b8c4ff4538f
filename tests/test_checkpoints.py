"""Resumable runs: --resume, SIGINT/SIGTERM/SIGKILL, atomic checkpoints, bad checkpoints,
non-finite losses, and the precision paths (bf16 autocast, the fp16 GradScaler) of a step.

Runs are real: ``main.main`` in-process, or ``python main.py`` in a subprocess where a signal or
a kill must hit a separate process. Data: a tiny synthetic CSS (6 scenes per split).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import checkpoints
import datasets
import distributed
import main
from checkpoints import RESUME_KEYS, find_resume_checkpoint, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "shared_data"
    main.resolve_dataset_path(main.parse_args(["--synthetic_size", "6", "--data_dir", str(path)]))
    return path


def run_argv(data_dir, log_dir, *extra) -> list[str]:
    # TIRG with L_S and L_GA^I (its noise is seeded per iteration: a resume must redraw it).
    return [
        "--dataset", "css3d", "--synthetic_size", "6", "--data_dir", str(data_dir),
        "--log_dir", str(log_dir), "--model", "tirg", "--image_embed_dim", "16",
        "--batch_size", "4", "--train_eval_queries", "16", "--eval_batch_size", "64",
        "--loader_num_workers", "0", "--sim_weight", "0.01", "--ga_iso_gamma", "0.01",
        "--comment", "res", *extra,
    ]  # fmt: skip


def run_dirs(log_dir) -> list[str]:
    return sorted(os.path.join(log_dir, n) for n in os.listdir(log_dir))


def read(path) -> str:
    with open(path) as f:
        return f.read()


def subprocess_env() -> dict:
    # The same thread count as this process, so subprocess and in-process runs compute the same
    # bits; unbuffered output so that the test sees progress as it happens.
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    return env


def wait_for(predicate, process, timeout=300.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            out = process.stdout.read() if process.stdout else ""
            pytest.fail(f"the run ended (rc {process.returncode}) before {what}:\n{out[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def metrics_iterations(log_dir) -> list[int]:
    dirs = run_dirs(log_dir) if os.path.isdir(log_dir) else []
    path = os.path.join(dirs[0], "metrics.jsonl") if dirs else None
    if not path or not os.path.isfile(path):
        return []
    out = []
    for line in read(path).splitlines():
        try:
            out.append(json.loads(line)["iteration"])
        except json.JSONDecodeError:
            pass
    return out


# --------------------------------------------------------------------------- resume


def test_resume_auto_continues_exactly(data_dir, tmp_path):
    """3 iterations in one go, and 1 then --resume to 3: identical final metrics lines and
    bit-identical weights (optimizer momentum, iteration, best metric, per-step seeds)."""
    common = ["--eval_every", "3", "--checkpoint_every", "0"]
    main.main(run_argv(data_dir, tmp_path / "a", *common, "--num_iters", "3"))
    main.main(run_argv(data_dir, tmp_path / "b", *common, "--num_iters", "1"))
    # --num_iters changes, so the run is named (--resume auto continues equal arguments only)
    (first,) = run_dirs(tmp_path / "b")
    main.main(run_argv(data_dir, tmp_path / "b", *common, "--num_iters", "3", "--resume", first))
    (a,), (b,) = run_dirs(tmp_path / "a"), run_dirs(tmp_path / "b")
    assert metrics_iterations(tmp_path / "b") == [1, 1, 3, 3]
    lines_b = read(os.path.join(b, "metrics.jsonl")).splitlines()
    assert read(os.path.join(a, "metrics.jsonl")).splitlines() == lines_b[2:]
    state_a = torch.load(os.path.join(a, "latest.pt"), weights_only=True)
    state_b = torch.load(os.path.join(b, "latest.pt"), weights_only=True)
    assert state_a["iteration"] == state_b["iteration"] == 3
    train_m = [json.loads(line)["M_s"] for line in lines_b]
    assert state_b["best_metric"] == max(train_m)  # carried over the resume
    for name, tensor in state_a["model"].items():
        if torch.is_tensor(tensor):
            assert torch.equal(tensor, state_b["model"][name]), name
    momentum_a = [s["momentum_buffer"] for s in state_a["optimizer"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in state_b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b, strict=True))


def test_sigterm_writes_a_checkpoint_and_exits_143_saying_how_to_resume(data_dir, tmp_path, capsys):
    """A real SIGTERM to this process during training (sent by a thread once the first
    evaluation is written): the step finishes, latest.pt holds it, and main exits with 143 and
    the resume command; --resume auto then finds that checkpoint."""
    log_dir = tmp_path / "cut"
    argv = run_argv(data_dir, log_dir, "--num_iters", "40", "--eval_every", "2")
    # A signal arriving after training (handlers restored) must not kill pytest.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)

    finished = threading.Event()

    def send_after_first_evaluation():
        while 2 not in metrics_iterations(log_dir):
            if finished.wait(0.02):
                return  # the run ended first: the assertions below say how
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=send_after_first_evaluation, daemon=True)
    sender.start()
    try:
        with pytest.raises(SystemExit) as exit_info:
            main.main(argv)
    finally:
        finished.set()
        sender.join()
        signal.signal(signal.SIGTERM, previous)
    assert exit_info.value.code == 128 + signal.SIGTERM
    (run_dir,) = run_dirs(log_dir)
    latest = os.path.join(run_dir, "latest.pt")
    stopped = torch.load(latest, weights_only=True)["iteration"]
    assert 2 <= stopped < 40
    assert metrics_iterations(log_dir)[-1] <= stopped
    captured = capsys.readouterr()
    assert f"received SIGTERM: writing a checkpoint of iteration {stopped}" in captured.out
    assert f"interrupted by SIGTERM at iteration {stopped}" in captured.err
    assert f"--resume {run_dir}" in captured.err and "--resume auto" in captured.err
    assert find_resume_checkpoint(main.parse_args([*argv, "--resume", "auto"])) == latest


@pytest.mark.slow
def test_sigterm_to_a_subprocess_then_resume_matches_uninterrupted(data_dir, tmp_path):
    """SIGTERM mid-run to a separate process: the step finishes, latest.pt is written, the
    process exits 143 saying how to resume; --resume auto then ends with the uninterrupted
    run's metrics."""
    common = ["--num_iters", "6", "--eval_every", "2", "--checkpoint_every", "0"]
    main.main(run_argv(data_dir, tmp_path / "ref", *common))
    log_dir = tmp_path / "cut"
    process = subprocess.Popen(
        [sys.executable, "main.py", *run_argv(data_dir, log_dir, *common)],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for(lambda: 2 in metrics_iterations(log_dir), process, what="the first evaluation")
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, out
    (run_dir,) = run_dirs(log_dir)
    state = torch.load(os.path.join(run_dir, "latest.pt"), weights_only=True)
    stopped = state["iteration"]
    assert 2 <= stopped < 6
    assert f"interrupted by SIGTERM at iteration {stopped}" in out
    assert f"--resume {run_dir}" in out and "--resume auto" in out
    main.main(run_argv(data_dir, log_dir, *common, "--resume", "auto"))
    assert run_dirs(log_dir) == [run_dir]
    (ref,) = run_dirs(tmp_path / "ref")
    assert read(os.path.join(run_dir, "metrics.jsonl")) == read(os.path.join(ref, "metrics.jsonl"))


def test_sigterm_to_the_process_group_with_loader_workers_still_checkpoints(data_dir, tmp_path):
    """``timeout``, Slurm and Ctrl-C signal the whole process group, DataLoader workers included:
    the workers must survive so that the main process finishes the step, writes latest.pt and
    exits 143 (a killed worker used to abort the step with a DataLoader error)."""
    log_dir = tmp_path / "group"
    argv = run_argv(data_dir, log_dir, "--num_iters", "400", "--eval_every", "2")
    argv[argv.index("--loader_num_workers") + 1] = "2"
    process = subprocess.Popen(
        [sys.executable, "main.py", *argv, "--checkpoint_every", "0"],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as under ``timeout`` or a scheduler
    )
    # Training and evaluation loaders both have workers by now.
    wait_for(lambda: 4 in metrics_iterations(log_dir), process, what="the second evaluation")
    os.killpg(process.pid, signal.SIGTERM)
    out, _ = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, out
    assert "DataLoader worker" not in out, out
    (run_dir,) = run_dirs(log_dir)
    state = torch.load(os.path.join(run_dir, "latest.pt"), weights_only=True)
    assert 0 < state["iteration"] < 400
    assert f"interrupted by SIGTERM at iteration {state['iteration']}" in out


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_auto_ends_with_identical_metrics(tmp_path):
    """The brief's scenario: the small synthetic CSS, batch 8, 12 iterations evaluated every 4,
    checkpoints every 2; SIGKILL (no chance to save) after the first evaluation, resume auto."""
    argv = [
        "--synthetic_size", "small", "--data_dir", str(tmp_path / "data"), "--batch_size", "8",
        "--train_eval_queries", "50", "--loader_num_workers", "0", "--num_iters", "12",
        "--eval_every", "4", "--checkpoint_every", "2", "--ga", "--comment", "kill",
    ]  # fmt: skip
    reference = subprocess.run(
        [sys.executable, "main.py", *argv, "--log_dir", str(tmp_path / "ref")],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    log_dir = tmp_path / "killed"
    cmd = [sys.executable, "main.py", *argv, "--log_dir", str(log_dir)]
    process = subprocess.Popen(
        cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    wait_for(lambda: 4 in metrics_iterations(log_dir), process, what="the first evaluation")
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    resumed = subprocess.run(
        [*cmd, "--resume", "auto"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    (ref,), (run_dir,) = run_dirs(tmp_path / "ref"), run_dirs(log_dir)
    assert read(os.path.join(run_dir, "metrics.jsonl")) == read(os.path.join(ref, "metrics.jsonl"))
    assert metrics_iterations(log_dir) == [4, 4, 8, 8, 12, 12]


def test_find_resume_checkpoint_auto_picks_the_newest_run_of_the_comment(tmp_path):
    def make(name, checkpoint=True):
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "args.json", "w") as f:
            json.dump(vars(args), f)
        if checkpoint:
            (tmp_path / name / "latest.pt").write_bytes(b"x")

    args = main.parse_args(["--log_dir", str(tmp_path), "--comment", "exp", "--resume", "auto"])
    assert find_resume_checkpoint(args) is None  # nothing yet: a new run starts
    make("20240101-000000_exp")
    make("20240101-000000_exp.1")
    make("20240102-000000_other_exp")  # another comment that ends with _exp
    make("20240103-000000_exp", checkpoint=False)  # started, never checkpointed
    expected = str(tmp_path / "20240101-000000_exp.1" / "latest.pt")
    assert find_resume_checkpoint(args) == expected
    args.resume = str(tmp_path / "20240101-000000_exp")
    assert find_resume_checkpoint(args) == str(tmp_path / "20240101-000000_exp/latest.pt")
    args.resume = str(tmp_path / "20240103-000000_exp")
    with pytest.raises(checkpoints.RunError, match="does not exist"):
        find_resume_checkpoint(args)


def test_resume_auto_continues_a_run_older_than_a_flag_at_its_default(tmp_path, capsys):
    """A run made before a flag existed (its args.json lacks the key) is continued by
    --resume auto while the flag stays at its default, and not once the flag is set."""
    argv = ["--log_dir", str(tmp_path), "--comment", "exp", "--resume", "auto"]
    args = main.parse_args(argv)
    old = {k: v for k, v in vars(args).items() if k != "ga_iso_form"}
    os.makedirs(tmp_path / "20240101-000000_exp")
    (tmp_path / "20240101-000000_exp" / "args.json").write_text(json.dumps(old))
    (tmp_path / "20240101-000000_exp" / "latest.pt").write_bytes(b"x")
    defaults = vars(main.parse_args([]))
    expected = str(tmp_path / "20240101-000000_exp" / "latest.pt")
    assert find_resume_checkpoint(args, defaults) == expected
    checkpoints.release_run_folders()
    assert find_resume_checkpoint(args) is None  # without the defaults: a difference
    assert "--ga_iso_form None -> paper" in capsys.readouterr().out
    public = main.parse_args([*argv, "--ga_iso_form", "public"])
    assert find_resume_checkpoint(public, defaults) is None
    assert "--ga_iso_form None -> public" in capsys.readouterr().out


def test_restore_training_refuses_optimizer_state_of_another_parameter_order():
    """SGD's state follows parameters by position: a checkpoint written for another order (the
    normalization layer's scale moved) is refused, naming the shapes, instead of running with
    momentum buffers of the wrong tensors."""
    scale, weight, bias = (torch.nn.Parameter(torch.ones(s)) for s in ((), (3, 2), (3,)))
    writer = torch.optim.SGD([weight, bias, scale], lr=0.1, momentum=0.9)
    (weight.sum() + bias.sum() + scale).backward()
    writer.step()
    state = {"optimizer": writer.state_dict()}

    reader = torch.optim.SGD([scale, weight, bias], lr=0.1, momentum=0.9)
    with pytest.raises(
        checkpoints.RunError, match=r"number 0 has shape \(3, 2\), the parameter \(\)"
    ):
        checkpoints.restore_training(reader, None, state, "old.pt")

    same = torch.optim.SGD([weight, bias, scale], lr=0.1, momentum=0.9)
    checkpoints.restore_training(same, None, state, "same.pt")
    torch.testing.assert_close(same.state[weight]["momentum_buffer"], torch.ones(3, 2))


def test_truncate_metrics_drops_later_and_torn_lines(tmp_path):
    lines = [json.dumps({"iteration": i, "split": "test"}) for i in (2, 4, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"iteration": 8, "spl')
    checkpoints.truncate_metrics(str(tmp_path), 4)
    assert (tmp_path / "metrics.jsonl").read_text() == lines[0] + "\n" + lines[1] + "\n"
    (tmp_path / "metrics.jsonl").write_text('{"iteration": 2}\nnot json\n{"iteration": 4}\n')
    with pytest.raises(checkpoints.RunError, match="metrics.jsonl:2"):
        checkpoints.truncate_metrics(str(tmp_path), 4)


def test_resume_command_replaces_resume():
    argv = ["--model", "tirg", "--resume", "auto", "--comment", "a b", "--resume=x"]
    assert checkpoints.resume_command(argv, "/logs/r 1") == (
        "python main.py --model tirg --comment 'a b' --resume '/logs/r 1'"
    )


# --------------------------------------------------------------------------- checkpoints


def small_state(value: float, size: int = 1000) -> dict:
    return {
        "format": checkpoints.CHECKPOINT_FORMAT,
        "model": {"w": torch.full((size,), value)},
        "optimizer": {},
        "iteration": int(value),
        "best_metric": 0.0,
        "args": {"model": "tirg", "dataset": "css3d", "image_embed_dim": 16},
    }


def tirg_args(*extra):
    return main.parse_args(["--model", "tirg", "--image_embed_dim", "16", *extra])


def test_save_checkpoint_is_atomic_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "latest.pt")
    checkpoints.save_checkpoint(path, small_state(1.0))
    checkpoints.save_checkpoint(path, small_state(2.0))
    assert os.listdir(tmp_path) == ["latest.pt"]
    assert load_checkpoint(path, tirg_args(), RESUME_KEYS)["iteration"] == 2


def test_failing_write_leaves_the_previous_checkpoint(tmp_path):
    """A real write that fails half-way: the file-size limit (RLIMIT_FSIZE) makes the kernel
    refuse the temporary file's bytes past 64 KiB, as a full disk would."""
    script = textwrap.dedent(
        f"""
        import os, resource, sys, torch
        sys.path.insert(0, {ROOT!r})
        import checkpoints
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_checkpoints import small_state
        path = {str(tmp_path / "latest.pt")!r}
        checkpoints.save_checkpoint(path, small_state(1.0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
        try:
            checkpoints.save_checkpoint(path, small_state(2.0, size=1_000_000))  # 4 MB
        except checkpoints.RunError as e:
            print("RunError:", e)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "RunError: could not write the checkpoint" in result.stdout
    assert "the previous checkpoint is intact" in result.stdout
    assert os.listdir(tmp_path) == ["latest.pt"]  # the partial temporary file was removed
    state = load_checkpoint(str(tmp_path / "latest.pt"), tirg_args(), RESUME_KEYS)
    assert state["iteration"] == 1 and torch.equal(state["model"]["w"], torch.ones(1000))


def test_kill_mid_write_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL a process that rewrites a 32 MB checkpoint in a loop until the kill lands during
    a write (its temporary file is left behind); the checkpoint is then one complete version."""
    path = tmp_path / "latest.pt"
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {ROOT!r})
        import checkpoints
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_checkpoints import small_state
        version = 0
        while True:
            version += 1
            checkpoints.save_checkpoint({str(path)!r}, small_state(float(version), size=8_000_000))
            print(version, flush=True)
        """
    )
    for _attempt in range(20):
        for name in os.listdir(tmp_path):
            os.remove(tmp_path / name)
        process = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        process.stdout.readline()  # the first version is complete
        # kill as soon as the next version's temporary file has bytes in it
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            temporaries = [n for n in os.listdir(tmp_path) if ".tmp." in n]
            if temporaries and os.path.getsize(tmp_path / temporaries[0]) > 0:
                break
        process.kill()
        process.communicate()
        if any(".tmp." in n for n in os.listdir(tmp_path)):
            break  # the kill landed mid-write
    else:
        pytest.fail("no kill landed during a write in 20 attempts")
    state = load_checkpoint(str(path), tirg_args(), RESUME_KEYS)
    w = state["model"]["w"]
    assert w.shape == (8_000_000,) and torch.equal(w, torch.full_like(w, float(state["iteration"])))
    assert checkpoints.remove_stale_temporaries(
        str(tmp_path)
    )  # what a resume does with the leftover
    assert os.listdir(tmp_path) == ["latest.pt"]


@pytest.fixture
def foreign_checkpoints(tmp_path):
    """Files that are not checkpoints of a 16-dim TIRG, each with the message it must give."""
    cases = {}
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    cases["random.pt"] = "is not a readable TIRG-GA checkpoint"
    good = tmp_path / "good.pt"
    checkpoints.save_checkpoint(str(good), small_state(1.0, size=100_000))
    (tmp_path / "torn.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    cases["torn.pt"] = "is not a readable TIRG-GA checkpoint"
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "state_dict.pt")
    cases["state_dict.pt"] = r"holds a bare state_dict \(2 tensors\)"
    torch.save({"weights": [1, 2]}, tmp_path / "other_dict.pt")
    cases["other_dict.pt"] = "lacks model, optimizer, iteration, best_metric, args"
    concat = small_state(1.0)
    concat["args"]["model"] = "concat"
    torch.save(concat, tmp_path / "concat.pt")
    cases["concat.pt"] = "holds a checkpoint of --model concat, but this run asks for --model tirg"
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled_module.pt")
    cases["pickled_module.pt"] = "is not a readable TIRG-GA checkpoint .*names the Python global"
    cases["missing.pt"] = "checkpoint not found"
    return tmp_path, cases


def test_corrupt_or_foreign_checkpoints_give_clear_errors(foreign_checkpoints):
    folder, cases = foreign_checkpoints
    for name, message in cases.items():
        path = str(folder / name)
        with pytest.raises(checkpoints.RunError, match=message) as error:
            load_checkpoint(path, tirg_args(), RESUME_KEYS)
        assert path in str(error.value), name


def test_bad_checkpoint_exits_2_without_a_traceback(data_dir, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(os.urandom(1000))
    with pytest.raises(SystemExit) as exit_info:
        main.main(run_argv(data_dir, tmp_path / "logs", "--resume", str(bad)))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {bad} is not a readable TIRG-GA checkpoint" in err
    assert "Traceback" not in err
    # a checkpoint of another --model, through the whole command
    model = main.build_model(tirg_args("--model", "concat"), datasets_for(data_dir))
    optimizer = main.build_optimizer(tirg_args(), model)[0]
    state = checkpoints.checkpoint_state(
        model, optimizer, None, tirg_args("--model", "concat"), 3, 1.0
    )
    checkpoints.save_checkpoint(str(tmp_path / "concat.pt"), state)
    with pytest.raises(SystemExit) as exit_info:
        main.main(run_argv(data_dir, tmp_path / "logs", "--resume", str(tmp_path / "concat.pt")))
    assert exit_info.value.code == 2
    assert "holds a checkpoint of --model concat" in capsys.readouterr().err


def datasets_for(data_dir):
    args = main.parse_args(["--synthetic_size", "6", "--data_dir", str(data_dir)])
    return main.build_datasets(args)[0]


# --------------------------------------------------------------------------- non-finite loss


def test_non_finite_loss_stops_naming_term_and_iteration_keeping_last_checkpoint(
    data_dir, tmp_path, capsys
):
    """--learning_rate 1e30: step 0's update leaves huge but finite weights, which are
    checkpointed; step 1's loss is NaN and the run stops naming it, keeping that checkpoint.
    1e38: the update itself overflows to inf; such weights are never checkpointed."""
    for lr, log_dir in (("1e30", tmp_path / "nan_loss"), ("1e38", tmp_path / "inf_weights")):
        argv = run_argv(
            data_dir, log_dir, "--learning_rate", lr, "--num_iters", "6",
            "--checkpoint_every", "1", "--eval_every", "100",
        )  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            main.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        (run_dir,) = run_dirs(log_dir)
        latest = os.path.join(run_dir, "latest.pt")
        if lr == "1e30":
            state = torch.load(latest, weights_only=True)
            assert state["iteration"] == 1
            weights = [t for t in state["model"].values() if torch.is_tensor(t)]
            assert all(torch.isfinite(t).all() for t in weights if t.is_floating_point())
            assert "non-finite loss at iteration 1: term 'ce' = nan" in err
            assert f"the last good checkpoint is {latest}" in err
            assert "may have exploded already" in err and "best.pt" in err
            assert "lower --learning_rate" in err
        else:
            assert not os.path.exists(latest)
            assert "non-finite weights after iteration 1: img_model.conv1.weight" in err
            assert "no checkpoint was written yet" in err and "lower --learning_rate" in err


# --------------------------------------------------------------------------- precision


def one_step_setup(data_dir, *extra, image_size=64):
    """A tiny TIRG with every GA term, and a batch of 4 training queries."""
    args = main.parse_args(
        ["--synthetic_size", "6", "--data_dir", str(data_dir), "--image_embed_dim", "16",
         "--ga", "--ga_adv_eps", "0.05", "--batch_size", "4", *extra]
    )  # fmt: skip
    distributed.seed_everything(0)
    trainset, _ = main.build_datasets(args)
    model = main.build_model(args, trainset)
    optimizer = main.build_optimizer(args, model)[0]
    batch = datasets.collate_queries([trainset[i] for i in range(4)])
    for key in ("source_img_data", "target_img_data"):
        images = batch[key].float()
        images = torch.nn.functional.interpolate(images, size=(image_size,) * 2, mode="area")
        batch[key] = images.round().to(torch.uint8)
    return args, model, optimizer, batch


def test_bf16_step_with_ga_on_cpu_is_finite_and_close_to_fp32(data_dir):
    """A bf16 autocast step with every GA term gives finite losses, close to fp32's, and L_GA^A's
    second-order gradient (double backprop through the autocast graph) points where fp32's does.

    The comparisons run in eval mode: with BatchNorm's statistics of a 4-image batch, dL/dx (and
    so L_GA^A) is dominated by the batch-statistics terms, nearly cancelling sums that bf16
    resolves to a factor of 2 (L_GA^A 60 against 131 measured); with running statistics it is
    the model's own input gradient. In train mode the bf16 step must still be finite."""
    values = {}
    for mode in ("train", "eval"):
        for precision in ("fp32", "bf16"):
            args, model, optimizer, batch = one_step_setup(data_dir, "--precision", precision)
            model.train(mode == "train")
            distributed.seed_step(0, 0, 0)
            step = main.train_step(model, optimizer, batch, args, torch.device("cpu"), 0)
            values[mode, precision] = {name: value.item() for name, value in step.items()}
    assert all(math.isfinite(v) for v in values["train", "bf16"].values())
    values = {precision: values["eval", precision] for precision in ("fp32", "bf16")}
    assert values["bf16"].keys() == values["fp32"].keys() >= {"ce", "sim", "ga_adv", "ga_iso"}
    for name, value in values["bf16"].items():
        assert value == pytest.approx(values["fp32"][name], rel=0.05), name
    assert values["bf16"]["ce"] != values["fp32"]["ce"]  # autocast did run in bf16

    def step_gradient(*extra):
        """The gradient a plain SGD step (lr 1) of train_step follows, in eval mode."""
        args, model, _, batch = one_step_setup(data_dir, "--ga_iso_gamma", "0", *extra)
        model.eval()
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        main.train_step(model, optimizer, batch, args, torch.device("cpu"), 0)
        return before - torch.cat([p.detach().flatten() for p in model.parameters()])

    # L_GA^A's gradient: the step with it minus the step without it.
    gradients = {
        precision: step_gradient("--precision", precision)
        - step_gradient("--precision", precision, "--ga_adv_eps", "0")
        for precision in ("fp32", "bf16")
    }
    fp32, bf16 = gradients["fp32"], gradients["bf16"]
    assert fp32.norm() > 0
    assert torch.nn.functional.cosine_similarity(fp32, bf16, dim=0) > 0.9
    assert bf16.norm() == pytest.approx(fp32.norm().item(), rel=0.1)


def test_grad_scaler_step_equals_the_unscaled_step(data_dir):
    """The fp16 plumbing of train_step (scaled backward, scaled dL/dx for L_GA^A, unscale before
    the L_GA^I noise, scaler.step/update), run for real with a CPU GradScaler: the same update as
    without a scaler; and an overflowing scale skips the step."""
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**12)):
        args, model, optimizer, batch = one_step_setup(data_dir, image_size=32)
        distributed.seed_step(0, 0, 0)
        values = main.train_step(model, optimizer, batch, args, torch.device("cpu"), 0, scaler)
        values = {name: value.item() for name, value in values.items()}
        results.append((values, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (plain, plain_params), (scaled, scaled_params) = results
    assert scaled.pop("fp16_skipped") == 0.0
    assert scaled == pytest.approx(plain, rel=1e-4)
    for name, p in plain_params.items():
        assert torch.allclose(scaled_params[name], p, rtol=1e-4, atol=1e-6), name

    args, model, optimizer, batch = one_step_setup(data_dir, image_size=32)
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    values = main.train_step(model, optimizer, batch, args, torch.device("cpu"), 0, scaler)
    assert values["fp16_skipped"] == 1.0 and scaler.get_scale() == 2.0**126
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_two_ctrl_c_to_the_process_group_end_the_run_within_seconds(data_dir, tmp_path):
    """Ctrl-C twice, 0.5 s apart, to a run in its own process group with 2 loader workers (which
    ignore SIGINT and SIGTERM): the first press says a checkpoint is coming and a second press
    aborts; the second ends the process within 10 s, with no traceback and no hang in
    multiprocessing's exit hook."""
    log_dir = tmp_path / "logs"
    argv = [
        *run_argv(data_dir, log_dir, "--num_iters", "100000", "--eval_every", "100000"),
        "--loader_num_workers",
        "2",
        "--batch_size",
        "48",
        "--ga",
        "--ga_adv_eps",
        "1e-3",
        "--image_embed_dim",
        "512",
    ]  # fmt: skip  (steps long enough for both presses)
    proc = subprocess.Popen(
        [sys.executable, "-u", os.path.join(ROOT, "main.py"), *argv],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (log_dir.exists() and run_dirs(log_dir) and os.listdir(run_dirs(log_dir)[0])):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(3)  # training, with its loader workers up
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert "press Ctrl-C again to abort without one" in err
    assert "aborted without a checkpoint" in err


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_a_hostile_checkpoint_is_refused_naming_its_global_without_unsafe_advice(tmp_path):
    """A pickle that names os.system, and one whose names carry terminal escape codes: the error
    names the refused global, never suggests weights_only=False, and prints no escape code."""
    plain = tmp_path / "runs_code.pt"
    torch.save({"model": _RunsCode()}, plain)
    escapes = tmp_path / "escapes.pt"
    escapes.write_bytes(b"\x80\x02cos\x1b[2J\nsystem\x1b[31m\n)R.")
    for path, name in ((plain, "system"), (escapes, "os.system")):
        with pytest.raises(checkpoints.RunError) as error:
            load_checkpoint(str(path), tirg_args())
        message = str(error.value)
        assert f"{name}, refused without running it" in message, message
        assert "weights_only" not in message and "\x1b" not in message


def test_resume_auto_continues_only_a_run_of_the_same_arguments(tmp_path, monkeypatch, capsys):
    """The README's sequence: a 300-iteration first look, then the main job with --resume auto.
    Both are named css3d_tirg_ga; the main job must not continue (and rewrite) the first look.
    The same arguments with paths spelled otherwise do continue it."""
    monkeypatch.chdir(tmp_path)
    first_look = main.parse_args(["--ga", "--num_iters", "300", "--log_dir", "logs"])
    run_dir = tmp_path / "logs" / "20240101-000000_css3d_tirg_ga"
    os.makedirs(run_dir)
    (run_dir / "latest.pt").write_bytes(b"x")
    with open(run_dir / "args.json", "w") as f:
        json.dump(vars(first_look), f)
    main_job = main.parse_args(["--ga", "--resume", "auto", "--log_dir", "logs"])
    assert find_resume_checkpoint(main_job) is None
    out = capsys.readouterr().out
    assert "other arguments (--num_iters 300 -> 210000)" in out and "starting a new run" in out
    again = main.parse_args(["--ga", "--num_iters", "300", "--resume", "auto",
                             "--log_dir", str(tmp_path / "logs")])  # fmt: skip
    assert find_resume_checkpoint(again) == str(tmp_path / "logs" / run_dir.name / "latest.pt")


def test_a_run_folder_in_use_is_never_resumed_twice(data_dir, tmp_path, capsys):
    """A run resumed in another process holds its folder: --resume PATH is refused naming the
    holder, --resume auto starts a new run saying why, and once the holder is gone (SIGKILL:
    the kernel drops the lock) the folder can be resumed again."""
    log_dir = tmp_path / "logs"
    main.main(run_argv(data_dir, log_dir, "--num_iters", "1"))
    (first,) = run_dirs(log_dir)
    long_run = run_argv(data_dir, log_dir, "--num_iters", "100000", "--eval_every", "100000")
    holder = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "main.py"), *long_run, "--resume", first],
        cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        lines = []
        wait_for(lambda: lines.append(holder.stdout.readline()) or "run folder" in lines[-1],
                 holder, what="the resumed run's folder")  # fmt: skip
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main.main([*long_run, "--resume", first])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"{first} is in use by another run (pid {holder.pid} on " in err
        assert find_resume_checkpoint(main.parse_args([*long_run, "--resume", "auto"])) is None
        assert f"--resume auto: {first} is in use by another run (pid {holder.pid}" in (
            capsys.readouterr().out
        )
        assert run_dirs(log_dir) == [first]  # nothing written into it by the refused runs
    finally:
        holder.kill()
        holder.wait()
    args = main.parse_args([*long_run, "--resume", "auto"])
    assert find_resume_checkpoint(args) == os.path.join(first, "latest.pt")
    checkpoints.release_run_folders()


def test_an_error_with_loader_workers_alive_ends_the_process(data_dir, tmp_path):
    """A bad image hit by a loader worker under --on_bad_image fail: the run exits 2 naming the
    file, without waiting on its 2 workers (they ignore SIGTERM, and multiprocessing's exit
    hook would join them without a timeout)."""
    import shutil

    css = tmp_path / "css"
    shutil.copytree(data_dir / "css3d_synthetic_6_seed0", css)
    os.makedirs(css / "images")  # the 3D version: every image is expected here
    (css / "images" / "css_train_000000.png").write_bytes(os.urandom(300))
    argv = [*run_argv(data_dir, tmp_path / "logs", "--num_iters", "1000"), "--dataset_path",
            str(css), "--on_bad_image", "fail", "--loader_num_workers", "2"]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "main.py"), *argv], cwd=ROOT, env=subprocess_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 2, err[-2000:]
    assert "css_train_0000" in err and "Traceback" not in err
    assert time.monotonic() - started < 90


def test_the_run_folder_is_printed_the_same_way_on_start_and_on_resume(
    data_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    argv = run_argv(data_dir, "logs", "--num_iters", "1")
    main.main(argv)
    first = re.search(r"run folder: (.+)", capsys.readouterr().out).group(1)
    main.main([*argv[:-2], "--num_iters", "2", "--resume", first])
    again = re.search(r"run folder: (.+)", capsys.readouterr().out).group(1)
    assert first == again == str(tmp_path / "logs" / os.path.basename(first))
