"""The speed-ups compute what the slow way computes: fused GELU, LM head only on response positions, old log-probs
from the sampler's own logits, fixed-length sampling without a stop token, constant LR, length-sorted forwards
(reward model, SFT) and PPO minibatches trimmed of all-padding columns."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

from rlhf_core.losses import policy_loss, token_logprobs, value_loss
from rlhf_core.models import fuse_activations
from rlhf_core.batching import by_length, collate
from rlhf_core.forwards import lm_forward, position_ids, sample_tokens, score_rows
from rlhf_core.ppo import PolicyAndValue, Rollout
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
    torch.manual_seed(3)
    with torch.no_grad():
        c = sample_tokens(model, queries, qmask, eos_id=EOS, pad_id=PAD, temperature=p.temperature,
                          max_new_tokens=p.response_length, stop_at_eos=stop_at_eos, keep_logits=True)
        responses, rmask, has_eos, logits = c.responses, c.response_mask, c.has_eos, c.logits
        ids, mask = c.input_ids, c.attention_mask
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


def test_by_length_sorts_and_chunks_every_index_once():
    lengths = [5, 2, 9, 2, 7, 1, 8]
    chunks = by_length(lengths, 3)
    assert [len(c) for c in chunks] == [3, 3, 1]
    assert sorted(i for c in chunks for i in c) == list(range(7))
    flat = [lengths[i] for c in chunks for i in c]
    assert flat == sorted(lengths)
    assert by_length(lengths, 0) == [sorted(range(7), key=lengths.__getitem__)]
    assert by_length([], 4) == []


def tiny_rm() -> GPT2ForSequenceClassification:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, num_labels=1, eos_token_id=EOS, pad_token_id=PAD)
    return GPT2ForSequenceClassification(config)


def test_length_sorted_reward_forwards_give_the_one_forward_rewards_and_gradient():
    g = torch.Generator().manual_seed(2)
    rows = [(torch.randint(2, 50, (n,), generator=g).tolist(), [0] * n) for n in (3, 11, 6, 14, 4, 9, 2)]
    model = tiny_rm()
    batch = collate(rows, PAD, "cpu")                   # one right-padded forward, read as HF's classifier reads
    one = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    (one * torch.arange(7.0)).sum().backward()
    grad_one = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    chunked = score_rows(model, rows, PAD, "cpu", rows_per_forward=2)
    (chunked * torch.arange(7.0)).sum().backward()
    torch.testing.assert_close(chunked, one, rtol=0, atol=1e-5)              # same rewards, in the rows' order
    for a, b in zip(grad_one, (p.grad for p in model.parameters())):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_trimmed_minibatch_gives_the_same_ppo_losses_and_gradients():
    """A minibatch whose prompts are shorter and responses end sooner than the rollout batch's longest."""
    torch.manual_seed(4)
    b, q, r = 3, 8, 10
    queries, qmask = left_padded(batch=b, width=q)
    qmask[:, :2], queries[:, :2] = 0, PAD                    # two all-padding prompt columns
    rmask = torch.zeros(b, r, dtype=torch.long)
    for i, n in enumerate((4, 6, 3)):                        # the last 4 response columns are padding everywhere
        rmask[i, :n] = 1
    responses = torch.randint(2, 50, (b, r)).masked_fill(rmask == 0, PAD)
    rand = lambda: torch.randn(b, r) * rmask  # noqa: E731
    batch = Rollout(queries, qmask, responses, rmask, rmask[:, -1] == 0, None, logprobs=rand() - 3,
                    ref_logprobs=rand() - 3, values=rand(), scores=torch.randn(b), rewards=rand(), advantages=rand(),
                    returns=rand())
    trimmed = batch.trimmed()
    assert trimmed.queries.shape == (b, q - 2) and trimmed.responses.shape == (b, 6)
    pv = PolicyAndValue(tiny_lm().train(), value_model=tiny_rm())

    def losses_and_grads(x: Rollout):
        pv.zero_grad()
        logits, values = pv(x.input_ids, x.attention_mask, x.queries.shape[1], 0.7)
        pg, _ = policy_loss(token_logprobs(logits, x.responses), x.logprobs, x.advantages, x.response_mask, 0.2)
        vf, _ = value_loss(values, x.values, x.returns, x.response_mask, 0.2)
        (pg + 0.1 * vf).backward()
        return torch.stack([pg, vf]).detach(), [p.grad.clone() for p in pv.parameters() if p.grad is not None]

    full_losses, full_grads = losses_and_grads(batch)
    trim_losses, trim_grads = losses_and_grads(trimmed)
    torch.testing.assert_close(trim_losses, full_losses, rtol=1e-5, atol=1e-6)
    assert len(trim_grads) == len(full_grads)
    for a, c in zip(full_grads, trim_grads):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-6)
