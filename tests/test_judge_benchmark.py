"""The judge throughput benchmark runs (local paths; the server paths are what test_judge_http covers)."""

from examples.benchmarks.judge_throughput import main


def test_judge_throughput_runs(tmp_path, capsys):
    doc = main(["--no-server", "--requests", "2", "--images-per-request", "1", "--max-new-tokens", "4",
                "--batch-size", "2", "--json", str(tmp_path / "b.json")])
    assert set(doc["results"]) == {"local, one at a time", "local, batch 2"}
    assert doc["ratios"]["local batched / one at a time"] > 0
    assert all(r["tokens"] > 0 and r["images_per_s"] > 0 for r in doc["results"].values())
    assert "ratio local batched / one at a time" in capsys.readouterr().out and (tmp_path / "b.json").exists()
