"""Tests of the influence engine: ghost scores vs brute force, sign, preconditioners, alignment gradient, in-run mode.

Everything runs on CPU with tiny models (hidden 32, 2 layers). Ghost scores must equal per-example
`torch.autograd.grad` dot products to 1e-5 relative error in fp32.
"""

from __future__ import annotations

import gc
import os
import warnings

import pytest
import torch
from torch import nn

from trl_u2a import influence as inf
from trl_u2a.core.modeling import PADDING, fill_reference_logps, sequence_logps, slice_batch
from trl_u2a.core.objectives import CallableObjective, DPOObjective, NLLObjective, reference_logps
from trl_u2a.influence.preconditioners import _precondition
from trl_u2a.influence.scores import _progress_disabled

LOSS_TYPES = ["ga", "npo", "simnpo"]
TOL = 1e-5

# Negatives of mixed lengths: right padding and prompt masks both matter.
NEGATIVES = [
    ("How do I bake bread?", " You are stupid and I will not help you."),
    ("Tell me a joke.", " Here is how to pick a lock."),
    ("What?", " No."),
    ("What is the capital of France?", " The capital of France is Paris, I think, or maybe not."),
    ("Hi", " I am sorry, I cannot help with that."),
]
PAIRS = [
    (
        "How do I bake bread?",
        " Mix flour, water, salt and yeast, then bake it.",
        " You are stupid and I will not help you.",
    ),
    ("Tell me a joke.", " Why did the chicken cross the road?", " Here is how to pick a lock and break into a house."),
    ("What is the capital of France?", " The capital of France is Paris.", " I will not help you."),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def _loss_fn(loss_type: str):
    # simnpo's defaults (β = 4.5, γ = 0) saturate the sigmoid on a random model; γ brings it to its linear range.
    if loss_type == "simnpo":
        return inf.make_unlearning_loss_fn("simnpo", beta=1.0, gamma=5.0)
    return inf.make_unlearning_loss_fn(loss_type)


# ---------------------------------------------------------------------------------------------------------------
# data and models
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny matmuls: OpenMP fork/join costs more than it saves, and on a shared machine the spin-waits of a second
    # thread make every tiny linear ~100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    from trl_u2a.testing import build_tokenizer

    return build_tokenizer()


def _pad(tokenizer, rows):
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    completion_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (ids, comp) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        completion_mask[i, : len(ids)] = torch.tensor(comp)
    return input_ids, attention_mask, completion_mask


def _encode(tokenizer, prompt, completion):
    p = tokenizer(prompt)["input_ids"]
    c = tokenizer(completion)["input_ids"]
    return p + c, [0] * len(p) + [1] * len(c)


def make_negatives(tokenizer, examples=NEGATIVES) -> dict:
    ids, am, cm = _pad(tokenizer, [_encode(tokenizer, p, c) for p, c in examples])
    return {"input_ids": ids, "attention_mask": am, "completion_mask": cm}


def make_pairs(tokenizer, pairs=PAIRS) -> dict:
    batch = {}
    for side, idx in (("chosen", 1), ("rejected", 2)):
        ids, am, cm = _pad(tokenizer, [_encode(tokenizer, row[0], row[idx]) for row in pairs])
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": am, f"{side}_completion_mask": cm})
    return batch


def tiny(tokenizer, **kwargs):
    from trl_u2a.testing import build_tiny_model

    kwargs.setdefault("hidden_size", 32)
    kwargs.setdefault("num_layers", 2)
    return build_tiny_model(tokenizer, **kwargs)


def randomize_lora_b(model, seed=0):
    # PEFT initialises lora_B = 0, which makes every lora_A gradient zero and would hide bugs in the A half.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def lora(model, use_rslora=False, dropout=0.1, seed=0):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout, use_rslora=use_rslora)
    return randomize_lora_b(get_peft_model(model, config), seed)


def random_v(params, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {p: torch.randn(p.shape, generator=gen) for p in params}


def quiet_tracked_parameters(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return inf.tracked_parameters(model)


def with_ref(model, batch, context=None):
    return fill_reference_logps(model, [batch], reference_context=context)[0]


def check_ghost_matches_brute_force(model, batch, loss_type, v=None):
    v = v if v is not None else random_v(quiet_tracked_parameters(model))
    loss_fn = _loss_fn(loss_type)
    ghost = inf.score_negatives_batch(model, batch, loss_fn, v)
    brute = inf.brute_force_scores(model, batch, loss_fn, v)
    assert ghost.shape == (batch["input_ids"].shape[0],)
    assert brute.abs().max() > 0
    assert rel_err(ghost, brute) <= TOL, (ghost, brute)
    return ghost, brute


# ---------------------------------------------------------------------------------------------------------------
# ghost = brute force
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_models(tokenizer):
    models = {rs: lora(tiny(tokenizer), use_rslora=rs) for rs in (False, True)}
    batches = {rs: with_ref(m, make_negatives(tokenizer), m.disable_adapter) for rs, m in models.items()}
    return models, batches


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_ghost_matches_brute_force_lora(lora_models, loss_type, use_rslora):
    models, batches = lora_models
    model = models[use_rslora]
    params = inf.tracked_parameters(model)  # LoRA: everything trainable is covered, no warning
    assert all(".lora_" in inf.resolve_tracking(model).names[id(p)] for p in params)
    model.train()
    check_ghost_matches_brute_force(model, batches[use_rslora], loss_type)
    assert model.training  # train mode restored


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_ghost_matches_brute_force_bf16(tokenizer, loss_type):
    """A bf16 base model (PEFT keeps the adapter in fp32, its default): activations and output gradients are bf16
    around every LoRA module, so ghost and brute force agree to bf16 precision, not 1e-5, and rank alike."""
    model = lora(tiny(tokenizer).to(torch.bfloat16), dropout=0.0)
    batch = with_ref(model, make_negatives(tokenizer), model.disable_adapter)
    params = inf.tracked_parameters(model)
    assert model.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16
    v = random_v(params)
    loss_fn = _loss_fn(loss_type)
    ghost = inf.score_negatives_batch(model, batch, loss_fn, v)
    brute = inf.brute_force_scores(model, batch, loss_fn, v)
    assert ghost.dtype == torch.float32 and torch.isfinite(ghost).all()
    tolerance = 2e-2
    assert rel_err(ghost, brute) <= tolerance, (ghost, brute)
    # Ranked alike wherever brute force puts two scores further apart than both errors together: bf16 rounding
    # differs from CPU to CPU (native AVX512-BF16 or emulated), so closer pairs may swap
    apart = (brute[:, None] - brute[None, :]).abs() > 2 * tolerance * brute.abs().max()
    assert apart.any()
    assert torch.equal((ghost[:, None] > ghost[None, :])[apart], (brute[:, None] > brute[None, :])[apart])


def load_qlora(directory):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from trl_u2a.testing import save_tiny_model

    path = save_tiny_model(directory, hidden_size=64, num_layers=2)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch.float32)
    return lora(base)


def bnb_repacked(model) -> bool:
    return any(
        getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
        for m in model.modules()
    )


@pytest.fixture(scope="module")
def qlora_model(tmp_path_factory):
    return load_qlora(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_ghost_matches_brute_force_qlora(qlora_model, tokenizer, loss_type):
    import bitsandbytes as bnb

    model = qlora_model
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    tracked = inf.tracked_modules(model)
    assert tracked and not any(isinstance(m, bnb.nn.Linear4bit) for _, m in tracked)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        batch = with_ref(model, make_negatives(tokenizer), model.disable_adapter)
        check_ghost_matches_brute_force(model, batch, loss_type)
    # bitsandbytes' CPU inference repacking (eval mode) would silently drop gradients through the 4-bit layers
    assert not bnb_repacked(model)
    assert not [w for w in record if "autograd kernel was not registered" in str(w.message)]


@pytest.mark.filterwarnings("ignore:.*autograd kernel was not registered")
def test_warns_when_bnb_layers_were_repacked(tokenizer, tmp_path):
    import bitsandbytes as bnb

    model = load_qlora(tmp_path)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    batch = make_negatives(tokenizer)
    if layers[0].support_avx512bf16_for_cpu:
        model.eval()
        with torch.no_grad():  # what an evaluation loop does: bitsandbytes repacks every 4-bit weight
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        model.train()
    else:
        # bitsandbytes repacks only on CPUs with AVX512-BF16 (its packed kernel needs them): here the mark its
        # repacking leaves is set on one layer, which is all the check reads; no forward runs on it
        layers[0].weight.quant_state.packing_format_for_cpu = True
    assert bnb_repacked(model)
    with pytest.warns(UserWarning, match="4-bit layer\\(s\\) were repacked"):
        with inf.scoring_mode(model):  # every scoring path enters it
            pass


@pytest.fixture(scope="module")
def full_ft_model(tokenizer):
    # qwen2: q/k/v projections carry biases; untied embeddings.
    return tiny(tokenizer, arch="qwen2", tie_word_embeddings=False, seed=3)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_ghost_matches_brute_force_full_finetuning(full_ft_model, tokenizer, loss_type):
    model = full_ft_model
    with pytest.warns(UserWarning, match=r"not inside a module the ghost scorer can hook") as record:
        params = inf.tracked_parameters(model)
    relevant = [w for w in record if "ghost scorer can hook" in str(w.message)]
    assert len(relevant) == 1  # ONE warning for all excluded parameters
    message = str(relevant[0].message)
    assert "norm.weight" in message and "%" in message
    tracking = inf.resolve_tracking(model)
    assert 0 < tracking.excluded_share < 0.05
    assert all("norm" in name for name in tracking.excluded)
    assert any(name.endswith("q_proj.bias") for name in tracking.names.values())  # biases are scored
    batch = {**make_negatives(tokenizer), "ref_logps": torch.full((len(NEGATIVES),), -30.0)}
    check_ghost_matches_brute_force(model, batch, loss_type, v=random_v(params, seed=1))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_ghost_matches_brute_force_tied_embeddings(tokenizer, loss_type):
    model = tiny(tokenizer, tie_word_embeddings=True, seed=4)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    params = quiet_tracked_parameters(model)
    assert sum(p is model.lm_head.weight for p in params) == 1  # one parameter, seen through two modules
    batch = {**make_negatives(tokenizer), "ref_logps": torch.full((len(NEGATIVES),), -30.0)}
    check_ghost_matches_brute_force(model, batch, loss_type, v=random_v(params, seed=2))


def _checkpointing_enable(model, use_reentrant: bool) -> None:
    # transformers 5.23 renamed gradient_checkpointing_enable (kept as a deprecated alias); the floor (5.18) has only it
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": use_reentrant})


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_ghost_with_gradient_checkpointing(tokenizer, use_reentrant):
    model = lora(tiny(tokenizer, seed=5), dropout=0.0)
    _checkpointing_enable(model.base_model.model, use_reentrant)
    model.enable_input_require_grads()
    model.train()
    batch = make_negatives(tokenizer)
    for loss_type in ("ga", "simnpo"):
        check_ghost_matches_brute_force(model, batch, loss_type)
    # checkpointing and train mode are restored exactly
    assert model.training
    flags = [m.gradient_checkpointing for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    assert flags and all(flags)


def test_padding_does_not_change_scores(lora_models):
    models, batches = lora_models
    model, batch = models[False], batches[False]
    v = random_v(inf.tracked_parameters(model))
    loss_fn = _loss_fn("npo")
    full = inf.score_negatives_batch(model, batch, loss_fn, v)
    for i in range(batch["input_ids"].shape[0]):
        row = slice_batch(batch, i)
        n = int(row["attention_mask"].sum())
        trimmed = {k: (t[:, :n] if t.dim() == 2 else t) for k, t in row.items()}
        alone = inf.score_negatives_batch(model, trimmed, loss_fn, v)
        assert rel_err(alone, full[i : i + 1]) <= 1e-4


# ---------------------------------------------------------------------------------------------------------------
# sign
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_sign_rejected_positive_chosen_negative(tokenizer, loss_type):
    """Unlearning an alignment-set *rejected* response lowers the DPO loss J (s > 0); unlearning a *chosen* one
    raises it (s < 0). At θ = θ_0 every DPO margin is 0, so ∇J = -(β/2)·mean(∇log π(y_w) − ∇log π(y_l))."""
    model = tiny(tokenizer, seed=0)
    pairs = reference_logps(model, [make_pairs(tokenizer)])  # the start model is the reference
    v = inf.compute_query(
        model, DPOObjective(beta=0.1), pairs, preconditioner="identity", params=quiet_tracked_parameters(model)
    )
    assert abs(v.objective_value - torch.log(torch.tensor(2.0)).item()) < 1e-5
    rejected = make_negatives(tokenizer, [(p, rej) for p, _, rej in PAIRS])
    chosen = make_negatives(tokenizer, [(p, ch) for p, ch, _ in PAIRS])
    loss_fn = _loss_fn(loss_type)
    for batch in (rejected, chosen):
        batch["ref_logps"] = fill_reference_logps(model, [batch])[0]["ref_logps"]
    s_rejected = inf.score_negatives_batch(model, rejected, loss_fn, v)
    s_chosen = inf.score_negatives_batch(model, chosen, loss_fn, v)
    assert (s_rejected > 0).all(), s_rejected
    assert (s_chosen < 0).all(), s_chosen


# ---------------------------------------------------------------------------------------------------------------
# alignment gradient and preconditioners
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pa_setup(tokenizer):
    model = lora(tiny(tokenizer, seed=6), dropout=0.0, seed=6)
    pairs = make_pairs(tokenizer)
    # two batches of different sizes: J is the mean over pairs, not the mean of batch means
    batches = reference_logps(model, [slice_batch(pairs, slice(0, 2)), slice_batch(pairs, 2)], model.disable_adapter)
    return model, batches


def per_pair_gradients(model, objective, batches, params):
    grads = []
    for batch in batches:
        for i in range(batch["chosen_input_ids"].shape[0]):
            loss = objective(model, slice_batch(batch, i)).sum()
            grads.append(torch.autograd.grad(loss, params, allow_unused=True))
    return grads


def test_alignment_gradient_is_mean_over_pairs(pa_setup):
    model, batches = pa_setup
    params = inf.tracked_parameters(model)
    objective = DPOObjective(beta=0.1)
    grads = inf.alignment_gradient(model, objective, batches, params)
    assert grads.num_pairs == 3
    per_pair = per_pair_gradients(model, objective, batches, params)
    for k, p in enumerate(params):
        expected = sum(g[k] for g in per_pair) / len(per_pair)
        assert rel_err(grads[p], expected) <= TOL
    with torch.no_grad():
        j = torch.cat([objective(model, b) for b in batches]).mean().item()
    assert abs(grads.objective_value - j) < 1e-6


def test_fisher_preconditioner(pa_setup):
    model, batches = pa_setup
    params = inf.tracked_parameters(model)
    objective = DPOObjective(beta=0.1)
    grads = inf.alignment_gradient(model, objective, batches, params, return_fisher=True)
    plain = inf.alignment_gradient(model, objective, batches, params)
    per_pair = per_pair_gradients(model, objective, batches, params)
    for k, p in enumerate(params):
        assert rel_err(grads[p], plain[p]) <= TOL
        fisher = sum(g[k] ** 2 for g in per_pair) / len(per_pair)
        assert rel_err(grads.fisher[p], fisher) <= TOL
    v = inf.precondition(grads, "fisher", damping=1e-3, fisher=grads.fisher)
    for p in params:
        torch.testing.assert_close(v[p], grads[p] / (grads.fisher[p] + 1e-3))
    q = inf.compute_query(model, objective, batches, preconditioner="fisher", damping=1e-3)
    for p in params:
        torch.testing.assert_close(q[p], v[p], rtol=1e-4, atol=1e-8)


def test_adam_preconditioner_uses_optimizer_state(pa_setup):
    model, batches = pa_setup
    params = inf.tracked_parameters(model)
    grads = inf.alignment_gradient(model, NLLObjective(), batches, params)
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-6)
    # before the first step there is no second moment: identity (with damping), and a warning says so
    with pytest.warns(UserWarning, match="using the identity preconditioner"):
        v0 = inf.precondition(grads, "adam", damping=0.5, optimizer=optimizer)
    for p in params:
        torch.testing.assert_close(v0[p], grads[p] / 1.5)
    assert inf.compute_query(model, NLLObjective(), batches, "adam", optimizer=optimizer).preconditioner == "identity"
    saved = [p.detach().clone() for p in params]
    for _ in range(2):  # two steps: the bias correction 1 - β2^step differs from one
        optimizer.zero_grad()
        loss = sum((p.float() ** 2).sum() for p in params) + sum(p.float().sum() for p in params)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    v = inf.precondition(grads, "adam", damping=1e-4, optimizer=optimizer)
    for p in params:
        state = optimizer.state[p]
        v_hat = state["exp_avg_sq"] / (1 - 0.95 ** float(state["step"]))
        torch.testing.assert_close(v[p], grads[p] / (v_hat.sqrt() + 1e-6 + 1e-4))
    assert rel_err(v[params[0]], grads[params[0]]) > 1e-2  # it really preconditioned
    q = inf.compute_query(model, NLLObjective(), batches, "adam", damping=1e-4, optimizer=optimizer)
    assert q.preconditioner == "adam"
    assert all(torch.allclose(q[p], v[p], rtol=1e-4, atol=1e-8) for p in params)


@pytest.mark.parametrize("loss_type", ["ga", "npo"])
def test_second_moments_estimate_adam_without_a_step(lora_models, loss_type):
    """`gradient_second_moments` is `mean_b (∇ mean_i ℓ_i)²` over the batches, padding rows excluded (each batch's
    gradient checked against torch.autograd.grad), and stands in for Adam's `v̂` before the first step."""
    models, batches = lora_models
    model = models[False]
    batch = batches[False]
    loss_fn = _loss_fn(loss_type)
    params = quiet_tracked_parameters(model)
    first, second = slice_batch(batch, slice(0, 2)), slice_batch(batch, slice(1, 4))
    # the second batch repeats a row as padding: it runs but must not count
    padded = slice_batch(batch, [1, 2, 3, 1])
    padded[PADDING] = torch.tensor([False, False, False, True])
    moments = inf.gradient_second_moments(model, loss_fn, [first, padded], params)
    expected = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    with inf.scoring_mode(model):
        for b in (first, second):
            grads = torch.autograd.grad(loss_fn(model, b).mean(), params, allow_unused=True)
            for e, g in zip(expected, grads):
                e += 0 if g is None else g.float() ** 2 / 2
    assert sum(float(e.abs().sum()) for e in expected) > 0
    for p, e in zip(params, expected):
        assert rel_err(moments[p], e) <= TOL
    # Used as Adam's v̂ when the optimizer has no state yet, with the optimizer's ε
    grads = {p: torch.randn(p.shape) for p in params}
    optimizer = torch.optim.AdamW(params, eps=1e-6)
    v, applied = _precondition(grads, "adam", 0.0, optimizer, None, second_moments=moments)
    assert applied == "adam-estimated"
    for p in params:
        torch.testing.assert_close(v[p], grads[p] / (moments[p].sqrt() + 1e-6))


def test_padding_rows_run_but_do_not_count(pa_setup):
    """Rows marked in `PADDING` (a rank evening out its forwards with the others) change neither J, nor its gradient,
    nor the Fisher, nor the pair count."""
    model, batches = pa_setup
    params = inf.tracked_parameters(model)
    objective = DPOObjective(beta=0.1)
    plain = inf.alignment_gradient(model, objective, batches, params, return_fisher=True)
    padded_batch = {k: torch.cat([t, t[:1]]) for k, t in batches[1].items()}  # its one pair, then a padding copy
    padded_batch[PADDING] = torch.tensor([False, True])
    only_padding = dict(slice_batch(padded_batch, slice(1, 2)))  # a batch of padding alone
    padded = inf.alignment_gradient(model, objective, [batches[0], padded_batch, only_padding], params, True)
    assert padded.num_pairs == plain.num_pairs == 3
    assert padded.objective_value == pytest.approx(plain.objective_value, rel=1e-6)
    for p in params:
        assert rel_err(padded[p], plain[p]) <= TOL and rel_err(padded.fisher[p], plain.fisher[p]) <= TOL


def test_identity_preconditioner_and_errors(pa_setup):
    model, batches = pa_setup
    params = inf.tracked_parameters(model)
    grads = inf.alignment_gradient(model, DPOObjective(), batches, params)
    v = inf.precondition(grads, "identity")
    assert all(torch.equal(v[p], grads[p]) for p in params)
    v = inf.precondition(grads, "identity", damping=1.0)
    assert all(torch.allclose(v[p], grads[p] / 2) for p in params)
    with pytest.raises(ValueError, match="not supported"):
        inf.precondition(grads, "ekfac")
    with pytest.raises(ValueError, match="not supported"):
        inf.compute_query(model, DPOObjective(), batches, preconditioner="diag")
    with pytest.raises(ValueError, match="optimizer"):
        inf.precondition(grads, "adam")
    with pytest.raises(ValueError, match="Fisher"):
        inf.precondition(grads, "fisher", damping=0.1)
    with pytest.raises(ValueError, match="damping"):
        inf.precondition(grads, "identity", damping=-1.0)
    with pytest.raises(ValueError, match="no pair batches"):
        inf.alignment_gradient(model, DPOObjective(), [], params)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        unref = {k: t for k, t in batches[0].items() if not k.startswith("ref_")}
        inf.alignment_gradient(model, DPOObjective(), [unref], params)
    with pytest.raises(ValueError, match="1-D"):
        inf.alignment_gradient(model, CallableObjective(lambda m, b: DPOObjective()(m, b).mean()), batches, params)
    with pytest.raises(ValueError, match="one loss per example"):
        inf.score_negatives_batch(
            model, {"input_ids": torch.zeros(2, 3, dtype=torch.long)}, lambda m, b: torch.zeros(3), v
        )


def test_callable_objective_matches_builtin(pa_setup):
    model, batches = pa_setup
    params = inf.tracked_parameters(model)
    dpo = DPOObjective(beta=0.2)
    a = inf.alignment_gradient(model, dpo, batches, params)
    b = inf.alignment_gradient(model, lambda m, batch: dpo(m, batch), batches, params)  # plain callables work
    assert all(torch.allclose(a[p], b[p]) for p in params)


# ---------------------------------------------------------------------------------------------------------------
# in-training attach mode
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non-reentrant"])
def test_attached_ghost_records_weighted_scores(tokenizer, checkpointing):
    model = lora(tiny(tokenizer, seed=7), dropout=0.0, seed=7)
    if checkpointing:
        _checkpointing_enable(model.base_model.model, checkpointing == "reentrant")
        model.enable_input_require_grads()
    batch = make_negatives(tokenizer)
    params = inf.tracked_parameters(model)
    v = random_v(params, seed=3)
    loss_fn = _loss_fn("ga")
    expected = inf.brute_force_scores(model, batch, loss_fn, v)
    weights = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0])

    model.train()
    ghost = inf.GhostDotProduct(model, v)
    try:
        losses = loss_fn(model, batch)
        (weights * losses).sum().backward()
        recorded = ghost.scores()
        assert rel_err(recorded, weights * expected) <= TOL
        # training gradients are untouched by the hooks
        grads_with = [p.grad.clone() for p in params]
        model.zero_grad()
        with ghost.paused():
            (weights * loss_fn(model, batch)).sum().backward()
        assert ghost._scores is None  # nothing recorded while paused
        for g, p in zip(grads_with, params):
            torch.testing.assert_close(p.grad, g)
    finally:
        ghost.detach()
        model.zero_grad()
    assert not any(m._forward_hooks for _, m in inf.tracked_modules(model))


def test_attached_ghost_rejects_uncovered_parameters(full_ft_model):
    norm = full_ft_model.model.norm.weight
    with pytest.raises(ValueError, match="cannot see"):
        inf.GhostDotProduct(full_ft_model, {norm: torch.ones_like(norm)})


# ---------------------------------------------------------------------------------------------------------------
# dataset scoring, fallbacks, wrappers
# ---------------------------------------------------------------------------------------------------------------


def test_score_dataset_concatenates(lora_models, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    models, batches = lora_models
    model, batch = models[False], batches[False]
    v = random_v(inf.tracked_parameters(model))
    loss_fn = _loss_fn("npo")
    parts = [slice_batch(batch, slice(0, 2)), slice_batch(batch, slice(2, 5))]
    scores = inf.score_dataset(model, parts, loss_fn, v, desc="test")
    assert scores.shape == (5,)
    assert rel_err(scores, inf.score_negatives_batch(model, batch, loss_fn, v)) <= TOL
    assert _progress_disabled()
    brute = inf.score_dataset(model, parts, loss_fn, v, method="brute_force")
    assert rel_err(scores, brute) <= TOL


def test_fallback_to_brute_force_when_nothing_is_covered(tokenizer):
    model = tiny(tokenizer, seed=8)
    for name, p in model.named_parameters():
        p.requires_grad_("norm" in name)  # only RMSNorm weights train: no hookable module
    with pytest.warns(UserWarning, match="fall back"):
        params = inf.tracked_parameters(model)
    assert params and all(p.dim() == 1 for p in params)
    v = random_v(params)
    batch = make_negatives(tokenizer)
    with pytest.warns(UserWarning, match="brute force"):
        scores = inf.score_dataset(model, [batch], _loss_fn("ga"), v)
    assert rel_err(scores, inf.brute_force_scores(model, batch, _loss_fn("ga"), v)) <= TOL
    with pytest.raises(ValueError, match="no trainable parameter"):
        inf.tracked_parameters(tiny(tokenizer).requires_grad_(False))


def test_dora_weights_are_not_covered(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny(tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    tracking = inf.resolve_tracking(model)
    # DoRA uses lora_A/lora_B weights outside the module calls: module-boundary gradients would be wrong
    assert not tracking.params
    assert any("lora_A" in n for n in tracking.excluded)


def test_sequence_logps_is_completion_only(tokenizer):
    model = tiny(tokenizer, seed=9)
    batch = make_negatives(tokenizer)
    logps, lengths = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_token = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    mask = batch["completion_mask"][:, 1:].float()
    torch.testing.assert_close(logps, (per_token * mask).sum(-1))
    torch.testing.assert_close(lengths, mask.sum(-1))
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    handle.remove()
    assert calls  # the lm_head module is called (its hooks fire)


def test_ddp_wrapped_model_single_process(lora_models, tokenizer, tmp_path):
    import torch.distributed as dist

    models, batches = lora_models
    model, batch = models[False], batches[False]
    params = inf.tracked_parameters(model)
    v = random_v(params)
    loss_fn = _loss_fn("ga")
    expected = inf.score_negatives_batch(model, batch, loss_fn, v)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    ddp = None
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        assert inf.unwrap_model(ddp) is model
        assert rel_err(inf.score_negatives_batch(ddp, batch, loss_fn, v), expected) <= TOL
        pairs = reference_logps(model, [make_pairs(tokenizer)], model.disable_adapter)
        grads = inf.alignment_gradient(ddp, DPOObjective(), pairs, params)  # the all-reduce path, world size 1
        assert grads.num_pairs == len(PAIRS)
    finally:
        # DDP's reducer holds the process group: freed after `destroy_process_group` (when the test's frame goes), its
        # gloo destructor joined worker threads that never ended and hung the test session (seen twice)
        del ddp
        gc.collect()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------
# two processes over gloo: every rank gets the global mean
# ---------------------------------------------------------------------------------------------------------------


class _TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(11, 6)
        self.lin = nn.Linear(6, 5)

    def forward(self, x):
        return self.lin(torch.tanh(self.emb(x)))


def _tiny_objective(model, batch):
    return model(batch["x"]).pow(2).mean((-1, -2))  # (P,)


def _tiny_pairs(seed, sizes):
    gen = torch.Generator().manual_seed(seed)
    return [{"x": torch.randint(0, 11, (n, 4), generator=gen)} for n in sizes]


def _dist_worker(rank, world_size, store, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        model = _TinyNet()
        local = _tiny_pairs(rank, [3] if rank == 0 else [1, 2])
        grads = inf.alignment_gradient(model, _tiny_objective, local, list(model.parameters()))
        empty = inf.alignment_gradient(model, _tiny_objective, local if rank == 0 else [], list(model.parameters()))
        torch.save(
            {
                "grads": [g for g in grads.values()],
                "n": grads.num_pairs,
                "j": grads.objective_value,
                "empty": [g for g in empty.values()],
                "n_empty": empty.num_pairs,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_alignment_gradient_all_reduces_across_two_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model = _TinyNet()
    params = list(model.parameters())
    union = inf.alignment_gradient(model, _tiny_objective, _tiny_pairs(0, [3]) + _tiny_pairs(1, [1, 2]), params)
    rank0 = inf.alignment_gradient(model, _tiny_objective, _tiny_pairs(0, [3]), params)
    for res in results:
        assert res["n"] == 6 and res["n_empty"] == 3
        assert abs(res["j"] - union.objective_value) < 1e-6
        for g, p in zip(res["grads"], params):
            torch.testing.assert_close(g, union[p])
        for g, p in zip(res["empty"], params):
            torch.testing.assert_close(g, rank0[p])


# ---------------------------------------------------------------------------------------------------------------
# FSDP2 over two processes: parameters are DTensor shards outside the forward
# ---------------------------------------------------------------------------------------------------------------


def _tiny_loss_fn(model, batch):
    return model(batch["x"]).pow(2).mean((-1, -2))  # (B,): one loss per row


def _tiny_step(model, optimizer):
    """One AdamW step on fixed data (the same on every rank, so that FSDP2's averaged gradient is the plain one)."""
    optimizer.zero_grad()
    _tiny_loss_fn(model, _tiny_pairs(7, [4])[0]).sum().backward()
    optimizer.step()


def _fsdp2_worker(rank, world_size, store, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        _fsdp2_checks(rank, world_size, out_dir)
        # The sharded model, its optimizer and the device mesh hold the process group: freed before it is destroyed
        # (freed after, a gloo destructor aborted the process: "terminate called without an active exception")
        gc.collect()
    finally:
        dist.destroy_process_group()


def _fsdp2_checks(rank, world_size, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _TinyNet()
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    sharded = list(model.parameters())
    assert all(type(p).__name__ == "DTensor" for p in sharded)
    # FSDP2 does not reshard the root after a forward that no backward follows (a reference pass)
    with torch.no_grad():
        model(_tiny_pairs(5, [4])[0]["x"])
    assert not any(type(p).__name__ == "DTensor" for p in model.parameters())
    params = inf.tracked_parameters(model)
    assert [id(p) for p in params] == [id(p) for p in sharded]
    # Every rank runs the same forwards (each all-gathers the parameters), on different pairs
    grads = inf.alignment_gradient(model, _tiny_objective, _tiny_pairs(rank, [3 - rank, 2]), params)
    v = random_v(params, seed=3)  # full-shape plain tensors, keyed by the sharded parameters
    negatives = _tiny_pairs(5, [4])[0]
    with torch.no_grad():
        model(negatives["x"])
    ghost = inf.score_negatives_batch(model, negatives, _tiny_loss_fn, v)
    brute = inf.brute_force_scores(model, negatives, _tiny_loss_fn, v)
    with inf.GhostDotProduct(model, v) as recorder, recorder.recording():
        (_tiny_loss_fn(model, negatives) * torch.tensor([1.0, 2.0, 0.5, 1.0])).sum().backward()
    in_training = recorder.scores(4)
    with torch.no_grad():
        model(negatives["x"])
    optimizer = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-6)
    _tiny_step(model, optimizer)
    adam = inf.precondition(grads, "adam", damping=1e-4, optimizer=optimizer)
    torch.save(
        {
            "grads": list(grads.values()),
            "n": grads.num_pairs,
            "ghost": ghost,
            "brute": brute,
            "in_training": in_training,
            "adam": [adam[p] for p in params],
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


@pytest.mark.slow
def test_fsdp2_sharded_parameters_match_plain_ones(tmp_path):
    """Under FSDP2 (two processes, gloo) the alignment gradient, the ghost, brute-force and in-training scores and the
    adam preconditioner (whose state is sharded too) equal those of the plain model on the union of the data."""
    import torch.multiprocessing as mp

    pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch.distributed")
    mp.spawn(_fsdp2_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model = _TinyNet()
    params = list(model.parameters())
    grads = inf.alignment_gradient(model, _tiny_objective, _tiny_pairs(0, [3, 2]) + _tiny_pairs(1, [2, 2]), params)
    v = random_v(params, seed=3)
    negatives = _tiny_pairs(5, [4])[0]
    scores = inf.brute_force_scores(model, negatives, _tiny_loss_fn, v)
    optimizer = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-6)
    _tiny_step(model, optimizer)
    adam = inf.precondition(grads, "adam", damping=1e-4, optimizer=optimizer)
    for res in results:
        assert res["n"] == 9
        for g, p in zip(res["grads"], params):
            assert type(g) is torch.Tensor and g.shape == p.shape
            torch.testing.assert_close(g, grads[p])
        assert scores.abs().min() > 0
        for key in ("ghost", "brute"):
            assert rel_err(res[key], scores) <= TOL, key
        assert rel_err(res["in_training"], scores * torch.tensor([1.0, 2.0, 0.5, 1.0])) <= TOL
        for a, p in zip(res["adam"], params):
            torch.testing.assert_close(a, adam[p])
        assert rel_err(res["adam"][0], grads[params[0]]) > 1e-2  # it really preconditioned
