"""Losses and checks of a model under training: answer-only loss, eval loss, held-out task score.

The loss runs the decoder once and applies the LM head only at positions that predict a trained
token: the head is the widest matmul of a small model, and most positions (prompts) carry no loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from adapters.train import tasks
from adapters.train.data import IGNORE, Example, collate


class AnswerLoss:
    """Summed cross-entropy over the trained tokens of a batch, with the head at those rows only."""

    def __init__(self, model: PeftModel) -> None:
        base = model.get_base_model()
        self.decoder: nn.Module = base.get_decoder()
        self.head: nn.Module = base.get_output_embeddings()
        self.softcap: float | None = getattr(base.config, "final_logit_softcapping", None)
        self.logit_scale: float | None = getattr(base.config, "logit_scale", None)

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(sum of token losses as a 0-dim tensor, number of trained tokens)."""
        out = self.decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        hidden = out.last_hidden_state  # [B, L, H]
        targets = batch["labels"][:, 1:]  # [B, L-1], position t predicts token t+1
        keep = targets != IGNORE  # [B, L-1]
        logits = self.head(hidden[:, :-1][keep]).float()  # [N, V]
        if self.logit_scale:
            logits = logits * self.logit_scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        loss = F.cross_entropy(logits, targets[keep], reduction="sum")  # []
        return loss, int(keep.sum())


@torch.no_grad()
def eval_loss(
    model: PeftModel, loss_fn: AnswerLoss, examples: Sequence[Example], pad_id: int, batch: int
) -> float | None:
    """Mean loss per trained token over examples (None when there are none); model left in eval."""
    if not examples:
        return None
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch):
        loss, n = loss_fn(collate(list(examples[start : start + batch]), pad_id))
        total, count = total + loss.item(), count + n
    return total / count


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer: object,
    cases: Sequence[tasks.Case],
    max_new_tokens: int = 64,
    batch: int = 20,
    base_only: bool = False,
) -> list[str]:
    """Greedy chat answers to each case's prompt (with the adapter disabled when base_only)."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    try:
        with model.disable_adapter() if base_only else nullcontext():
            for start in range(0, len(cases), batch):
                chunk = [c.messages(with_answer=False) for c in cases[start : start + batch]]
                enc = tokenizer.apply_chat_template(
                    chunk,
                    add_generation_prompt=True,
                    padding=True,
                    return_dict=True,
                    return_tensors="pt",
                )
                ids = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )  # [b, prompt + new]
                new = ids[:, enc["input_ids"].shape[1] :]  # [b, new]
                outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outputs


def task_score(model: PeftModel, tokenizer: object, task: str, n: int) -> dict:
    """Held-out score of the adapter and of the bare base on task, with a few sample answers."""
    cases = tasks.held_out(task, n)
    adapted = generate_answers(model, tokenizer, cases)
    base = generate_answers(model, tokenizer, cases, base_only=True)
    return {
        "task": task,
        "n": n,
        "score": tasks.score(task, adapted, cases),
        "base_score": tasks.score(task, base, cases),
        "samples": [
            {"prompt": c.prompt, "expected": c.answer, "adapter": a, "base": b}
            for c, a, b in list(zip(cases, adapted, base, strict=True))[:3]
        ],
    }
