"""`reward-align train-rl` on the tiny configs: runs, resumes, and refuses bad input in one line."""

import json

import pytest

from alignment.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["train.max_steps=1", "train.report_to=none", "train.validate_every=1", "sampling.num_steps=2",
         "method.group_size=2", "method.inner_epochs=1", "method.contact_sheet_every=1"]


@pytest.mark.parametrize("method,config", [("ddpo", "configs/tiny/rl_ddpo.yaml"), ("grpo", "configs/tiny/rl_grpo.yaml")])
def test_train_rl_runs_a_tiny_config(method, config, tmp_path, capsys):
    out = tmp_path / method
    assert main(["train-rl", "--method", method, "--config", config, "--output-dir", str(out), *SMALL]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == method and printed["epochs"] == 1 and printed["nan_rewards"] == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert list((out / "samples").glob("epoch-00000-group-*.png"))
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert "rewards/eval/mean" in row and "val/rewards/eval/mean" in row  # the held-out reward is logged
    # --resume at the end: nothing left to do, same LoRA
    assert main(["train-rl", "--config", config, "--output-dir", str(out), "--resume", *SMALL]) == 0


def test_train_rl_bad_input_is_one_line(tmp_path, capsys):
    code = main(["train-rl", "--config", "configs/tiny/rl_ddpo.yaml", "--output-dir", str(tmp_path),
                 "method.group_size=1", "train.report_to=none"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "group_size is 1" in err
    assert main(["train-rl", "--config", "configs/tiny/rl_ddpo.yaml", "method.groupsize=2"]) == 1
    assert "Did you mean 'group_size'" in capsys.readouterr().err
