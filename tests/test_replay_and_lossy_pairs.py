"""Replay settings and lossy pair images (issue 11, item 10): best-of-N records the pipeline dtype (noise is
drawn in it) and warns on replay in another one; JPEG pairs are scored after encoding, so the stored scores
and labels describe the images that are stored."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from alignment import best_of_n
from alignment.pairs import mine_pairs
from alignment.tiny import tiny_sd_pipeline
from reward_plugins import create_reward

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline(seed=0, sample_size=8)


@pytest.fixture(scope="module")
def reward():
    return create_reward("pickscore-tiny", device="cpu")


def test_best_of_n_records_the_dtype_and_warns_on_replay_in_another(pipe, reward):
    res = best_of_n(pipe, ["a cat"], reward, 2, num_inference_steps=1, progress=False)
    assert res.settings["dtype"] == "float32"
    res.regenerate(pipe, 0, 0)  # same dtype: no warning needed
    other = tiny_sd_pipeline(seed=0, sample_size=8).to(dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="float32.*bfloat16"):
        res.regenerate(other, 0, 0)


def _decode(raw: bytes) -> torch.Tensor:
    arr = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255


def test_jpeg_pairs_are_scored_after_encoding(pipe, reward, tmp_path):
    res = mine_pairs(pipe, ["a cat", "a dog"], reward, 3, tmp_path / "p", rule="composite", image_format="jpeg",
                     jpeg_quality=30, num_inference_steps=1, progress=False, pairs_per_prompt=None)
    table = pq.read_table(res.files[0]).to_pylist() + (pq.read_table(res.files[1]).to_pylist() if len(res.files) > 1 else [])
    assert table and res.manifest["settings"]["scores_after_encoding"] is True
    for row in table:
        imgs = torch.stack([_decode(row["jpg_0"]), _decode(row["jpg_1"])])
        scores = reward.score(imgs, [row["caption"]] * 2).scores
        assert scores.tolist() == pytest.approx([row["score_0"], row["score_1"]], abs=1e-4)
        winner_is_0 = row["label_0"] == 1.0
        assert (scores[0] > scores[1]) == winner_is_0
