"""Rollouts sample from the policy's own distribution, whatever its generation_config says."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from hanlm.align.rollouts import answer_logits, rollout
from hanlm.data.templates import stop_token_ids


def test_a_shipped_generation_config_does_not_shape_rollouts(tiny_model_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()
    shipped = GenerationConfig(
        repetition_penalty=1.3, no_repeat_ngram_size=2, min_new_tokens=12, typical_p=0.5
    )
    model.generation_config = shipped
    prompts = [[{"role": "user", "content": q}] for q in ("床前明月光的下一句？", "Say hello.")]
    stops = stop_token_ids(tok, "auto")
    r = rollout(model, tok, prompts, stops, max_new_tokens=12, temperature=0.0)
    assert model.generation_config is shipped  # put back
    # Greedy answers are the argmax of the log-probs PPO recomputes, token by token: no
    # repetition penalty, banned n-grams or forced length reshaped them.
    with torch.no_grad():
        logits = answer_logits(model, r.seq, r.attn, r.ctx)
    greedy = logits.argmax(-1)
    answer = r.seq[:, r.ctx :]
    assert torch.equal(greedy[r.mask.bool()], answer[r.mask.bool()])
    # the shipped penalties would have changed them: a random model repeats itself
    with torch.no_grad():
        shaped = model.generate(
            input_ids=r.seq[:, : r.ctx],
            attention_mask=r.attn[:, : r.ctx],
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=tok.pad_token_id,
        )[:, r.ctx :]
    assert not torch.equal(shaped[:, : answer.size(1)], answer)
