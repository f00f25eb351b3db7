"""A tiny random vision-language model of a real transformers architecture, built offline.

LLaVA (`LlavaForConditionalGeneration`: CLIP vision tower, 2-layer projector, Llama decoder) at toy size,
with a byte-level BPE tokenizer trained here on the templates' own text (the `tokenizers` library, no
download) and a Mistral-style chat template. `AutoModelForImageTextToText` and `AutoProcessor` load what
`save_tiny_vlm` writes, and `transformers serve` serves it. Random weights: its answers are noise, which is
what the parser's failure path and the constrained decoder are tested on.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

IMAGE_TOKEN = "[IMG]"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", IMAGE_TOKEN]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{{ eos_token }}"
    "{% else %}[INST]{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}[IMG]{% endif %}{% endfor %}{% endif %}[/INST]"
    "{% endif %}{% endfor %}"
)


def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer (any text encodes) with merges learned from the builtin templates."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .templates import _BUILTIN

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = list(_BUILTIN.values()) + ['{"image_1": {"alignment": 85}, "image_2": {"aesthetic": 7}}'] * 4
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": IMAGE_TOKEN})


def tiny_vlm(seed: int = 0, image_size: int = 32, patch_size: int = 8, init_std: float = 0.5):
    """(model, processor): a random tiny LLaVA and its processor, in float32 on the CPU.

    Weights are drawn with a large std (`init_std`): at the usual 0.02 a random decoder's next token barely
    depends on its input, and every image would get the same score.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = tiny_tokenizer()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                               image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>", IMAGE_TOKEN)}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=image_size, patch_size=patch_size, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"], eos_token_id=ids["</s>"]),
        image_token_id=ids[IMAGE_TOKEN], vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
        for mod in model.modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(mod.weight, std=init_std)
    model.generation_config.pad_token_id = ids["<pad>"]
    model.generation_config.eos_token_id = ids["</s>"]
    return model.eval(), processor


def save_tiny_vlm(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny VLM and its processor with `save_pretrained`; returns the directory."""
    model, processor = tiny_vlm(seed)
    out = Path(path)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
