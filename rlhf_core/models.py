"""Models and tokenizers: load any causal LM, or build the tiny demo model; reward/value models with a scalar head.

- `load_tokenizer(path)` / `train_tokenizer(texts, vocab_size)`: PAD is always a token distinct from EOS (N+ detail 1),
  and padding is on the left, as generation needs (N+ detail 2).
- `tiny_gpt2(cfg, tokenizer)`: the GPT-2-style model the embedded default pretrains from scratch.
- `load_causal_lm(path)` / `load_reward_model(path)`: `from_pretrained` (hub name or local dir) with dropout off (N+
  detail 4). Saved directories are plain `save_pretrained` output (safetensors), so `AutoModelForCausalLM` /
  `AutoModelForSequenceClassification.from_pretrained` load them with no project code.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

EOS, PAD = "<|endoftext|>", "<|pad|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE trained on `texts`; returns a transformers fast tokenizer with EOS and a distinct PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                  padding_side="left", model_max_length=1_000_000)
    return tok


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    with _loading(path, "tokenizer"):
        tok = AutoTokenizer.from_pretrained(path)
    return ensure_pad_token(tok)


def ensure_pad_token(tok):
    """Give the tokenizer a PAD distinct from EOS (many hub models reuse EOS as PAD, which masks real EOS tokens)."""
    if tok.eos_token is None:
        raise ValueError(f"tokenizer {tok.name_or_path!r} has no EOS token; responses could never end")
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": PAD})
    tok.padding_side = "left"
    return tok


def tiny_gpt2(pcfg, tok) -> nn.Module:
    """A GPT-2-style causal LM from a config (random init), sized by the `pretrain` section."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tok), n_positions=pcfg.n_positions, n_embd=pcfg.n_embd, n_layer=pcfg.n_layer,
                        n_head=pcfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        activation_function="gelu_pytorch_tanh",
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return GPT2LMHeadModel(config)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout off everywhere: it makes log-probs of the same tokens disagree between forwards (N+ detail 4)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout", "hidden_dropout",
                "attention_dropout", "dropout", "classifier_dropout", "hidden_dropout_prob"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)
    return model


def fuse_activations(model: nn.Module) -> nn.Module:
    """Swap GPT-2's "gelu_new" (tanh GELU spelled out in five elementwise ops) for torch's fused tanh GELU: the same
    function to float rounding (~1e-7), a fifth of the memory traffic; measured ~8% of a PPO update on CPU."""
    from transformers.activations import NewGELUActivation

    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, NewGELUActivation):
                setattr(module, name, nn.GELU(approximate="tanh"))
    return model


def fit_to_tokenizer(model: nn.Module, tok) -> nn.Module:
    """Resize embeddings when the tokenizer gained a PAD, and record the special ids in the model config."""
    if model.get_input_embeddings().num_embeddings < len(tok):
        model.resize_token_embeddings(len(tok))
    model.config.pad_token_id, model.config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.pad_token_id, gen.eos_token_id = tok.pad_token_id, tok.eos_token_id
    return model


class ModelLoadError(RuntimeError):
    """A model or tokenizer that cannot be loaded: the message names the path and what to do."""


@contextlib.contextmanager
def _loading(path: str, what: str):
    """Turn whatever a failed load raises (a truncated safetensors file, a missing config, ...) into ModelLoadError
    naming the path: without it the error names neither the file nor the way out."""
    try:
        yield
    except Exception as e:
        hint = ("it is a stage output: rerun the stage that wrote it (e.g. `dvc repro -f <stage>` or "
                "`python -m rlhf_core <stage>`)" if Path(path).exists() else
                "check the name (a hub model needs the hub or a local copy; HF_HUB_OFFLINE is set by the flows)")
        raise ModelLoadError(f"cannot load the {what} at {path}: {type(e).__name__}: {str(e)[:300]}; {hint}") from e


def load_causal_lm(path: str, tok=None, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with _loading(path, "causal LM"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if tok is not None:
        fit_to_tokenizer(model, tok)
    return fuse_activations(disable_dropout(model))


def reward_model_from_lm(path: str, tok, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A sequence classifier with one output on the trunk of a causal LM; head ~ N(0, 1/sqrt(d+1)) (N+ detail 6)."""
    from transformers import AutoModelForSequenceClassification

    with _loading(path, "model (reward-model trunk)"):
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    fit_to_tokenizer(model, tok)
    head = score_head(model)
    nn.init.normal_(head.weight, std=1.0 / math.sqrt(head.in_features + 1))
    if head.bias is not None:
        nn.init.zeros_(head.bias)
    return fuse_activations(disable_dropout(model))


def load_reward_model(path: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    with _loading(path, "reward model"):
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)
    return fuse_activations(disable_dropout(model))


def score_head(model: nn.Module) -> nn.Linear:
    """The linear scalar head of a reward or value model (`score`, `classifier` or `v_head`)."""
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            return head
    raise ValueError(f"{type(model).__name__}: no linear scalar head found (looked for score/classifier/v_head)")


def _final_norm_bias(model: nn.Module) -> nn.Parameter | None:
    trunk = model.base_model
    for name in ("ln_f", "final_layer_norm", "norm"):
        norm = getattr(trunk, name, None)
        if norm is not None and getattr(norm, "bias", None) is not None:
            return norm.bias
    return None


@torch.no_grad()
def shift_reward(model: nn.Module, delta: float) -> str:
    """Add `delta` to every reward the model outputs, keeping it loadable by plain `from_pretrained`.

    Most `*ForSequenceClassification` heads have no bias, so the shift goes where a plain load still sees it: into the
    head's bias if there is one, else into the final LayerNorm's bias along the head's direction (w.h' = w.h + delta
    with h' = h + delta.w/|w|^2; exact, and only the head reads that hidden state). Returns where it went.
    """
    head = score_head(model)
    if head.bias is not None:
        head.bias += delta
        return "head.bias"
    norm_bias = _final_norm_bias(model)
    if norm_bias is None:
        raise ValueError(f"{type(model).__name__}: no bias to hold a reward offset (head and final norm have none)")
    w = head.weight[0].to(norm_bias.dtype)
    norm_bias += delta * w / w.pow(2).sum()
    return "final_norm.bias"


def save_pretrained(model: nn.Module, tok, out: Path) -> Path:
    """`save_pretrained` for model and tokenizer into `out` (safetensors); callers wrap it in io.atomic_path."""
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def base_model_path(cfg) -> str:
    """What the stages after pretraining load as the base model: base.model, or the pretrain stage's output."""
    return cfg.base.model or str(cfg.stage_dir("pretrain") / "model")
