"""Sets labelled by an oracle whose answers are exact: the harness's accuracy of another reward against it
equals an independent count."""

import pytest
import torch
from evaluation_helpers import ChannelReward

from alignment.evaluation import oracle_agreement, oracle_preference_set
from reward_plugins.base import RewardModel


class ThresholdOracle(RewardModel):
    """Discrete like the toy world's exact oracle: 'bright' = 1 if mean red > 0.5 else 0 (many ties),
    'overall' = the number of channels whose mean exceeds 0.5."""

    dimensions = ("bright", "overall")
    default_dimension = "overall"
    requires_prompts = False

    def __init__(self):
        super().__init__()
        self.name = "threshold-oracle"
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def compute(self, images, prompts):
        m = images.mean(dim=(2, 3))
        return {"bright": (m[:, 0] > 0.5).float(), "overall": (m > 0.5).float().sum(dim=1)}


def _images(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(n, 3, 1, 1, generator=g)
    return colours.expand(n, 3, 8, 8).clone(), [f"prompt {i // 4}" for i in range(n)]  # 6 prompts x 4 images


def test_oracle_labels_every_pair_within_a_prompt():
    images, prompts = _images()
    pset = oracle_preference_set(images, prompts, ThresholdOracle())
    assert len(pset.groups) == 6 and len(pset.pairs) == 6 * 6      # C(4, 2) per prompt
    assert set(pset.labels) == {"bright", "overall"}
    assert (pset.labels["bright"] == 0.5).any() and (pset.labels["bright"] != 0.5).any()  # ties and decisions


def test_learned_reward_accuracy_against_the_oracle_matches_an_independent_count():
    images, prompts = _images()
    oracle = ThresholdOracle()
    learned = ChannelReward().select("green")   # an imperfect proxy: green says little about red
    res = oracle_agreement(learned, oracle, images, prompts, rules=("exclude", "half"), bootstrap=100)
    # Independent count over the same pairs (uint8-rounded pixels, as the harness scores the PNGs).
    q = (images * 255).round() / 255
    red, green = q[:, 0].mean(dim=(1, 2)), q[:, 1].mean(dim=(1, 2))
    right = total = 0
    for g in range(6):
        for i in range(4 * g, 4 * g + 4):
            for j in range(i + 1, 4 * g + 4):
                o = int(red[i] > 0.5) - int(red[j] > 0.5)
                if o:
                    total += 1
                    right += (green[i] - green[j]) * o > 0
    acc = res.get("channels", "exclude", "bright")
    assert acc.pairs == total and acc.value == pytest.approx(right / total)
    assert acc.low <= acc.value <= acc.high
    # The reward that reads the oracle's own quantity agrees on every decided pair; its mirror on none.
    assert oracle_agreement(ChannelReward(), oracle, images, prompts, bootstrap=0).get("channels", "exclude", "bright").value == 1.0

    class Mirror(ChannelReward):
        def compute(self, images, prompts):
            return {k: -v for k, v in super().compute(images, prompts).items()}

    assert oracle_agreement(Mirror(), oracle, images, prompts, bootstrap=0).get("channels", "exclude", "bright").value == 0.0


def test_oracle_input_errors():
    images, prompts = _images()
    with pytest.raises(ValueError, match="one prompt per image"):
        oracle_preference_set(images, prompts[:-1], ThresholdOracle())
    with pytest.raises(ValueError, match="no dimension"):
        oracle_preference_set(images, prompts, ThresholdOracle(), dimensions=["colour"])
