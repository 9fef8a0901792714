"""The headlines of `hanlm pretrain` and `hanlm sft`: held-out loss, answer loss, stop rate."""

from __future__ import annotations

from hanlm.headline import Headline, Outcome, figure, num, pct, signed


def pretrain(h: Headline, o: Outcome) -> None:
    s = o.summary
    fig = figure(s, "eval_bpc")
    if fig is None:
        fig = figure(s, "eval_loss")
    if fig is None:
        h.verdict = "no held-out figure (give validation data)"
        return
    h.figures.append(fig)
    unit = "bits per character" if "bpc" in fig.keys[-1] else "loss"
    if fig.before is None:
        h.verdict = f"held-out text: {num(fig.after)} {unit}"
        return
    d = fig.after - fig.before
    if d < 0:
        h.verdict = (
            f"predicts held-out text better: {signed(d)} {unit} (the training loss, measured on"
            " text it did not train on)"
        )
        h.tone = "good"
    else:
        h.verdict = f"held-out {unit} did not fall ({signed(d)})"
        h.tone = "bad"
        h.warnings.append(f"held-out {unit} rose from {num(fig.before)} to {num(fig.after)}")


def sft(h: Headline, o: Outcome) -> None:
    s = o.summary
    loss = figure(s, "answer_loss")
    stop = figure(s, "stop_rate", pct=True)
    h.figures += [f for f in (loss, stop) if f]
    parts = []
    if loss and loss.before is not None:
        d = loss.after - loss.before
        if d < 0:
            parts.append(
                f"predicts held-out answers better (answer loss {signed(d)}; the training loss"
                " on unseen chats)"
            )
            h.tone = "good"
        else:
            parts.append(f"answer loss on held-out chats did not fall ({signed(d)})")
            h.tone = "bad"
    if stop:
        was = f", was {pct(stop.before)}" if stop.before is not None else ""
        parts.append(f"{pct(stop.after)} of held-out answers end by themselves{was}")
        if stop.after < 0.5:
            h.warnings.append(
                f"only {pct(stop.after)} of held-out answers stop: the rest run to the length limit"
            )
    h.verdict = "; ".join(parts) or "no held-out figures in this stage's summary"
