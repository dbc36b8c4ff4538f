import json
import math
import os

import pytest

import whm


def test_whm_formula_and_edge_cases():
    assert math.isclose(whm.whm(99.7, 90.3), 93.23, abs_tol=0.005)
    assert whm.whm(0.0, 0.0) == 0.0
    assert math.isclose(whm.whm(0.5, 0.5, alpha=3.0), 0.5)
    # alpha -> 0 gives M_t, large alpha approaches M_s
    assert math.isclose(whm.whm(0.9, 0.3, alpha=0.0), 0.3)
    assert whm.whm(0.9, 0.3, alpha=1e6) == pytest.approx(0.9, rel=1e-4)


def test_recomputes_the_papers_whm_column():
    rows = whm.load_paper_results()
    table = {}
    for row in rows:
        if row["table"] == "whm":
            table.setdefault((row["dataset"], row["method"]), {})[row["metric"]] = row["value"]
    assert len(table) == 14
    for key, m in table.items():
        assert abs(whm.whm(m["M_s"], m["M_t"], alpha=0.5) - m["WHM"]) <= 0.05, key


# --------------------------------------------------------------------------- the command


def tiny_run(data_dir, log_dir, *extra):
    """A real run of main.main on a tiny synthetic CSS (8 source scenes per split): 2
    iterations, evaluated at 1 and 2."""
    import main

    argv = ["--synthetic_size", "8", "--data_dir", str(data_dir), "--log_dir", str(log_dir)]
    argv += ["--num_iters", "2", "--eval_every", "1", "--train_eval_queries", "50"]
    argv += ["--loader_num_workers", "0", "--batch_size", "8", "--eval_batch_size", "64"]
    main.main(argv + list(extra))
    (name,) = os.listdir(log_dir)
    return os.path.join(log_dir, name)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("whm_runs")
    data = tmp_path_factory.mktemp("whm_data")
    # the paper's CSS TIRG is TIRGLastConv (the GA code's --model tirg)
    lastconv = ("--model", "tirg_lastconv")
    baseline = tiny_run(data, root / "logs" / "a", "--comment", "tirg", *lastconv)
    with_ga = tiny_run(data, root / "logs" / "b", "--comment", "tirg_ga", "--ga", *lastconv)
    return root / "logs", baseline, with_ga


def metrics_lines(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_table_of_two_real_runs_beside_the_paper(two_runs, capsys):
    _, baseline, with_ga = two_runs
    table = whm.main([baseline, with_ga, "--alpha", "0.5"])
    assert capsys.readouterr().out.strip().startswith(table.splitlines()[0])
    rows = [line for line in table.splitlines() if line.startswith("| 2")]
    assert len(rows) == 2
    for row, run_dir, paper in zip(rows, (baseline, with_ga), ("CSS TIRG", "CSS TIRG+GA")):
        cells = [c.strip() for c in row.strip("|").split("|")]
        final = [m for m in metrics_lines(run_dir) if m["split"] == "test"][-1]
        assert cells[0] == os.path.basename(run_dir)
        assert cells[2] == "**SYNTHETIC: not comparable**"
        assert cells[3] == "2" == str(final["iteration"])
        assert float(cells[4]) == pytest.approx(final["M_s"], abs=0.006)
        assert float(cells[5]) == pytest.approx(final["M_t"], abs=0.006)
        assert float(cells[6]) == pytest.approx(final["WHM"], abs=0.006)  # main's alpha is 0.5
        assert cells[7] == paper
    base_cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert base_cells[8:] == ["99.70", "90.30", "93.23"]
    ga_cells = [c.strip() for c in rows[1].strip("|").split("|")]
    assert ga_cells[8:] == ["98.80", "96.50", "97.25"]


def test_alpha_selection_and_folders_of_runs(two_runs):
    log_root, baseline, with_ga = two_runs
    rows = whm.summarize_runs([str(log_root)], alpha=2.0, select="best_ms")
    assert [r["dir"] for r in rows] == sorted([baseline, with_ga])
    for r in rows:
        tests = [m for m in metrics_lines(r["dir"]) if m["split"] == "test"]
        best = max(tests, key=lambda m: (m["M_s"], -m["iteration"]))
        assert r["iteration"] == best["iteration"]
        assert r["WHM"] == pytest.approx(whm.whm(best["M_s"], best["M_t"], 2.0))
        assert r["paper_WHM"] == pytest.approx(whm.whm(r["paper_M_s"], r["paper_M_t"], 2.0))
    last = whm.summarize_runs([baseline], select="last")[0]
    assert last["iteration"] == 2


def test_plot_of_whm_against_alpha(two_runs, tmp_path):
    _, baseline, with_ga = two_runs
    out = tmp_path / "whm.png"
    whm.main([baseline, with_ga, "--plot", str(out)])
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000


def test_bad_run_folders_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        whm.main([str(tmp_path / "missing")])
    assert "missing: no such run folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        whm.main([str(tmp_path)])
    assert "expected a run folder holding metrics.jsonl" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    good = {"iteration": 2, "split": "test", "M_s": 1.0, "M_t": 2.0, "WHM": 1.0}
    (run / "metrics.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(SystemExit):
        whm.main([str(run)])
    assert f"{run / 'metrics.jsonl'}:2:" in capsys.readouterr().err


def test_paper_setting_needs_dataset_model_text_encoder_and_ga_to_match():
    base = {"dataset": "mitstates", "model": "tirg", "use_bert": False}
    off = {"sim_weight": 0.0, "ga_adv_eps": 0.0, "ga_iso_gamma": 0.0}
    on = {"sim_weight": 1e-3, "ga_adv_eps": 1e-6, "ga_iso_gamma": 0.01}
    assert whm.paper_method({**base, **off})[:2] == ("MIT-States", "TIRG")
    assert whm.paper_method({**base, **on})[:2] == ("MIT-States", "TIRG+GA")
    assert whm.paper_method({**base, **on, "use_bert": True})[1] == "TIRG-BERT+GA"
    assert whm.paper_method({**base, **off, "sim_weight": 1e-3})[1] is None  # partial GA
    assert whm.paper_method({**base, **on, "fgsm_eps": 0.1})[1] is None  # a baseline term on
    assert whm.paper_method({**base, **off, "model": "composeAE"})[1] is None  # LSTM ComposeAE
    assert whm.paper_method({**base, **off, "model": "composeAE", "use_bert": True})[1] == (
        "ComposeAE"
    )
    assert whm.paper_method({**base, **off, "dataset": "fashioniq"})[1] is None


def test_paper_results_hold_every_table_of_the_paper():
    rows = whm.load_paper_results()
    tables = {r["table"] for r in rows}
    assert tables == {"datasets", "main", "whm", "ga_vs_fgsm", "iso_vs_l1l2", "ablation"}
    ablation = whm.paper_table("ablation", "CSS")
    assert len(ablation) == 8
    assert ablation[("CSS", "L_CE + L_S + L_GA^A + L_GA^I")]["R@1"] == 91.2
    main_table = whm.paper_table("main")
    assert len(main_table) == 8 + 6 + 7
    assert main_table[("Fashion200k", "TIRG-BERT+GA")] == {
        "R@1": 31.4,
        "R@10": 54.1,
        "R@50": 77.6,
        "avg": 54.4,
    }
    # every row's avg is the mean of its recalls, as rounded in the paper (within 0.1)
    for table in ("main", "ablation", "iso_vs_l1l2", "ga_vs_fgsm"):
        for key, m in whm.paper_table(table).items():
            recalls = [v for k, v in m.items() if k.startswith("R@")]
            assert abs(sum(recalls) / len(recalls) - m["avg"]) <= 0.1, (table, key)
    assert whm.paper_table("ga_vs_fgsm")[("CSS", "baseline + FGSM")]["train_time_s_per_epoch"] == (
        248.57
    )
    assert whm.paper_table("datasets")[("Fashion200k", "")]["test_queries"] == 33480


def test_the_papers_css_tirg_is_tirg_lastconv():
    off = {"sim_weight": 0.0, "ga_adv_eps": 0.0, "ga_iso_gamma": 0.0}
    on = {"sim_weight": 1e-3, "ga_adv_eps": 1e-6, "ga_iso_gamma": 0.01}
    css = {"dataset": "css3d", "use_bert": False}
    assert whm.paper_method({**css, **off, "model": "tirg_lastconv"})[:2] == ("CSS", "TIRG")
    assert whm.paper_method({**css, **on, "model": "tirg_lastconv"})[:2] == ("CSS", "TIRG+GA")
    assert whm.paper_method({**css, **off, "model": "concat"})[1] == "Concatenation"
    dataset, method, setting = whm.paper_method({**css, **on, "model": "tirg"})
    assert (dataset, method) == ("CSS", None)
    assert "the TIRG code's model; the paper's CSS TIRG is tirg_lastconv" in setting
    # on MIT-States and Fashion200k the paper's TIRG is TIRG
    mit = {"dataset": "mitstates", "use_bert": False, **off}
    assert whm.paper_method({**mit, "model": "tirg"})[1] == "TIRG"
    assert whm.paper_method({**mit, "model": "tirg_lastconv"})[1] is None


def fake_run(folder, args, iteration=2, m_s=50.0, m_t=40.0):
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps(args))
    line = {"iteration": iteration, "split": "test", "M_s": m_s, "M_t": m_t, "synthetic": True}
    (folder / "metrics.jsonl").write_text(json.dumps(line) + "\n")
    return str(folder)


def test_a_css_tirg_run_is_labelled_as_the_tirg_codes_model(tmp_path):
    args = {"dataset": "css3d", "model": "tirg", "use_bert": False}
    run = fake_run(tmp_path / "tirg_run", args)
    (row,) = whm.summarize_runs([run])
    assert row["paper_method"] is None and row["paper_M_t"] is None
    table = whm.markdown_table([row], 0.5, "last")
    line = next(t for t in table.splitlines() if t.startswith("| tirg_run |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[7] == (
        "— (not the paper's model: TIRG (the TIRG code's model; the paper's CSS TIRG is "
        "tirg_lastconv))"
    )
    lastconv = fake_run(tmp_path / "lc", {**args, "model": "tirg_lastconv"})
    assert whm.summarize_runs([lastconv])[0]["paper_method"] == "CSS TIRG"


def test_run_folders_without_metrics_are_named_on_stderr(tmp_path, capsys):
    args = {"dataset": "css3d", "model": "tirg_lastconv", "use_bert": False}
    good = fake_run(tmp_path / "logs" / "20240101-000000_done", args)
    pending = tmp_path / "logs" / "20240101-000001_crashed"
    pending.mkdir()
    (pending / "args.json").write_text(json.dumps(args))
    (tmp_path / "logs" / "notes").mkdir()  # not a run folder: nothing to say
    rows = whm.summarize_runs([str(tmp_path / "logs")])
    assert [r["dir"] for r in rows] == [good]
    err = capsys.readouterr().err
    assert f"skipping {pending}: no metrics.jsonl" in err
    assert err.count("skipping") == 1
