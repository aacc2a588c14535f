"""training: the optimizer and the one training loop every stage runs on."""
from __future__ import annotations

import copy

import pytest
import torch

from gpt_model import GPTModel
from training import configure_optimizer

SMALL = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=128, max_seq_len=48)


@pytest.fixture()
def model() -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(**SMALL).eval()


def test_optimizer_groups(model):
    opt = configure_optimizer(model, weight_decay=0.1, lr=3e-4, betas=(0.9, 0.95), device_type="cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert opt.defaults["lr"] == 3e-4 and opt.defaults["fused"]


def test_fused_optimizer_steps_like_the_reference_adamw(model):
    """The fused kernel configure_optimizer picks gives the same parameters as PyTorch's per-parameter AdamW."""
    reference = copy.deepcopy(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    for net in (model, reference):
        net(ids, labels=ids)["loss"].backward()
    fused = configure_optimizer(model, weight_decay=0.1, lr=1e-2, device_type="cpu")
    plain = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in
                               configure_optimizer(reference, 0.1, 1e-2).param_groups], lr=1e-2, betas=(0.9, 0.95),
                              foreach=False)
    for _ in range(3):
        fused.step()
        plain.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
