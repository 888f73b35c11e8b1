"""EasyEdit inputs: request fields, hyperparameter YAML files mapped (unknown fields refused by name,
bad files with clear errors), and EasyEdit's metrics against a hand count."""

from __future__ import annotations

import logging

import pytest

import lmedit
from lmedit.easyedit import load_hparams, requests
from lmedit.errors import HyperparameterError, RequestError
from lmedit.methods.alphaedit import AlphaEditHParams
from lmedit.methods.emmet import EmmetHParams
from lmedit.methods.memit import MemitHParams
from lmedit.methods.rome import RomeHParams

MEMIT_YAML = """\
alg_name: "MEMIT"
model_name: "./hugging_cache/llama-2-7b"
stats_dir: "./data/stats"
device: 1
layers: [4, 5, 6, 7, 8]
clamp_norm_factor: 4
layer_selection: "all"
fact_token: "subject_last"
v_num_grad_steps: 25
v_lr: 5e-1
v_loss_layer: 31
v_weight_decay: 1e-3
kl_factor: 0.0625
mom2_adjustment: true
mom2_update_weight: 15000
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
"""


def _write(tmp_path, text, name="h.yaml"):
    (tmp_path / name).write_text(text)
    return tmp_path / name


def test_memit_yaml_maps_and_warns_about_what_it_ignores(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lmedit.easyedit"):
        hp = load_hparams(_write(tmp_path, MEMIT_YAML))
    assert isinstance(hp, MemitHParams)
    assert hp.layers == (4, 5, 6, 7, 8) and hp.clamp_norm_factor == 4.0 and hp.v_lr == 0.5
    assert hp.v_weight_decay == 1e-3 and hp.mom2_update_weight == 15000.0 and hp.mom2_dtype == "float32"
    warned = caplog.text
    for ignored in ("model_name", "device", "stats_dir", "rewrite_module_tmp", "mom2_dataset", "v_loss_layer"):
        assert ignored in warned


@pytest.mark.parametrize("text,cls,check", [
    ('alg_name: "ROME"\nlayers: [5]\ncontext_template_length_params: [[5, 10], [10, 10]]\nmom2_adjustment: false\n',
     RomeHParams, lambda hp: hp.context_templates == ((5, 10), (10, 10)) and not hp.mom2_adjustment),
    ('alg_name: "EMMET"\nlayers: [4, 5]\nemmet_lambda: 0.1\nupdate_norm_lambda: 0\nmom2_update_weight: 1\n',
     EmmetHParams, lambda hp: hp.emmet_lambda == 0.1 and hp.layers == (4, 5)),
    ('alg_name: "AlphaEdit"\nlayers: [4, 5]\nL2: 10\nnullspace_threshold: 2e-2\nP_loc: "./p.pt"\n',
     AlphaEditHParams, lambda hp: hp.alphaedit_l2 == 10.0 and hp.nullspace_energy == AlphaEditHParams().nullspace_energy),
])
def test_each_method_maps(tmp_path, text, cls, check):
    hp = load_hparams(_write(tmp_path, text))
    assert type(hp) is cls and check(hp)


def test_refusals_name_the_problem(tmp_path):
    with pytest.raises(HyperparameterError, match="unknown field 'mystery_knob'"):
        load_hparams(_write(tmp_path, MEMIT_YAML + "mystery_knob: 3\n"))
    with pytest.raises(HyperparameterError, match="emmet_lambda"):  # an EMMET field in a MEMIT file
        load_hparams(_write(tmp_path, MEMIT_YAML + "emmet_lambda: 0.1\n"))
    with pytest.raises(HyperparameterError, match="alg_name 'MEND'"):
        load_hparams(_write(tmp_path, 'alg_name: "MEND"\n'))
    with pytest.raises(HyperparameterError, match="fact_token='last'"):
        load_hparams(_write(tmp_path, MEMIT_YAML.replace('fact_token: "subject_last"', 'fact_token: "last"')))
    with pytest.raises(HyperparameterError, match="does not exist"):
        load_hparams(tmp_path / "missing.yaml")
    with pytest.raises(HyperparameterError, match="not readable YAML"):
        load_hparams(_write(tmp_path, "alg_name: [unclosed\n"))
    with pytest.raises(HyperparameterError, match="expected a mapping"):
        load_hparams(_write(tmp_path, "- just\n- a list\n"))
    with pytest.raises(HyperparameterError, match="layers"):
        load_hparams(_write(tmp_path, MEMIT_YAML.replace("layers: [4, 5, 6, 7, 8]", "layers: [8, 4]")))


def test_request_fields():
    reqs = requests(prompts=["Who was the designer of Lahti Town Hall?", "The mother tongue of Danielle Darrieux is"],
                    target_new=["Alfred Lahti", "English"], subject=["Lahti Town Hall", "Danielle Darrieux"],
                    ground_truth=["Eliel Saarinen", "French"],
                    rephrase_prompts=["Which designer was responsible for Lahti Town Hall?", "Danielle Darrieux spoke"],
                    locality_inputs={"neighborhood": {"prompt": ["Who designed the Eiffel Tower?", "The mother tongue of "
                                                                 "Thomas Joannes Stieltjes is"],
                                                      "ground_truth": ["Gustave Eiffel", ["Dutch"]]}})
    a, b = reqs
    assert a.prompt == "Who was the designer of {}?" and a.subject == "Lahti Town Hall" and a.target_true == "Eliel Saarinen"
    assert a.paraphrase_prompts == ("Which designer was responsible for Lahti Town Hall?",)
    assert a.neighborhood_prompts == ("Who designed the Eiffel Tower?",) and a.neighborhood_target == "Gustave Eiffel"
    assert b.text == "The mother tongue of Danielle Darrieux is" and b.neighborhood_target == "Dutch"
    one = requests(prompts="The capital of France is", target_new="Rome", subject="France")
    assert one[0].prompt == "The capital of {} is" and one[0].target_true is None


def test_request_refusals():
    with pytest.raises(RequestError, match="subject is required"):
        requests(prompts=["a b"], target_new=["c"])
    with pytest.raises(RequestError, match="does not occur"):
        requests(prompts=["a b"], target_new=["c"], subject=["z"])
    with pytest.raises(RequestError, match="one entry per prompt"):
        requests(prompts=["a b", "a c"], target_new=["c"], subject=["a", "a"])
    with pytest.raises(RequestError, match="different answers"):
        requests(prompts=["a b"], target_new=["c"], subject=["a"],
                 locality_inputs={"x": {"prompt": ["p"], "ground_truth": ["u"]}, "y": {"prompt": ["q"], "ground_truth": ["v"]}})
    with pytest.raises(RequestError, match="locality_inputs"):
        requests(prompts=["a b"], target_new=["c"], subject=["a"], locality_inputs={"x": {"prompt": ["p"]}})
