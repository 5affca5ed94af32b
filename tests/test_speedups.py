"""The speed-ups of the PPO loop compute what the slow way computes: fused GELU, LM head only on response positions,
old log-probs from the sampler's own logits, fixed-length sampling without a stop token, constant LR."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf_core.losses import token_logprobs
from rlhf_core.models import fuse_activations
from rlhf_core.ppo import lm_forward, sample_responses
from rlhf_core.sampling import position_ids
from rlhf_core.training import make_optimizer, make_scheduler

EOS, PAD = 0, 1


def tiny_lm(activation: str = "gelu_new") -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, activation_function=activation, eos_token_id=EOS,
                        pad_token_id=PAD, bos_token_id=EOS)
    return GPT2LMHeadModel(config).eval()


def left_padded(batch: int = 4, width: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 50, (batch, width), generator=g)
    mask = torch.ones_like(ids)
    for i in range(batch):
        mask[i, :i] = 0                    # row i has i pads on the left
    return ids.masked_fill(mask == 0, PAD), mask


def test_fused_gelu_matches_gpt2s_gelu_new():
    from transformers.activations import NewGELUActivation

    model = tiny_lm()
    ids, mask = left_padded()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        fuse_activations(model)
        after = model(input_ids=ids, attention_mask=mask).logits
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    assert any(isinstance(m, torch.nn.GELU) for m in model.modules())
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_lm_head_only_on_response_positions_gives_the_same_logits():
    model = tiny_lm()
    ids, mask = left_padded(width=12)
    context = 5
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
        kept = lm_forward(model, ids, mask, context).logits
    assert kept.shape == (4, 12 - context + 1, 50)
    torch.testing.assert_close(kept, full[:, context - 1:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("stop_at_eos", [True, False])
def test_sampler_logits_give_the_log_probs_a_fresh_forward_gives(stop_at_eos):
    model = tiny_lm()
    queries, qmask = left_padded()
    p = SimpleNamespace(temperature=0.7, response_length=9, stop_at_eos=stop_at_eos)
    tok = SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(3)
    with torch.no_grad():
        responses, rmask, has_eos, logits = sample_responses(model, tok, queries, qmask, p)
        ids, mask = torch.cat([queries, responses], 1), torch.cat([qmask, rmask], 1)
        fresh = lm_forward(model, ids, mask, queries.shape[1]).logits[:, :-1]
    assert logits.shape == (*responses.shape, 50)
    if not stop_at_eos:
        assert responses.shape == (4, 9) and rmask.all() and has_eos.all()   # exactly response_length, nothing cut
    kept = rmask.bool()
    sampled = token_logprobs(logits / p.temperature, responses)[kept]
    recomputed = token_logprobs(fresh, responses, p.temperature)[kept]
    torch.testing.assert_close(sampled, recomputed, rtol=0, atol=1e-4)


def test_constant_schedule_keeps_the_peak_lr_and_linear_anneals_to_zero():
    w = torch.nn.Parameter(torch.zeros(2, 2))
    for shape, last in (("constant", 0.1), ("linear", 0.0)):
        opt = make_optimizer(torch.nn.ParameterList([w]), 0.1, 0.0)
        sched = make_scheduler(opt, total_steps=10, warmup_steps=0, shape=shape)
        for _ in range(10):
            opt.step(), sched.step()
        assert sched.get_last_lr()[0] == pytest.approx(last)
