"""`sweeper demo`: a real sweep on the CPU in minutes, with nothing downloaded.

A tiny Llama built from a config (random init), a byte-level BPE tokenizer trained here, and a
generated dataset of templated sentences that a LoRA adapter can learn: enough structure that
too small and too large learning rates visibly lose.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from sweeper.errors import SweeperError

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
THINGS = ["apples", "books", "coins", "drums", "eggs", "flags", "gems", "hats", "keys", "lamps"]
PLACES = ["kitchen", "garden", "library", "market", "harbor", "studio", "tower", "cellar"]

SPEC = """\
# The demo sweep: written by `sweeper demo`, editable like any sweep file.
study = "demo"
n_trials = {n_trials}
sampler = "tpe"
pruner = "median"

[model]
id = "{model}"
max_seq_len = 128

[data]
source = "{data}"
text_field = "text"
eval_examples = 64

[budget]
train_tokens = 60_000
evals = 4
checkpoint_every = 1000

[train]
lora_r = 8
lora_alpha = 16
lora_dropout = 0.0
warmup_ratio = 0.05

[space.learning_rate]
low = 1e-5
high = 0.3
log = true

[space.batch_size]
choices = [8, 16]
"""

# Enqueued first, so the table shows both ends of the learning-rate range losing.
FIRST_POINTS = [
    {"learning_rate": 1e-5, "batch_size": 8},
    {"learning_rate": 3e-3, "batch_size": 8},
    {"learning_rate": 0.3, "batch_size": 8},
]


def make_text(rng: random.Random) -> str:
    """One example: a counting story whose numbers add up."""
    a, b = rng.sample(NAMES, 2)
    thing, place = rng.choice(THINGS), rng.choice(PLACES)
    x, y = rng.randint(1, 9), rng.randint(1, 9)
    return (f"in the {place}, {a} has {x} {thing} and {b} has {y} {thing}. "
            f"together {a} and {b} have {x + y} {thing}.")


def write_dataset(path: Path, n: int = 1200, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"text": make_text(rng)}) + "\n" for _ in range(n)))
    return path


def build_tiny_model(folder: Path, texts: list[str], seed: int = 0) -> Path:
    """A 2-layer Llama (random init) and a BPE tokenizer trained on `texts`, saved like a hub model."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # The frozen head bounds the logits: at the usual std 0.02 no adapter gets them past about +-1.3,
    # and the loss cannot fall far below uniform. A wider random head leaves LoRA room to learn.
    torch.nn.init.normal_(model.lm_head.weight, std=0.15)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prepare_demo(folder: Path, n_trials: int = 12) -> Path:
    """Model, data and sweep file under `folder`; returns the sweep file."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        data = write_dataset(folder / "data.jsonl")
        texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
        model = build_tiny_model(folder / "tiny-llama", texts)
        sweep = folder / "sweep.toml"
        sweep.write_text(SPEC.format(n_trials=n_trials, model=model.resolve(), data=data.resolve()))
    except OSError as e:  # an unwritable folder, a full disk
        raise SweeperError(f"cannot write the demo into {folder}: {e.strerror or e}") from None
    return sweep
