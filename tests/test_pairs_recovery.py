"""Pair mining recovers from failed and damaged runs (issue 11, items 13 and 14): a run that failed before its
first shard does not lock its directory, and a resume verifies every finished shard (size, parquet footer,
row count) and regenerates the broken ones."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from alignment.pairs import mine_pairs
from alignment.tiny import tiny_sd_pipeline
from reward_plugins import create_reward

PROMPTS = ["a photo of a cat", "a red fox in the snow", "a bowl of ramen"]
KW = dict(num_inference_steps=1, batch_size=8, shard_size=1, progress=False, rule="composite", pairs_per_prompt=None)


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline(seed=0, sample_size=8)


@pytest.fixture(scope="module")
def reward():
    return create_reward("pickscore-tiny", device="cpu")


class Boom(RuntimeError):
    pass


def _fail_before_any_shard(*args, **kwargs):
    raise Boom("the sampler crashed")


def test_failed_run_without_shards_is_replaced_by_a_corrected_rerun(pipe, reward, tmp_path, monkeypatch):
    import alignment.pairs as pairs_module

    out = tmp_path / "pairs"
    monkeypatch.setattr(pairs_module, "best_of_n", _fail_before_any_shard)
    with pytest.raises(Boom):
        mine_pairs(pipe, PROMPTS, reward, 3, out, margin=0.5, **KW)
    monkeypatch.undo()
    # Different settings (the corrected margin) in the same directory: nothing was mined there, so no refusal.
    res = mine_pairs(pipe, PROMPTS, reward, 3, out, margin=0.0, **KW)
    assert res.num_prompts == len(PROMPTS) and res.manifest["settings"]["margin"] == 0.0


def test_run_with_finished_shards_still_refuses_other_settings(pipe, reward, tmp_path):
    out = tmp_path / "pairs"
    mine_pairs(pipe, PROMPTS[:1], reward, 3, out, **KW)
    with pytest.raises(ValueError, match="incompatible settings"):
        mine_pairs(pipe, PROMPTS[:1], reward, 3, out, **{**KW, "num_inference_steps": 2})


def _shard_table(path):
    return pq.read_table(path).to_pydict()


@pytest.mark.parametrize("damage", ["truncate", "empty", "delete", "fewer_rows"])
def test_resume_regenerates_broken_shards(pipe, reward, tmp_path, damage):
    out = tmp_path / "pairs"
    first = mine_pairs(pipe, PROMPTS, reward, 3, out, **KW)
    victim = first.files[1]
    expected = _shard_table(victim)
    if damage == "truncate":
        data = victim.read_bytes()
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        victim.write_bytes(b"")
    elif damage == "delete":
        victim.unlink()
    else:  # a complete parquet file with a row missing
        pq.write_table(pq.read_table(victim).slice(0, 1), victim)
    with pytest.warns(UserWarning, match=victim.name):
        again = mine_pairs(pipe, PROMPTS, reward, 3, out, **KW)
    assert again.new_pairs == len(expected["caption"])
    assert _shard_table(victim) == expected
    assert again.num_pairs == first.num_pairs
    # The dataset loads again (what failed before: load_dataset on a truncated shard).
    assert len(again.load()) == first.num_pairs


def test_resume_of_intact_shards_regenerates_nothing(pipe, reward, tmp_path):
    out = tmp_path / "pairs"
    first = mine_pairs(pipe, PROMPTS, reward, 3, out, **KW)
    again = mine_pairs(pipe, PROMPTS, reward, 3, out, **KW)
    assert again.new_pairs == 0 and len(again.skipped_blocks) == len(PROMPTS)
    progress = json.loads((out / "progress-p00000.json").read_text())
    for info in progress["blocks"].values():
        if info["file"]:
            assert info["bytes"] == (out / info["file"]).stat().st_size
    assert again.num_pairs == first.num_pairs
