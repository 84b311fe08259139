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
