"""Chat form: a prompt as the user's turn of the tokenizer's own chat template, the answer in the
assistant's turn (for instruct models, which are asked through their template).

Example::

    chat_prompt(tok, "The mother tongue of Danielle Darrieux is")
    # '<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\nThe mother tongue of Danielle Darrieux is'
    # '<|im_end|>\\n<|im_start|>assistant\\n'    -- the answer ("French") follows directly

The returned text ends where the assistant's answer begins, so a continuation is read right after
it (``lmedit.core.tokens.encode_continuations`` puts no space after text that ends in
whitespace, as chat templates' generation prompts do). A "{}" placeholder in the prompt survives
the wrapping, so context templates can be wrapped before they are filled. Where the template
writes the tokenizer's BOS token as text and the tokenizer adds it again, the text copy is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmedit.errors import RequestError


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_prompt(tokenizer, text: str) -> str:
    """``text`` as the user turn, followed by the template's generation prompt for the assistant."""
    if not has_chat_template(tokenizer):
        raise RequestError("chat form needs a tokenizer with a chat template (tokenizer.chat_template is not set)")
    out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and out.startswith(bos) and _adds_bos(tokenizer):
        out = out[len(bos):]
    if text not in out:
        raise RequestError(f"the tokenizer's chat template does not keep the user's text verbatim ({text!r})")
    return out


def is_chat_form(tokenizer):
    """A test of whether a prompt was wrapped by :func:`chat_prompt` (the template's text around the
    user turn): ``is_chat_form(tok)(text)``; the template is rendered once."""
    if not has_chat_template(tokenizer):
        return lambda text: False
    before, _, after = chat_prompt(tokenizer, "{}").partition("{}")
    return lambda text: len(text) >= len(before) + len(after) and text.startswith(before) and text.endswith(after)


def chat_groups(tokenizer, groups: Sequence[Sequence[str]]) -> list[list[str]]:
    """Each context-template group with every template inside the user turn."""
    return [[chat_prompt(tokenizer, t) for t in g] for g in groups]


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
