"""`reward-align eval-reward` end to end on tiny registered rewards: every output file, and one-line errors."""

import json

import pytest
from evaluation_helpers import write_pickapic, write_rank_json

from alignment.cli import main
from reward_plugins.composite import CompositeReward

pytestmark = pytest.mark.usefixtures("one_thread")


def test_eval_reward_writes_tables_charts_calibration_and_probes(tmp_path, capsys):
    pick = write_pickapic(tmp_path / "pick" / "test.parquet")
    hpd = write_rank_json(tmp_path / "hpd", "hpdv2", [([200, 100, 150], [1, 2, 3]), ([50, 60, 70], [1, 1, 2])])
    out = tmp_path / "out"
    argv = ["eval-reward", "--reward", "pickscore-tiny", "--reward", "aesthetic-tiny", "--dataset", str(pick),
            "--dataset", str(hpd), "--output-dir", str(out), "--workers", "0", "--bootstrap", "20", "--batch-size", "4",
            "--calibrate", "--probes", "--probe", "blur", "--probe-images", "4", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "official protocol pickscore" in printed and "official protocol hpsv2" in printed
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["dataset"]["layout"] for r in results] == ["pickapic", "hpdv2"]
    rows = results[0]["rows"]
    assert {(r["reward"], r["rule"]) for r in rows} >= {("pickscore-tiny", "exclude"), ("aesthetic-tiny", "pickscore")}
    md = (out / "accuracy.md").read_text()
    assert "| Method | Multi-dimension | Human Annotation | Pick-a-Pic v1 | HPD v2 | ImageRewardDB | Mean |" in md
    assert "| LeScore | ✔ |  | 0.674 | 0.829 | 0.642 | 0.715 |" in md and "**pickscore-tiny** (this run)" in md
    assert (out / "accuracy_pickapic_test_overall.png").is_file() and (out / "probe_blur.png").is_file()
    assert "blur" in (out / "probes.md").read_text()
    cal = out / "calibration.json"
    comp = CompositeReward.from_weights({"pickscore-tiny": 1.0, "aesthetic-tiny": 0.5})
    stats = comp.load_calibration(cal)
    saved = json.loads(cal.read_text())["rewards"]["aesthetic-tiny"]["dimensions"]["aesthetic"]
    # 12 Pick-a-Pic images, one of them twice (under two prompts): the prompt-free reward saw it once.
    assert stats["aesthetic-tiny"] == pytest.approx((saved["mean"], saved["std"])) and saved["n"] == 11
    # A rerun scores nothing: every image comes from the cache.
    assert main(argv[:argv.index("--calibrate")] + ["--no-progress"]) == 0
    cache_lines = sum(len(p.read_text().splitlines()) for p in (out / "cache").rglob("scores.jsonl"))
    assert cache_lines == (12 + 6) + (11 + 6)   # pickscore, aesthetic: nothing scored twice


def test_eval_reward_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "odd.json"
    bad.write_text(json.dumps([{"question": 1}]))
    assert main(["eval-reward", "--reward", "aesthetic-tiny", "--dataset", str(bad), "--output-dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("reward-align eval-reward: error: cannot tell the layout") and "Known layouts" in err
    assert "\n" not in err
    assert main(["eval-reward", "--reward", "aesthetic-tiny", "--dataset", str(bad), "--option", "nodot"]) == 1
    assert "NAME.KEY=VALUE" in capsys.readouterr().err


def test_decode_workers_benchmark_runs(capsys):
    from examples.benchmarks import eval_decode_workers

    out = eval_decode_workers.main(["--pairs", "3", "--size", "32", "--workers", "1", "--batch", "2"])
    assert set(out["rates"]) == {0, 1} and all(r > 0 for r in out["rates"].values()) and out["ratio"] > 0
    assert "ratio 1 workers / 0" in capsys.readouterr().out


def test_results_json_is_strict(tmp_path):
    from alignment.evaluation.report import write_json

    p = write_json({"acc": float("nan"), "rows": [{"v": float("inf"), "ok": 0.5}]}, tmp_path / "r.json")
    assert json.loads(p.read_text()) == {"acc": None, "rows": [{"v": None, "ok": 0.5}]}


def test_eval_reward_tunes_the_pickscore_tie_threshold_on_validation(tmp_path, capsys):
    val = write_pickapic(tmp_path / "val.parquet")
    test = write_pickapic(tmp_path / "test.parquet", rows=[(200, 10, 1.0), (90, 90, 0.5)])
    out = tmp_path / "o"
    assert main(["eval-reward", "--reward", "aesthetic-tiny", "--dataset", str(test), "--tune-ties-on", str(val),
                 "--output-dir", str(out), "--workers", "0", "--bootstrap", "0", "--no-progress"]) == 0
    assert "tie thresholds (softmax probability) tuned on" in capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())["results"][0]["rows"]
    tuned = {r["rule"]: r["accuracy"]["tie_threshold"] for r in rows}
    assert tuned["exclude"] == 0.0 and 0.0 <= tuned["pickscore"] <= 1.0
    assert "softmax threshold tuned per reward" in (out / "accuracy.md").read_text()
