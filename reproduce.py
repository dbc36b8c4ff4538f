"""Reproduce a table of the GA paper: run every row (and seed), then tabulate beside the paper.

Each (row, seed) is one ``main.py`` run in its own folder,
``<out>/runs/<row key>/seed<s>/<time>_<row key>/``, where the row key names the setting and
hashes every flag that can change its result. A run that already finished (its metrics.jsonl has
the test line of iteration ``--num_iters``, and its args.json matches) is reused; one that was
interrupted is resumed from its ``latest.pt``; the same setting in another table (the baseline of
several tables) is the same run. Runs are separate processes by default, so one failure or one
memory spike does not take the others down (``--in_process`` runs them in this process).

The table (``<out>/<table>_<dataset>.md``, also printed) gives mean ± std over seeds of the test
recalls, their average M_t, the training accuracy M_s and WHM (α 0.5), the training time per 100
iterations (from TensorBoard's wall clock, evaluations excluded; stored in each run's
``timing.json``, never in metrics.jsonl) and its ratio to the first row, beside the paper's
numbers. ``<out>/<table>_<dataset>.png`` plots them and ``.json`` holds every number.

Tables (rows switch the GA terms and the paper's baselines on with the values of the options
``--sim_weight``, ``--ga_adv_eps``, ``--ga_iso_gamma``, ``--fgsm_eps``, ``--l1_weight`` and
``--l2_weight``, and off with 0):
- ``ablation``: L_CE with every subset of L_S, L_GA^A and L_GA^I (8 rows);
- ``ga_vs_fgsm``: baseline, + FGSM adversarial training, + L_GA^A;
- ``iso_vs_l1l2``: baseline, + L1, + L2, + L_GA^I;
- ``iso_forms``: baseline, L_GA^I in the paper's form, in the GA code's public form, its drift
  alone, its cumulative noise without drift (``ISO_FORMS``); the table adds the paired differences
  with row 1 and ``<table>_<dataset>_scale_norms.png`` the batch-norm weight norm and the
  normalization scale over training;
- ``main``: the paper's models for the dataset that this code has (Concatenation, TIRG,
  ComposeAE, with and without GA; BERT rows where --use_bert works);
- ``sweep_eps`` / ``sweep_gamma``: L_CE + L_GA^A (or + L_GA^I) over ``--sweep_values`` (at the
  GA code's eps = 1e-6 the adversarial term is about 1e-6 of the loss, so its effect is only
  visible at larger eps).
Flags that reproduce.py does not know are passed to every run of main.py.

Protocols (``--protocol``; the one used is named in every table's markdown, JSON and plot):
- ``paper``: the GA paper's CSS protocol, the GA code's schedule: the TIRG rows are
  ``--model tirg_lastconv`` (the GA code's ``--model tirg`` builds TIRGLastConv), batch 200,
  4845 iterations (51 epochs of 95), evaluated every 950, lr 0.01, weight decay 1e-6. css3d only.
- ``quick`` (default): a short CPU protocol, ``--model tirg`` (the TIRG code's model) at batch 32
  for ``--num_iters`` iterations. Its numbers are not the paper's setting.
A flag of the protocol given explicitly (``--batch_size 64``) wins and the table says that the
protocol was changed.

Examples:

    python reproduce.py --table ablation --dataset css3d --seeds 0 --num_iters 200 --dry_run
    python reproduce.py --table ablation --protocol paper --seeds 0 1 2
    python reproduce.py --table ablation --dataset css3d --seeds 0 1 2 --num_iters 20000
    python reproduce.py --table ga_vs_fgsm --dataset css3d --seeds 0 --num_iters 200 \\
        --batch_size 32 --loader_num_workers 0
    python reproduce.py --table sweep_eps --dataset css3d --num_iters 2000 \\
        --sweep_values 0 1e-6 1e-3 1e-1 1
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import platform
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm

import whm as whm_lib

HERE = os.path.dirname(os.path.abspath(__file__))
MAIN_PY = os.path.join(HERE, "main.py")

# The value a row uses when it switches a term on. The GA code's values for the GA terms; the
# paper does not state the baselines' values, so these are ours (each is a reproduce.py option;
# the README quotes them).
TERM_FLAGS = {
    "S": ("sim_weight", 1e-3, "L_S, similarity matching (eta)"),
    "A": ("ga_adv_eps", 1e-6, "L_GA^A, adversarial GA (eps)"),
    "I": ("ga_iso_gamma", 1e-2, "L_GA^I, isotropic GA (gamma)"),
    "FGSM": ("fgsm_eps", 0.03, "FGSM baseline (eps, normalized-image units: ~2 grey levels)"),
    "L1": ("l1_weight", 1e-5, "L1 weight regularization baseline"),
    "L2": ("l2_weight", 1e-4, "L2 weight regularization baseline"),
}
SWEEP_DEFAULTS = {
    "sweep_eps": ("A", [0.0, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]),
    "sweep_gamma": ("I", [0.0, 1e-3, 1e-2, 1e-1, 1.0]),
}
TABLES = ("ablation", "ga_vs_fgsm", "iso_vs_l1l2", "iso_forms", "main", "sweep_eps", "sweep_gamma")
# iso_forms: L_GA^I as the paper writes it against the public GA code's --random_grad and its
# parts (gradient_augmentation.add_isotropic_gradient_noise).
ISO_FORMS = (
    ("baseline", (), ()),
    ("L_GA^I, paper form", ("I",), ()),
    ("L_GA^I, public form", ("I",), ("--ga_iso_form", "public")),
    ("drift only (no noise)", ("I",), ("--ga_iso_form", "public", "--ga_iso_noise", "none")),
    ("cumulative noise, no drift", ("I",), ("--ga_iso_form", "public", "--ga_iso_drift", "off")),
)


@dataclass(frozen=True)
class Protocol:
    """How the rows of a table are trained: the model of its TIRG rows and main.py flags."""

    name: str
    description: str
    tirg_model: str  # the model of the ablation/baseline tables and of the TIRG rows of 'main'
    flags: tuple[tuple[str, str], ...]  # main.py flags every run gets, unless given explicitly
    num_iters: int | None = None  # None: --num_iters is required
    eval_every: int | None = None  # None: evaluate at the end only
    datasets: tuple[str, ...] | None = None  # None: any


PROTOCOLS = {
    "paper": Protocol(
        "paper",
        "the GA paper's CSS protocol (the GA code's schedule): TIRG rows --model tirg_lastconv "
        "(the GA code's --model tirg builds TIRGLastConv), batch 200, 4845 iterations (51 epochs "
        "of 95), evaluated every 950, lr 0.01, weight decay 1e-6",
        "tirg_lastconv",
        (("batch_size", "200"), ("learning_rate", "0.01"), ("weight_decay", "1e-06")),
        num_iters=4845,
        eval_every=950,
        datasets=("css3d",),
    ),
    "quick": Protocol(
        "quick",
        "quick CPU protocol: --model tirg (the TIRG code's model; the paper's CSS TIRG is "
        "tirg_lastconv), batch 32, a short schedule. Not the paper's setting (--protocol paper)",
        "tirg",
        (("batch_size", "32"),),
    ),
}
# Flags that the row/seed layout sets itself.
RESERVED = ("--seed", "--log_dir", "--comment", "--resume", "--test_only", "--model_checkpoint")
# Settings that cannot change a run's result: left out of its identity (key and reuse check).
NOT_IDENTITY = {
    "seed",
    "log_dir",
    "comment",
    "resume",
    "data_dir",
    "loader_num_workers",
    "eval_batch_size",
    "log_every",
}
TIMING_JSON = "timing.json"
PAIRED = ("M_t", "M_s", "WHM")  # the paired differences with the first row, per seed
GA_ALL = ("S", "A", "I")


@dataclass
class Row:
    """One row of a table: the paper's label, the model and the terms it switches on."""

    label: str
    model: str
    terms: dict[str, float] = field(default_factory=dict)  # term -> value (others are 0)
    use_bert: bool = False
    paper_method: str | None = None  # the method name in paper_results.csv (None: not there)
    sweep_value: float | None = None
    flags: tuple[str, ...] = ()  # further main.py flags of the row (the L_GA^I form's)


@dataclass
class PlannedRun:
    row: Row
    seed: int
    argv: list[str]
    key: str
    log_dir: str
    error: str | None = None  # main.parse_args refused the flags (e.g. --use_bert unavailable)
    status: str = "new"  # new | done | resume | unavailable
    run_dir: str | None = None
    checkpoint: str | None = None


# --------------------------------------------------------------------------- tables


def _term_values(opts) -> dict[str, float]:
    return {term: getattr(opts, flag) for term, (flag, _, _) in TERM_FLAGS.items()}


def table_rows(table: str, dataset: str, opts) -> list[Row]:
    """The rows of ``table`` for ``dataset``, with the values given in ``opts``."""
    values = _term_values(opts)
    model = opts.model

    def row(label, terms, model=model, **kw):
        return Row(label, model, {t: values[t] for t in terms}, paper_method=label, **kw)

    if table == "ablation":
        names = {"S": "L_S", "A": "L_GA^A", "I": "L_GA^I"}
        subsets = [(), ("S",), ("A",), ("I",), ("S", "A"), ("S", "I"), ("A", "I"), GA_ALL]
        return [row(" + ".join(["L_CE"] + [names[t] for t in s]), s) for s in subsets]
    if table == "ga_vs_fgsm":
        return [
            row("baseline", ()),
            row("baseline + FGSM", ("FGSM",)),
            row("baseline + L_GA^A", ("A",)),
        ]
    if table == "iso_vs_l1l2":
        return [
            row("baseline", ()),
            row("baseline + L1", ("L1",)),
            row("baseline + L2", ("L2",)),
            row("baseline + L_GA^I", ("I",)),
        ]
    if table == "iso_forms":
        return [Row(label, model, {t: values[t] for t in terms}, flags=flags)
                for label, terms, flags in ISO_FORMS]  # fmt: skip
    if table == "main":
        rows = []
        models = [("Concatenation", "concat", False)] if dataset == "css3d" else []
        # The paper's CSS TIRG is TIRGLastConv (the GA code's and TIRG's own CSS model).
        models += [
            ("TIRG", PROTOCOLS[opts.protocol].tirg_model if dataset == "css3d" else "tirg", False)
        ]
        if dataset != "css3d":
            models += [("TIRG-BERT", "tirg", True)]
        models += [("ComposeAE", "composeAE", True)]  # ComposeAE's text encoder is BERT
        for label, name, bert in models:
            rows.append(row(label, (), model=name, use_bert=bert))
            if label != "Concatenation":
                rows.append(row(label + "+GA", GA_ALL, model=name, use_bert=bert))
        return rows
    if table in SWEEP_DEFAULTS:
        term, defaults = SWEEP_DEFAULTS[table]
        flag = TERM_FLAGS[term][0]
        sweep = opts.sweep_values if opts.sweep_values else defaults
        return [
            Row(
                f"{flag} = {v:g}",
                model,
                {term: v} if v else {},
                paper_method=None,
                sweep_value=v,
            )
            for v in sweep
        ]
    raise ValueError(f"unknown table {table!r}; choose from {TABLES}")


def _given(extra: list[str]) -> set[str]:
    """The main.py flag names (without --) that ``extra`` sets."""
    return {a[2:].split("=")[0] for a in extra if a.startswith("--")}


def protocol_flags(opts, extra: list[str]) -> list[str]:
    """The protocol's main.py flags that ``extra`` does not set itself."""
    given = _given(extra)
    protocol = PROTOCOLS[opts.protocol]
    return [x for name, value in protocol.flags if name not in given for x in (f"--{name}", value)]


def protocol_changes(opts, extra: list[str]) -> list[str]:
    """How this table departs from its protocol: flags given explicitly that the protocol sets."""
    protocol = PROTOCOLS[opts.protocol]
    changed = []
    for i, arg in enumerate(extra):
        name = arg[2:].split("=")[0] if arg.startswith("--") else None
        if name in dict(protocol.flags) or name == "eval_every":
            value = arg.split("=", 1)[1] if "=" in arg else " ".join(extra[i + 1 : i + 2])
            changed.append(f"--{name} {value}")
    if protocol.num_iters is not None and opts.num_iters != protocol.num_iters:
        changed.append(f"--num_iters {opts.num_iters}")
    if opts.model != protocol.tirg_model and opts.table != "main":
        changed.append(f"--model {opts.model}")
    return changed


def protocol_label(opts, extra: list[str]) -> dict:
    """{"name", "description", "changed"}: what the table's markdown and JSON say about it."""
    protocol = PROTOCOLS[opts.protocol]
    return {
        "name": protocol.name,
        "description": protocol.description,
        "changed": protocol_changes(opts, extra),
    }


def row_argv(row: Row, opts, extra: list[str]) -> list[str]:
    """main.py flags of a row, without seed and folders: every term flag explicitly, then the
    protocol's flags that ``extra`` does not set, then ``extra``."""
    protocol = PROTOCOLS[opts.protocol]
    eval_every = protocol.eval_every or opts.num_iters
    argv = ["--dataset", opts.dataset, "--model", row.model]
    argv += ["--num_iters", str(opts.num_iters), "--eval_every", str(eval_every)]
    for term, (flag, _, _) in TERM_FLAGS.items():
        argv += [f"--{flag}", f"{row.terms.get(term, 0.0):g}"]
    if row.use_bert:
        argv += ["--use_bert", "True"]
    return argv + list(row.flags) + protocol_flags(opts, extra) + list(extra)


def _parse_main_args(argv: list[str]):
    """main.parse_args(argv), or the error text it would print."""
    import main

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return main.parse_args(argv), None
    except SystemExit:
        lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
        return None, lines[-1] if lines else "main.py refused these flags"


_MAIN_DEFAULTS: dict | None = None


def _main_defaults() -> dict:
    global _MAIN_DEFAULTS
    if _MAIN_DEFAULTS is None:
        import main

        _MAIN_DEFAULTS = vars(main.parse_args([]))
    return _MAIN_DEFAULTS


def identity(parsed) -> dict:
    """The settings of a run that can change its result and differ from main.py's defaults (a
    flag added to main.py later, at its default, leaves the identity of older runs unchanged)."""
    defaults = _main_defaults()
    return {
        k: v
        for k, v in sorted(vars(parsed).items())
        if k not in NOT_IDENTITY and (k not in defaults or v != defaults[k])
    }


def comparable(parsed) -> dict:
    """Every setting that can change a run's result (compared with a finished run's args.json)."""
    return {k: v for k, v in sorted(vars(parsed).items()) if k not in NOT_IDENTITY}


def row_key(row: Row, parsed, argv: list[str]) -> str:
    """Readable, unique folder name: dataset, model, terms, iterations, hash of the setting."""
    terms = "+".join(f"{t}{v:g}" for t, v in row.terms.items()) or "base"
    settings = identity(parsed) if parsed is not None else argv
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    bert = "-bert" if row.use_bert else ""
    form = "".join(
        f"-{name.removeprefix('--ga_iso_')}{value}"
        for name, value in zip(row.flags[::2], row.flags[1::2], strict=True)
    )
    it = parsed.num_iters if parsed is not None else "?"
    return f"{row.model}{bert}_{terms}{form}_{it}it_{digest[:8]}"


# --------------------------------------------------------------------------- run state


def _final_test_line(run_dir: str, num_iters: int) -> dict | None:
    try:
        run = whm_lib.read_run(run_dir)
    except whm_lib.RunReadError:
        return None
    return run["evaluations"].get(num_iters, {}).get("test")


def _same_setting(run_dir: str, expected: dict) -> bool:
    try:
        with open(os.path.join(run_dir, "args.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return False
    # A flag added to main.py after the run was made is absent from its args.json: ignored.
    return all(saved[k] == v for k, v in expected.items() if k in saved)


def locate(planned: PlannedRun, parsed) -> None:
    """Set the status of a planned run: done (reuse), resume (from latest.pt) or new."""
    if planned.error:
        planned.status = "unavailable"
        return
    expected = comparable(parsed)
    if not os.path.isdir(planned.log_dir):
        planned.status = "new"
        return
    candidates = sorted(
        os.path.join(planned.log_dir, d)
        for d in os.listdir(planned.log_dir)
        if os.path.isfile(os.path.join(planned.log_dir, d, "args.json"))
    )
    matching = [d for d in candidates if _same_setting(d, expected)]
    for run_dir in reversed(matching):
        if _final_test_line(run_dir, parsed.num_iters) is not None:
            planned.status, planned.run_dir = "done", run_dir
            return
    for run_dir in reversed(matching):
        checkpoint = os.path.join(run_dir, "latest.pt")
        if os.path.isfile(checkpoint):
            planned.status, planned.run_dir, planned.checkpoint = "resume", run_dir, checkpoint
            return
    planned.status = "new"


def plan(opts, extra: list[str]) -> list[PlannedRun]:
    """Every (row, seed) of the table, with its flags, folder and status."""
    runs = []
    selected = table_rows(opts.table, opts.dataset, opts)
    if opts.rows:
        bad = [i for i in opts.rows if not 1 <= i <= len(selected)]
        if bad:
            raise SystemExit(f"error: --rows {bad}: the table has rows 1..{len(selected)}")
        selected = [selected[i - 1] for i in opts.rows]
    for row in selected:
        argv = row_argv(row, opts, extra)
        parsed, error = _parse_main_args(argv)
        key = row_key(row, parsed, argv)
        for seed in opts.seeds:
            log_dir = os.path.join(opts.out, "runs", key, f"seed{seed}")
            full = argv + ["--seed", str(seed), "--log_dir", log_dir, "--comment", key]
            planned = PlannedRun(row, seed, full, key, log_dir, error)
            seeded = None
            if parsed is not None:
                seeded, planned.error = _parse_main_args(full)
            locate(planned, seeded)
            runs.append(planned)
    return runs


# --------------------------------------------------------------------------- running


def _run_subprocess(argv: list[str], log_path: str) -> int:
    with open(log_path, "a") as log:
        log.write(f"\n$ {sys.executable} {MAIN_PY} {' '.join(argv)}\n")
        log.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        return subprocess.call(
            [sys.executable, MAIN_PY, *argv], stdout=log, stderr=subprocess.STDOUT, env=env
        )


def _run_in_process(argv: list[str], log_path: str) -> int:
    import main

    with (
        open(log_path, "a") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        print(f"\n$ main.main({argv!r})", flush=True)
        try:
            main.main(argv)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 1
        except Exception as e:  # one row's failure must not stop the table
            import traceback

            traceback.print_exc()
            print(f"error: {type(e).__name__}: {e}")
            return 1
    return 0


def _tb_events(run_dir: str):
    """(file, tag, step, wall_time, value) of every scalar in the run's TensorBoard files."""
    from tensorboardX.proto import event_pb2

    out = []
    for name in sorted(os.listdir(run_dir)):
        if not name.startswith("events.out.tfevents"):
            continue
        with open(os.path.join(run_dir, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):  # TFRecord: length, crc, payload, crc
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            payload = data[pos + 12 : pos + 12 + length]
            pos += 12 + length + 4
            if len(payload) < length:
                break  # a record still being written
            event = event_pb2.Event.FromString(payload)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.append((name, value.tag, event.step, event.wall_time, value.simple_value))
    return out


def training_seconds_per_iteration(run_dir: str) -> float | None:
    """Seconds per training iteration from TensorBoard's wall clock: the time between the first
    and last ``train/lr`` points of each process, minus the evaluations in between, over the
    iterations in between. None when no process logged two points."""
    events = _tb_events(run_dir)
    seconds, iterations = 0.0, 0
    for name in sorted({e[0] for e in events}):
        lr = sorted((e[2], e[3]) for e in events if e[0] == name and e[1] == "train/lr")
        if len(lr) < 2:
            continue
        (first_step, first_time), (last_step, last_time) = lr[0], lr[-1]
        # main evaluates right after logging the iteration's scalars: evaluations at steps
        # first..last-1 fall between the two points.
        evaluating = sum(
            e[4]
            for e in events
            if e[0] == name and e[1].startswith("time/eval_") and first_step <= e[2] < last_step
        )
        seconds += last_time - first_time - evaluating
        iterations += last_step - first_step
    return seconds / iterations if iterations else None


def machine_description() -> str:
    """The CPU model and core count (and the GPU, if one is visible) that ran a segment: runs
    are not bit-identical across CPU models, and their times are not comparable."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    text = f"{cpu}, {os.cpu_count()} cores"
    import torch

    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name()}"
    return text


def record_timing(run_dir: str, wall_seconds: float, start_iteration: int, num_iters: int):
    """Add this process's wall time to ``timing.json`` and refresh the training time."""
    path = os.path.join(run_dir, TIMING_JSON)
    timing = {"segments": []}
    if os.path.isfile(path):
        with open(path) as f:
            timing = json.load(f)
    timing["segments"].append(
        {
            "wall_seconds": wall_seconds,
            "start_iteration": start_iteration,
            "end": num_iters,
            "machine": machine_description(),
        }
    )
    timing["wall_seconds"] = sum(s["wall_seconds"] for s in timing["segments"])
    per_iteration = training_seconds_per_iteration(run_dir)
    eval_seconds = sum(e[4] for e in _tb_events(run_dir) if e[1].startswith("time/eval_"))
    if per_iteration is None:  # too few logged points: wall time minus evaluation, startup kept
        per_iteration = max(timing["wall_seconds"] - eval_seconds, 0.0) / max(num_iters, 1)
        timing["source"] = "wall clock minus evaluation (few TensorBoard points)"
    else:
        timing["source"] = "TensorBoard wall clock of train/lr, evaluations excluded"
    timing.update(
        seconds_per_iteration=per_iteration,
        train_seconds=per_iteration * num_iters,
        eval_seconds=eval_seconds,
    )
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(timing, f, indent=2)
    os.replace(tmp, path)
    return timing


def execute(planned: PlannedRun, parsed_num_iters: int, in_process: bool) -> None:
    """Run (or resume) one planned run; set its status to done or failed."""
    os.makedirs(planned.log_dir, exist_ok=True)
    log_path = os.path.join(planned.log_dir, "output.log")
    argv = list(planned.argv)
    start_iteration = 0
    if planned.status == "resume":
        argv += ["--resume", planned.checkpoint]
        try:
            import torch

            start_iteration = torch.load(planned.checkpoint, weights_only=True)["iteration"]
        except Exception:
            start_iteration = -1  # unknown; main reports it in the log
    start = time.perf_counter()
    runner = _run_in_process if in_process else _run_subprocess
    code = runner(argv, log_path)
    wall = time.perf_counter() - start
    seeded, _ = _parse_main_args(planned.argv)
    locate(planned, seeded)
    if code != 0 or planned.status != "done":
        planned.status = "failed"
        with open(log_path) as f:
            tail = f.read().splitlines()[-6:]
        planned.error = f"exit code {code}; see {log_path}: " + " | ".join(tail)
        return
    record_timing(planned.run_dir, wall, start_iteration, parsed_num_iters)


# --------------------------------------------------------------------------- the table


def _mean_std(values: list[float]):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _cell(mean, std, digits=1) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def collect(runs: list[PlannedRun], opts) -> list[dict]:
    """Per row: its runs' final test metrics and timing, and mean/std over seeds."""
    paper_name = whm_lib.PAPER_DATASET.get(opts.dataset)
    paper_table = opts.table if opts.table in ("ablation", "ga_vs_fgsm", "iso_vs_l1l2") else "main"
    paper = whm_lib.paper_table(paper_table, paper_name) if paper_name else {}
    rows, order = {}, []
    for planned in runs:
        label = planned.row.label
        if label not in rows:
            order.append(label)
            rows[label] = {
                "label": label,
                "protocol": opts.protocol_label,
                "row": planned.row,
                "argv": planned.argv[: planned.argv.index("--seed")],
                "seeds": [],
                "paper": paper.get((paper_name, planned.row.paper_method), {}),
                "errors": [],
            }
        entry = rows[label]
        if planned.status != "done":
            why = {"new": "not run yet", "resume": f"unfinished ({planned.run_dir})"}
            reason = why.get(planned.status) if not planned.error else planned.error
            entry["errors"].append(f"seed {planned.seed}: {planned.status}: {reason}")
            continue
        line = _final_test_line(planned.run_dir, opts.num_iters)
        timing = {}
        timing_path = os.path.join(planned.run_dir, TIMING_JSON)
        if os.path.isfile(timing_path):
            with open(timing_path) as f:
                timing = json.load(f)
        entry["seeds"].append(
            {
                "seed": planned.seed,
                "run_dir": planned.run_dir,
                "metrics": {k: v for k, v in line.items() if k.startswith("R@")},
                "M_t": line["M_t"],
                "M_s": line["M_s"],
                "WHM": line["WHM"],
                "synthetic": bool(line.get("synthetic")),
                "seconds_per_iteration": timing.get("seconds_per_iteration"),
                "machines": sorted(
                    {seg.get("machine", "not recorded") for seg in timing.get("segments", [])}
                    or {"not recorded"}
                ),
            }
        )
    out = []
    first = {s["seed"]: s for s in rows[order[0]]["seeds"]} if order else {}
    for label in order:
        entry = rows[label]
        seeds = entry["seeds"]
        ks = sorted({k for s in seeds for k in s["metrics"]}, key=lambda k: int(k[2:]))
        stats = {k: _mean_std([s["metrics"].get(k) for s in seeds]) for k in ks}
        for key in ("M_t", "M_s", "WHM", "seconds_per_iteration"):
            stats[key] = _mean_std([s[key] for s in seeds])
        if label != order[0]:  # paired by seed: this row minus the first row
            for key in PAIRED:
                stats["Δ" + key] = _mean_std(
                    [s[key] - first[s["seed"]][key] for s in seeds if s["seed"] in first]
                )
        entry["stats"] = stats
        entry["synthetic"] = any(s["synthetic"] for s in seeds)
        out.append(entry)
    return out


def markdown(results: list[dict], opts) -> str:
    ks = sorted(
        {k for r in results for k in r["stats"] if k.startswith("R@")}, key=lambda k: int(k[2:])
    )
    if not ks:
        ks = [f"R@{k}" for k in (1, 5, 10)]
    has_paper = any(r["paper"] for r in results)
    has_paper_time = any("train_time_s_per_epoch" in r["paper"] for r in results)
    base = results[0]["stats"]["seconds_per_iteration"][0] if results else None
    paper_base = results[0]["paper"].get("train_time_s_per_epoch") if results else None
    paired = any("Δ" + key in r["stats"] for r in results for key in PAIRED)
    head = ["row", "seeds", *ks, "avg (M_t)", "M_s", "WHM"]
    head += [f"Δ{key} vs row 1" for key in PAIRED] if paired else []
    head += ["s/100 it", "time ×row 1"]
    if has_paper:
        head += [f"paper {k}" for k in ks] + ["paper avg"]
    if has_paper_time:
        head += ["paper s/epoch", "paper time ×row 1"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in results:
        s = r["stats"]
        spi = s["seconds_per_iteration"]
        ratio = spi[0] / base if spi[0] is not None and base else None
        cells = [r["label"] + ("" if r["seeds"] else " (no finished run)")]
        cells += [" ".join(str(seed["seed"]) for seed in r["seeds"]) or "—"]
        cells += [_cell(*s.get(k, (None, None))) for k in ks]
        cells += [_cell(*s["M_t"]), _cell(*s["M_s"]), _cell(*s["WHM"])]
        if paired:
            cells += [_cell(*s.get("Δ" + key, (None, None)), digits=2) for key in PAIRED]
        cells += [_cell(*(v * 100 if v is not None else None for v in spi)), _cell(ratio, None, 2)]
        if has_paper:
            cells += [_cell(r["paper"].get(k), None) for k in ks] + [
                _cell(r["paper"].get("avg"), None)
            ]
        if has_paper_time:
            t = r["paper"].get("train_time_s_per_epoch")
            cells += [
                _cell(t, None, 2),
                _cell(t / paper_base if t and paper_base else None, None, 2),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = " ".join(str(s) for s in opts.seeds)
    protocol = opts.protocol_label
    title = (
        f"## {opts.table} on {opts.dataset}: {protocol['name']} protocol, {opts.num_iters} "
        f"iterations, seeds {seeds}"
    )
    notes = [title, "", f"Protocol: {protocol['name']}, {protocol['description']}."]
    if protocol["changed"]:
        notes.append(
            f"**Changed here: {', '.join(protocol['changed'])}: not the {protocol['name']} "
            f"protocol as defined.**"
        )
    notes.append("")
    if any(r["synthetic"] for r in results):
        notes += [
            "**Trained and tested on the SYNTHETIC CSS stand-in: not comparable with the "
            "paper's numbers (real CSS).**",
            "",
        ]
    notes += lines
    notes += [
        "",
        "Recall in percent, mean ± sample std over the seeds of the row that finished, at the "
        "final evaluation; M_t is the "
        "mean test recall (the paper's avg), M_s the mean recall on the fixed training sample, "
        "WHM at α 0.5. Δ: the paired difference with row 1, seed by seed (mean ± sample std). "
        "s/100 it: training time from TensorBoard's wall clock, evaluations "
        "excluded (machine-dependent: compare ratios). Paper numbers: paper_results.csv"
        " (GA paper, Huang et al., IEEE TMM 2022).",
        "",
    ]
    machines = {m for r in results for seed in r["seeds"] for m in seed["machines"]}
    if len(machines) > 1:
        notes += [
            "**These runs did not all record the same machine (timing.json; 'not recorded' "
            "marks runs older than that field, which may have run anywhere): times, and recall "
            "too since runs are not bit-identical across CPU models, compare machines as well "
            "as rows.**",
            "",
        ]
    notes.append("Rows (every run also gets --seed, --log_dir and --comment):")
    for r in results:
        notes.append(f"- {r['label']}: `python main.py {' '.join(r['argv'])}`")
        if len(machines) > 1:
            by_machine = {}
            for seed in r["seeds"]:
                by_machine.setdefault(" + ".join(seed["machines"]), []).append(str(seed["seed"]))
            notes += [
                f"  - seed{'s' * (len(s) > 1)} {' '.join(s)}: {m}" for m, s in by_machine.items()
            ]
        notes += [f"  - {e}" for e in r["errors"]]
    return "\n".join(notes)


def _error_bars(stds: list) -> list[float] | None:
    """Error bars from per-row std (None with a single seed): none at all when no row has one."""
    return [s or 0.0 for s in stds] if any(s for s in stds) else None


def plot(results: list[dict], opts, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(results) + 2), 4.8), dpi=110)
    if opts.table in SWEEP_DEFAULTS:
        pairs = [(r["row"].sweep_value, r) for r in results if r["seeds"]]
        swept = [(v, r) for v, r in pairs if v > 0]
        for key, name in (("M_t", "M_t (test)"), ("M_s", "M_s (train)"), ("WHM", "WHM")):
            if swept:
                xs = [v for v, _ in swept]
                ys = [r["stats"][key][0] for _, r in swept]
                err = _error_bars([r["stats"][key][1] for _, r in swept])
                line = ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name)
                color = line[0].get_color()
            else:
                color = None
            zero = [r for v, r in pairs if v == 0]
            if zero:
                ax.axhline(
                    zero[0]["stats"][key][0],
                    linestyle="--",
                    color=color,
                    linewidth=1,
                    label=f"{name} at 0 (term off)",
                )
        ax.set_xscale("log")
        ax.set_xlabel(TERM_FLAGS[SWEEP_DEFAULTS[opts.table][0]][2])
    else:
        xs = range(len(results))
        ours = [r["stats"]["M_t"][0] or 0.0 for r in results]
        err = _error_bars([r["stats"]["M_t"][1] for r in results])
        ax.bar([x - 0.2 for x in xs], ours, width=0.4, yerr=err, capsize=3, label="this code: M_t")
        if any(r["paper"] for r in results):
            paper = [r["paper"].get("avg", 0.0) for r in results]
            ax.bar([x + 0.2 for x in xs], paper, width=0.4, label="paper: avg", alpha=0.7)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r["label"] for r in results], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 118)  # room for the legend above 100%
    synthetic = " (SYNTHETIC CSS: not comparable)" if any(r["synthetic"] for r in results) else ""
    protocol = opts.protocol_label
    changed = " (changed)" if protocol["changed"] else ""
    ax.set_title(
        f"{opts.table}, {opts.dataset}, {protocol['name']} protocol{changed}, {opts.num_iters} it"
        f"{synthetic}",
        fontsize=10,
    )
    ax.set_ylabel("recall (%)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left", ncol=3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_scale_norms(results: list[dict], opts, path: str) -> str | None:
    """iso_forms: the TensorBoard curves train/bn_weight_norm and train/norm_scale of each row
    (mean over the seeds whose TensorBoard files are there), to see whether the public form's
    drift shrinks them. None, and nothing written, when no run has its TensorBoard files (runs
    kept as records only, as under results/)."""
    tags = ("train/bn_weight_norm", "train/norm_scale")
    curves = {}  # (label, tag) -> {step: [value per seed]}
    seeds_with_curves = {}  # label -> the seeds that have curves
    for r in results:
        for seed in r["seeds"]:
            events = [e for e in _tb_events(seed["run_dir"]) if e[1] in tags]
            if events:
                seeds_with_curves.setdefault(r["label"], []).append(seed["seed"])
            for _, tag, step, _, value in events:
                curves.setdefault((r["label"], tag), {}).setdefault(step, []).append(value)
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for r in results:
        seeds = seeds_with_curves.get(r["label"], [])
        seeds = f"seed{'s' if len(seeds) > 1 else ''} {','.join(str(s) for s in seeds)}"
        for ax, tag in zip(axes, tags, strict=True):
            curve = curves.get((r["label"], tag))
            if curve:
                steps = sorted(curve)
                means = [sum(curve[t]) / len(curve[t]) for t in steps]
                ax.plot(steps, means, label=f"{r['label']} ({seeds})")
    for ax, title in zip(axes, ("batch-norm weights, l2 norm", "normalization layer scale")):
        ax.set_title(f"{title} (mean over seeds)", fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    synthetic = ", SYNTHETIC CSS" if any(r["synthetic"] for r in results) else ""
    fig.suptitle(f"{opts.table}, {opts.dataset}, {opts.num_iters} it{synthetic}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Run every row of a GA paper table and tabulate mean ± std beside the paper. "
        "Unknown flags are passed to every main.py run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # a main.py flag must never be taken for a prefix of one of ours
    )
    p.add_argument("--table", required=True, choices=TABLES)
    p.add_argument(
        "--dataset", default="css3d", choices=sorted(whm_lib.PAPER_DATASET) + ["fashioniq"]
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--protocol",
        default="quick",
        choices=sorted(PROTOCOLS),
        help="paper: the GA paper's CSS protocol (tirg_lastconv, batch 200, 4845 iterations); "
        "quick: --model tirg at batch 32 for --num_iters (not the paper's setting)",
    )
    p.add_argument(
        "--num_iters",
        type=int,
        default=None,
        help="iterations of every run (required by --protocol quick; paper: 4845)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="the model of the ablation/baseline tables (default: the protocol's, "
        "paper tirg_lastconv, quick tirg)",
    )
    p.add_argument("--out", default=os.path.join("runs", "reproduce"), help="output folder")
    p.add_argument("--dry_run", action="store_true", help="print the runs, run nothing")
    p.add_argument(
        "--report_only",
        action="store_true",
        help="tabulate the runs that have finished, run nothing (the table names the rest): for "
        "a table whose runs span several sittings or machines",
    )
    p.add_argument("--in_process", action="store_true", help="run main.main here, not a process")
    p.add_argument("--rows", type=int, nargs="+", default=None, help="only these rows (1-based)")
    p.add_argument(
        "--sweep_values", type=float, nargs="+", default=None, help="values of a sweep table"
    )
    for _term, (flag, default, text) in TERM_FLAGS.items():
        p.add_argument(f"--{flag}", type=float, default=default, help=f"{text} when a row uses it")
    opts, extra = p.parse_known_args(argv)
    reserved = [a for a in extra if a.split("=")[0] in RESERVED]
    if reserved:
        p.error(f"{reserved}: reproduce.py sets these for each run itself")
    protocol = PROTOCOLS[opts.protocol]
    if protocol.datasets is not None and opts.dataset not in protocol.datasets:
        p.error(
            f"--protocol {opts.protocol} is defined for {', '.join(protocol.datasets)} only (the "
            f"GA code's CSS schedule); use --protocol quick and pass the schedule's flags"
        )
    if opts.num_iters is None:
        if protocol.num_iters is None:
            p.error(f"--protocol {opts.protocol} needs --num_iters")
        opts.num_iters = protocol.num_iters
    if opts.num_iters < 1:
        p.error("--num_iters must be >= 1")
    if opts.model is None:
        opts.model = protocol.tirg_model
    opts.protocol_label = protocol_label(opts, extra)
    return opts, extra


def main(argv=None) -> list[dict] | None:
    opts, extra = parse_args(argv)
    runs = plan(opts, extra)
    rows = len({r.row.label for r in runs})
    protocol = opts.protocol_label
    changed = f"; changed: {', '.join(protocol['changed'])}" if protocol["changed"] else ""
    print(
        f"{opts.table} on {opts.dataset}: {rows} rows x {len(opts.seeds)} seeds "
        f"= {len(runs)} runs, {opts.num_iters} iterations each (folder: {opts.out})\n"
        f"protocol: {protocol['name']}, {protocol['description']}{changed}"
    )
    for r in runs:
        where = f" [{r.run_dir}]" if r.run_dir else ""
        reason = f" ({r.error})" if r.status == "unavailable" else ""
        print(f"  [{r.status}] {r.row.label} | seed {r.seed}{where}{reason}")
        if opts.dry_run:
            print(f"      python main.py {' '.join(r.argv)}")
    if opts.dry_run:
        return None
    todo = [r for r in runs if r.status in ("new", "resume") and not opts.report_only]
    progress = tqdm(todo, desc="runs", unit="run", disable=not todo)
    try:
        for r in progress:
            progress.set_postfix_str(f"{r.row.label} seed {r.seed}")
            started = time.perf_counter()
            execute(r, opts.num_iters, opts.in_process)
            took = time.perf_counter() - started
            tqdm.write(f"  {r.status}: {r.row.label} | seed {r.seed} in {took:.0f} s ({r.log_dir})")
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished runs are kept and an interrupted one resumes from its "
            "latest.pt; run the same command again to continue",
            file=sys.stderr,
        )
        raise SystemExit(130) from None
    results = collect(runs, opts)
    text = markdown(results, opts)
    os.makedirs(opts.out, exist_ok=True)
    stem = os.path.join(opts.out, f"{opts.table}_{opts.dataset}")
    with open(stem + ".md", "w") as f:
        f.write(text + "\n")
    with open(stem + ".json", "w") as f:
        json.dump(
            [{k: v for k, v in r.items() if k != "row"} for r in results], f, indent=2, default=str
        )
    if any(r["seeds"] for r in results):
        plot(results, opts, stem + ".png")
        if opts.table == "iso_forms":
            if plot_scale_norms(results, opts, stem + "_scale_norms.png") is None:
                print("no TensorBoard files in these runs: no _scale_norms.png")
    print()
    print(text)
    written = [stem + ".md", stem + ".json", stem + ".png", stem + "_scale_norms.png"]
    print(f"\nwritten: {', '.join(p for p in written if os.path.isfile(p))}")
    failed = [r for r in runs if r.status not in ("done", "unavailable")]
    if failed and not opts.report_only:
        print(f"{len(failed)} run(s) failed; their logs are named above", file=sys.stderr)
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
