"""Methods own their targets: one family asked by the trainer's loss, the fused loss and the
offline cache builder (deltakd.targets), with the α = 0 rule and the divergence rule in one
place. The `student_anchor` variant shows what a new target family costs: its catalogue entry
and this test; every path below picks it up."""

from __future__ import annotations

import pytest
import torch

from deltakd.losses import kd_loss, parallelogram_target
from deltakd.references.base import ReferenceBatch
from deltakd.train.config import load_config
from deltakd.train.methods import StudentBatch, get_method
from deltakd.train.trainer import RoleLogits

MINIMAL = {"student_raw": "s", "teacher_ft": "f", "teacher_raw": "r", "output_dir": "o"}
B, T, V, H = 2, 7, 29, 6


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    head = torch.nn.Linear(H, V, bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g, dtype=torch.float64))
    ref_logits = {r: torch.randn(B, T, V, generator=g, dtype=torch.float64)
                  for r in ("teacher_ft", "teacher_raw", "student_raw")}  # fmt: skip
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T - 1, generator=g) > 0.3
    return hidden, head, ref_logits, ids, mask


def _batch(hidden, head, ids, mask, *, fused: bool) -> StudentBatch:
    h = hidden[:, :-1]  # (B, T-1, H)
    logits = None if fused else head(h)  # (B, T-1, V)
    return StudentBatch(ids, torch.ones_like(ids), logits, ids[:, 1:], mask, {},
                        student_hidden=h if fused else None)  # fmt: skip


def _refs(ref_logits) -> RoleLogits:
    return RoleLogits(ReferenceBatch(logits=dict(ref_logits)), {}, V, torch.device("cpu"))


def test_a_new_variant_works_through_every_path():
    from deltakd.references.cache.build import reference_roles, target_logits
    from deltakd.targets import target_of

    cfg = load_config(None, {**MINIMAL, "method": "parallelogram", "variant": "student_anchor",
                             "alpha": 0.7, "temperature": 2.0})  # fmt: skip
    target = target_of(cfg)
    method = get_method(cfg.method)
    assert set(method.reference_roles(cfg)) == {"student_raw", "teacher_ft", "teacher_raw"}
    assert set(reference_roles(cfg)) == set(method.reference_roles(cfg))  # the cache agrees
    hidden, head, ref_logits, ids, mask = _inputs()
    zs = {r: z[:, :-1] for r, z in ref_logits.items()}  # (B, T-1, V)
    want_z = zs["student_raw"] + 0.7 * (zs["teacher_ft"] - zs["teacher_raw"])

    # The cache stores this target...
    torch.testing.assert_close(target_logits(cfg, zs.__getitem__), want_z)
    assert (
        target.describe(8, 2.0)["formula"]
        == "z* = z_student_raw + α·(z_teacher_ft − z_teacher_raw)"
    )
    # ...the trainer's loss distils towards it...
    batch = _batch(hidden, head, ids, mask, fused=False)
    got = method.compute(batch, _refs(ref_logits), cfg).total
    want = kd_loss(batch.student_logits, want_z, temperature=2.0, mask=mask, reduction="sum")
    torch.testing.assert_close(got, want)
    # ...and so does the fused loss, straight from hidden states.
    fused = method.fused_terms(_batch(hidden, head, ids, mask, fused=True), _refs(ref_logits),
                               cfg.replace(fused_loss=True), head)  # fmt: skip
    torch.testing.assert_close(fused.total, want)
    # At α = 1 it is Delta-KD's target.
    delta = target_of(cfg.replace(method="delta_kd", alpha=1.0)).logits(zs.__getitem__)
    torch.testing.assert_close(target_of(cfg.replace(alpha=1.0)).logits(zs.__getitem__), delta)


@pytest.mark.parametrize("method", ["delta_kd", "parallelogram"])
def test_alpha_zero_is_plain_kd_on_teacher_ft_everywhere(method):
    from deltakd.references.cache.build import target_logits
    from deltakd.targets import target_of

    cfg = load_config(None, {**MINIMAL, "method": method, "variant": "delta", "alpha": 0.0})
    target = target_of(cfg)
    assert get_method(method).reference_roles(cfg) == ("teacher_ft",) == target.roles
    assert target.fused_args() == {"variant": None, "target_role": "teacher_ft",
                                   "divergence": "fkl"}  # fmt: skip
    _, _, ref_logits, _, _ = _inputs()
    torch.testing.assert_close(target_logits(cfg, ref_logits.__getitem__),
                               ref_logits["teacher_ft"])  # fmt: skip


def test_explicit_fkl_is_kept_for_a_variant_with_its_own_divergence():
    """Defect: `divergence: fkl` written in the config was treated as unset for delta_rkl."""
    hidden, head, ref_logits, ids, mask = _inputs(1)
    batch = _batch(hidden, head, ids, mask, fused=False)
    refs = _refs(ref_logits)
    zs = {r: z[:, :-1] for r, z in ref_logits.items()}
    z = parallelogram_target("delta", batch.student_logits, zs, alpha=1.0)
    losses = {}
    for name, extra in (("explicit", {"divergence": "fkl"}), ("unset", {})):
        cfg = load_config(None, {**MINIMAL, "method": "parallelogram", "variant": "delta_rkl",
                                 **extra})  # fmt: skip
        losses[name] = get_method("parallelogram").kd_sum(batch, refs, cfg)
    fkl = kd_loss(batch.student_logits, z, divergence="fkl", mask=mask, reduction="sum")
    rkl = kd_loss(batch.student_logits, z, divergence="rkl", mask=mask, reduction="sum")
    torch.testing.assert_close(losses["explicit"], fkl)
    torch.testing.assert_close(losses["unset"], rkl)  # the variant's own divergence


def test_the_cache_package_asks_the_target_not_the_method_name():
    from deltakd.errors import ConfigError
    from deltakd.references.cache.build import check_cacheable

    base = {**MINIMAL, "method": "parallelogram"}
    check_cacheable(load_config(None, {**base, "variant": "student_anchor"}))
    check_cacheable(load_config(None, {**base, "variant": "delta_rkl", "divergence": "fkl"}))
    with pytest.raises(ConfigError, match=r"live student \(student_sg\)"):
        check_cacheable(load_config(None, {**base, "variant": "live_anchor_sg"}))
    with pytest.raises(ConfigError, match="divergence 'rkl'"):
        check_cacheable(load_config(None, {**base, "variant": "delta_rkl"}))
    with pytest.raises(ConfigError, match="method 'sft' cannot train from an offline cache"):
        check_cacheable(load_config(None, {**MINIMAL, "method": "sft"}))


def test_delta_floor_reaches_the_loss_the_fused_loss_and_the_cache():
    from deltakd.losses import delta_target
    from deltakd.references.cache.build import target_logits
    from deltakd.targets import target_of

    cfg = load_config(None, {**MINIMAL, "method": "delta_kd", "alpha": 0.8, "temperature": 2.0,
                             "delta_floor": -4.0})  # fmt: skip
    method = get_method(cfg.method)
    hidden, head, ref_logits, ids, mask = _inputs(2)
    zs = {r: z[:, :-1] for r, z in ref_logits.items()}  # (B, T-1, V)
    want_z = delta_target(zs["teacher_ft"], zs["teacher_raw"], zs["student_raw"], 0.8,
                          floor=-4.0, temperature=2.0)  # fmt: skip
    plain_z = delta_target(zs["teacher_ft"], zs["teacher_raw"], zs["student_raw"], 0.8)
    # The cache stores the floored target (the floor acts on log-probabilities at τ)...
    torch.testing.assert_close(target_logits(cfg, zs.__getitem__), want_z)
    assert target_of(cfg).describe(8, 2.0)["delta_floor"] == -4.0
    assert "delta_floor" not in target_of(cfg.replace(delta_floor=None)).describe(8, 2.0)
    # ...the trainer's loss and the fused loss distil towards it.
    batch = _batch(hidden, head, ids, mask, fused=False)
    got = method.compute(batch, _refs(ref_logits), cfg).total
    want = kd_loss(batch.student_logits, want_z, temperature=2.0, mask=mask, reduction="sum")
    plain = kd_loss(batch.student_logits, plain_z, temperature=2.0, mask=mask, reduction="sum")
    torch.testing.assert_close(got, want)
    assert abs(float((want - plain).detach())) > 1e-3  # the floor bites on these logits
    fused = method.fused_terms(_batch(hidden, head, ids, mask, fused=True), _refs(ref_logits),
                               cfg.replace(fused_loss=True), head)  # fmt: skip
    torch.testing.assert_close(fused.total, want)
    # At α = 0 the target is teacher_ft alone, floor or not.
    assert target_of(cfg.replace(alpha=0.0)).single_role == "teacher_ft"


def test_delta_floor_validates():
    from deltakd.errors import ConfigError

    base = {**MINIMAL, "teacher_ft2": "f2"}
    load_config(None, {**base, "method": "parallelogram", "variant": "multi_teacher",
                       "delta_floor": -8})  # fmt: skip
    for value in (0.0, 3.0, "nan"):
        with pytest.raises(ConfigError, match=r"'delta_floor'.*negative log-probability"):
            load_config(None, {**base, "delta_floor": value})
    for extra, why in (
        ({"method": "kd"}, "method 'kd'"),
        ({"method": "parallelogram", "variant": "student_anchor"}, "variant 'student_anchor'"),
        ({"method": "parallelogram", "variant": "live_shift_sg"}, "variant 'live_shift_sg'"),
        ({"method": "sft"}, "method 'sft' has no Delta-KD target"),
        ({"method": "minillm"}, "method 'minillm' has no Delta-KD target"),
    ):
        with pytest.raises(ConfigError, match=f"'delta_floor'.*{why}"):
            load_config(None, {**base, **extra, "delta_floor": -8.0})
