"""Subject token positions with the real tokenizer, and the keys read at them from a padded batch
against a lone, unpadded pass on every tiny architecture.
"""

from __future__ import annotations

import pytest
import torch

from lmedit.core.keys import collect_keys, residual_stream
from lmedit.core.tokens import encode_subject_prompts
from lmedit.hooks import Trace
from lmedit.models.adapters import get_adapter

from helpers import VARIED_REQUESTS


@pytest.mark.parametrize("template,subject", [
    ("{} is a city in", "Xanadu"),                         # start
    ("The capital of {} is", "Xanadu"),                    # middle
    ("The mother tongue of {} is", "Danielle Darrieux"),   # middle, several tokens
    ("I was born in {}", "San Francisco"),                  # end
    ("{}", "Lionel Messi"),                                 # the whole prompt
    ("Facts about {}'s history", "Ancient Rome"),           # followed by punctuation
    ("The lyrics of {} are", "  Über Straße"),              # non-ASCII, leading spaces
])
def test_subject_last_token_ends_the_subject(tokenizer, template, subject):
    seq, = encode_subject_prompts(tokenizer, [template], [subject])
    text = template.replace("{}", subject)
    assert seq.ids == tokenizer(text)["input_ids"]
    upto = tokenizer.decode(seq.ids[: seq.subject_last + 1])
    before = tokenizer.decode(seq.ids[: seq.subject_last])
    assert upto.rstrip().endswith(subject.strip()), (upto, subject)
    assert not before.rstrip().endswith(subject.strip())  # the last token is needed to finish the subject
    assert seq.subject_last + 1 <= len(seq.ids)


def test_subject_positions_in_a_batch_match_single_encoding(tokenizer):
    templates = ["{} is a city in", "The capital of {} is", "I was born in {}"]
    subjects = ["Xanadu", "Danielle Darrieux", "San Francisco"]
    batch = encode_subject_prompts(tokenizer, templates, subjects)
    single = [encode_subject_prompts(tokenizer, [t], [s])[0] for t, s in zip(templates, subjects)]
    assert batch == single


def test_collect_keys_equal_unpadded_module_inputs(tiny_model):
    """Keys read from a right-padded batch equal the edited module's input in a lone, unpadded pass."""
    model, tok = tiny_model
    adapter = get_adapter(model)
    K = collect_keys(model, tok, adapter, VARIED_REQUESTS, [["{}"]], [1, 2])
    z = residual_stream(model, tok, adapter, VARIED_REQUESTS, 2)
    for i, r in enumerate(VARIED_REQUESTS):
        seq, = encode_subject_prompts(tok, [r.prompt], [r.subject])
        with torch.no_grad(), Trace({"k1": adapter.edit_module(model, 1), "k2": adapter.edit_module(model, 2),
                                     "z": adapter.block(model, 2)}, capture="both") as tr:
            model(torch.tensor([seq.ids]))
        p = seq.subject_last
        torch.testing.assert_close(K[1][i], tr.inputs["k1"][0, p], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(K[2][i], tr.inputs["k2"][0, p], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(z[i], tr.outputs["z"][0, p], rtol=1e-4, atol=1e-5)
