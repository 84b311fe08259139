"""benchmarks/merge_exact.py on the committed held-out benchmark files."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HELDOUT = ROOT / "docs" / "bench-heldout"


def _merge():
    spec = importlib.util.spec_from_file_location("merge_exact", ROOT / "benchmarks" / "merge_exact.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_one_seed_rebuilt_from_cells_equals_its_pooled_counts():
    m = _merge()
    whole, runs = m.pooled([HELDOUT / "seed2"])
    seed, seed_runs = m.pooled_seed([HELDOUT / "seed2"], "2")
    def nonempty(counts):
        return {key: kn for key, kn in counts.items() if kn[1]}

    assert nonempty(seed) == nonempty(whole) and dict(seed_runs) == dict(runs)


def test_seeds_split_and_add_up_to_the_pooled_table():
    m = _merge()
    whole, runs = m.pooled([HELDOUT])
    s0, r0 = m.pooled_seed([HELDOUT], "0")
    s1, r1 = m.pooled_seed([HELDOUT], "1")
    assert r0["dynasyn"] == r1["dynasyn"] == 5 and runs["dynasyn"] == 10
    for key, (k, n) in whole.items():
        if n == 0:
            continue
        if key[0] == m.CEILING:
            assert s0[key] == [k, n]
            continue
        assert s0[key][0] + s1[key][0] == k and s0[key][1] + s1[key][1] == n, key
    assert s0[("dynasyn", "overall", "identity_kept")] != s1[("dynasyn", "overall", "identity_kept")]
    three = m.pooled([HELDOUT, HELDOUT / "seed2"])[0]
    assert three[("dynasyn", "overall", "identity_kept")][1] == 3 * s0[("dynasyn", "overall", "identity_kept")][1]


def test_the_ceiling_counts_once_per_scene():
    m = _merge()
    key = (m.CEILING, "overall", "identity_kept")
    held, held_runs = m.pooled([HELDOUT])
    tune, tune_runs = m.pooled([ROOT / "docs" / "bench-tune"])
    same, same_runs = m.pooled([HELDOUT, HELDOUT / "seed2"])
    both, both_runs = m.pooled([HELDOUT, ROOT / "docs" / "bench-tune"])
    assert same[key] == held[key] and same_runs[m.CEILING] == held_runs[m.CEILING] == 5
    assert both[key] == [held[key][0] + tune[key][0], held[key][1] + tune[key][1]]
    assert both_runs[m.CEILING] == 10


def test_paired_counts_only_the_asked_seed():
    m = _merge()
    assert "of 10 runs" in m.paired([HELDOUT])
    assert "of 5 runs" in m.paired([HELDOUT], seed="0")


def test_paired_over_several_directories_counts_every_seed():
    # regression: the loop over one directory's runs used to overwrite the ``seed`` filter,
    # so a second directory's runs of other seeds were dropped
    m = _merge()
    assert "of 15 runs" in m.paired([HELDOUT, HELDOUT / "seed2"])
    assert "of 15 runs" in m.paired([HELDOUT / "seed2", HELDOUT])
    assert "of 5 runs" in m.paired([HELDOUT, HELDOUT / "seed2"], seed="2")


def test_run_points_rebuild_the_pooled_acting_rates(tmp_path):
    m = _merge()
    dirs = [HELDOUT, HELDOUT / "seed2"]
    counts, runs = m.pooled(dirs)
    points = m.run_points(dirs)
    dyn = [p for p in points if p["preset"] == "dynasyn"]
    assert len(dyn) == runs["dynasyn"] == 15
    assert len({(p["scene"], p["seed"]) for p in dyn}) == 15
    stats = m.plot_stats(counts, runs, points)
    for metric in ("identity_kept", "action_followed"):
        pooled = stats["exact"]["dynasyn"]["acting"][metric]
        # every run has the same images, so the pooled rate is the mean of the runs' rates
        mean = sum(p[metric] for p in dyn) / len(dyn)
        assert abs(pooled["rate"] - mean) < 1e-3, (metric, pooled["rate"], mean)
        lo, hi = pooled["ci95"]
        assert lo < pooled["rate"] < hi
    assert stats["exact_ceiling"]["acting"]["identity_kept"]["n"] > 0
    from dynasyn.evaluate.benchmark import identity_action_plot

    image = identity_action_plot(stats)
    assert image is not None and image.size == (760, 560)


def test_cli_writes_the_table_and_the_plot(tmp_path, monkeypatch, capsys):
    from PIL import Image

    m = _merge()
    out, png = tmp_path / "t.md", tmp_path / "p.png"
    monkeypatch.setattr("sys.argv", ["merge_exact", str(HELDOUT), str(HELDOUT / "seed2"),
                                     "--out", str(out), "--plot", str(png)])
    m.main()
    assert "| DynASyn | 15 |" in out.read_text()
    assert Image.open(png).size == (760, 560)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png", "t.md"]


def test_scene_bootstrap_resamples_whole_scenes():
    m = _merge()
    # one scene far ahead, one far behind: the mean is between, the interval spans both
    mean, lo, hi = m.scene_bootstrap({"a": [10.0, 10.0, 10.0], "b": [-2.0]})
    assert mean == 7.0 and lo == -2.0 and hi == 10.0
    mean, lo, hi = m.scene_bootstrap({"a": [1.0, 3.0], "b": [2.0, 2.0], "c": [5.0, -1.0]})
    assert mean == 2.0 and lo == hi == 2.0  # every scene averages 2
    text = m.paired([HELDOUT, HELDOUT / "seed2"])
    assert "bootstrap over the 5 scenes" in text


def test_plot_without_action_prompts_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import csv

    import pytest

    m = _merge()
    d = tmp_path / "plain_only"
    d.mkdir()
    for name in ("exact.csv", "cells.csv"):
        rows = list(csv.DictReader((HELDOUT / "seed2" / name).open()))
        with (d / name).open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(r for r in rows if r["category"] in ("plain", "overall"))
    out, png = tmp_path / "t.md", tmp_path / "p.png"
    monkeypatch.setattr("sys.argv", ["merge_exact", str(d), "--out", str(out), "--plot", str(png)])
    with pytest.raises(SystemExit) as e:
        m.main()
    assert e.value.code == 2
    assert "no run has exact metrics of action prompts" in capsys.readouterr().err
    assert not out.exists() and not png.exists()
