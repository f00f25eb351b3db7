"""The toy world: grammar, split, renderer ground truth against the exact oracle, soft oracle gradients."""

import pytest
import torch

import reward_plugins as rp
from alignment.toyworld import models, oracle, render, world


def test_caption_grammar_round_trips_and_rejects_other_text():
    for a in world.all_combinations():
        assert world.parse_caption(world.caption(a)) == a
    assert world.parse_caption("  A Red circle   on the left. ") == world.Attributes("red", "circle", "left")
    with pytest.raises(ValueError, match="not a toy-world caption.*a red circle on the left"):
        world.parse_caption("a photo of a cat")
    with pytest.raises(ValueError, match="not a toy-world caption"):
        world.parse_caption("a pink circle on the left")
    with pytest.raises(TypeError, match="must be a str"):
        world.parse_caption(3)
    with pytest.raises(ValueError, match="unknown color 'pink'"):
        world.Attributes("pink", "circle", "left")


def test_heldout_split_is_a_split_of_combinations_not_of_values():
    train, held = world.train_combinations(), world.heldout_combinations()
    assert len(train) + len(held) == 90 and not set(train) & set(held)
    assert len(held) == 18 and len(world.heldout_prompts()) == 18 and len(world.train_prompts()) == 72
    for dim, values in (("color", world.COLORS), ("shape", world.SHAPES), ("position", world.POSITIONS)):
        assert {a.get(dim) for a in train} == set(values)  # every single value is seen in training
    pairs = lambda combos, d1, d2: {(a.get(d1), a.get(d2)) for a in combos}  # noqa: E731
    for d1, d2 in (("color", "shape"), ("color", "position"), ("shape", "position")):
        assert pairs(held, d1, d2) <= pairs(train, d1, d2)  # and every pair of values too
    assert not set(world.HELDOUT_SEEDS) & set(range(100_000))


def test_tokenizer_covers_the_grammar():
    tok = models.build_tokenizer()
    single = [w for w in world.vocabulary() if len(tok(w).input_ids) == 3]  # BOS, the word, EOT
    assert sorted(set(world.vocabulary()) - set(single)) == ["cyan", "triangle"]  # see grammar_merges
    captions = world.train_prompts() + world.heldout_prompts()
    ids = [tuple(tok(c).input_ids) for c in captions]
    assert len(set(ids)) == 90 and max(map(len, ids)) <= 15
    assert [tok.decode(i, skip_special_tokens=True).strip() for i in ids] == captions
    assert tok.eos_token_id == len(tok) - 1  # EOT is the largest id, as CLIP's pooling expects


@pytest.mark.parametrize("seed", [0, 1])
def test_generator_captions_agree_with_exact_oracle(seed):
    combos = world.all_combinations() * 2
    images, scenes = render.render(combos, torch.Generator().manual_seed(seed))
    assert images.shape == (180, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert [s.attrs for s in scenes] == combos
    assert oracle.analyze(images) == combos
    reward = rp.create_reward("toyworld-exact")
    out = reward.score(images, [world.caption(a) for a in combos])
    for dim in ("color", "shape", "position", "overall"):
        assert out.per_dim[dim].mean().item() == 1.0, dim


def test_exact_oracle_scores_each_wrong_attribute_zero():
    a = world.Attributes("blue", "square", "top")
    images, _ = render.render([a] * 3, torch.Generator().manual_seed(3))
    prompts = [world.caption(a.replace(color="red")), world.caption(a.replace(shape="circle")),
               world.caption(a.replace(position="bottom"))]
    out = rp.create_reward("toyworld-exact").score(images, prompts).per_dim
    assert out["color"].tolist() == [0, 1, 1]
    assert out["shape"].tolist() == [1, 0, 1]
    assert out["position"].tolist() == [1, 1, 0]
    assert out["overall"].tolist() == [0, 0, 0]


def test_exact_oracle_blank_image_scores_zero_and_any_size_works():
    blank = torch.tensor(world.BACKGROUND).view(1, 3, 1, 1).expand(1, 3, 32, 32).clone()
    assert oracle.analyze(blank) == [None]
    img, _ = render.render([world.Attributes("green", "triangle", "right")], torch.Generator().manual_seed(0),
                           res=96)
    assert oracle.analyze(img) == [world.Attributes("green", "triangle", "right")]


def test_soft_oracle_prefers_the_true_caption_on_every_dimension():
    combos = world.all_combinations()
    images, _ = render.render(combos, torch.Generator().manual_seed(5))
    soft = rp.create_reward("toyworld")
    right = soft.score(images, [world.caption(a) for a in combos]).per_dim
    for dim, values in (("color", world.COLORS), ("shape", world.SHAPES), ("position", world.POSITIONS)):
        wrong_attrs = [a.replace(**{dim: next(v for v in values if v != a.get(dim))}) for a in combos]
        wrong = soft.score(images, [world.caption(a) for a in wrong_attrs]).per_dim
        assert (right[dim] > wrong[dim]).float().mean() == 1.0, dim
        assert (right["overall"] > wrong["overall"]).all()


def test_soft_oracle_gradient_moves_an_image_towards_the_named_colour():
    a = world.Attributes("blue", "circle", "center")
    images, _ = render.render([a], torch.Generator().manual_seed(0))
    prompt = [world.caption(a.replace(color="red"))]
    reward = rp.create_reward("toyworld:color")
    x = images.clone()
    red = torch.tensor(world.COLORS["red"]).view(1, 3, 1, 1)
    mask = (images - torch.tensor(world.BACKGROUND).view(1, 3, 1, 1)).abs().sum(1, keepdim=True) > 0.3
    dist = lambda img: ((img - red).norm(dim=1, keepdim=True) * mask).sum() / mask.sum()  # noqa: E731
    start_score, start_dist = reward.score(x, prompt).scores.item(), dist(x).item()
    for _ in range(60):
        x.requires_grad_(True)
        (g,) = torch.autograd.grad(reward(x, prompt).scores.sum(), x)
        x = (x.detach() + 0.05 * g.sign()).clamp(0, 1)
    assert reward.score(x, prompt).scores.item() > start_score + 0.3
    assert dist(x).item() < start_dist / 3
    assert oracle.analyze(x)[0].color == "red"


def test_oracles_refuse_captions_outside_the_grammar():
    images, _ = render.render([world.Attributes("red", "circle", "left")])
    for name in ("toyworld", "toyworld-exact"):
        with pytest.raises(ValueError, match="not a toy-world caption"):
            rp.create_reward(name)(images, ["a photo of a cat"])
