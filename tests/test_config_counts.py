"""Every count in every config section is checked when the config is loaded (issue 11, item 12): steps,
images, batch sizes, ... <= 0 are refused with the key named, before any model is built."""

from __future__ import annotations

import dataclasses

import pytest

from alignment.configs import load_config

ROOT = "configs/tiny"


def _cases():
    from alignment.commands.best_of_n import BestOfNJobConfig
    from alignment.commands.pairs import PairsJobConfig
    from alignment.trainers.dpo import DPOConfig
    from alignment.trainers.reward_finetune import RewardFinetuneConfig

    return [
        (BestOfNJobConfig, f"{ROOT}/best_of_n.yaml", ["num_inference_steps", "n", "k", "batch_size", "max_prompts",
                                                      "height", "width", "cell_size"]),
        (PairsJobConfig, f"{ROOT}/pairs.yaml", ["num_inference_steps", "n", "batch_size", "shard_size",
                                                "pairs_per_prompt"]),
        (DPOConfig, f"{ROOT}/dpo.yaml", ["validation.num_inference_steps", "train.max_steps", "train.batch_size",
                                         "train.gradient_accumulation_steps", "train.checkpoints_total_limit",
                                         "lora.rank", "data.max_pairs", "online.images_per_prompt",
                                         "online.steps_per_round", "model.resolution"]),
        (RewardFinetuneConfig, f"{ROOT}/reward_draft.yaml", ["sampling.num_steps", "method.k", "method.lv_n",
                                                            "data.val_images_per_prompt", "train.max_steps",
                                                            "reward.calibration_images"]),
    ]


CASES = [(cls, path, key) for cls, path, keys in _cases() for key in keys]


@pytest.mark.parametrize("cls,path,key", CASES, ids=[f"{c.__name__}:{k}" for c, _, k in CASES])
@pytest.mark.parametrize("value", [0, -3])
def test_non_positive_counts_are_refused_at_load(cls, path, key, value):
    with pytest.raises(ValueError, match=rf"{key.split('.')[-1]} must be an integer >= \d+; got {value}"):
        load_config(cls, path, [f"{key}={value}"])


@pytest.mark.parametrize("key", ["train.save_every", "train.log_every", "train.validate_every",
                                 "train.lr_warmup_steps", "train.num_workers", "data.synthetic_pairs"])
def test_zero_is_allowed_where_it_means_off_but_negative_is_not(key):
    from alignment.trainers.dpo import DPOConfig

    load_config(DPOConfig, f"{ROOT}/dpo.yaml", [f"{key}=0"])
    with pytest.raises(ValueError, match=rf"{key.split('.')[-1]} must be an integer >= 0; got -1"):
        load_config(DPOConfig, f"{ROOT}/dpo.yaml", [f"{key}=-1"])


def test_counts_must_be_integers_not_floats_or_bools():
    from alignment.commands.best_of_n import BestOfNJobConfig

    for bad in ("2.5", "true"):
        with pytest.raises(ValueError, match="num_inference_steps must be an integer"):
            load_config(BestOfNJobConfig, f"{ROOT}/best_of_n.yaml", [f"num_inference_steps={bad}"])


def test_pairs_need_two_images_per_prompt():
    from alignment.commands.pairs import PairsJobConfig

    with pytest.raises(ValueError, match="n must be an integer >= 2; got 1"):
        load_config(PairsJobConfig, f"{ROOT}/pairs.yaml", ["n=1"])


def test_programmatic_configs_are_checked_by_the_trainer_too():
    from alignment.configs import check_counts
    from alignment.trainers.dpo import DPOConfig, ValidationSection, check_config

    cfg = DPOConfig(validation=ValidationSection(num_inference_steps=0))
    cfg.data.synthetic_pairs = 4
    cfg.model.tiny = "sd"
    with pytest.raises(ValueError, match="validation.num_inference_steps must be an integer >= 1; got 0"):
        check_config(cfg)
    check_counts(dataclasses.replace(cfg, validation=ValidationSection()))


@pytest.mark.parametrize("command,flag", [("best-of-n", "--steps"), ("pairs", "--steps"), ("best-of-n", "--n"),
                                          ("pairs", "--batch-size")])
@pytest.mark.parametrize("value", ["-1", "0"])
def test_cli_refuses_non_positive_steps_in_one_line(tmp_path, capsys, command, flag, value):
    from alignment.cli import main

    cfg = f"{ROOT}/{'best_of_n' if command == 'best-of-n' else 'pairs'}.yaml"
    code = main([command, "--config", cfg, "--output-dir", str(tmp_path / "out"), flag, value, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "must be an integer >=" in err, err
    assert not (tmp_path / "out").exists()  # refused before anything was built or written


def test_library_best_of_n_and_mine_pairs_refuse_non_positive_steps(tmp_path):
    from alignment import best_of_n
    from alignment.pairs import mine_pairs
    from alignment.tiny import tiny_sd_pipeline
    from reward_plugins import create_reward

    pipe, reward = tiny_sd_pipeline(), create_reward("pickscore-tiny", device="cpu")
    with pytest.raises(ValueError, match="num_inference_steps must be an integer >= 1; got -1"):
        best_of_n(pipe, ["a cat"], reward, 2, num_inference_steps=-1)
    with pytest.raises(ValueError, match="num_inference_steps must be an integer >= 1; got 0"):
        mine_pairs(pipe, ["a cat"], reward, 2, tmp_path / "pairs", rule="composite", num_inference_steps=0)
    assert not (tmp_path / "pairs").exists()
