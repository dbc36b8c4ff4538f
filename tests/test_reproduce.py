import json
import math
import os
import re

import pytest

import reproduce
import whm

ABLATION = {  # row -> (sim_weight, ga_adv_eps, ga_iso_gamma) at the GA code's values
    "L_CE": (0, 0, 0),
    "L_CE + L_S": (1e-3, 0, 0),
    "L_CE + L_GA^A": (0, 1e-6, 0),
    "L_CE + L_GA^I": (0, 0, 1e-2),
    "L_CE + L_S + L_GA^A": (1e-3, 1e-6, 0),
    "L_CE + L_S + L_GA^I": (1e-3, 0, 1e-2),
    "L_CE + L_GA^A + L_GA^I": (0, 1e-6, 1e-2),
    "L_CE + L_S + L_GA^A + L_GA^I": (1e-3, 1e-6, 1e-2),
}


def flag(argv, name):
    values = [argv[i + 1] for i, a in enumerate(argv) if a == name]
    assert len(values) == 1, (name, argv)
    return values[0]


def test_dry_run_lists_the_eight_ablation_rows_with_their_flags(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--table", "ablation", "--dataset", "css3d", "--seeds", "0", "1", "--num_iters", "7"]
    assert reproduce.main(argv + ["--out", str(out), "--dry_run", "--batch_size", "16"]) is None
    text = capsys.readouterr().out
    assert not out.exists()  # a dry run writes nothing
    listed = re.findall(r"\[new\] (.+) \| seed (\d)\n +python main.py (.+)\n", text)
    assert [(row, int(seed)) for row, seed, _ in listed] == [
        (row, seed) for row in ABLATION for seed in (0, 1)
    ]
    log_dirs = set()
    for row, seed, command in listed:
        cmd = command.split()
        assert [
            float(flag(cmd, f)) for f in ("--sim_weight", "--ga_adv_eps", "--ga_iso_gamma")
        ] == (pytest.approx(list(ABLATION[row])))
        for off in ("--fgsm_eps", "--l1_weight", "--l2_weight"):
            assert float(flag(cmd, off)) == 0.0
        assert flag(cmd, "--model") == "tirg" and flag(cmd, "--dataset") == "css3d"
        assert flag(cmd, "--num_iters") == "7" == flag(cmd, "--eval_every")
        assert flag(cmd, "--batch_size") == "16"  # passed through to every run
        assert flag(cmd, "--seed") == seed
        assert "--ga" not in cmd  # rows set each term explicitly
        log_dirs.add(flag(cmd, "--log_dir"))
    assert len(log_dirs) == 16


PAPER_SCHEDULE = {
    "--batch_size": "200",
    "--num_iters": "4845",
    "--eval_every": "950",
    "--learning_rate": "0.01",
    "--weight_decay": "1e-06",
}


def test_paper_protocol_is_the_ga_codes_css_schedule_with_tirg_lastconv(tmp_path):
    for table in ("ablation", "ga_vs_fgsm", "iso_vs_l1l2"):
        opts, extra = reproduce.parse_args(
            ["--table", table, "--protocol", "paper", "--out", str(tmp_path)]
        )
        for run in reproduce.plan(opts, extra):
            assert flag(run.argv, "--model") == "tirg_lastconv"
            assert {f: flag(run.argv, f) for f in PAPER_SCHEDULE} == PAPER_SCHEDULE
        assert opts.protocol_label["name"] == "paper" and opts.protocol_label["changed"] == []
    opts, extra = reproduce.parse_args(["--table", "main", "--protocol", "paper"])
    models = {r.label: r.model for r in reproduce.table_rows("main", "css3d", opts)}
    assert models["TIRG"] == models["TIRG+GA"] == "tirg_lastconv"
    # quick: the TIRG code's model at batch 32, for --num_iters
    opts, extra = reproduce.parse_args(["--table", "main", "--num_iters", "5"])
    models = {r.label: r.model for r in reproduce.table_rows("main", "css3d", opts)}
    assert models["TIRG"] == "tirg"
    (run, *_) = reproduce.plan(opts, extra)
    assert flag(run.argv, "--batch_size") == "32" and flag(run.argv, "--num_iters") == "5"
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--table", "ablation"])  # quick needs --num_iters
    with pytest.raises(SystemExit):
        reproduce.parse_args(
            ["--table", "ablation", "--protocol", "paper", "--dataset", "mitstates"]
        )


def test_tables_name_their_protocol_and_what_was_changed(tmp_path):
    opts, extra = reproduce.parse_args(
        ["--table", "ablation", "--protocol", "paper", "--batch_size", "64", "--num_iters", "10"]
    )
    (run, *_) = reproduce.plan(opts, extra)
    assert flag(run.argv, "--batch_size") == "64"  # given explicitly: it wins, once
    assert opts.protocol_label["changed"] == ["--batch_size 64", "--num_iters 10"]
    row = reproduce.table_rows(opts.table, opts.dataset, opts)[0]
    results = [
        {"label": row.label, "row": row, "seeds": [], "paper": {}, "synthetic": False,
         "stats": {k: (None, None) for k in ("M_t", "M_s", "WHM", "seconds_per_iteration")},
         "argv": [], "errors": [], "protocol": opts.protocol_label}
    ]  # fmt: skip
    text = reproduce.markdown(results, opts)
    assert text.splitlines()[0] == "## ablation on css3d: paper protocol, 10 iterations, seeds 0"
    assert "Protocol: paper, the GA paper's CSS protocol" in text
    assert "**Changed here: --batch_size 64, --num_iters 10: not the paper protocol" in text
    quick, _ = reproduce.parse_args(["--table", "ablation", "--num_iters", "10"])
    text = reproduce.markdown(results, quick)
    assert "quick protocol" in text.splitlines()[0] and "Not the paper's setting" in text
    assert "Changed here" not in text


def test_baseline_rows_and_sweeps_use_their_flags(tmp_path):
    opts, extra = reproduce.parse_args(
        ["--table", "ga_vs_fgsm", "--num_iters", "5", "--out", str(tmp_path), "--fgsm_eps", "0.1"]
    )
    runs = reproduce.plan(opts, extra)
    assert [r.row.label for r in runs] == ["baseline", "baseline + FGSM", "baseline + L_GA^A"]
    assert float(flag(runs[1].argv, "--fgsm_eps")) == 0.1
    assert float(flag(runs[2].argv, "--ga_adv_eps")) == 1e-6
    opts, extra = reproduce.parse_args(
        ["--table", "iso_vs_l1l2", "--num_iters", "5", "--out", str(tmp_path)]
    )
    runs = reproduce.plan(opts, extra)
    assert (
        float(flag(runs[1].argv, "--l1_weight")) > 0
        and float(flag(runs[2].argv, "--l2_weight")) > 0
    )
    assert float(flag(runs[3].argv, "--ga_iso_gamma")) == 0.01
    # the baseline of both tables is one setting: one folder
    ablation_opts, _ = reproduce.parse_args(
        ["--table", "ablation", "--num_iters", "5", "--out", str(tmp_path)]
    )
    assert reproduce.plan(ablation_opts, [])[0].log_dir == runs[0].log_dir
    opts, extra = reproduce.parse_args(
        ["--table", "sweep_eps", "--num_iters", "5", "--out", str(tmp_path)]
        + ["--sweep_values", "0", "1e-3", "0.5"]
    )
    runs = reproduce.plan(opts, extra)
    assert [float(flag(r.argv, "--ga_adv_eps")) for r in runs] == [0.0, 1e-3, 0.5]
    assert all(float(flag(r.argv, "--ga_iso_gamma")) == 0 for r in runs)


def test_flags_main_refuses_make_a_row_unavailable_and_reserved_flags_are_refused(tmp_path):
    opts, extra = reproduce.parse_args(
        ["--table", "ablation", "--num_iters", "5", "--out", str(tmp_path), "--no_such_flag", "1"]
    )
    runs = reproduce.plan(opts, extra)
    assert {r.status for r in runs} == {"unavailable"}
    assert "--no_such_flag" in runs[0].error
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--table", "ablation", "--num_iters", "5", "--seed", "3"])


def tiny_flags(tmp_path):
    return [
        "--synthetic_size", "8", "--data_dir", str(tmp_path / "data"), "--batch_size", "8",
        "--train_eval_queries", "40", "--loader_num_workers", "0", "--eval_batch_size", "64",
        "--log_every", "1",
    ]  # fmt: skip


def test_runs_once_then_reuses_finished_runs(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--table", "ablation", "--num_iters", "2", "--rows", "1", "--out", str(out)]
    argv += tiny_flags(tmp_path)
    results = reproduce.main(argv)  # a separate main.py process, as by default
    text = capsys.readouterr().out
    (row,) = results
    (seed,) = row["seeds"]
    run_dir = seed["run_dir"]
    final = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))][-1]
    assert final["iteration"] == 2 and final["split"] == "test"
    assert seed["M_t"] == final["M_t"] and seed["metrics"]["R@1"] == final["R@1"]
    with open(os.path.join(run_dir, reproduce.TIMING_JSON)) as f:
        timing = json.load(f)
    assert timing["source"].startswith("TensorBoard") and timing["seconds_per_iteration"] > 0
    (segment,) = timing["segments"]
    assert f", {os.cpu_count()} cores" in segment["machine"]
    table = (out / "ablation_css3d.md").read_text()
    assert table.strip() in text
    line = next(t for t in table.splitlines() if t.startswith("| L_CE |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:5] == ["0"] + [f"{final[k]:.1f}" for k in ("R@1", "R@5", "R@10")]
    assert cells[-4:] == ["78.8", "94.9", "97.3", "90.3"]  # the paper's L_CE row
    assert "SYNTHETIC" in table and "machines as well as rows" not in table  # one machine
    assert (out / "ablation_css3d.png").stat().st_size > 5_000

    # again: nothing runs, the same folder is read
    before = sorted(os.listdir(os.path.dirname(run_dir)))
    mtime = os.path.getmtime(os.path.join(run_dir, "metrics.jsonl"))
    again = reproduce.main(argv)
    assert "[done] L_CE | seed 0" in capsys.readouterr().out
    assert again[0]["seeds"][0]["run_dir"] == run_dir
    assert sorted(os.listdir(os.path.dirname(run_dir))) == before
    assert os.path.getmtime(os.path.join(run_dir, "metrics.jsonl")) == mtime
    # the same setting in another table is the same run
    iso, extra = reproduce.parse_args(
        ["--table", "iso_vs_l1l2", "--num_iters", "2", "--out", str(out)] + tiny_flags(tmp_path)
    )
    baseline = reproduce.plan(iso, extra)[0]
    assert (baseline.status, baseline.run_dir) == ("done", run_dir)
    # other iterations or flags are another setting
    other, extra = reproduce.parse_args(argv[:2] + ["--num_iters", "3"] + argv[4:])
    assert reproduce.plan(other, extra)[0].status == "new"
    # whm.py reads the reproduction's folders; a quick run is the TIRG code's model, not the
    # paper's CSS TIRG (tirg_lastconv)
    (summary,) = whm.summarize_runs([str(out)])
    assert summary["dir"] == run_dir and summary["paper_method"] is None
    assert "tirg_lastconv" in summary["paper_note"]
    assert "Protocol: quick" in table
    with open(out / "ablation_css3d.json") as f:
        assert json.load(f)[0]["protocol"]["name"] == "quick"


@pytest.mark.slow
def test_an_interrupted_run_is_resumed_in_process(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--table", "ablation", "--num_iters", "4", "--rows", "2", "--out", str(out)]
    argv += ["--in_process", *tiny_flags(tmp_path), "--eval_every", "2"]
    opts, extra = reproduce.parse_args(argv)
    (planned,) = reproduce.plan(opts, extra)
    # a run killed after its evaluation at iteration 2: made as a 2-iteration run, then its
    # args.json says 4 (what the killed run had been asked for)
    import main

    short = list(planned.argv)
    short[short.index("--num_iters") + 1] = "2"
    main.main(short)
    (name,) = os.listdir(planned.log_dir)
    run_dir = os.path.join(planned.log_dir, name)
    with open(os.path.join(run_dir, "args.json")) as f:
        args = json.load(f)
    args["num_iters"] = 4
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump(args, f)
    (planned,) = reproduce.plan(opts, extra)
    assert planned.status == "resume" and planned.run_dir == run_dir
    capsys.readouterr()
    (row,) = reproduce.main(argv)
    assert row["seeds"][0]["run_dir"] == run_dir
    iterations = [json.loads(line)["iteration"] for line in open(f"{run_dir}/metrics.jsonl")]
    assert iterations == [2, 2, 4, 4]
    with open(os.path.join(run_dir, reproduce.TIMING_JSON)) as f:
        assert json.load(f)["segments"][0]["start_iteration"] == 2


def test_sweep_table_and_plot_from_collected_results(tmp_path):
    opts, _ = reproduce.parse_args(
        ["--table", "sweep_gamma", "--num_iters", "9", "--out", str(tmp_path), "--seeds", "0", "1"]
    )
    rows = reproduce.table_rows(opts.table, opts.dataset, opts)
    assert [r.sweep_value for r in rows] == [0.0, 1e-3, 1e-2, 1e-1, 1.0]
    results = []
    for i, row in enumerate(rows):  # per-seed numbers made up: the table and plot code is tested
        seeds = [{"M_t": 30.0 + i + s, "M_s": 50.0 + i, "WHM": 40.0 + i} for s in (0, 1)]
        stats = {key: reproduce._mean_std([s[key] for s in seeds]) for key in seeds[0]}
        seeds = [dict(seed, seed=s, machines=["CPU X"]) for s, seed in enumerate(seeds)]
        stats["R@1"] = (10.0 + i, None)
        stats["seconds_per_iteration"] = (0.5 * (1 + i), None)
        results.append(
            {"label": row.label, "row": row, "seeds": seeds, "paper": {}, "synthetic": True,
             "stats": stats, "argv": ["--ga_iso_gamma", f"{row.sweep_value:g}"], "errors": []}
        )  # fmt: skip
    text = reproduce.markdown(results, opts)
    header = next(line for line in text.splitlines() if line.startswith("| row |"))
    assert "paper" not in header  # no paper columns for sweeps
    line = next(t for t in text.splitlines() if t.startswith("| ga_iso_gamma = 0.01 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:4] == ["0 1", "12.0", "32.5 ± 0.7"]  # seeds, R@1, M_t: mean ± std of 32, 33
    assert cells[-2:] == ["150.0", "3.00"]  # s/100 it, and the time ratio to the first row
    path = reproduce.plot(results, opts, str(tmp_path / "sweep.png"))
    assert os.path.getsize(path) > 10_000


def test_iso_forms_rows_their_flags_paired_differences_and_scale_norm_plot(tmp_path):
    opts, extra = reproduce.parse_args(["--table", "iso_forms", "--num_iters", "5"])
    expected = [  # (gamma, form, noise, drift, cumulative) as main.py resolves each row
        (0.0, "paper", "gaussian", "off", "off"),
        (0.01, "paper", "gaussian", "off", "off"),
        (0.01, "public", "gaussian", "on", "on"),
        (0.01, "public", "none", "on", "on"),
        (0.01, "public", "gaussian", "off", "on"),
    ]
    rows = reproduce.table_rows("iso_forms", "css3d", opts)
    keys = set()
    for row, want in zip(rows, expected, strict=True):
        argv = reproduce.row_argv(row, opts, extra)
        parsed, error = reproduce._parse_main_args(argv)
        assert error is None
        got = (parsed.ga_iso_gamma, parsed.ga_iso_form, parsed.ga_iso_noise,
               parsed.ga_iso_drift, parsed.ga_iso_cumulative)  # fmt: skip
        assert got == want, row.label
        keys.add(reproduce.row_key(row, parsed, argv))
    assert len(keys) == 5

    # rows 1 and 3 (baseline, public form) for two seeds, run for real at a tiny size
    out = tmp_path / "out"
    argv = ["--table", "iso_forms", "--num_iters", "2", "--rows", "1", "3", "--seeds", "0", "1",
            "--out", str(out), "--in_process", *tiny_flags(tmp_path)]  # fmt: skip
    baseline, public = reproduce.main(argv)
    table = (out / "iso_forms_css3d.md").read_text()
    line = next(t for t in table.splitlines() if t.startswith("| L_GA^I, public form |"))
    header = next(t for t in table.splitlines() if t.startswith("| row |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    cells = dict(zip(columns, [c.strip() for c in line.strip("|").split("|")], strict=True))
    for key in ("M_t", "M_s", "WHM"):
        diffs = [p[key] - b[key] for p, b in zip(public["seeds"], baseline["seeds"], strict=True)]
        mean = sum(diffs) / 2
        std = math.sqrt(sum((d - mean) ** 2 for d in diffs))
        assert cells[f"Δ{key} vs row 1"] == f"{mean:.2f} ± {std:.2f}"
    assert (out / "iso_forms_css3d_scale_norms.png").stat().st_size > 10_000
    assert cells["seeds"] == "0 1"

    # --report_only with a third seed: the same numbers, seed 2 named as not run, nothing run
    report = reproduce.main([*argv[:argv.index("--seeds")], "--seeds", "0", "1", "2",
                             *argv[argv.index("--out"):], "--report_only"])  # fmt: skip
    assert [r["stats"] for r in report] == [baseline["stats"], public["stats"]]
    table = (out / "iso_forms_css3d.md").read_text()
    assert table.count("seed 2: new: not run yet") == 2
    assert not any(p.name == "seed2" for p in (out / "runs").glob("*/*"))

    # the runs kept as records only (as under results/): the same table, no scale-norm plot
    records = tmp_path / "records"
    for path in (out / "runs").rglob("*"):
        if path.name in ("args.json", "metrics.jsonl", "timing.json"):
            target = records / "runs" / path.relative_to(out / "runs")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    # seed 1 of the public form as if recorded before timing.json named the machine
    (old,) = (records / "runs").glob(f"*public*/seed1/*/{reproduce.TIMING_JSON}")
    timing = json.loads(old.read_text())
    del timing["segments"][0]["machine"]
    old.write_text(json.dumps(timing))
    kept = reproduce.main([*argv[:argv.index("--out")], "--out", str(records),
                           *argv[argv.index("--out") + 2:], "--report_only"])  # fmt: skip
    assert [r["stats"] for r in kept] == [baseline["stats"], public["stats"]]
    table = (records / "iso_forms_css3d.md").read_text()
    assert "**These runs did not all record the same machine" in table
    machine = reproduce.machine_description()
    rows = table.split("Rows (every run")[1]
    assert rows.count(f"  - seeds 0 1: {machine}") == 1  # the baseline
    assert f"  - seed 0: {machine}\n  - seed 1: not recorded" in rows  # the public form
    assert not (records / "iso_forms_css3d_scale_norms.png").exists()
