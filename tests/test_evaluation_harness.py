"""The harness on small sets written by the tests in each official layout, with rewards whose answers are
known: exact accuracies per tie rule and protocol, rank-list expansion, per-dimension MHP, the score cache,
decoding workers and bad input."""

import json

import pytest
import torch
from evaluation_helpers import (
    ChannelReward,
    PromptColourReward,
    solid_png,
    write_parquet,
    write_pickapic,
    write_rank_json,
)

from alignment.evaluation import detect_layout, evaluate, load_preference_set
from alignment.evaluation.cache import ScoreCache

RULES = ("exclude", "half", "predict")


def run(dataset, specs=("channels:red",), models=None, **kw):
    kw.setdefault("bootstrap", 0)
    kw.setdefault("progress", False)
    return evaluate(dataset, list(specs), models=models or {"channels": ChannelReward()}, **kw)


def test_pickapic_known_reward_gives_exact_accuracy_under_each_rule(tmp_path):
    path = write_pickapic(tmp_path / "test.parquet")
    assert detect_layout(path) == "pickapic"
    res = run(path, rules=RULES)
    assert res.dataset["pairs"] == 6 and res.dataset["human_ties"] == {"overall": 2}
    # Worked by hand from PICK_ROWS: right, wrong, reward tie, human tie, both tie, right.
    assert res.get("channels:red", "exclude").value == pytest.approx(2.5 / 4)
    assert res.get("channels:red", "half").value == pytest.approx(3.5 / 6)
    assert res.get("channels:red", "predict").value == pytest.approx(4 / 6)
    official = res.get("channels:red")  # Pick-a-Pic's official protocol is PickScore's 3-way scoring
    assert official.rule == "pickscore" and official.value == pytest.approx(4 / 6)
    # The other dimension of the same model comes from the same cached pass: green is 10 vs 20 everywhere.
    res2 = run(path, specs=("channels:green",), rules=("exclude",))
    assert res2.get("channels:green", "exclude").value == pytest.approx(1 / 4)  # only the label-0 row agrees


def _rank_groups():
    # prompt 0: reds 200 > 150 > 100 but humans rank [1, 2, 3]: pairs (0,1) ok, (0,2) ok, (1,2) inverted.
    # prompt 1: ranks [1, 1, 2] (a tie), reds rising: both decided pairs inverted.
    return [([200, 100, 150], [1, 2, 3]), ([50, 60, 70], [1, 1, 2])]


@pytest.mark.parametrize("kind", ["hpdv2", "imagereward"])
def test_rank_lists_expand_and_follow_each_official_protocol(tmp_path, kind):
    path = write_rank_json(tmp_path / kind, kind, _rank_groups())
    assert detect_layout(path) == kind
    pset = load_preference_set(path)
    assert pset.pairs.tolist() == [[0, 1], [0, 2], [1, 2], [3, 4], [3, 5], [4, 5]]
    assert pset.labels["overall"].tolist() == [1.0, 1.0, 1.0, 0.5, 1.0, 1.0]
    res = run(path, rules=RULES)
    if kind == "hpdv2":  # HPSv2's inversion score: per prompt (2/3 and 1/3: the tie is not an inversion)
        assert res.get("channels:red").value == pytest.approx((2 / 3 + 1 / 3) / 2)
    else:  # ImageReward's test.py: ties out, over all pairs
        assert res.get("channels:red").value == pytest.approx(2 / 5)
    assert res.get("channels:red", "exclude").value == pytest.approx(2 / 5)


def test_imagerewarddb_parquet_groups_by_prompt_and_adds_rating_dimensions(tmp_path):
    rows = []
    for i, (red, rank, fid) in enumerate([(200, 1, 7), (100, 2, 3), (150, 3, 3)]):
        rows.append({"prompt_id": "p0", "prompt": "a red car", "image": {"bytes": solid_png(red, i), "path": None},
                     "rank": rank, "fidelity_rating": fid, "image_text_alignment_rating": 5})
    path = write_parquet(rows, tmp_path / "ir" / "test.parquet")
    assert detect_layout(path) == "imagereward"
    pset = load_preference_set(path)
    assert pset.dimensions == ["overall", "alignment", "fidelity"]
    assert pset.labels["fidelity"].tolist() == [1.0, 1.0, 0.5]
    res = run(pset, rules=("exclude",))
    assert res.get("channels:red", "exclude", "overall").value == pytest.approx(2 / 3)
    assert res.get("channels:red", "exclude", "fidelity").value == pytest.approx(1.0)
    skipped = [r for r in res.rows if r.dimension == "alignment"]
    assert skipped and all(r.accuracy is None and "ignores prompts" in r.skipped for r in skipped)


def test_mhp_per_dimension_maps_to_the_reward_dimensions(tmp_path):
    class Two(ChannelReward):
        dimensions = ("aesthetic", "fidelity")
        default_dimension = "aesthetic"

        def compute(self, images, prompts):
            out = super().compute(images, prompts)
            return {"aesthetic": out["red"], "fidelity": out["green"]}

    for name, (r, g) in {"a": (200, 10), "b": (100, 50)}.items():
        (tmp_path / f"{name}.png").write_bytes(solid_png(r, g))
    # a beats b on red (aesthetics), loses on green (detail); humans: a on aesthetics, a on detail, tie overall.
    rows = [{"prompt": "a cat", "image_0": "a.png", "image_1": "b.png", "label_aesthetics": 1,
             "label_detail": 1, "label_overall": 0.5}]
    (tmp_path / "mhp.json").write_text(json.dumps(rows))
    assert detect_layout(tmp_path / "mhp.json") == "mhp"
    res = run(tmp_path / "mhp.json", specs=("two",), models={"two": Two()}, rules=("exclude", "half"))
    assert res.get("two", "exclude", "aesthetics").value == 1.0
    assert res.get("two", "exclude", "detail").value == 0.0       # measured with the fidelity head
    assert res.get("two", "half", "overall").value == 0.5
    mapped = {r.dimension: r.reward_dimension for r in res.rows}
    assert mapped == {"aesthetics": "aesthetic", "detail": "fidelity", "overall": None}


def test_own_pairs_directory_is_read(tmp_path):
    out = tmp_path / "pairs"
    write_pickapic(out / "data" / "train-p0-s0.parquet", rows=[(200, 100, 1.0), (10, 90, 0.0)])
    (out / "manifest.json").write_text(json.dumps({"format": "reward-plugins/pairs", "version": 1}))
    assert detect_layout(out) == "pairs"
    assert run(out).get("channels:red").value == 1.0


def test_several_rewards_share_one_decode_and_the_cache_resumes(tmp_path, monkeypatch):
    from alignment.evaluation import scoring

    path = write_pickapic(tmp_path / "test.parquet")
    calls = []
    real = scoring.decode_image
    monkeypatch.setattr(scoring, "decode_image", lambda ref: calls.append(ref.key) or real(ref))
    cache = tmp_path / "cache"
    models = {"channels": ChannelReward(), "prompt-colour": PromptColourReward()}
    res = run(path, specs=("channels:red", "channels:green", "prompt-colour"), models=models, cache_dir=cache)
    assert len(calls) == 11 == len(set(calls))   # each distinct image decoded once (one repeats across prompts)
    # the prompt-free reward scores that repeated image once; the prompt reader once per prompt
    assert res.scoring.scored == {"channels": 11, "prompt-colour": 12}
    # prompts name 'red': the prompt reward agrees with channels:red on every pair
    assert res.get("prompt-colour").value == res.get("channels:red").value
    calls.clear()
    again = run(path, specs=("channels:red", "prompt-colour"), models=models, cache_dir=cache)
    assert calls == [] and again.scoring.scored == {"channels": 0, "prompt-colour": 0}
    assert again.get("channels:red").value == res.get("channels:red").value
    # A run killed mid-write leaves a partial last line: it is dropped and only that image re-scored.
    folder = next(p for p in cache.iterdir() if p.name.startswith("channels-"))
    lines = (folder / "scores.jsonl").read_text().splitlines()
    (folder / "scores.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])
    third = run(path, specs=("channels:red",), models=models, cache_dir=cache)
    assert third.scoring.scored == {"channels": 1} and third.get("channels:red").value == res.get("channels:red").value
    # Another reward under the same name is a different fingerprint: its own folder, never the stale one.
    other = ChannelReward()
    other.anchor.data.fill_(1.0)
    run(path, models={"channels": other}, cache_dir=cache)
    assert len([p for p in cache.iterdir() if p.name.startswith("channels-")]) == 2


def test_cache_refuses_a_folder_of_another_reward(tmp_path):
    ScoreCache(tmp_path, "r", "aaaa")
    (tmp_path / "r-aaaa" / "meta.json").write_text(json.dumps({"format": "reward-plugins/score-cache", "fingerprint": "bbbb"}))
    with pytest.raises(ValueError, match="belongs to another reward"):
        ScoreCache(tmp_path, "r", "aaaa")


def test_decoding_workers_give_the_same_scores(tmp_path):
    path = write_pickapic(tmp_path / "test.parquet")
    a = run(path, workers=0, batch_size=4)
    b = run(path, workers=2, batch_size=4)
    assert a.get("channels:red").value == b.get("channels:red").value


def test_missing_image_is_counted_and_reported_unless_strict(tmp_path):
    path = write_rank_json(tmp_path / "hpd", "hpdv2", _rank_groups(), skip={"g0_2.png"})
    res = run(path, rules=("exclude",))
    assert res.missing_images and res.missing_images[0].endswith("g0_2.png")
    assert res.dataset["pairs"] == 4                              # (0,2) and (1,2) of prompt 0 left out
    assert any("left out" in n for n in res.dataset["notes"])
    with pytest.raises(FileNotFoundError, match="do not exist"):
        run(path, strict=True)


def test_unreadable_image_is_counted_too(tmp_path):
    path = write_rank_json(tmp_path / "hpd", "hpdv2", _rank_groups())
    (tmp_path / "hpd" / "g1_0.png").write_bytes(b"not a png")
    res = run(path, rules=("exclude",))
    assert len(res.unreadable_images) == 1 and res.dataset["pairs"] == 4
    with pytest.raises(FileNotFoundError, match="cannot read image"):
        run(path, strict=True)


def test_unknown_layout_names_the_known_layouts(tmp_path):
    bad = tmp_path / "odd.json"
    bad.write_text(json.dumps([{"question": "?", "answer": 1}]))
    with pytest.raises(ValueError, match=r"Known layouts — pickapic: .*hpdv2: .*imagereward: .*mhp: .*pairs: "):
        load_preference_set(bad)
    write_parquet([{"a": 1}], tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=r"parquet columns \['a'\].*Known layouts"):
        load_preference_set(tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="unknown layout 'nope'"):
        load_preference_set(bad, layout="nope")


def test_a_reward_that_needs_prompts_on_a_set_without_them(tmp_path):
    path = write_pickapic(tmp_path / "test.parquet", caption="")
    with pytest.raises(ValueError, match="'prompt-colour' scores image-text agreement and needs prompts.*aesthetic"):
        run(path, specs=("prompt-colour",), models={"prompt-colour": PromptColourReward()})
    # a prompt-free reward is fine there
    assert run(path).get("channels:red").value == pytest.approx(4 / 6)


def test_hub_name_offline_fails_with_the_local_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="pass the local path instead: Pick-a-Pic v1 parquet"):
        load_preference_set("pickapic")


def test_unknown_reward_dimension_is_an_error(tmp_path):
    path = write_pickapic(tmp_path / "test.parquet")
    with pytest.raises(ValueError, match="has no dimension 'blue'"):
        run(path, specs=("channels:blue",))


def test_limit_keeps_the_first_prompts(tmp_path):
    path = write_pickapic(tmp_path / "test.parquet")
    res = run(path, limit=2, rules=("exclude",))
    assert res.dataset["pairs"] == 2 and res.get("channels:red", "exclude").value == 0.5
    assert torch.isfinite(torch.tensor(res.get("channels:red").value))


def test_tie_threshold_tuned_on_validation_like_pickscore(tmp_path):
    from alignment.evaluation.harness import evaluate_set, load_rewards, tune_tie_thresholds

    # Clear wins with big gaps, human ties with small ones: 0.1 on probabilities calls the ties and not
    # the wins (0 misses the ties; 0.5 and above swallow the wins too).
    val = load_preference_set(write_pickapic(tmp_path / "val.parquet", rows=[(250, 5, 1.0), (5, 250, 0.0), (100, 110, 0.5), (120, 118, 0.5)]))
    rewards = load_rewards(["channels:red"], models={"channels": ChannelReward()})
    thresholds = tune_tie_thresholds(val, rewards, ["channels:red"], progress=False)
    assert thresholds == {"channels:red": 0.1}
    res = evaluate_set(val, rewards, ["channels:red"], rules=("exclude",), pickscore_thresholds=thresholds,
                       bootstrap=0, progress=False)
    acc = res.get("channels:red")
    assert acc.rule == "pickscore" and acc.tie_threshold == 0.1 and acc.value == 1.0
    assert res.get("channels:red", "exclude").tie_threshold == 0.0   # other rules keep the score threshold
    assert evaluate_set(val, rewards, ["channels:red"], rules=(), bootstrap=0, progress=False).get("channels:red").value == 0.75


def test_a_hub_snapshot_folder_reads_one_split_by_glob(tmp_path):
    data = tmp_path / "pickapic_v1" / "data"
    write_pickapic(data / "test_unique-00000-of-00001.parquet")
    write_pickapic(data / "train-00000-of-00001.parquet", rows=[(1, 2, 1.0)])
    whole = load_preference_set(data)
    assert len(whole.pairs) == 7 and any("splits ['test_unique', 'train']" in n for n in whole.notes)
    one = load_preference_set(str(data / "test_unique-*.parquet"))
    assert len(one.pairs) == 6 and not one.notes
    assert run(str(data / "test_unique-*.parquet")).get("channels:red").value == pytest.approx(4 / 6)
    with pytest.raises(FileNotFoundError, match="no parquet file matches"):
        load_preference_set(str(data / "validation-*.parquet"))


def test_mined_pairs_are_read_and_the_mining_reward_agrees_with_every_pair(tmp_path):
    # Pairs written by `mine_pairs` are labelled by the reward that mined them (winner strictly better),
    # so that reward agrees with them and its mirror does not (up to the PNG's uint8 rounding of near ties).
    from alignment.pairs import mine_pairs
    from alignment.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=0, sample_size=8)
    pipe.set_progress_bar_config(disable=True)
    reward = ChannelReward()
    mine_pairs(pipe, ["a cat", "a fox", "ramen"], reward, 3, tmp_path / "pairs", rule="composite",
               pairs_per_prompt=None, num_inference_steps=1, batch_size=8, shard_size=1, progress=False)
    assert detect_layout(tmp_path / "pairs") == "pairs"
    res = run(tmp_path / "pairs", models={"channels": reward})
    assert 6 <= res.dataset["pairs"] <= 9 and res.get("channels:red").value > 0.9

    class Mirror(ChannelReward):
        def compute(self, images, prompts):
            return {k: -v for k, v in super().compute(images, prompts).items()}

    assert run(tmp_path / "pairs", models={"channels": Mirror()}).get("channels:red").value < 0.1
