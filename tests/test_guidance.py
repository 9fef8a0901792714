"""Classifier-free guidance through transformers' own guidance_scale / negative_prompt_ids."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hanlm.data.templates import prompt_ids, stop_token_ids
from hanlm.generation import GenerationOptions, _generate_kwargs, generate, guidance_inputs

Q = [[{"role": "user", "content": "床前明月光的下一句是什么？"}]]


def _load(path):
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()


def test_scale_one_is_the_unguided_output(tiny_model_path):
    tok, model = _load(tiny_model_path)
    plain = GenerationOptions(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0)
    one = GenerationOptions(**{**plain.__dict__, "guidance_scale": 1.0, "negative_prompt": "不"})
    assert generate(model, tok, Q, one) == generate(model, tok, Q, plain)


def test_one_guided_step_is_the_formula(tiny_model_path):
    """log p̃ = log p_uncond + s·(log p_cond - log p_uncond) on the model's two logit vectors."""
    tok, model = _load(tiny_model_path)
    opts = GenerationOptions(
        max_new_tokens=1,
        temperature=0.0,
        repetition_penalty=1.0,
        guidance_scale=1.5,
        negative_prompt="写一首诗",
    )
    ids = torch.tensor([prompt_ids(tok, Q[0])])
    stops = stop_token_ids(tok)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            return_dict_in_generate=True,
            output_scores=True,
            **_generate_kwargs(opts, stops, tok.pad_token_id),
            **guidance_inputs(tok, opts, 1, "cpu"),
        )
        neg = guidance_inputs(tok, opts, 1, "cpu")["negative_prompt_ids"]
        cond = torch.log_softmax(model(ids).logits[0, -1], -1)
        uncond = torch.log_softmax(model(neg).logits[0, -1], -1)
    want = uncond + 1.5 * (cond - uncond)
    torch.testing.assert_close(out.scores[0][0], want, atol=1e-4, rtol=1e-4)
