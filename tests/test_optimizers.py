"""optimizers: AdamW's groups and fused kernel; Muon for the blocks' matrices with AdamW for the rest, as one."""
from __future__ import annotations

import copy

import pytest
import torch

from gpt_model import GPTModel
from optimizers import configure_optimizer

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


# ----------------------------------------------------------------------------- --optimizer muon

def test_muon_gets_exactly_the_blocks_weight_matrices(model):
    import lora
    import model_heads
    from optimizers import MuonWithAdamW

    opt = configure_optimizer(model, weight_decay=0.1, lr=1e-3, kind="muon")
    assert isinstance(opt, MuonWithAdamW) and isinstance(opt.muon, torch.optim.Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for g in opt.muon.param_groups for p in g["params"]]
    adamw = [names[id(p)] for g in opt.adamw.param_groups for p in g["params"]]
    expected = [f"transformer.h.{i}.{m}.weight" for i in range(2)
                for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert sorted(muon) == sorted(expected)
    assert sorted(muon + adamw) == sorted(names.values())  # every parameter in exactly one optimizer
    assert "transformer.wte.weight" in adamw  # the embedding, tied to the LM head
    assert model.lm_head.weight is model.transformer.wte.weight
    assert len(opt.param_groups) == len(opt.muon.param_groups) + 2  # the schedule reaches both

    for head_model in (model_heads.GPTRewardModel.from_language_model(model),
                       model_heads.GPTClassifier.from_language_model(model, ["a", "b"])):
        split = configure_optimizer(head_model, 0.1, 1e-3, kind="muon")
        in_adamw = {id(p) for g in split.adamw.param_groups for p in g["params"]}
        assert id(head_model.head.weight) in in_adamw  # the head stays with AdamW, the backbone's blocks go to Muon
        assert sum(p.numel() for g in split.muon.param_groups for p in g["params"]) == \
            sum(p.numel() for g in opt.muon.param_groups for p in g["params"])

    adapted = lora.apply_lora(copy.deepcopy(model), ["c_attn"], r=2, alpha=4.0)
    lora.mark_only_lora_trainable(adapted)
    with pytest.raises(ValueError, match="LoRA trains only its adapters"):
        configure_optimizer(adapted, 0.1, 1e-3, kind="muon")


def test_muon_steps_its_matrices_as_torch_muon_and_the_rest_as_adamw(model):
    """The composite steps each parameter exactly as the optimizer it belongs to would alone."""
    reference = copy.deepcopy(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    opt = configure_optimizer(model, weight_decay=0.1, lr=1e-2, kind="muon")
    hidden = {n for n, p in model.named_parameters() if p.dim() == 2 and ".h." in f".{n}"}
    ref_params = dict(reference.named_parameters())
    muon = torch.optim.Muon([ref_params[n] for n in sorted(hidden, key=list(ref_params).index)], lr=1e-2,
                            weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    rest = [p for n, p in reference.named_parameters() if n not in hidden]
    adamw = torch.optim.AdamW([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": 0.1},
                               {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}], lr=1e-2,
                              betas=(0.9, 0.95), fused=True)  # the kernel configure_optimizer picks
    for _ in range(3):
        for net in (model, reference):
            net(ids, labels=ids)["loss"].backward()
        opt.step()
        opt.zero_grad()
        muon.step(), adamw.step(), muon.zero_grad(), adamw.zero_grad()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_muon_state_round_trips_and_lowers_the_loss(model):
    ids = torch.randint(0, model.config.vocab_size, (4, 32))
    opt = configure_optimizer(model.train(), 0.0, 1e-2, kind="muon")
    losses = []
    for _ in range(40):
        loss = model(ids, labels=ids)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    state = opt.state_dict()
    again = configure_optimizer(model, 0.0, 1e-2, kind="muon")
    again.load_state_dict(state)
    assert state["kind"] == "muon"
    for a, b in zip(again.muon.state.values(), opt.muon.state.values()):
        torch.testing.assert_close(a["momentum_buffer"], b["momentum_buffer"])


def test_a_loss_scaler_unscales_and_skips_both_optimizers(model):
    """fp16's GradScaler needs only ``param_groups`` and ``step``: it unscales Muon's and AdamW's gradients alike,
    and an overflowing step moves neither."""
    opt = configure_optimizer(model.train(), 0.1, 3e-3, kind="muon")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    ids = torch.randint(0, model.config.vocab_size, (4, 32))
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids)["loss"]
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and scaler.get_scale() == 2.0 ** 10
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.zeros(1, 4, dtype=torch.long))["logits"].sum().mul(float("inf")).backward()
    scaler.unscale_(opt)
    scaler.step(opt)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_muon_on_the_modern_shape_gets_the_blocks_matrices_and_adamw_the_gains_and_both_tables():
    torch.manual_seed(0)
    model = GPTModel(**SMALL, pos_embedding="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu", n_kv_heads=2,
                     bias=False, tie_embeddings=False)
    opt = configure_optimizer(model, weight_decay=0.1, lr=1e-2, kind="muon")
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    assert muon == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                    for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert {"transformer.wte.weight", "lm_head.weight", "transformer.h.0.attn.q_norm.weight",
            "transformer.h.1.attn.k_norm.weight", "transformer.ln_f.weight"} <= adamw
    assert muon | adamw == set(names.values()) and not muon & adamw
    ids = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = model(ids, labels=ids)["loss"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
