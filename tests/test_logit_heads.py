"""Every model family's own logits (issue 18): recomputing logits from hidden states — in the
fused loss, hidden-state references and teacher servers — equals the model's forward.

`CHECKED` enumerates the families deltakd reproduces, each with a tiny config whose output
transform is switched on and large enough to matter (soft cap biting, scale ≠ 1); `REFUSED`
those it must refuse. A family added to `deltakd.heads.FAMILIES` without an entry here fails
`test_every_family_in_the_table_is_tested`; one added here but not to the table fails the
equality tests until it is handled.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deltakd.heads import FAMILIES, UnsupportedHeadError, head_transform, logit_head
from deltakd.losses import delta_kd_loss, fused_distill_loss, kd_loss
from deltakd.losses.heads import LogitHead
from deltakd.references.local import LocalReferences

V = 48
SMALL = dict(
    vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           shared_expert_intermediate_size=32)  # fmt: skip
HD = dict(head_dim=8)
SOFTCAP = 2.0

#: family → config overrides that switch its output transform on.
CHECKED: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "mixtral": MOE,
    "qwen2": {},
    "qwen2_moe": MOE,
    "qwen3": HD,
    "qwen3_moe": {**MOE, **HD},
    "gemma": HD,
    "gemma2": {**HD, "final_logit_softcapping": SOFTCAP},
    "gemma3_text": {**HD, "final_logit_softcapping": SOFTCAP},
    "phi3": {},
    "phi": {},
    "olmo": {},
    "olmo2": {},
    "granite": {"logits_scaling": 4.0},
    "granitemoe": {**MOE, "logits_scaling": 4.0},
    "cohere": {"logit_scale": 0.25},
    "cohere2": {"logit_scale": 0.25},
    "smollm3": {},
    "gpt_neox": {},
    "falcon": {},
    "starcoder2": {},
    "stablelm": {},
}
#: families whose forward deltakd has not checked: refused, never silently recomputed.
REFUSED: dict[str, dict] = {
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4},
    "opt": {
        "hidden_size": 32,
        "ffn_dim": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "word_embed_proj_dim": 32,
    },
    "falcon_h1": {**SMALL, "lm_head_multiplier": 2.0},
}


def build(family: str, seed: int, overrides: dict | None = None) -> torch.nn.Module:
    """A tiny random model of `family` in float64, its head scaled so logits reach ±10."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = CHECKED.get(family, REFUSED.get(family, {})) if overrides is None else overrides
    kwargs = {**SMALL, **extra}
    if family in REFUSED:
        kwargs = {"vocab_size": V, **extra}
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    # Eager experts: the grouped-matmul kernel of MoE families has no float64.
    model = AutoModelForCausalLM.from_config(config, experts_implementation="eager")
    model = model.double().eval()
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.mul_(2.0 / head.std())  # random init gives |z| ≈ 0.1; the soft cap must bite
    return model


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False
    mask[1, 5] = False
    return ids, mask


@pytest.fixture(scope="module")
def trio() -> dict:
    """family → (student, teacher_ft, teacher_raw), built once per module."""
    return {}


def _trio(cache: dict, family: str):
    if family not in cache:
        cache[family] = tuple(build(family, seed) for seed in (0, 1, 2))
    return cache[family]


def test_every_family_in_the_table_is_tested():
    assert set(FAMILIES) == set(CHECKED), "a family in deltakd.heads.FAMILIES needs a test here"
    assert not set(FAMILIES) & set(REFUSED)


@pytest.mark.parametrize("family", sorted(CHECKED))
def test_recomputed_logits_equal_the_models_forward(family, trio):
    model = _trio(trio, family)[0]
    ids, _ = batch()
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        last = model.base_model(input_ids=ids).last_hidden_state
    # The trainer reads the student's hidden_states[-1]: after the final norm in every family.
    torch.testing.assert_close(out.hidden_states[-1], last)
    head = logit_head(model)
    assert head.family == family and head.weight is model.get_output_embeddings().weight
    with torch.no_grad():
        torch.testing.assert_close(head.apply(last), out.logits)
        plain = F.linear(last, head.weight, head.bias)
    if head.softcap is not None or head.scale != 1.0:
        # The transform matters here: plain h @ W.T would be wrong.
        assert not torch.allclose(plain, out.logits, atol=1e-3)
    if head.softcap is not None:
        assert float((plain.abs() > head.softcap).double().mean()) > 0.3  # the cap bites


@pytest.mark.parametrize("family", sorted(CHECKED))
def test_fused_loss_and_gradients_equal_the_dense_path(family, trio):
    # The trainer's two paths on Delta-KD with λ > 0: the model's own logits into the unfused
    # loss, and its hidden_states[-1] with logit_head(model) into the fused loss. Every
    # parameter's gradient (head weight and bias, norm, decoder) must agree.
    student, t_ft, t_raw = _trio(trio, family)
    ids, mask = batch()
    labels = ids[:, 1:]
    lam, alpha = 0.25, 0.5
    with torch.no_grad():
        ref_out = {r: m(input_ids=ids, output_hidden_states=True) for r, m in
                   (("teacher_ft", t_ft), ("teacher_raw", t_raw), ("student_raw", student))}  # fmt: skip
    params = [p for p in student.parameters() if p.requires_grad]

    logits = student(input_ids=ids).logits[:, :-1]
    ce = F.cross_entropy(logits[mask], labels[mask])
    kd = delta_kd_loss(logits, *(ref_out[r].logits[:, :-1] for r in
                                 ("teacher_ft", "teacher_raw", "student_raw")),
                       alpha=alpha, mask=mask)  # fmt: skip
    dense = lam * ce + (1 - lam) * kd
    g_dense = torch.autograd.grad(dense, params, allow_unused=True)

    out = student(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
    refs = {
        "teacher_ft": (ref_out["teacher_ft"].hidden_states[-1][:, :-1], logit_head(t_ft)),
        "teacher_raw": (ref_out["teacher_raw"].hidden_states[-1][:, :-1], logit_head(t_raw)),
        "student_raw": (ref_out["student_raw"].hidden_states[-1][:, :-1], logit_head(student)),
    }
    fused = fused_distill_loss(
        out.hidden_states[-1][:, :-1], logit_head(student), refs, alpha=alpha, mask=mask,
        chunk_size=3, sft_weight=lam, labels=labels,
    )  # fmt: skip
    g_fused = torch.autograd.grad(fused, params, allow_unused=True)
    torch.testing.assert_close(fused, dense)
    for p, a, b in zip(params, g_fused, g_dense):
        if a is None or b is None:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, msg=lambda m, p=p: f"{family} {tuple(p.shape)}: {m}")


@pytest.mark.parametrize("family", sorted(CHECKED))
def test_local_hidden_state_mode_equals_logits_mode(family, trio):
    student, t_ft, _ = _trio(trio, family)
    ids, mask = batch()
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    dense = LocalReferences(models={"teacher_ft": t_ft}).fetch(0, b)
    src = LocalReferences(models={"teacher_ft": t_ft}, hidden_states=True)
    out = src.fetch(0, b)
    head = src.lm_heads()["teacher_ft"]
    assert not out.logits and isinstance(head, LogitHead)
    torch.testing.assert_close(head.apply(out.hidden["teacher_ft"]), dense.logits["teacher_ft"])
    with torch.no_grad():
        h = student(input_ids=ids, output_hidden_states=True).hidden_states[-1][:, :-1]
    s_head = logit_head(student)
    from_hidden = fused_distill_loss(
        h, s_head, {"teacher_ft": (out.hidden["teacher_ft"][:, :-1], head)}, variant=None,
        mask=mask,
    )  # fmt: skip
    from_logits = fused_distill_loss(
        h, s_head, {"teacher_ft": dense.logits["teacher_ft"][:, :-1]}, variant=None, mask=mask
    )
    torch.testing.assert_close(from_hidden, from_logits)


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_unchecked_families_are_refused_with_the_setting_to_use(family):
    model = build(family, 0)
    with pytest.raises(UnsupportedHeadError, match=rf"{family}.*fused_loss: false"):
        logit_head(model)
    # Local references fall back to the model's own logits (always right) instead.
    ids, _ = batch()
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    src = LocalReferences(models={"teacher_ft": model}, hidden_states=True)
    out = src.fetch(0, b)
    assert not src.lm_heads() and not out.hidden and "teacher_ft" in out.logits


def test_an_unknown_head_knob_of_a_known_family_is_refused():
    from transformers import LlamaConfig

    with pytest.raises(UnsupportedHeadError, match=r"llama.*final_logit_softcapping=30.0"):
        head_transform(LlamaConfig(**SMALL, final_logit_softcapping=30.0))
    # A knob left neutral changes nothing and is accepted.
    assert head_transform(LlamaConfig(**SMALL, logit_scale=1.0))["scale"] == 1.0
    # Attention soft caps are inside the decoder: not the output layer's business.
    assert head_transform(LlamaConfig(**SMALL, attn_logit_softcapping=50.0))["softcap"] is None


def test_logit_head_math_and_checks():
    g = torch.Generator().manual_seed(0)
    w, b, h = (torch.randn(7, 5, generator=g, dtype=torch.float64),
               torch.randn(7, generator=g, dtype=torch.float64),
               torch.randn(3, 5, generator=g, dtype=torch.float64) * 4)  # fmt: skip
    head = LogitHead(w, b, scale=0.5, softcap=1.5)
    z = (h @ w.T + b) * 0.5
    torch.testing.assert_close(head.apply(h), torch.tanh(z / 1.5) * 1.5)
    torch.testing.assert_close(head.apply(h, vocab=4), (torch.tanh(z / 1.5) * 1.5)[:, :4])
    # backward_ is the derivative of the transform (what the fused loss chains through).
    raw = (h @ w.T + b).requires_grad_()
    out = torch.tanh(raw * 0.5 / 1.5) * 1.5
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (expected,) = torch.autograd.grad(out, raw, grad)
    torch.testing.assert_close(head.backward_(grad.clone(), out.detach().clone()), expected)
    for bad in ({"scale": 0.0}, {"softcap": -1.0}, {"bias": torch.zeros(3)}):
        with pytest.raises(ValueError):
            LogitHead(w, **bad)


def test_student_head_bias_gets_its_gradient_through_the_soft_cap():
    # A head with bias, scale and soft cap at once (no shipped family has all three).
    g = torch.Generator().manual_seed(3)
    h = (torch.randn(9, 6, generator=g, dtype=torch.float64) * 3).requires_grad_()
    w = torch.randn(11, 6, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(11, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.randn(9, 11, generator=g, dtype=torch.float64)
    head = LogitHead(w, b, scale=0.7, softcap=2.5)
    fused = fused_distill_loss(h, head, {"t": t}, variant=None, target_role="t", chunk_size=4,
                               divergence="jsd")  # fmt: skip
    ref = kd_loss(head.apply(h), t, divergence="jsd")
    torch.testing.assert_close(fused, ref)
    for a, c in zip(torch.autograd.grad(fused, (h, w, b)), torch.autograd.grad(ref, (h, w, b))):
        torch.testing.assert_close(a, c)
    with pytest.raises(ValueError, match="bias is given twice"):
        fused_distill_loss(h, head, {"t": t}, variant=None, target_role="t", student_bias=b)


def test_teacher_server_round_trip_of_a_soft_capped_family(tmp_path: Path):
    from deltakd.references.client import ServerReferences, ServerSpec
    from deltakd.references.server import TeacherServer

    model = build("gemma2", 5)
    path = tmp_path / "gemma2"
    model.float().save_pretrained(path)
    model = model.float()
    ep = f"ipc://{tmp_path}/g.sock"
    server = TeacherServer.from_pretrained(
        "teacher_ft", str(path), output="hidden", dtype="fp32", endpoint=ep
    )
    ready = threading.Event()
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_ms": 20, "ready": ready.set}, daemon=True
    )
    thread.start()
    assert ready.wait(10)
    try:
        spec = ServerSpec("teacher_ft", endpoint=ep, output="hidden", dtype="fp32")
        with ServerReferences([spec], timeout=20) as refs:
            ids, _ = batch()
            out = refs.fetch(0, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
            head = refs.lm_heads()["teacher_ft"]
            assert (head.family, head.softcap, head.scale) == ("gemma2", SOFTCAP, 1.0)
            with torch.no_grad():
                expected = model(input_ids=ids).logits
            got = head.apply(out.hidden["teacher_ft"])
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    finally:
        server.stop()
        thread.join(10)
    # A family deltakd cannot reproduce is refused at the server, naming the fix.
    gpt2 = tmp_path / "gpt2"
    build("gpt2", 0).save_pretrained(gpt2)
    with pytest.raises(UnsupportedHeadError, match=r"gpt2.*output: logits"):
        TeacherServer.from_pretrained(
            "teacher_ft", str(gpt2), output="hidden", endpoint=f"ipc://{tmp_path}/x.sock"
        )


def test_training_a_soft_capped_family_fused_equals_unfused(tiny_world, tmp_path: Path):
    # The reproduction: the same Gemma 2 run with fused_loss false and true gave a
    # first-step loss of 2.45 against 5.15. Now every logged loss and the weights agree.
    import json

    from deltakd.data.vocab import load_tokenizer
    from deltakd.train import load_config, train
    from tests.conftest import tiny_run_fields

    tok = load_tokenizer(str(tiny_world["tokenizer"]))
    world = dict(tiny_world)
    overrides = {**SMALL, **CHECKED["gemma2"], "vocab_size": len(tok)}
    for role, seed in (("teacher_ft", 1), ("teacher_raw", 2), ("student_raw", 3)):
        path = tmp_path / role
        build("gemma2", seed, overrides).float().save_pretrained(path)
        tok.save_pretrained(path)
        world[role] = path
    data = tmp_path / "train.jsonl"
    rows = [{"prompt": "what colour is the fox?", "response": "the fox is red."},
            {"prompt": "seven plus six?", "response": "seven plus six is thirteen."}] * 2  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    base = {**tiny_run_fields(world, data), "method": "delta_kd", "lam": 0.3, "max_steps": 2,
            "shuffle": False, "learning_rate": 1e-3}  # fmt: skip
    runs = {}
    for fused in (False, True):
        over = {"output_dir": str(tmp_path / f"r{fused}"), "fused_loss": fused, "chunk_size": 8}
        runs[fused] = train(load_config(None, {**base, **over}))
    for key in ("loss", "kd_loss", "sft_loss"):
        for (_, a), (_, b) in zip(runs[False].losses(key), runs[True].losses(key), strict=True):
            assert a == pytest.approx(b, rel=1e-4), key
    # A student family the fused loss cannot reproduce is refused before the first step.
    build("gpt2", 4, {"n_embd": 32, "n_layer": 1, "n_head": 4, "vocab_size": len(tok)}).float(
    ).save_pretrained(tmp_path / "gpt2")  # fmt: skip
    tok.save_pretrained(tmp_path / "gpt2")
    over = {"output_dir": str(tmp_path / "refused"), "fused_loss": True,
            "student_raw": str(tmp_path / "gpt2")}  # fmt: skip
    with pytest.raises(UnsupportedHeadError, match=r"gpt2.*fused_loss: false"):
        train(load_config(None, {**base, **over}))


def test_usage_lists_every_checked_family():
    usage = (Path(__file__).parent.parent / "docs" / "USAGE.md").read_text(encoding="utf-8")
    section = usage.split("### Model families checked", 1)[1].split("\n### ", 1)[0]
    rows = {line.split("`")[1] for line in section.splitlines() if line.startswith("| `")}
    assert rows == set(FAMILIES)
