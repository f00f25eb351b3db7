"""One shared test over every registered reward (its `-tiny` twin): the reward contract of DESIGN.md."""

import pytest
import torch

import reward_plugins as rp
from reward_plugins.testing import random_images

TINY = [n for n in rp.list_rewards(include_tiny=True) if n.endswith("-tiny")]
PROMPTS = ["a photo of a cat", "a red car on a street", "two dogs playing in the snow"]


def prompts_for(reward, n: int, offset: int = 0) -> list[str]:
    """`n` prompts the reward understands: its `example_prompts` (a closed grammar such as the toy
    world's captions) when it declares them, else the generic PROMPTS."""
    pool = list(getattr(reward, "example_prompts", None) or PROMPTS)
    return [pool[(offset + i) % len(pool)] for i in range(n)]


def test_every_reward_has_a_tiny_twin():
    full = rp.list_rewards()
    assert full, "no rewards registered"
    assert sorted(f"{n}-tiny" for n in full) == sorted(TINY)


@pytest.fixture(scope="module")
def rewards():
    return {name: rp.create_reward(name) for name in TINY}


@pytest.mark.parametrize("name", TINY)
def test_scores_shape_dtype_finite_and_per_dim(rewards, name):
    reward = rewards[name]
    out = reward(random_images(3, 96, 128), prompts_for(reward, 3))
    assert out.scores.shape == (3,) and out.scores.dtype == torch.float32
    assert torch.isfinite(out.scores).all()
    assert tuple(out.per_dim) == tuple(reward.dimensions)
    for v in out.per_dim.values():
        assert v.shape == (3,) and v.dtype == torch.float32
    assert reward.default_dimension in reward.dimensions
    torch.testing.assert_close(out.scores, out.per_dim[reward.default_dimension])


@pytest.mark.parametrize("name", TINY)
def test_gradients_reach_images_not_weights(rewards, name):
    reward = rewards[name]
    images = random_images(2, 80, 72).requires_grad_()
    out = reward(images, prompts_for(reward, 2))
    assert out.scores.requires_grad == reward.is_differentiable
    if not reward.is_differentiable:
        return
    out.scores.sum().backward()
    assert torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in reward.parameters())
    assert all(p.grad is None for p in reward.parameters())
    assert not reward.training


@pytest.mark.parametrize("name", TINY)
def test_batch_equals_single_calls(rewards, name):
    reward = rewards[name]
    images = random_images(3, 64, 64, seed=1)
    prompts = prompts_for(reward, 3)
    batched = reward.score(images, prompts).scores
    singles = torch.cat([reward.score(images[i : i + 1], prompts[i : i + 1]).scores for i in range(3)])
    torch.testing.assert_close(batched, singles, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_bfloat16(name):
    reward = rp.create_reward(name, dtype=torch.bfloat16)
    assert reward.dtype == torch.bfloat16
    images = random_images(2, 64, 64).requires_grad_()
    out = reward(images, prompts_for(reward, 2))
    assert out.scores.dtype == torch.float32 and torch.isfinite(out.scores).all()
    if reward.is_differentiable:
        out.scores.sum().backward()
        assert torch.isfinite(images.grad).all()


@pytest.mark.parametrize("name", TINY)
def test_requires_prompts_matches_behaviour(rewards, name):
    reward = rewards[name]
    images = random_images(2, 64, 64, seed=2)
    if reward.requires_prompts:
        with pytest.raises(ValueError, match="needs one prompt per image"):
            reward(images, None)
        if getattr(reward, "example_prompts", None):
            # A closed-grammar reward (e.g. an exact 0/1 oracle) may give the same overall score to two
            # captions on random images; some dimension must still change.
            a = torch.stack(list(reward.score(images, prompts_for(reward, 1) * 2).per_dim.values()))
            b = torch.stack(list(reward.score(images, prompts_for(reward, 2, offset=2)).per_dim.values()))
        else:
            a = reward.score(images, ["a cat", "a cat"]).scores
            b = reward.score(images, ["a spaceship over a city at night", "a bowl of soup"]).scores
        assert not torch.allclose(a, b)
    else:
        a = reward.score(images, None).scores
        b = reward.score(images, ["anything", "else"]).scores
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", TINY)
def test_dimension_selection(name):
    reward = rp.create_reward(name)
    dim = reward.dimensions[-1]
    selected = rp.create_reward(f"{name}:{dim}")
    images = random_images(2, 64, 64, seed=3)
    out = selected.score(images, prompts_for(selected, 2))
    torch.testing.assert_close(out.scores, out.per_dim[dim])
