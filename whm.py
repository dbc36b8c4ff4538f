"""Weighted harmonic mean (WHM) of training and test accuracy, the GA paper's generalization score.

    WHM = (1 + alpha) * M_s * M_t / (alpha * M_t + M_s)

M_s is the accuracy on a fixed sample of training queries and M_t on the test queries (for CSS,
MIT-States and Fashion200k, the mean of the dataset's recalls). alpha = 0.5 in the paper; small
alpha weighs M_t, large alpha M_s.

As a command, it reads run folders (``metrics.jsonl`` and ``args.json``, as ``main.py`` writes
them) and prints a markdown table of M_s, M_t and WHM per run beside the GA paper's numbers for
the same setting (dataset, model, text encoder, GA on/off); ``--plot`` draws WHM against alpha
(0..5), as the paper's sensitivity figure does. A folder without ``metrics.jsonl`` stands for
every run below it.

    python whm.py logs/RUN_A logs/RUN_B --alpha 0.5
    python whm.py logs/ --select best_ms --plot whm_vs_alpha.png
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import sys

PAPER_RESULTS_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_results.csv")
PAPER_DATASET = {"css3d": "CSS", "mitstates": "MIT-States", "fashion200k": "Fashion200k"}
PAPER_MODEL = {"tirg": "TIRG", "composeAE": "ComposeAE", "concat": "Concatenation"}
# The paper's CSS "TIRG" is the GA code's --model tirg, which builds TIRGLastConv (TIRG's own
# README also trains CSS with tirg_lastconv): here --model tirg_lastconv. On MIT-States and
# Fashion200k it is TIRG.
PAPER_MODEL_BY_DATASET = {
    "css3d": {"tirg_lastconv": "TIRG", "composeAE": "ComposeAE", "concat": "Concatenation"},
}
# Why a run's model is not the paper's, where the paper has a model of that name.
MODEL_NOTES = {
    ("css3d", "tirg"): "TIRG (the TIRG code's model; the paper's CSS TIRG is tirg_lastconv)",
}
GA_TERMS = ("sim_weight", "ga_adv_eps", "ga_iso_gamma")
BASELINE_TERMS = ("fgsm_eps", "l1_weight", "l2_weight")
SELECT = ("last", "best_ms")
PLOT_ALPHAS = [i / 20 for i in range(101)]  # 0 .. 5


class RunReadError(ValueError):
    """A run folder or paper table that cannot be read; the message names the file (and line)."""


def whm(m_s: float, m_t: float, alpha: float = 0.5) -> float:
    """WHM of M_s and M_t, in the units of its inputs (0 when both are 0)."""
    denominator = alpha * m_t + m_s
    if denominator == 0:
        return 0.0
    return (1.0 + alpha) * m_s * m_t / denominator


def load_paper_results(path: str = PAPER_RESULTS_CSV) -> list[dict]:
    """Rows of the GA paper's tables: table, dataset, method, metric, value (percent)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise RunReadError(
            f"{path} not found: expected the GA paper's numbers as CSV "
            f"(table,dataset,method,metric,value)"
        ) from None
    for line, row in enumerate(rows, start=2):
        try:
            row["value"] = float(row["value"])
        except (TypeError, ValueError, KeyError):
            raise RunReadError(
                f"{path}:{line}: expected columns table,dataset,method,metric,value with a "
                f"numeric value, got {row}"
            ) from None
    return rows


def paper_table(table: str, dataset: str | None = None, path: str = PAPER_RESULTS_CSV):
    """{(dataset, method): {metric: value}} of one of the paper's tables."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for row in load_paper_results(path):
        if row["table"] == table and (dataset is None or row["dataset"] == dataset):
            out.setdefault((row["dataset"], row["method"]), {})[row["metric"]] = row["value"]
    return out


# --------------------------------------------------------------------------- run folders


def find_runs(paths: list[str]) -> list[str]:
    """Run folders named by ``paths``: a folder with metrics.jsonl, or every such folder below."""
    runs = []
    for path in paths:
        if os.path.isfile(os.path.join(path, "metrics.jsonl")):
            runs.append(path)
            continue
        if not os.path.isdir(path):
            raise RunReadError(f"{path}: no such run folder")
        below = os.path.join(glob.escape(path), "**")
        found = sorted(
            os.path.dirname(m)
            for m in glob.glob(os.path.join(below, "metrics.jsonl"), recursive=True)
        )
        # Run folders (main.py writes args.json first) that have no evaluation yet: said, not
        # silently left out of the table.
        for args_json in sorted(glob.glob(os.path.join(below, "args.json"), recursive=True)):
            run_dir = os.path.dirname(args_json)
            if run_dir not in found:
                print(
                    f"whm.py: skipping {run_dir}: no metrics.jsonl (the run has not been "
                    f"evaluated yet, or it stopped before its first evaluation)",
                    file=sys.stderr,
                )
        if not found:
            raise RunReadError(
                f"{path}: expected a run folder holding metrics.jsonl (as main.py writes it), "
                f"or a folder with such runs below it; found none"
            )
        runs.extend(found)
    return runs


def read_run(run_dir: str) -> dict:
    """A run folder as ``{"dir", "name", "args", "evaluations"}``.

    ``evaluations`` maps iteration -> ``{"train": line, "test": line}`` (the metrics.jsonl
    objects; the last line wins when an iteration repeats); ``args`` is args.json ({} when
    absent).
    """
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise RunReadError(f"{metrics} not found: expected one JSON object per evaluated split")
    evaluations: dict[int, dict[str, dict]] = {}
    with open(metrics) as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
                iteration, split = int(line["iteration"]), line["split"]
                for key in ("M_s", "M_t"):
                    float(line[key])
            except (ValueError, KeyError, TypeError) as e:
                raise RunReadError(
                    f"{metrics}:{number}: expected a JSON object with iteration, split, M_s and "
                    f"M_t ({type(e).__name__}: {e})"
                ) from None
            evaluations.setdefault(iteration, {})[split] = line
    args = {}
    args_path = os.path.join(run_dir, "args.json")
    if os.path.isfile(args_path):
        try:
            with open(args_path) as f:
                args = json.load(f)
        except ValueError as e:
            raise RunReadError(f"{args_path}: not valid JSON ({e})") from None
    name = os.path.basename(os.path.normpath(run_dir))
    return {"dir": run_dir, "name": name, "args": args, "evaluations": evaluations}


def select_evaluation(run: dict, select: str = "last") -> tuple[int, dict] | None:
    """(iteration, test line) of the last evaluation, or of the best by M_s (the earliest among
    equals, as main.py keeps best.pt); None when the run has no evaluation yet."""
    if select not in SELECT:
        raise ValueError(f"select must be one of {SELECT}, got {select!r}")
    done = [(it, ev) for it, ev in sorted(run["evaluations"].items()) if "test" in ev]
    if not done:
        return None
    if select == "last":
        iteration, ev = done[-1]
    else:
        iteration, ev = max(done, key=lambda item: (item[1]["test"]["M_s"], -item[0]))
    return iteration, ev["test"]


def ga_setting(args: dict) -> str:
    """'GA' (all three GA terms on, no baseline regularizer), 'none' (all off) or 'partial'."""
    ga = [float(args.get(name) or 0.0) > 0 for name in GA_TERMS]
    baselines = any(float(args.get(name) or 0.0) > 0 for name in BASELINE_TERMS)
    if all(ga) and not baselines:
        return "GA"
    if not any(ga) and not baselines:
        return "none"
    return "partial"


def paper_method(args: dict) -> tuple[str | None, str | None, str]:
    """(paper dataset, paper method, description) of a run's setting; the method is None when
    the paper has no such setting (the description says why)."""
    dataset = PAPER_DATASET.get(args.get("dataset"))
    models = PAPER_MODEL_BY_DATASET.get(args.get("dataset"), PAPER_MODEL)
    model = models.get(args.get("model"))
    text = "BERT" if args.get("use_bert") else "LSTM"
    ga = ga_setting(args)
    describe = f"{args.get('dataset', '?')} {args.get('model', '?')} {text}"
    describe += {"GA": " +GA", "none": "", "partial": " (some GA/baseline terms)"}[ga]
    note = MODEL_NOTES.get((args.get("dataset"), args.get("model")))
    if note:
        describe += f": {note}"
    if dataset is None or model is None or ga == "partial":
        return dataset, None, describe
    if model == "ComposeAE" and text != "BERT":
        return dataset, None, describe + " (the paper's ComposeAE uses BERT)"
    method = model + ("-BERT" if text == "BERT" and model == "TIRG" else "")
    return dataset, method + ("+GA" if ga == "GA" else ""), describe


def summarize_runs(paths: list[str], alpha: float = 0.5, select: str = "last") -> list[dict]:
    """One dict per run: name, setting, synthetic, iteration, M_s, M_t, WHM (at alpha), and the
    paper's M_s, M_t and WHM (recomputed at alpha) where the setting matches, else None."""
    paper = paper_table("whm")
    rows = []
    for run_dir in find_runs(paths):
        run = read_run(run_dir)
        picked = select_evaluation(run, select)
        dataset, method, setting = paper_method(run["args"])
        row = {"name": run["name"], "dir": run_dir, "setting": setting, "args": run["args"]}
        if picked is None:
            row.update(iteration=None, synthetic=None, M_s=None, M_t=None, WHM=None)
        else:
            iteration, line = picked
            m_s, m_t = float(line["M_s"]), float(line["M_t"])
            row.update(
                iteration=iteration,
                synthetic=bool(line.get("synthetic", False)),
                M_s=m_s,
                M_t=m_t,
                WHM=whm(m_s, m_t, alpha),
            )
        published = paper.get((dataset, method)) if method else None
        row["paper_method"] = f"{dataset} {method}" if published else None
        row["paper_note"] = MODEL_NOTES.get((run["args"].get("dataset"), run["args"].get("model")))
        row["paper_M_s"] = published["M_s"] if published else None
        row["paper_M_t"] = published["M_t"] if published else None
        row["paper_WHM"] = whm(published["M_s"], published["M_t"], alpha) if published else None
        rows.append(row)
    return rows


def _fmt(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _no_paper_setting(row: dict) -> str:
    if row.get("paper_note"):
        return f"— (not the paper's model: {row['paper_note']})"
    return "— (no such setting in the paper)"


def markdown_table(rows: list[dict], alpha: float, select: str) -> str:
    """The runs beside the paper, as a markdown table with notes."""
    lines = [
        f"| run | setting | data | iter | M_s | M_t | WHM (α={alpha:g}) | paper | "
        f"paper M_s | paper M_t | paper WHM |",
        "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        if r["synthetic"] is None:
            data = "no evaluation yet"
        elif r["synthetic"]:
            data = "**SYNTHETIC: not comparable**"
        else:
            data = "real"
        lines.append(
            f"| {r['name']} | {r['setting']} | {data} | {_fmt(r['iteration'], 0)} | "
            f"{_fmt(r['M_s'])} | {_fmt(r['M_t'])} | {_fmt(r['WHM'])} | "
            f"{r['paper_method'] or _no_paper_setting(r)} | {_fmt(r['paper_M_s'])} | "
            f"{_fmt(r['paper_M_t'])} | {_fmt(r['paper_WHM'])} |"
        )
    which = "the last evaluation" if select == "last" else "the evaluation with the best M_s"
    lines += [
        "",
        f"Recall in percent; each run at {which}. The paper's WHM is recomputed from its M_s and "
        f"M_t at α={alpha:g} (at α=0.5 this is within 0.05 of the published values). Runs on the "
        f"synthetic CSS stand-in are not comparable with the paper's numbers.",
    ]
    return "\n".join(lines)


def plot_whm_vs_alpha(rows: list[dict], path: str, alpha: float = 0.5) -> str:
    """WHM against alpha (0..5) per run (solid) and for the matching paper settings (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn_paper = {}
    for i, r in enumerate(row for row in rows if row["M_s"] is not None):
        color = colors[i % len(colors)]
        label = r["name"] + (" (synthetic)" if r["synthetic"] else "")
        ax.plot(
            PLOT_ALPHAS, [whm(r["M_s"], r["M_t"], a) for a in PLOT_ALPHAS], color=color, label=label
        )
        if r["paper_method"] and r["paper_method"] not in drawn_paper:
            drawn_paper[r["paper_method"]] = color
            ax.plot(
                PLOT_ALPHAS,
                [whm(r["paper_M_s"], r["paper_M_t"], a) for a in PLOT_ALPHAS],
                color=color,
                linestyle="--",
                label=f"paper: {r['paper_method']}",
            )
    ax.axvline(alpha, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("α  (small: weighs M_t, large: weighs M_s)")
    ax.set_ylabel("WHM (%)")
    ax.set_title("WHM vs α")
    ax.set_xlim(0, 5)
    ax.grid(alpha=0.3)
    # Below the axes: with several runs a legend inside covers the curves.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, -0.16), frameon=False)
    fig.savefig(path, bbox_inches="tight")  # the figure grows to hold the legend
    plt.close(fig)
    return path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Tabulate M_s, M_t and WHM of training runs beside the GA paper's numbers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (or folders of runs)")
    p.add_argument("--alpha", type=float, default=0.5, help="WHM's alpha")
    p.add_argument(
        "--select",
        default="last",
        choices=SELECT,
        help="which evaluation of a run: the last, or the one with the best M_s",
    )
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw WHM vs alpha (0..5)")
    args = p.parse_args(argv)
    if args.alpha < 0 or not math.isfinite(args.alpha):
        p.error("--alpha must be a finite number >= 0")
    return args


def main(argv=None) -> str:
    """Print (and return) the markdown table; draw the plot when asked."""
    args = parse_args(argv)
    try:
        rows = summarize_runs(args.runs, args.alpha, args.select)
    except RunReadError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    table = markdown_table(rows, args.alpha, args.select)
    print(table)
    if args.plot:
        plot_whm_vs_alpha(rows, args.plot, args.alpha)
        print(f"\nplot: {args.plot}")
    return table


if __name__ == "__main__":
    main()
