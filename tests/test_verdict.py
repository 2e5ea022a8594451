"""The demo's verdict (ppu_fast.report.judge) on constructed tables, the attack's sample size over
seeds, and the picture that tells the same story."""
import math

import json

import pytest

from ppu_fast.report import attack_size, judge, plot_story, summarize, write_results


def row(forget, test, mia_, seconds, retain=0.0):
    return {"test_error": test, "retain_error": retain, "forget_error": forget, "val_error": float("nan"),
            "mia": mia_, "seconds": seconds}


def table(rows):
    return summarize([rows])


# Class unlearning as the demo measures it (seed 0): the attack cannot tell Original from Retrain.
CLASS = {"original": row(0.0, 1.1, 52.5, 0.0), "retrain": row(100.0, 10.7, 47.5, 15.9),
         "finetune": row(0.0, 1.1, 52.5, 4.0), "ppu": row(100.0, 11.6, 55.0, 5.4),
         "ppu-bias": row(87.8, 10.1, 55.0, 3.8), "ppu-random": row(82.0, 9.9, 57.5, 2.9)}


def test_closest_is_the_smallest_mean_gap_over_forget_and_test_error():
    v = judge(table(CLASS), chance=7.9, n=36)
    assert v.attack_informative is False and v.compared == ("forget_error", "test_error")
    expected = {m: (abs(r["forget_error"] - 100.0) + abs(r["test_error"] - 10.7)) / 2
                for m, r in CLASS.items() if m not in ("original", "retrain")}
    assert v.gaps == pytest.approx(expected)
    assert v.closest == "ppu" == min(expected, key=expected.get)
    assert v.nearest["forget_error"] == "ppu" and v.nearest["test_error"] == "ppu-bias"
    assert v.speedup == pytest.approx(15.9 / 5.4)
    assert v.luck == pytest.approx(2 * math.sqrt(2) * 7.9)
    text = v.text
    assert text.startswith("Closest to Retrain: PPU (privacy)")
    assert "2.9x faster than retraining" in text
    assert "Did not forget: Finetune:" in text
    assert "says nothing about privacy here" in text and "36 examples a side" in text
    assert "test error: PPU w/ uniform (bias)" in text
    assert v.headline == "Closest to Retrain: PPU (privacy), 2.9x faster than Retrain"


def test_an_informative_attack_counts_and_can_change_the_winner():
    rows = {"original": row(0.0, 4.5, 45.0, 0.0), "retrain": row(100.0, 0.9, 100.0, 20.0),
            "a": row(90.0, 3.0, 55.0, 4.0),     # nearer on errors, far on the attack
            "b": row(80.0, 3.0, 99.0, 40.0)}    # a bit farther on errors, at Retrain's attack score
    assert judge(table(rows)).closest == "a"    # sample size unknown: the attack is left out
    v = judge(table(rows), chance=5.0, n=100)
    assert v.attack_informative is True and v.compared == ("forget_error", "test_error", "mia")
    assert v.closest == "b" and v.gaps["b"] < v.gaps["a"]
    assert "this gap is real" in v.text and "2.0x slower than retraining" in v.text
    assert v.nearest == {"forget_error": "a", "test_error": "a", "mia": "b"}


def test_unknown_attack_size_and_no_visible_forgetting_are_said():
    rows = {"original": row(0.0, 0.7, 40.0, 0.0), "retrain": row(0.0, 0.7, 40.0, 2.7),
            "finetune": row(0.0, 0.7, 40.0, 0.8), "ppu": row(4.0, 3.6, 52.0, 2.6)}
    v = judge(table(rows))
    assert v.attack_informative is None and v.closest == "finetune"
    assert "forgetting hardly shows" in v.text and "is unknown" in v.text
    assert "It is also the nearest on each of them alone." in v.text


def test_ties_go_to_the_first_method_in_table_order():
    rows = {"retrain": row(50.0, 5.0, 50.0, 1.0), "x": row(40.0, 5.0, 50.0, 1.0),
            "y": row(60.0, 5.0, 50.0, 1.0)}
    assert judge(table(rows)).closest == "x"
    assert judge(table(dict(reversed(list(rows.items()))))).closest == "y"


def test_without_retrain_nothing_is_ranked():
    v = judge(table({"original": row(0, 1, 50, 0), "ppu": row(50, 2, 50, 1)}))
    assert v.closest is None and v.gaps == {} and "No Retrain row" in v.text


def test_attack_size_over_seeds():
    runs = [{"retrain": {**row(1, 1, 50, 1), "mia_chance": 8.0, "mia_n": 36}},
            {"retrain": {**row(1, 1, 50, 1), "mia_chance": 8.0, "mia_n": 30}}]
    chance, n = attack_size(runs)
    assert chance == pytest.approx(8.0 / math.sqrt(2)) and n == 30
    assert attack_size([{"retrain": row(1, 1, 50, 1)}]) == (None, None)


def test_story_png_and_verdict_in_the_results(tmp_path):
    methods = table(CLASS)
    v = judge(methods, chance=7.9, n=36)
    path = plot_story(methods, v, tmp_path / "story.png", title="digits / smallcnn")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    paths = write_results(tmp_path / "out", {"dataset": "digits"}, methods, per_seed=[CLASS], verdict=v,
                          story=True)
    md = paths["md"].read_text()
    assert "## Verdict" in md and "- Closest to Retrain: PPU (privacy)" in md
    saved = json.loads(paths["json"].read_text())["verdict"]
    assert saved["closest"] == "ppu" and saved["attack_informative"] is False
