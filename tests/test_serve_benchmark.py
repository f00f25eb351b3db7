"""The serve throughput benchmark script runs end to end (server on a thread, a few tiny images)."""

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from examples.benchmarks import serve_throughput  # noqa: E402


def test_serve_throughput_prints_a_row_per_client_count(capsys):
    result = serve_throughput.main(["--in-thread", "--images", "16", "--size", "32", "--clients", "1", "4",
                                    "--max-batch-size", "8"])
    out = capsys.readouterr().out
    assert "in-process = reward.score" in out and "p99 ms" in out
    assert set(result["clients"]) == {1, 4}
    for row in result["clients"].values():
        assert row["images_per_s"] > 0 and row["in_process_images_per_s"] > 0 and row["ratio"] > 0
        assert row["p99_ms"] >= row["p50_ms"] > 0
    assert result["clients"][1]["mean_batch"] == 1.0


def test_serve_throughput_rejects_fewer_images_than_one_request():
    with pytest.raises(SystemExit):
        serve_throughput.main(["--images", "2", "--images-per-request", "4"])
