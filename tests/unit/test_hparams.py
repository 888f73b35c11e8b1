"""Hyperparameters: one self-validating definition per method, typed presets, the registry."""

from __future__ import annotations

import dataclasses

import pytest

from lmedit.cli import main
from lmedit.config import Config
from lmedit.core.targets import TargetConfig
from lmedit.errors import HyperparameterError
from lmedit.methods import EditHParams, get_method, method_names, register_method
from lmedit.methods.memit import MemitHParams
from lmedit.presets import PRESETS

ALL_METHODS = ("alphaedit", "emmet", "encore", "memit", "rome")


def test_every_method_is_registered():
    assert tuple(method_names()) == ALL_METHODS


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_preset_and_method_builds(preset, method):
    """Presets are built (so validated) at import; each entry is its method's dataclass with its layers."""
    p = PRESETS[preset]
    if method not in p.hparams:
        pytest.skip(f"preset {preset} has no {method} entry")
    hp = p.hparams[method]
    assert type(hp) is get_method(method).hparams_cls
    assert all(0 <= l < p.n_layers for l in hp.layers)
    assert method in p.sources or "all" in p.sources
    assert hp.replace() == hp  # a round trip through from_dict validates the same values again


def test_presets_cover_the_batch_methods():
    for p in PRESETS.values():
        assert {"rome", "memit", "emmet"} <= set(p.hparams)


def test_target_settings_are_defined_once():
    """The target-vector fields live in TargetConfig only; every method's hparams inherit them."""
    target_fields = {f.name for f in dataclasses.fields(TargetConfig)}
    own = {f.name for f in dataclasses.fields(EditHParams)} - target_fields
    assert target_fields < {f.name for f in dataclasses.fields(EditHParams)}
    assert not own & target_fields
    for name in ALL_METHODS:
        assert issubclass(get_method(name).hparams_cls, TargetConfig)


@pytest.mark.parametrize("field,value,match", [
    ("v_lr", "abc", "v_lr = 'abc': must be a float"),
    ("v_lr", 0.0, "v_lr = 0.0: must be > 0"),
    ("v_num_grad_steps", 2.5, "must be a whole number"),
    ("v_num_grad_steps", 0, ">= 1"),
    ("mom2_adjustment", 3, "must be a bool"),
    ("compute_dtype", "fp8", "one of model, auto, float32, bfloat16, float16"),
    ("layers", [5, 4], "strictly increasing"),
    ("layers", "4,5", "must be a list"),
    ("context_templates", [[1, 5]], "length >= 2"),
    ("early_stop", "never", "one of loss, most_probable"),
    ("nope", 1, "unknown hyperparameter"),
])
def test_bad_values_are_refused_by_name(field, value, match):
    with pytest.raises(HyperparameterError, match=match):
        MemitHParams().replace(**{field: value})


def test_values_are_coerced_and_frozen():
    hp = MemitHParams(layers=[4, 5], v_num_grad_steps=10.0, context_templates=[[10, 5]])
    assert hp.layers == (4, 5) and hp.v_num_grad_steps == 10 and isinstance(hp.v_num_grad_steps, int)
    assert hp.context_templates == ((10, 5),)
    with pytest.raises(dataclasses.FrozenInstanceError):
        hp.v_lr = 1.0  # type: ignore[misc]
    assert hp.to_dict()["layers"] == [4, 5]


def test_every_field_has_help():
    for name in ALL_METHODS:
        for field, _, text in get_method(name).hparams_cls.describe():
            assert len(text) > 5, f"{name}.{field} has no help text"


def test_register_method_validates():
    with pytest.raises(HyperparameterError, match="registered already"):
        register_method("MEMIT", MemitHParams)
    with pytest.raises(HyperparameterError, match="EditHParams subclass"):
        register_method("plain", Config)  # type: ignore[arg-type]

    @dataclasses.dataclass(frozen=True)
    class NoSolver(EditHParams):
        pass

    with pytest.raises(HyperparameterError, match="does not define solver"):
        register_method("nosolver", NoSolver)
    assert get_method(" Memit ").name == "memit"  # names are case-insensitive


def test_list_hparams_prints_every_field(capsys):
    assert main(["edit", "--list-hparams"]) == 0
    out = capsys.readouterr().out
    for name in ALL_METHODS:
        assert f"{name}: {get_method(name).summary}" in out
    assert "nullspace_energy = 0.1" in out and "mpes_extra_steps = 2" in out
    assert out.count("  v_lr = ") == len(ALL_METHODS)
