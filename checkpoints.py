"""Checkpoints, resuming, the run folder and stopping on a signal.

A checkpoint is a plain dict (``checkpoint_state``) written atomically (``save_checkpoint``) and
read with ``torch.load(weights_only=True)`` (``load_checkpoint``): nothing in a file runs.
``find_resume_checkpoint`` turns ``--resume`` into a checkpoint path; ``Run`` is a run folder with
its TensorBoard writer; ``StopOnSignal`` turns SIGINT/SIGTERM into a checkpoint and a clean stop.
"""

from __future__ import annotations

import errno
import fcntl
import json
import multiprocessing
import os
import re
import shlex
import signal
import socket
import sys
import threading
import time

import torch

import distributed


class RunError(RuntimeError):
    """An error meant for the person running the command: printed without a traceback."""


# What a checkpoint is: a dict written by torch.save with these entries (plain containers,
# strings, numbers and tensors only, so torch.load(weights_only=True) reads it):
#   format, version   "tirg-ga checkpoint", 1
#   model             the unwrapped model's state_dict (the LSTM vocabulary included)
#   optimizer         SGD's state_dict (momentum buffers; the learning rate follows iteration)
#   scaler            the fp16 GradScaler's state_dict ({} when it is off)
#   iteration         training steps done
#   best_metric       the best M_s so far (best.pt's selection criterion)
#   args              the command-line arguments, as a plain dict
#   world_size        the number of processes that trained it
# No RNG state is needed: every random draw of a step is a function of (seed, rank, iteration)
# (``seed_step``) and the training data of (seed, index).
CHECKPOINT_FORMAT = "tirg-ga checkpoint"
CHECKPOINT_VERSION = 1
RESUME_KEYS = ("model", "optimizer", "iteration", "best_metric", "args")


def checkpoint_state(
    model, optimizer, scaler, args, iteration: int, best_metric: float, world_size: int = 1
) -> dict:
    """The checkpoint dict described above; ``model`` may be wrapped in DDP."""
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": distributed.unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "iteration": iteration,
        "best_metric": best_metric,
        "args": dict(vars(args)),
        "world_size": world_size,
    }


def _fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (POSIX: the directory entry is data of the folder)."""
    if not hasattr(os, "O_DIRECTORY"):  # Windows: no directory handles to fsync
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:  # some network file systems refuse fsync on a directory
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def save_checkpoint(path: str, state: dict) -> None:
    """Write ``state`` to ``path`` atomically.

    torch.save goes to a temporary file in the same folder, which is fsynced and renamed over
    ``path``; the folder is then fsynced so the rename itself survives a power cut. A crash, a
    kill or a full disk at any point leaves either the previous file or the new one, never a
    torn one. A failed write raises RunError and removes the temporary file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    except (OSError, RuntimeError) as e:  # torch.save reports write errors as RuntimeError
        previous = "the previous checkpoint is intact" if os.path.isfile(path) else "none kept"
        raise RunError(
            f"could not write the checkpoint {path}: {e} (disk full or not writable?); {previous}"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def copy_checkpoint(source: str, path: str, state: dict) -> None:
    """Make ``path`` hold the checkpoint just written to ``source``, atomically: a hard link
    (no second write of the same bytes) renamed over ``path``, or a second write of ``state``
    where the file system has no hard links."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        os.link(source, tmp)
    except OSError:
        save_checkpoint(path, state)
        return
    try:
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(run_dir: str) -> list[str]:
    """Delete ``*.pt.tmp.<pid>`` files that a process killed mid-write left in ``run_dir``."""
    removed = []
    for name in os.listdir(run_dir):
        if re.fullmatch(r".+\.pt\.tmp\.\d+", name):
            os.remove(os.path.join(run_dir, name))
            removed.append(name)
    return removed


def load_checkpoint(path: str, args, keys=("model", "args")) -> dict:
    """Read a checkpoint written by ``save_checkpoint`` (weights_only: no code in it runs).

    Raises RunError with the path and what was expected for a missing file, a file torch cannot
    read (random bytes, a torn or foreign file, a pickle naming code), a dict that is not a
    TIRG-GA checkpoint (a bare state_dict, say) or lacks one of ``keys``, and a checkpoint of
    another --model, --dataset or --image_embed_dim.
    """
    if os.path.isdir(path):
        path = os.path.join(path, "latest.pt")
    if not os.path.isfile(path):
        raise RunError(f"checkpoint not found: {path} (expected a .pt file written by main.py)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RunError(
            f"{path} is not a readable TIRG-GA checkpoint ({_load_failure(e)}); expected a file "
            f"written by main.py with torch.save"
        ) from None
    if isinstance(state, dict) and state and all(torch.is_tensor(v) for v in state.values()):
        raise RunError(
            f"{path} holds a bare state_dict ({len(state)} tensors), not a TIRG-GA checkpoint: "
            f"main.py writes a dict with {', '.join(RESUME_KEYS)}"
        )
    missing = [k for k in keys if not isinstance(state, dict) or k not in state]
    if missing or not isinstance(state.get("args"), dict):
        found = sorted(map(str, state))[:8] if isinstance(state, dict) else type(state).__name__
        raise RunError(
            f"{path} is not a TIRG-GA checkpoint: it lacks {', '.join(missing) or 'args'} "
            f"(found {found}); main.py writes a dict with {', '.join(RESUME_KEYS)}"
        )
    saved = state["args"]
    for key in ("model", "dataset", "image_embed_dim", "text_encoder") if args else ():
        if saved.get(key, getattr(args, key)) != getattr(args, key):
            raise RunError(
                f"{path} holds a checkpoint of --{key} {saved.get(key)}, but this run "
                f"asks for --{key} {getattr(args, key)}"
            )
    return state


# What --test_only may set itself; every other setting comes from the checkpoint's arguments.
EVALUATION_FLAGS = {
    "dataset_path", "data_dir", "log_dir", "device", "loader_num_workers", "eval_batch_size",
    "test_only", "model_checkpoint", "resume", "comment", "train_eval_queries", "on_bad_image",
    "bert_host", "bert_port", "bert_port_out", "bert_timeout", "precision", "log_every",
    "checkpoint_every", "eval_every", "ensemble", "eval_split", "image_size", "write_submission",
    "feature_cache_dir", "circo_path",
}  # fmt: skip


def adopt_training_settings(parser, args, given: set[str]) -> None:
    """--test_only: the model, data set, GA terms, text encoder, ... of the checkpoint's run, so
    the result is labelled as what was trained; a conflicting flag is an error, a missing one
    is fine. The run folder is named after the checkpoint's run unless --comment is given."""
    try:
        saved = load_checkpoint(args.model_checkpoint, None, keys=("args",))["args"]
    except RunError as e:
        parser.error(str(e))
    for key, value in saved.items():
        if key in EVALUATION_FLAGS and not (key == "comment" and "comment" not in given):
            continue
        if key in given and getattr(args, key, value) != value:
            parser.error(
                f"--{key} {getattr(args, key)} conflicts with the checkpoint, which was trained "
                f"with --{key} {value} ({args.model_checkpoint}); leave the flag out"
            )
        setattr(args, key, value)


def _printable(text: str, keep_newlines: bool = False) -> str:
    """``text`` without terminal escape codes and control characters (what a file says)."""
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|[\x00-\x08\x0b-\x1f\x7f]", "", text)
    return text if keep_newlines else text.replace("\n", " ")


def _load_failure(error: Exception) -> str:
    """Why torch.load refused a file, for people: the global a pickle names (never torch's hint
    to load it with weights_only=False, which would run it), without the terminal escape codes
    a hostile file can put into the message."""
    text = _printable(str(error), keep_newlines=True)
    refused = re.search(r"GLOBAL (\S+)", text)
    if refused:
        return f"it names the Python global {refused.group(1)}, refused without running it"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def restore_model(model, state: dict, path: str) -> None:
    try:
        distributed.unwrap(model).load_state_dict(state["model"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise RunError(f"{path} does not fit this model: {str(e).splitlines()[0]}") from None


def restore_training(optimizer, scaler, state: dict, path: str) -> None:
    """Put the optimizer's (and the GradScaler's) state back from a checkpoint.

    The optimizer's state follows the parameters by position: a buffer whose shape is not its
    parameter's (a checkpoint of a model whose parameters came in another order) is refused."""
    try:
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and scaler.is_enabled() and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise RunError(
            f"{path}: its optimizer state does not fit this run: {str(e).splitlines()[0]}"
        ) from None
    for group in optimizer.param_groups:
        for index, p in enumerate(group["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and key != "step" and value.shape != p.shape:
                    raise RunError(
                        f"{path}: its optimizer state does not fit this run: its {key} number "
                        f"{index} has shape {tuple(value.shape)}, the parameter "
                        f"{tuple(p.shape)}. The model's parameters came in another order when it "
                        "was written (before 2026-12-03 the normalization layer came after the "
                        "encoders): resume it with the code that wrote it; --test_only "
                        "--model_checkpoint still evaluates it"
                    )


def reopen_run(args, state: dict, checkpoint: str, world_size: int) -> None:
    """Prepare a run folder for its resumed run: drop its metrics after the checkpoint and the
    temporaries of a killed write, and say what changed since the checkpoint."""
    resume_dir = os.path.dirname(os.path.abspath(checkpoint))
    start_iteration = state["iteration"]
    truncate_metrics(resume_dir, start_iteration)
    remove_stale_temporaries(resume_dir)
    print(
        f"resuming {resume_dir} at iteration {start_iteration} from {os.path.abspath(checkpoint)}"
    )
    changed = [
        f"--{key} {state['args'].get(key)} -> {value}"
        for key, value in sorted(vars(args).items())
        if key not in ("resume", "log_dir") and state["args"].get(key, value) != value
    ]
    if changed:
        print(f"note: arguments changed since the checkpoint: {'; '.join(changed)}")
    saved_batch = state.get("world_size", 1) * state["args"].get("batch_size", 0)
    if saved_batch != world_size * args.batch_size:
        print(
            f"note: the global batch was {saved_batch} and is now {world_size * args.batch_size}: "
            f"the run continues, but not as the uninterrupted run would have"
        )


def run_dir_pattern(comment: str) -> re.Pattern:
    """Names of the run folders ``Run`` makes for --comment: <YYYYmmdd-HHMMSS>_<comment>[.n]."""
    return re.compile(r"(\d{8}-\d{6})_" + re.escape(comment) + r"(?:\.(\d+))?")


def find_resume_checkpoint(args, defaults: dict | None = None) -> str | None:
    """The checkpoint --resume names.

    'auto': latest.pt of the newest run folder of this --comment under --log_dir whose recorded
    arguments (its args.json) equal this command's, ``--resume`` and the spelling of paths
    aside (and, given ``defaults``, a flag newer than the run at its default); None when there
    is none (a new run starts, and the note says why). An explicit folder (its latest.pt) or
    file may change arguments: the resumed run prints what changed.
    """
    if args.resume != "auto":
        path = args.resume
        if os.path.isdir(path):
            path = os.path.join(path, "latest.pt")
        if not os.path.isfile(path):
            raise RunError(
                f"--resume {args.resume}: {path} does not exist (expected a run folder holding "
                f"latest.pt, a checkpoint file, or 'auto')"
            )
        holder = lock_run_folder(os.path.dirname(os.path.abspath(path)))
        if holder:
            raise RunError(
                f"--resume {args.resume}: {os.path.dirname(os.path.abspath(path))} is in use by "
                f"another run ({holder}); wait for it to end, or stop it first"
            )
        return path
    pattern = run_dir_pattern(args.comment)
    candidates = []
    if os.path.isdir(args.log_dir):
        for name in os.listdir(args.log_dir):
            match = pattern.fullmatch(name)
            checkpoint = os.path.join(args.log_dir, name, "latest.pt")
            if match and os.path.isfile(checkpoint):
                candidates.append(((match.group(1), int(match.group(2) or 0)), checkpoint))
    reason = f"no run of --comment {args.comment} with a latest.pt under {args.log_dir}"
    for _, checkpoint in sorted(candidates, reverse=True):
        differences = argument_differences(os.path.dirname(checkpoint), args, defaults)
        if not differences:
            holder = lock_run_folder(os.path.dirname(checkpoint))
            if not holder:
                return checkpoint
            reason = f"{os.path.dirname(checkpoint)} is in use by another run ({holder})"
            break
        if reason.startswith("no run"):
            reason = (
                f"the newest run of --comment {args.comment}, {os.path.dirname(checkpoint)}, "
                f"was started with other arguments ({'; '.join(differences[:4])})"
            )
    print(f"--resume auto: {reason}; starting a new run")
    return None


# ----------------------------------------------------------------------- the run folder's lock
#
# A run holds an exclusive flock on <run>/.lock for as long as it writes there, so that two
# processes never resume into one folder (duplicate metrics, lost TensorBoard events, one run's
# cleanup deleting the other's checkpoint in progress). The kernel drops the lock when the
# process ends, however it ends; the file keeps who held it last.
LOCK_FILE = ".lock"
_held: dict[str, int] = {}  # folder -> file descriptor of the lock this process holds


def lock_run_folder(folder: str) -> str | None:
    """Take ``folder``'s lock: None when this process holds it now, else who holds it."""
    folder = os.path.abspath(folder)
    if folder in _held:
        return None
    fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        return _printable(holder)
    os.ftruncate(fd, 0)
    holder = (
        f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    )
    os.write(fd, f"{holder}: {' '.join(sys.argv)}\n".encode())
    _held[folder] = fd
    return None


def release_run_folders() -> None:
    """Give up every run folder lock of this process (also done by the kernel at exit)."""
    for fd in _held.values():
        os.close(fd)
    _held.clear()


# Keys of args.json that a resumed run may differ in: how it was resumed, and what the run sets
# itself once the data are loaded.
_NOT_COMPARED = ("resume", "world_size")
_PATH_KEYS = ("dataset_path", "data_dir", "log_dir", "model_checkpoint", "word_vectors")


def argument_differences(run_dir: str, args, defaults: dict | None = None) -> list[str]:
    """'--key recorded -> now' for each argument of ``args`` that differs from the run's
    args.json (paths compared as absolute paths); a run without a readable args.json differs.

    A key the args.json lacks is a flag added after the run was made; at its value in
    ``defaults`` (the parsed defaults, which keep the older behaviour) it is no difference."""
    try:
        with open(os.path.join(run_dir, "args.json")) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return ["no readable args.json"]

    def plain(key, value):
        if key in _PATH_KEYS and isinstance(value, str):
            return os.path.abspath(os.path.expanduser(value))
        return value

    differences = []
    for key, value in sorted(vars(args).items()):
        if key in _NOT_COMPARED or (key == "num_iters" and value is None):  # esa: from epochs
            continue
        if key not in recorded and key in (defaults or {}) and defaults[key] == value:
            continue
        if plain(key, recorded.get(key)) != plain(key, value):
            differences.append(f"--{key} {recorded.get(key)} -> {value}")
    return differences


class Run:
    """The run folder and its TensorBoard writer (rank 0 only).

    ``purge_step``: a resumed run's first iteration; TensorBoard then drops the events at and
    after it that the interrupted run had written, so no curve doubles back.
    """

    def __init__(self, args, resume_dir: str | None = None, purge_step: int | None = None):
        from tensorboardX import SummaryWriter

        if resume_dir:
            self.dir = resume_dir
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            # absolute, as a resumed run's: the same folder is always printed the same way
            base = os.path.join(os.path.abspath(args.log_dir), f"{stamp}_{args.comment}")
            os.makedirs(args.log_dir, exist_ok=True)
            self.dir, n = base, 1
            while True:
                try:
                    os.mkdir(self.dir)
                    break
                except FileExistsError:
                    self.dir, n = f"{base}.{n}", n + 1
        holder = lock_run_folder(self.dir)  # a resumed run's: taken by find_resume_checkpoint
        if holder:
            raise RunError(f"{self.dir} is in use by another run ({holder})")
        with open(os.path.join(self.dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2, sort_keys=True)
        self.writer = SummaryWriter(self.dir, purge_step=purge_step)

    def close(self):
        self.writer.close()
        fd = _held.pop(os.path.abspath(self.dir), None)
        if fd is not None:
            os.close(fd)


def record_evaluation(
    run, iteration: int, result: dict, synthetic: bool, loss_terms: dict | None = None
) -> None:
    """Append to metrics.jsonl (no timings there, so equal seeds give equal files) and TB.

    ``loss_terms``: every loss term of the last training step, written on the train line (as
    single-step values they are the same whether or not the run was resumed in between).
    """
    lines = []
    for split in ("train", "test"):
        metrics = {k: v for k, v in result[split].items() if not k.startswith("seconds")}
        if split == "train" and loss_terms:
            metrics["loss"] = dict(loss_terms)
        line = {
            "iteration": iteration,
            "split": split,
            **metrics,
            "M_s": result["train"]["M"],
            "M_t": result["test"]["M"],
            "WHM": result["WHM"],
            "synthetic": synthetic,
        }
        lines.append(json.dumps(line))
        for key, value in metrics.items():  # TensorBoard tags cannot hold '@': R@1 -> R1
            if key == "loss":
                continue  # already under train/<term>
            run.writer.add_scalar(f"eval/{split}/{key.replace('@', '')}", value, iteration)
        for key in ("seconds_features", "seconds_ranking"):
            if key in result[split]:
                run.writer.add_scalar(f"time/eval_{split}_{key}", result[split][key], iteration)
    run.writer.add_scalar("eval/WHM", result["WHM"], iteration)
    with open(os.path.join(run.dir, "metrics.jsonl"), "a") as f:
        f.write("\n".join(lines) + "\n")
    run.writer.flush()


def format_result(result: dict, iteration: int, synthetic: bool) -> str:
    data = "SYNTHETIC stand-in" if synthetic else "real data"
    test = "  ".join(
        f"{k} {v:.2f}" for k, v in result["test"].items() if k != "M" and not k.startswith("sec")
    )
    return (
        f"test results at iteration {iteration} ({data}): {test}  "
        f"M_t {result['test']['M']:.2f} | train M_s {result['train']['M']:.2f} | "
        f"WHM {result['WHM']:.2f}"
    )


def truncate_metrics(run_dir: str, iteration: int) -> None:
    """Drop metrics.jsonl lines written after ``iteration`` (a resumed run writes them again).

    A last line torn by a kill mid-append is dropped too; the file is rewritten atomically.
    """
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # torn by a kill while it was being appended
                break
            raise RunError(f"{path}:{number}: not a JSON line: {line[:80]!r}") from None
        if record["iteration"] <= iteration:
            kept.append(line if line.endswith("\n") else line + "\n")
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- divergence


def check_finite(values: dict[str, torch.Tensor], iteration: int, last_good: str | None) -> None:
    """RunError naming the first non-finite term of a step (one host sync when all are fine).

    In an fp16 step the GradScaler skipped (overflowed gradients), L_GA^A, FGSM's term, the
    total and the gradient norm may be inf while the loss itself is fine; they are not checked.
    """
    skipped = bool(values.get("fp16_skipped", 0))
    checked = {k: v for k, v in values.items() if not (skipped and k in GRADIENT_TERMS)}
    if bool(torch.isfinite(torch.stack([v.float() for v in checked.values()])).all()):
        return
    name, value = next((k, v.item()) for k, v in checked.items() if not torch.isfinite(v))
    raise RunError(
        f"non-finite {'gradient' if name == 'grad_norm' else 'loss'} at iteration {iteration}: "
        f"term '{name}' = {value}; {_after_divergence(last_good)}"
    )


def _after_divergence(last_good: str | None) -> str:
    if not last_good:
        return "stopping (no checkpoint was written yet); try a lower --learning_rate"
    return (
        f"stopping (the last good checkpoint is {last_good}: its weights are finite but may have "
        f"exploded already, so resuming from it can diverge again; prefer best.pt of the run "
        f"folder, chosen by M_s, and a lower --learning_rate)"
    )


GRADIENT_TERMS = ("ga_adv", "fgsm", "total", "grad_norm")


def check_finite_parameters(model, iteration: int, last_good: str | None) -> None:
    """RunError naming the first non-finite parameter tensor, if any."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise RunError(
                f"non-finite weights after iteration {iteration}: {name} holds NaN or inf (the "
                f"update overflowed: is the learning rate too high?); "
                f"{_after_divergence(last_good)}"
            )


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after a step; a checkpoint of that step was written."""

    def __init__(self, signum: int, iteration: int, checkpoint: str, run_dir: str):
        super().__init__(f"interrupted by {signal.Signals(signum).name} at iteration {iteration}")
        self.signum, self.iteration, self.checkpoint, self.run_dir = (
            signum,
            iteration,
            checkpoint,
            run_dir,
        )


class StopOnSignal:
    """While active, SIGINT and SIGTERM ask training to stop at the end of the current step.

    The first signal says so on stderr (also during an evaluation, which can take a while). A
    second SIGINT (Ctrl-C twice) aborts at once, without a checkpoint: it kills the DataLoader
    workers (they ignore SIGINT and SIGTERM, so multiprocessing's exit hook would wait for them
    forever) and exits with 130. Handlers can only be installed from the main thread; elsewhere
    (a run started from a thread) this does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = 0
        self._previous = {}
        self._pipe = None

    def _handle(self, signum, frame):
        self.signum = self.signum or signum

    def _watch(self, read_fd: int) -> None:
        """Signals as they arrive, even while the main thread is inside a long torch call
        (Python runs handlers only between bytecodes; the C-level handler writes the wakeup byte
        at once)."""
        presses = 0
        while True:
            try:
                data = os.read(read_fd, 64)
            except OSError:
                data = b""
            if not data:
                os.close(read_fd)
                return
            for signum in data:
                presses += signum == signal.SIGINT
                if presses >= 2:
                    os.write(2, b"\nsecond Ctrl-C: aborted without a checkpoint\n")
                    for child in multiprocessing.active_children():
                        child.kill()
                    os._exit(128 + signal.SIGINT)
                if signum in self.SIGNALS and not getattr(self, "_said", False):
                    self._said = True
                    os.write(
                        2,
                        f"\nreceived {signal.Signals(signum).name}: a checkpoint is written at the "
                        f"end of this step (or evaluation); press Ctrl-C again to abort without "
                        f"one\n".encode(),
                    )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            read_fd, write_fd = os.pipe()
            os.set_blocking(write_fd, False)
            self._pipe = (
                read_fd,
                write_fd,
                signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False),
            )
            threading.Thread(target=self._watch, args=(read_fd,), daemon=True).start()
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if self._pipe is not None:
            read_fd, write_fd, previous_fd = self._pipe
            signal.set_wakeup_fd(previous_fd)
            os.close(write_fd)  # the watcher reads EOF and ends
            self._pipe = None
        return False


def stop_workers() -> None:
    """Kill this process's worker processes (DataLoader workers ignore SIGTERM, see
    ``datasets.worker_init``), so that an error or an abort never waits on them."""
    if threading.current_thread() is threading.main_thread():
        # torch's SIGCHLD handler would raise "DataLoader worker ... is killed" in the middle
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        child.kill()
    for child in multiprocessing.active_children():
        child.join(timeout=5)


def resume_command(argv: list[str], run_dir: str) -> str:
    """The command line that continues the run in ``run_dir``: ``argv`` with --resume set."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--resume":
            skip = True
            continue
        if arg.startswith("--resume="):
            continue
        kept.append(arg)
    launcher = "torchrun ... main.py" if distributed.env_ranks()[2] > 1 else "python main.py"
    return " ".join([launcher, *map(shlex.quote, kept), "--resume", shlex.quote(run_dir)])
