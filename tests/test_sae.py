"""SAE loading/validation and the steering math (add / clamp / ablate) on tiny random SAEs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tinymorph.steering.library import ADD_FRACTION, FALLBACK_NORM, FeatureLibrary
from tinymorph.steering.sae import SAEError, load_sae, validate_for_model
from tinymorph.steering.steering import (
    SteeringEntry,
    SteeringError,
    SteeringHooks,
    SteeringPlan,
    apply_layer_edit,
    feature_indices,
    feature_weights,
    parse_feature_ref,
    resolve_plan,
    steer_mask,
)
from tinymorph.steering.vectors import SteeringVector, save_vector

D_IN, D_SAE, LAYER = 16, 32, 2


def make_sae(folder: Path, *, rescale: bool = False, d_in: int = D_IN, hook: str = f"model.layers.{LAYER}",
             seed: int = 0) -> Path:
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    cfg = TopKSAEConfig(d_in=d_in, d_sae=D_SAE, k=4, rescale_acts_by_decoder_norm=rescale)
    cfg.metadata.hook_name = hook
    sae = TopKSAE(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
        sae.W_dec.mul_(torch.rand(D_SAE, 1) * 3 + 0.5)  # non-unit decoder rows on purpose
    sae.save_model(str(folder))
    return folder


@pytest.fixture
def sae_dir(tmp_path: Path) -> Path:
    return make_sae(tmp_path / "tiny")


def test_magnitude_convention_matches_sae_lens(sae_dir: Path, tmp_path: Path) -> None:
    """Our unit directions × magnitudes rebuild exactly what sae-lens decodes, for both TopK flavours."""
    for rescale in (False, True):
        folder = make_sae(tmp_path / f"r{rescale}", rescale=rescale)
        sae = load_sae(folder)
        x = torch.randn(10, D_IN)
        ours = sae.reconstruct(x)
        theirs = sae._sae.decode(sae._sae.encode(x))
        assert torch.allclose(ours, theirs, atol=1e-4)
        assert torch.allclose(sae.directions.norm(dim=-1), torch.ones(D_SAE), atol=1e-5)
        # the ReLU pre-activation of our encoder equals the magnitude wherever TopK keeps the feature
        mags = sae.encode(x)
        pre = torch.relu((x - sae.decoder_bias()) @ sae.enc + sae.b_enc)
        kept = mags > 0
        assert torch.allclose(mags[kept], pre[kept], atol=1e-4)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(SAEError, match="not found"):
        load_sae(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SAEError, match="not an sae-lens SAE folder"):
        load_sae(tmp_path / "empty")
    bad = make_sae(tmp_path / "bad")
    (bad / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(SAEError, match="could not load"):
        load_sae(bad)
    nolayer = make_sae(tmp_path / "nolayer", hook="embed")
    with pytest.raises(SAEError, match="cannot tell the layer"):
        load_sae(nolayer)
    with pytest.raises(SAEError, match="not available offline"):
        load_sae("no-such-release:no-such-id")


def test_validate_for_model(sae_dir: Path) -> None:
    sae = load_sae(sae_dir)
    validate_for_model(sae, D_IN, 4)
    with pytest.raises(SAEError, match="different model"):
        validate_for_model(sae, 576, 30)
    with pytest.raises(SAEError, match="layers 0..1"):
        validate_for_model(sae, D_IN, 2)


def test_stats_give_max_activation(sae_dir: Path) -> None:
    max_act = [float(i) for i in range(D_SAE)]  # feature 0 is dead: gets the median of live ones
    (sae_dir / "labels.json").write_text(json.dumps({"max_act": max_act, "features": []}))
    sae = load_sae(sae_dir)
    assert sae.has_stats and sae.max_activation(5) == 5.0
    assert sae.max_activation(0) == pytest.approx(float(torch.arange(1, D_SAE).float().median()))


def _library(sae_dir: Path, tmp_path: Path) -> FeatureLibrary:
    return FeatureLibrary({"tiny": str(sae_dir)}, vectors_dir=tmp_path / "vectors")


def test_add_math(sae_dir: Path, tmp_path: Path) -> None:
    """add: strength × (a fraction of the typical residual norm) along the unit decoder direction."""
    lib = _library(sae_dir, tmp_path)
    sae = lib.sae("tiny")
    plan = SteeringPlan((SteeringEntry("tiny:3", 2.0), SteeringEntry("tiny:7", -0.5)))
    resolved = resolve_plan(plan, lib, D_IN, 4)
    assert set(resolved) == {LAYER}
    unit = ADD_FRACTION * FALLBACK_NORM  # no labels with a measured norm: the fallback norm
    expected = 2.0 * unit * sae.direction(3) - 0.5 * unit * sae.direction(7)
    h = torch.randn(1, 5, D_IN)
    out = apply_layer_edit(h, resolved[LAYER])
    assert torch.allclose(out - h, expected.expand_as(h), atol=1e-4)




def test_a_features_add_is_shared_over_its_span_of_layers(sae_dir: Path, tmp_path: Path) -> None:
    """With a model attached, an SAE feature's `add` is split evenly over `feature_span` layers from
    its SAE's layer on (cut at the model's last layer); the same total push; clamp stays at its layer."""
    from tinymorph.steering.library import feature_span

    assert feature_span(30) == 5 and feature_span(4) == 1 and feature_span(1) == 1
    lib = _library(sae_dir, tmp_path)
    lib.feature_span = 3
    sae = lib.sae("tiny")
    one = ADD_FRACTION * FALLBACK_NORM * sae.direction(3)
    resolved = resolve_plan(SteeringPlan((SteeringEntry("tiny:3", 1.0),)), lib, D_IN, 8)
    assert set(resolved) == {LAYER, LAYER + 1, LAYER + 2}
    for layer in resolved:
        assert torch.allclose(resolved[layer].add, one / 3, atol=1e-5) and not resolved[layer].features
    cut = resolve_plan(SteeringPlan((SteeringEntry("tiny:3", 1.0),)), lib, D_IN, LAYER + 2)  # two layers left
    assert set(cut) == {LAYER, LAYER + 1} and torch.allclose(cut[LAYER].add, one / 2, atol=1e-5)
    moved = resolve_plan(SteeringPlan((SteeringEntry("tiny:3", 1.0, layer=0),)), lib, D_IN, 8)
    assert set(moved) == {0, 1, 2}  # a layer the user gives is where the span starts
    clamp = resolve_plan(SteeringPlan((SteeringEntry("tiny:3", 1.0, "clamp"),)), lib, D_IN, 8)
    assert set(clamp) == {LAYER} and clamp[LAYER].add is None
def test_clamp_uses_the_saes_own_encoding(sae_dir: Path, tmp_path: Path) -> None:
    """clamp sets the value the SAE itself reads (TopK included) and keeps the rest of the residual."""
    lib = _library(sae_dir, tmp_path)
    sae = lib.sae("tiny")
    i, strength = 4, 0.75
    resolved = resolve_plan(SteeringPlan((SteeringEntry(f"tiny:{i}", strength, "clamp"),)), lib, D_IN, 4)
    h = torch.randn(1, 40, D_IN) * 3
    out = apply_layer_edit(h, resolved[LAYER])
    current = sae.encode(h)[..., i]
    target = strength * sae.max_activation(i)
    assert torch.allclose(out - h, (target - current).unsqueeze(-1) * sae.direction(i), atol=1e-4)
    # clamp 0 is not skipped: it switches the feature off where it is on
    zero = resolve_plan(SteeringPlan((SteeringEntry(f"tiny:{i}", 0.0, "clamp"),)), lib, D_IN, 4)
    assert zero is not None
    off = apply_layer_edit(h, zero[LAYER])
    assert torch.allclose(off - h, (-current).unsqueeze(-1) * sae.direction(i), atol=1e-4)


def test_ablate_leaves_positions_where_the_feature_is_off_untouched(sae_dir: Path, tmp_path: Path) -> None:
    lib = _library(sae_dir, tmp_path)
    sae = lib.sae("tiny")
    i = 9
    h = torch.randn(1, 64, D_IN) * 2
    h[0, :8] += 6 * sae.direction(i)  # make it fire somewhere
    code = sae.encode(h)[..., i]
    on = code > 0
    pre = torch.relu((h - sae.decoder_bias()) @ sae.encoder_column(i) + sae.encoder_bias(i))
    assert bool(on.any()) and bool(((pre > 0) & ~on).any()), "test needs positions where only relu(pre) > 0"
    resolved = resolve_plan(SteeringPlan((SteeringEntry(f"tiny:{i}", 1.0, "ablate"),)), lib, D_IN, 4)
    out = apply_layer_edit(h, resolved[LAYER])
    assert torch.equal(out[~on], h[~on])  # bit-identical where the SAE says the feature is off
    assert torch.allclose((out - h)[on], -code[on].unsqueeze(-1) * sae.direction(i), atol=1e-4)
    half = resolve_plan(SteeringPlan((SteeringEntry(f"tiny:{i}", 0.5, "ablate"),)), lib, D_IN, 4)
    assert torch.allclose((apply_layer_edit(h, half[LAYER]) - h)[on], -0.5 * code[on].unsqueeze(-1) * sae.direction(i),
                          atol=1e-4)


def test_strength_zero_is_unsteered(sae_dir: Path, tmp_path: Path) -> None:
    lib = _library(sae_dir, tmp_path)
    for mode in ("add", "ablate"):
        assert resolve_plan(SteeringPlan((SteeringEntry("tiny:1", 0.0, mode),)), lib, D_IN, 4) is None
    assert resolve_plan(SteeringPlan(), lib, D_IN, 4) is None


def test_mask_skips_first_position_and_special_tokens() -> None:
    assert steer_mask([5, 6, 7], 10, frozenset({0, 1})) is None  # decode / later chunk: everything
    assert steer_mask([5, 1, 7], 10, frozenset({0, 1})).tolist() == [True, False, True]
    assert steer_mask([5, 6, 7], 0, frozenset({0, 1})).tolist() == [False, True, True]
    from tinymorph.steering.steering import LayerEdit

    h = torch.randn(1, 3, D_IN)
    out = apply_layer_edit(h, LayerEdit(add=torch.ones(D_IN)), torch.tensor([False, True, True]))
    assert torch.equal(out[0, 0], h[0, 0]) and torch.allclose(out[0, 1:], h[0, 1:] + 1)


def test_feature_references() -> None:
    assert parse_feature_ref("default:12") == ("default", "12")
    assert parse_feature_ref("vector:calm") == ("vector", "calm")
    assert parse_feature_ref("about  gardening") == ("concept", "about gardening")
    assert parse_feature_ref("concept:formal") == ("concept", "formal")
    assert parse_feature_ref("less hedging") == ("concept", "less hedging")
    assert parse_feature_ref("default:12+40+7") == ("default", "12+40+7")  # a group steered together
    assert parse_feature_ref("default:12+40*0.5+7*.25") == ("default", "12+40*0.5+7*.25")  # with weights
    assert feature_indices("12+40*0.5+7*.25") == [12, 40, 7]
    assert feature_weights("12+40*0.5+7*.25") == [1.0, 0.5, 0.25] and feature_weights("12+40") == [1.0, 1.0]
    for bad in ("", "default:12a", "tiny:x", "1234", "x" * 300, "default:12+", "default:+3", "default:1+1",
                "default:" + "+".join(map(str, range(9))), "default:1+2*", "default:1+2*x", "default:1+2*-1"):
        with pytest.raises(SteeringError):
            parse_feature_ref(bad)
    for bad, why in (("default:12*0.5", "a group member's share"), ("default:1+2*0", "weights must be"),
                     ("default:1+2*101", "weights must be"), ("default:1*1+1", "twice")):
        with pytest.raises(SteeringError, match=why):
            parse_feature_ref(bad)


def test_a_weighted_group_pushes_each_member_by_its_weight(sae_dir: Path, tmp_path: Path) -> None:
    """`tiny:3+7*0.25` adds the one push along the unit of d3 + 0.25·d7, shared by the members in
    that proportion (what search's fitted groups are); without weights the members count alike."""
    lib = _library(sae_dir, tmp_path)
    sae = lib.sae("tiny")
    weighted = sae.direction(3) + 0.25 * sae.direction(7)
    resolved = resolve_plan(SteeringPlan((SteeringEntry("tiny:3+7*0.25", 1.0),)), lib, D_IN, 4)
    push = ADD_FRACTION * FALLBACK_NORM
    assert torch.allclose(resolved[LAYER].add, push * weighted / weighted.norm(), atol=1e-4)
    members = lib.handles("tiny:3+7*0.25")
    assert members[1].add_scale == pytest.approx(0.25 * members[0].add_scale)
    assert torch.allclose(lib.handle("tiny:3+7*0.25").direction, weighted / weighted.norm(), atol=1e-5)
    plain = resolve_plan(SteeringPlan((SteeringEntry("tiny:3+7", 1.0),)), lib, D_IN, 4)
    assert not torch.allclose(plain[LAYER].add, resolved[LAYER].add)


def test_a_feature_pushes_the_tokens_the_model_writes_less(sae_dir: Path, tmp_path: Path) -> None:
    """An SAE feature's add gives the tokens a model writes `WRITTEN_SHARE` of the push the text it
    reads gets (`LayerEdit.written`, applied with `writing=True`); a vector pushes both alike."""
    from tinymorph.steering.library import WRITTEN_SHARE
    from tinymorph.steering.steering import LayerEdit, writes_differently

    save_vector(SteeringVector("calm", LAYER, torch.ones(D_IN) / D_IN**0.5, 2.0), tmp_path / "vectors")
    lib = FeatureLibrary({"tiny": str(sae_dir)}, vectors_dir=tmp_path / "vectors")
    feature = resolve_plan(SteeringPlan((SteeringEntry("tiny:3", 1.0),)), lib, D_IN, 4)
    assert 0 < WRITTEN_SHARE < 1 and writes_differently(feature)
    assert torch.allclose(feature[LAYER].written, WRITTEN_SHARE * feature[LAYER].add)
    h = torch.randn(1, 3, D_IN)
    assert torch.allclose(apply_layer_edit(h, feature[LAYER], writing=True) - h,
                          (WRITTEN_SHARE * feature[LAYER].add).expand_as(h), atol=1e-5)
    assert torch.allclose(apply_layer_edit(h, feature[LAYER]) - h, feature[LAYER].add.expand_as(h), atol=1e-5)
    vector = resolve_plan(SteeringPlan((SteeringEntry("vector:calm", 1.0),)), lib, D_IN, 4)
    assert not writes_differently(vector) and torch.equal(vector[LAYER].written, vector[LAYER].add)
    both = resolve_plan(SteeringPlan((SteeringEntry("tiny:3", 1.0), SteeringEntry("vector:calm", 1.0))), lib, D_IN, 4)
    assert torch.allclose(both[LAYER].written, feature[LAYER].written + vector[LAYER].add, atol=1e-5)
    assert not writes_differently({LAYER: LayerEdit(add=torch.ones(D_IN))})


def test_a_group_adds_along_its_summed_direction_and_clamps_each_member(sae_dir: Path, tmp_path: Path) -> None:
    """`tiny:3+7+9` at strength s adds s × (the one push) along the unit sum of the members' directions;
    clamp and ablate act on each member as the SAE reads it, leaving positions where all are off."""
    lib = _library(sae_dir, tmp_path)
    sae = lib.sae("tiny")
    members = [3, 7, 9]
    summed = sum(sae.direction(i) for i in members)
    resolved = resolve_plan(SteeringPlan((SteeringEntry("tiny:3+7+9", 1.5),)), lib, D_IN, 4)
    h = torch.randn(1, 6, D_IN)
    expected = 1.5 * ADD_FRACTION * FALLBACK_NORM * summed / summed.norm()
    assert torch.allclose(apply_layer_edit(h, resolved[LAYER]) - h, expected.expand_as(h), atol=1e-4)
    assert lib.handle("tiny:3+7+9").direction.norm() == pytest.approx(1.0)
    h = torch.randn(1, 64, D_IN) * 2
    ablated = resolve_plan(SteeringPlan((SteeringEntry("tiny:3+7+9", 1.0, "ablate"),)), lib, D_IN, 4)
    assert [f.kind for f in ablated[LAYER].features] == ["ablate"] * 3
    out = apply_layer_edit(h, ablated[LAYER])
    off = (sae.encode(h)[..., members] == 0).all(-1)
    assert bool(off.any()) and torch.equal(out[off], h[off])
    with pytest.raises(SteeringError, match="features 0..31"):
        resolve_plan(SteeringPlan((SteeringEntry("tiny:3+32", 1.0),)), lib, D_IN, 4)


def test_described_concepts_need_the_model(sae_dir: Path, tmp_path: Path) -> None:
    lib = _library(sae_dir, tmp_path)
    with pytest.raises(SteeringError, match="needs the model"):
        resolve_plan(SteeringPlan((SteeringEntry("about the sea", 1.0),)), lib, D_IN, 4)


def test_gated_and_jumprelu_saes_load_and_steer_exactly(tmp_path: Path) -> None:
    from sae_lens import GatedSAE, GatedSAEConfig, JumpReLUSAE, JumpReLUSAEConfig

    for cls, cfg_cls in ((GatedSAE, GatedSAEConfig), (JumpReLUSAE, JumpReLUSAEConfig)):
        torch.manual_seed(0)
        cfg = cfg_cls(d_in=D_IN, d_sae=D_SAE)
        cfg.metadata.hook_name = f"model.layers.{LAYER}"
        sae = cls(cfg)
        with torch.no_grad():
            for p in sae.parameters():
                p.normal_()
        folder = tmp_path / cls.__name__
        sae.save_model(str(folder))
        lib = FeatureLibrary({"g": str(folder)})
        loaded = lib.sae("g")
        h = torch.randn(1, 32, D_IN) * 3
        code = loaded.encode(h)
        i = int(code.gt(0).sum((0, 1)).argmax())
        on = code[..., i] > 0
        resolved = resolve_plan(SteeringPlan((SteeringEntry(f"g:{i}", 1.0, "ablate"),)), lib, D_IN, 4)
        out = apply_layer_edit(h, resolved[LAYER])
        assert torch.equal(out[~on], h[~on])
        assert not torch.equal(out[on], h[on])


def test_unsupported_architecture_is_one_line(tmp_path: Path) -> None:
    folder = make_sae(tmp_path / "odd")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["architecture"] = "transcoder"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises((SAEError, SteeringError)) as info:
        FeatureLibrary({"odd": str(folder)}).sae("odd")
    assert "\n" not in str(info.value)


def test_resolve_errors(sae_dir: Path, tmp_path: Path) -> None:
    lib = _library(sae_dir, tmp_path)
    cases = [
        (SteeringEntry("tiny:999", 1.0), "features 0..31"),
        (SteeringEntry("nosuch:1", 1.0), "unknown SAE"),
        (SteeringEntry("tiny:x", 1.0), "bad feature id"),
        (SteeringEntry("tiny:1", 1e6), "out of range"),
        (SteeringEntry("tiny:1", float("nan")), "out of range"),
        (SteeringEntry("tiny:1", 2.0, "ablate"), r"\[0, 1\]"),
        (SteeringEntry("tiny:1", 1.0, "boost"), "unknown mode"),  # type: ignore[arg-type]
        (SteeringEntry("tiny:1", 1.0, layer=9), "layer 9"),
        (SteeringEntry("vector:nope", 1.0), "unknown vector"),
    ]
    for entry, message in cases:
        with pytest.raises(SteeringError, match=message):
            resolve_plan(SteeringPlan((entry,)), lib, D_IN, 4)
    with pytest.raises(SteeringError, match="different model"):
        resolve_plan(SteeringPlan((SteeringEntry("tiny:1", 1.0),)), lib, 32, 4)


def test_vectors_steer_like_features(sae_dir: Path, tmp_path: Path) -> None:
    lib = _library(sae_dir, tmp_path)
    direction = torch.zeros(D_IN)
    direction[0] = 1.0
    save_vector(SteeringVector("calm", 1, direction, 4.0, {"model": "test"}), tmp_path / "vectors")
    plan = SteeringPlan((SteeringEntry("vector:calm", 0.5), SteeringEntry("tiny:2", 1.0)))
    resolved = resolve_plan(plan, lib, D_IN, 4)
    assert set(resolved) == {1, LAYER}  # several layers in one plan
    h = torch.zeros(1, 2, D_IN)
    # same unit as features: strength × fraction of the residual norm (no norm measured: fallback)
    assert torch.allclose(apply_layer_edit(h, resolved[1])[0, 0], 0.5 * ADD_FRACTION * FALLBACK_NORM * direction)
    # clamp on a vector sets the projection onto its direction
    clamp = resolve_plan(SteeringPlan((SteeringEntry("vector:calm", 1.0, "clamp"),)), lib, D_IN, 4)
    h = torch.randn(1, 3, D_IN).abs()
    out = apply_layer_edit(h, clamp[1])
    assert torch.allclose(out[..., 0], torch.full((1, 3), 4.0), atol=1e-5)
    assert torch.allclose(out[..., 1:], h[..., 1:])


def test_hooks_apply_the_active_plan(sae_dir: Path, tmp_path: Path) -> None:
    """The hooks edit only inside `active(...)`, on every forward (prompt and 1-token steps)."""
    lib = _library(sae_dir, tmp_path)
    layers = torch.nn.ModuleList(torch.nn.Identity() for _ in range(4))
    hooks = SteeringHooks(layers)
    resolved = resolve_plan(SteeringPlan((SteeringEntry("tiny:3", 1.0),)), lib, D_IN, 4)

    def run(x):
        for layer in layers:
            x = layer(x)
        return x

    x = torch.randn(1, 1, D_IN)
    assert torch.equal(run(x), x)
    with hooks.active(resolved):
        steered = run(x)
        with hooks.active(resolved):  # nested: the edit applies once, not once per level
            assert torch.equal(run(x), steered)
        with hooks.active(None):
            assert torch.equal(run(x), x)
    assert not torch.equal(steered, x)
    assert torch.equal(run(x), x)
    assert not any(layer._forward_hooks for layer in layers)  # unsteered forwards keep the fast path


def test_library_caches_saes(sae_dir: Path, tmp_path: Path) -> None:
    lib = _library(sae_dir, tmp_path)
    assert lib.sae("tiny") is lib.sae("tiny")


def test_a_calibration_does_not_outlive_its_sae(tmp_path: Path) -> None:
    """A stored calibration of `tiny:3` applies to that SAE only: a new SAE under the same name (as when
    the shipped default is replaced) starts from the default push again."""
    from tinymorph.steering.calibration import CalibrationStore

    store = CalibrationStore(tmp_path / "calibrations.json")
    old = make_sae(tmp_path / "old", seed=1)
    lib = FeatureLibrary({"tiny": str(old)}, calibrations=store)
    store.set(lib.model_key, lib._calibration_ref("tiny:3"), LAYER, 0.2)
    assert lib.add_fraction("tiny:3", LAYER) == 0.2
    assert FeatureLibrary({"tiny": str(old)}, calibrations=store).add_fraction("tiny:3", LAYER) == 0.2
    new = make_sae(tmp_path / "new", seed=2)
    assert FeatureLibrary({"tiny": str(new)}, calibrations=store).add_fraction("tiny:3", LAYER) == ADD_FRACTION


def test_a_group_is_calibrated_along_its_own_direction(tmp_path: Path) -> None:
    """`steer add tiny:3+7` reads (and makes) a calibration of the group itself, not of a member: a
    member's calibrated push says nothing about a direction made mostly of the others."""
    from tinymorph.steering.calibration import CalibrationStore

    store = CalibrationStore(tmp_path / "calibrations.json")
    lib = FeatureLibrary({"tiny": str(make_sae(tmp_path / "tiny"))}, calibrations=store)
    store.set(lib.model_key, lib._calibration_ref("tiny:3"), LAYER, 0.2)
    assert lib.add_fraction("tiny:3", LAYER) == 0.2 and lib.add_fraction("tiny:3+7", LAYER) == ADD_FRACTION
    store.set(lib.model_key, lib._calibration_ref("tiny:3+7"), LAYER, 0.3)
    assert lib.add_fraction("tiny:3+7", LAYER) == 0.3 and lib.add_fraction("tiny:3", LAYER) == 0.2
    sae = lib.sae("tiny")
    summed = sae.direction(3) + sae.direction(7)
    push = sum(h.add_scale * h.direction for h in lib.handles("tiny:3+7"))
    assert torch.allclose(push, 0.3 * FALLBACK_NORM * summed / summed.norm(), atol=1e-4)
