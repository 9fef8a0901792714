"""Context distillation's loss: training rows that hold both views of an answer (after the
student's prompt, and after the teacher's, the context included), their collation, and the KL
from the teacher's distribution (full, or its stored top-k) to the student's at the answer
tokens, for transformers' Trainer and for the held-out measure of `hanlm.align.distill`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

from hanlm import losses
from hanlm.align.rollouts import Messages
from hanlm.data.templates import prompt_ids
from hanlm.modeling import pad_batch


def encode(tok: Any, student: Messages, teacher: Messages, answer: list[int]) -> dict[str, Any]:
    s, t = prompt_ids(tok, student), prompt_ids(tok, teacher)
    return {
        "student_ids": s + answer,
        "teacher_ids": t + answer,
        "student_start": len(s),
        "teacher_start": len(t),
        "n": len(answer),
    }


class Collator:
    """Right-pads both views of each row and indexes the positions that predict the answer."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(r["n"] for r in rows)
        out: dict[str, Any] = {}
        for who in ("student", "teacher"):
            ids, attn = pad_batch([r[f"{who}_ids"] for r in rows], self.pad_id, "right")
            pos = [[r[f"{who}_start"] - 1 + min(j, r["n"] - 1) for j in range(width)] for r in rows]
            out[f"{who}_ids"], out[f"{who}_attn"] = ids, attn
            out[f"{who}_pos"] = torch.tensor(pos)
        out["mask"] = torch.tensor([[1.0] * r["n"] + [0.0] * (width - r["n"]) for r in rows])
        if "topk_ids" in rows[0]:
            k = len(rows[0]["topk_ids"][0])
            fill = width

            def pad3(key: str, value: float) -> Any:
                return torch.tensor(
                    [r[key] + [[value] * k] * (fill - r["n"]) for r in rows],
                    dtype=torch.float32 if key == "topk_logp" else torch.long,
                )

            out["topk_logp"], out["topk_ids"] = pad3("topk_logp", 0.0), pad3("topk_ids", 0)
        return out


def answer_logits(model: Any, ids: Any, attn: Any, pos: Any) -> Any:
    """Logits at the positions that predict the answer tokens: [B, N, V]."""
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    index = pos.to(logits.device).unsqueeze(-1).expand(-1, -1, logits.size(-1))
    return logits.gather(1, index)


TeacherOf = Callable[[Any], AbstractContextManager[Any]]


def batch_kl(student: Any, teacher_of: TeacherOf, b: dict[str, Any]) -> Any:
    """Per-token KL [B, N] of a collated batch: to the stored top-k, or to the full distribution
    of the teacher `teacher_of(student)` yields (run without gradients, and after the student:
    under LoRA the teacher is the student with its adapter disabled)."""
    import torch

    device = next(student.parameters()).device
    b = {k: v.to(device) for k, v in b.items()}
    s_logits = answer_logits(student, b["student_ids"], b["student_attn"], b["student_pos"])
    if "topk_ids" in b:
        return losses.distill_kl_topk(b["topk_logp"], b["topk_ids"], s_logits, b["mask"])
    with torch.no_grad(), teacher_of(student) as teacher:
        t_logits = answer_logits(teacher, b["teacher_ids"], b["teacher_attn"], b["teacher_pos"])
    return losses.distill_kl(t_logits, s_logits, b["mask"])


def make_trainer(teacher_of: TeacherOf, **kw: Any) -> Any:
    """A transformers Trainer whose loss is the distillation KL (mean per answer token)."""
    from transformers import Trainer

    class DistillTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            unwrapped = self.accelerator.unwrap_model(model)
            kl = batch_kl(model, lambda _: teacher_of(unwrapped), inputs)
            loss = kl.sum() / inputs["mask"].sum().clamp(min=1)
            return (loss, None) if return_outputs else loss

    return DistillTrainer(**kw)


class Teacher:
    """The frozen teacher of a student, entered with `with teacher(student) as t`: a copy held
    beside it (full tuning), the student with its LoRA adapter disabled, or (top-k) none, the
    teacher's figures being in the rows."""

    def __init__(self, frozen: Any = None) -> None:
        self.frozen = frozen

    @contextlib.contextmanager
    def __call__(self, student: Any) -> Iterator[Any]:
        if self.frozen is not None:
            yield self.frozen
        elif hasattr(student, "disable_adapter"):
            with student.disable_adapter():
                yield student
        else:  # top-k: the teacher is in the rows
            yield None


def held_out_kl(
    student: Any, teacher_of: TeacherOf, rows: list[dict[str, Any]], pad_id: int, batch: int
) -> float:
    """KL(teacher with context ‖ student without) per answer token, full distributions."""
    import torch

    collate = Collator(pad_id)
    total, count = 0.0, 0.0
    student.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            chunk = rows[i : i + batch]
            b = collate([{k: v for k, v in r.items() if not k.startswith("topk")} for r in chunk])
            kl = batch_kl(student, teacher_of, b)
            total += float(kl.sum())
            count += float(b["mask"].sum())
    return total / max(count, 1.0)
