"""Chat form: prompts wrapped as the user turn of the tokenizer's own template with the answer in
the assistant turn (checked token by token), chat metrics against a hand-made teacher-forced
pass, and chat-form editing (targets and keys also in the chat form) raising the chat-form
probability of target_new."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lmedit
from helpers import REQUESTS, edit_kwargs, spd_covariances
from lmedit.chat import chat_groups, chat_prompt
from lmedit.core.layout import build_layout
from lmedit.core.tokens import encode_continuations, encode_subject_prompts
from lmedit.errors import RequestError
from lmedit.evaluate.runner import evaluate_requests, record_scores

PROMPT = "The capital of France is"


def test_chat_prompt_puts_the_answer_in_the_assistant_turn(tokenizer):
    text = chat_prompt(tokenizer, PROMPT)
    messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "Paris"}]
    full = tokenizer.apply_chat_template(messages, tokenize=False)  # the template's own rendering of the answer
    assert full.startswith(text + "Paris") and text.endswith("<|im_start|>assistant\n")
    ((p, c),) = encode_continuations(tokenizer, [text], ["Paris"])
    assert p == tokenizer(text)["input_ids"]
    assert c == tokenizer("Paris", add_special_tokens=False)["input_ids"]  # no leading space inside the turn
    assert p + c == tokenizer(text + "Paris")["input_ids"]
    assert tokenizer.decode(p[-4:]).endswith("<|im_start|>assistant\n")


def test_templates_without_trailing_whitespace_read_the_answer_after_a_space(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    text = chat_prompt(tok, PROMPT)
    assert text == f"{tok.bos_token}[INST] {PROMPT} [/INST]"  # the tokenizer adds no BOS, so the text keeps it
    ((p, c),) = encode_continuations(tok, [text], ["Paris"])
    assert p + c == tok(text + " Paris")["input_ids"]


def test_a_tokenizer_without_a_template_is_refused(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.raises(RequestError, match="chat template"):
        chat_prompt(tok, PROMPT)


def test_chat_metrics_match_a_hand_made_pass(fresh, tokenizer):
    model = fresh("llama")
    req = lmedit.EditRequest("The capital of {} is", "France", "Rome", "Paris",
                             paraphrase_prompts=["France has its capital in"],
                             neighborhood_prompts=["The capital of Spain is"], neighborhood_answer="Madrid")
    (rec,) = record_scores(model, tokenizer, [req], chat=True)
    for prompts, group in (([req.text], rec.rewrite), (req.paraphrase_prompts, rec.paraphrase)):
        for p, got in zip(prompts, group):
            text = chat_prompt(tokenizer, p)
            ids = tokenizer(text)["input_ids"]
            for target, nll in ((req.target_new, got.nll_new), (req.target_true, got.nll_true)):
                c = tokenizer(target, add_special_tokens=False)["input_ids"]
                with torch.no_grad():
                    logits = model(torch.tensor([ids + c])).logits[0].double()
                lp = torch.log_softmax(logits[len(ids) - 1:len(ids) + len(c) - 1], -1).gather(1, torch.tensor(c)[:, None])
                assert nll == pytest.approx(float(-lp.mean()), abs=1e-4)
    m = evaluate_requests(model, tokenizer, [req], chat=True)
    assert {"chat_efficacy_score", "chat_paraphrase_score", "chat_neighborhood_score", "efficacy_score"} <= set(m)


def test_chat_layout_reads_chat_targets_without_the_space(tokenizer):
    groups = [["{}"]]
    templates = [t for g in groups + chat_groups(tokenizer, groups) for t in g]
    lay = build_layout(tokenizer, REQUESTS[:1], templates)
    plain = lay.loss_tok[lay.loss_rows == 0].tolist()
    chat = lay.loss_tok[lay.loss_rows == 1].tolist()
    assert plain == tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    assert chat == tokenizer("Paris", add_special_tokens=False)["input_ids"]
    assert lay.loss_w.sum().item() == pytest.approx(1.0)  # one request: weights average over both forms


@pytest.mark.parametrize("method", ["rome", "emmet"])
def test_chat_form_editing_optimises_and_reads_keys_in_both_forms(method, fresh, tokenizer):
    """With chat_prompts="on" the targets are optimised on the chat-wrapped templates too (their
    provenance lists them) and the edit still lands in the plain form. (Whether it lands in the chat
    form is a property of a trained model: tests/model/test_embedded.py measures it there.)"""
    from helpers import target_logprob

    kw = {**edit_kwargs(method), "chat_prompts": "on"}
    model = fresh("llama")
    before = [target_logprob(model, tokenizer, r) for r in REQUESTS]
    ed = lmedit.Editor(model, tokenizer, method, covariances=spd_covariances(model, kw["layers"]), **kw)
    res = ed.edit(REQUESTS)
    flat = [t for g in ed.context() for t in g]
    assert ed.template_groups() == ed.context() + chat_groups(tokenizer, ed.context())
    if method != "rome":  # (ROME's per-request targets keep no joint provenance)
        assert res.targets.provenance["templates"] == flat + [chat_prompt(tokenizer, t) for t in flat]
    after = [target_logprob(model, tokenizer, r) for r in REQUESTS]
    assert all(a > b + math.log(10) for a, b in zip(after, before))


def test_auto_follows_the_tokenizer(fresh, tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    model = fresh("llama")
    kw = {k: v for k, v in edit_kwargs("emmet").items() if k != "chat_prompts"}
    with_template = lmedit.Editor(model, tokenizer, "emmet", covariances=spd_covariances(model, kw["layers"]),
                                  chat_prompts="auto", **kw)
    without = lmedit.Editor(model, tok, "emmet", covariances=spd_covariances(model, kw["layers"]), chat_prompts="auto", **kw)
    assert len(with_template.template_groups()) == 2 * len(without.template_groups())
    forced = lmedit.Editor(model, tok, "emmet", covariances=spd_covariances(model, kw["layers"]), chat_prompts="on", **kw)
    with pytest.raises(RequestError, match="chat template"):
        forced.edit(REQUESTS)


def test_is_chat_form_tells_the_wrapped_prompts(tokenizer):
    from lmedit.chat import is_chat_form

    chat = is_chat_form(tokenizer)
    assert chat(chat_prompt(tokenizer, "{}")) and chat(chat_prompt(tokenizer, "A context. {}"))
    assert not chat("{}") and not chat("A context. {}")
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    assert not is_chat_form(tok)(chat_prompt(tokenizer, "{}"))  # no template: nothing is in its form


def test_layout_counts_the_chosen_templates_for_the_stop(tokenizer):
    templates = ["{}", chat_prompt(tokenizer, "{}")]
    lay = build_layout(tokenizer, REQUESTS, templates, counted=[True, False])
    plain_rows = torch.tensor([0, 2])  # request-major: request i's template t is sequence 2 i + t
    assert torch.equal(lay.loss_counted, torch.isin(lay.loss_rows, plain_rows))
    assert build_layout(tokenizer, REQUESTS, templates).loss_counted.all()
    for bad in ([True], [False, False]):
        with pytest.raises(ValueError, match="one flag per template"):
            build_layout(tokenizer, REQUESTS, templates, counted=bad)


def test_most_probable_stop_on_plain_prompts_waits_only_for_them(fresh, tokenizer):
    """mpes_prompts="plain": the chat rows are still optimised, but the stop reads only the plain ones,
    so each request stops no later than when it waits for every row, and only once target_new is the
    argmax of its plain prompts."""
    kw = {**edit_kwargs("emmet"), "chat_prompts": "on", "early_stop": "most_probable", "mpes_extra_steps": 0,
          "v_num_grad_steps": 25, "early_stop_loss": 1e-6}
    model = fresh("llama")
    ed = lmedit.Editor(model, tokenizer, "emmet", covariances=spd_covariances(model, kw["layers"]), **kw)
    every = ed.compute_targets(REQUESTS)
    plain = ed.compute_targets(REQUESTS, mpes_prompts="plain")
    assert (plain.steps <= every.steps).all() and (plain.steps < every.steps).any()
    assert (plain.steps < kw["v_num_grad_steps"]).any()  # stopped by the argmax, not by running out of steps
    assert every.provenance["config"] != plain.provenance["config"]  # reusing one for the other is refused
    assert plain.provenance["templates"] == every.provenance["templates"]  # the chat rows are still optimised
    adapter = lmedit.get_adapter(model)
    layer = kw["layers"][-1]
    seqs = encode_subject_prompts(tokenizer, [r.prompt for r in REQUESTS], [r.subject for r in REQUESTS])
    conts = encode_continuations(tokenizer, [r.text for r in REQUESTS], [r.target_new for r in REQUESTS])
    for i, (seq, (ids, target)) in enumerate(zip(seqs, conts)):  # at the stop, target_new is the plain argmax
        assert ids == seq.ids
        first, last = target[0], seq.subject_last
        out = adapter.block(model, layer)

        def shift(_m, _inp, o, d=plain.delta[i]):
            h = o[0] if isinstance(o, tuple) else o
            h = h.clone()
            h[0, last] += d.to(h.dtype)
            return (h, *o[1:]) if isinstance(o, tuple) else h

        handle = out.register_forward_hook(shift)
        try:
            with torch.no_grad():
                nxt = model(torch.tensor([ids])).logits[0, -1].argmax()
        finally:
            handle.remove()
        assert int(nxt) == first


def test_mpes_prompts_is_a_target_setting_only_where_it_acts():
    from lmedit.core.targets import TargetConfig

    assert "mpes_prompts" not in TargetConfig().target_settings()  # vectors saved before it existed compare equal
    assert "mpes_prompts" not in TargetConfig(mpes_prompts="plain").target_settings()  # the loss stop reads no argmax
    assert TargetConfig(early_stop="most_probable", mpes_prompts="plain").target_settings()["mpes_prompts"] == "plain"
