"""metrics: token log-probs, the LM-head-only-where-scored path, exact match and pairwise accuracy."""
from __future__ import annotations

import pytest
import torch

import gpt_model
import metrics
from scoring import exact_match_by_task


def test_token_logprobs_against_a_naive_loop():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    labels[0, 2] = -100
    logprobs, mask = metrics.token_logprobs(logits, labels)
    for b in range(2):
        for t in range(4):
            expected = 0.0 if labels[b, t + 1] == -100 else logits[b, t].log_softmax(-1)[labels[b, t + 1]].item()
            assert logprobs[b, t].item() == pytest.approx(expected, abs=1e-5)
    assert metrics.sequence_logprobs(logits, labels).tolist() == pytest.approx(logprobs.sum(1).tolist())
    loss = metrics.shifted_cross_entropy(logits, labels)
    assert loss.item() == pytest.approx(-(logprobs.sum() / mask.sum()).item(), rel=1e-5)


def test_scored_logprobs_equal_the_full_logits_ones_with_padding():
    torch.manual_seed(0)
    model = gpt_model.GPTModel(gpt_model.GPTConfig(vocab_size=11, max_seq_len=8, n_layers=1, d_model=16, n_heads=2,
                                                   d_ff=32))
    input_ids = torch.randint(0, 11, (3, 8))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # right padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :3] = -100  # a prompt
    labels[2, 3:] = -100  # a row with nothing scored
    full = metrics.sequence_logprobs(model(input_ids, attention_mask=attention_mask)["logits"], labels)
    scored = metrics.scored_logprobs(model, input_ids, attention_mask, labels)
    assert scored.tolist() == pytest.approx(full.tolist(), abs=1e-5) and scored[2] == 0
    mean = metrics.scored_logprobs(model, input_ids, attention_mask, labels, average=True)
    assert mean[0].item() == pytest.approx(full[0].item() / 5, abs=1e-5)


def test_scored_logprobs_go_through_forward_so_a_ddp_wrapped_policy_works(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = gpt_model.GPTModel(gpt_model.GPTConfig(vocab_size=11, max_seq_len=8, n_layers=1, d_model=16, n_heads=2,
                                                   d_ff=32))
    input_ids = torch.randint(0, 11, (2, 8))
    labels = input_ids.clone()
    labels[:, :4] = -100
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(model)  # what the trainer hands DPO's loss under torchrun
        total = metrics.scored_logprobs(wrapped, input_ids, None, labels)
        total.sum().backward()
    finally:
        dist.destroy_process_group()
    expected = metrics.sequence_logprobs(model(input_ids)["logits"], labels)
    assert total.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_exact_match_and_pairwise_accuracy_on_hand_made_records():
    records = [{"response": "42", "task": "arithmetic"}, {"response": "7", "task": "arithmetic"},
               {"response": "ROMEO", "task": "speaker"}]
    report = exact_match_by_task([" 42\n", "8", "ROMEO"], records)
    assert report == {"exact_match": pytest.approx(2 / 3), "exact_match/arithmetic": 0.5, "exact_match/speaker": 1.0}
    assert metrics.pairwise_accuracy([1.0, 0.5, 2.0], [0.0, 0.5, 3.0]) == pytest.approx(1 / 3)  # a tie is not a win
    with pytest.raises(ValueError):
        metrics.exact_match(["a"], [])
