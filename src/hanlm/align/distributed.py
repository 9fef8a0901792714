"""How a hand-written training loop (`hanlm ppo`) trains its models across processes: plain DDP
through accelerate, or DeepSpeed ZeRO-2/3 through `deepspeed.initialize` when `train.deepspeed`
names a config. The loop calls the same few methods either way:

  prepare(models)         wrap each trained (model, optimiser): DDP, or a DeepSpeed engine
  accumulate(m, k, n)     micro-batch k of n: gradients are averaged across processes on the last
  backward(m, loss)       then update(m, opt, sched): clip, step, schedule, zero the gradients
  full_weights(*ms)       all weights whole inside (ZeRO-3 gathers them and lifts the per-layer
                          fetch hooks; its forward passes must still run in step, `lockstep`)
  save / load             a complete checkpoint (`runs.Run.checkpoint`, marker and all)
  freeze(how, ref, ...)   the frozen models as the loop calls them (below); describe() for
                          the summary: the weights of theirs each process stores

accelerate stays the loop's process group and collectives in both cases (gather, reduce, the
main process); DeepSpeed joins the group accelerate initialised (gloo on CPU, NCCL on GPUs).

The frozen models (the reference, the reward models that score, the gold judge) are held as the
stage's `frozen` says, through `freeze`: `replicate` (the default) keeps a whole copy in each
process; `partition` (ZeRO-3 only) makes each an inference-only ZeRO-3 engine
(`deepspeed.initialize` without an optimiser, with the run's config, as OpenRLHF does), so each
process stores 1/W of its weights and every forward gathers them layer by layer: a collective
that all processes must call alike. The loop scores and takes reference log-probs in the same
number of micro-batches on every process, and under ZeRO-3 evaluates on every process
(`lockstep`). Each frozen model still loads whole before it is partitioned: the saving holds for
the run, not for the peak while loading.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hanlm.align import loop
from hanlm.config import ConfigError, TrainConfig, deepspeed_config, zero_stage
from hanlm.modeling import pick_precision
from hanlm.runs import Run


class DDPLoop:
    """DDP through accelerate (one process: the models themselves)."""

    # ZeRO-3: every forward pass of a trained model is collective (its parameters are fetched
    # from all processes), so all processes generate in step and all evaluate
    lockstep = False

    def __init__(self, acc: Any, train: TrainConfig) -> None:
        self.acc, self.train = acc, train
        self._frozen: tuple[str, list[Any]] = ("replicate", [])  # how, the frozen models

    def prepare(self, models: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
        """{name: (model, optimiser)} -> {name: (wrapped model, wrapped optimiser)}."""
        flat = [x for pair in models.values() for x in pair]
        out = self.acc.prepare(*flat)
        return {name: (out[2 * i], out[2 * i + 1]) for i, name in enumerate(models)}

    def unwrap(self, wrapped: Any) -> Any:
        return self.acc.unwrap_model(wrapped)

    def final_model(self, wrapped: Any) -> Any:
        """The trained model to save, without accelerate's autocast wrapper."""
        return self.acc.unwrap_model(wrapped, keep_fp32_wrapper=False)

    def accumulate(self, wrapped: Any, k: int, count: int) -> Any:
        """Only the last micro-batch's backward averages the gradients across processes."""
        return contextlib.nullcontext() if k == count - 1 else self.acc.no_sync(wrapped)

    def backward(self, wrapped: Any, loss: Any) -> None:
        self.acc.backward(loss)

    def update(self, wrapped: Any, opt: Any, sched: Any) -> None:
        if self.train.max_grad_norm > 0:
            self.acc.clip_grad_norm_(wrapped.parameters(), self.train.max_grad_norm)
        opt.step()
        sched.step()  # not prepared: one step per update in every process, as in one
        opt.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def full_weights(self, *wrapped: Any) -> Iterator[None]:
        yield

    def frozen(self, model: Any) -> Any:
        """A frozen model for inference: here the model itself, whole in each process."""
        return model

    def freeze(self, how: str, ref_model: Any, *scorers: Any) -> Any:
        """The frozen models as the loop will call them: `replicate` leaves them whole;
        `partition` swaps the reference and each scorer's reward models (a
        `hanlm.align.rewards.Scorer` or None) for `frozen(model)`. Returns the reference (None stays
        None)."""
        wrap = self.frozen if how == "partition" else (lambda model: model)
        ref_model = None if ref_model is None else wrap(ref_model)
        for scorer in [s for s in scorers if s is not None]:
            scorer.map_models(wrap)
        models = [m for s in scorers if s is not None for m, *_ in s.models]
        self._frozen = (how, [m for m in [ref_model, *models] if m is not None])
        return ref_model

    def describe(self) -> dict[str, Any]:
        """For the run's summary (a collective: every process calls it): the DeepSpeed config,
        and the frozen models' weights: their total and the number each process stores (a
        partitioned ZeRO-3 parameter counts its own partition, and itself while gathered)."""
        from accelerate.utils import gather_object

        how, models = self._frozen
        params = [p for m in models for p in m.parameters()]
        total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        held = sum(
            p.numel() + (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0) for p in params
        )
        frozen = {"mode": how, "models": len(models), "weights": total}
        frozen["held_per_process"] = gather_object([held])
        return {"deepspeed": self.train.deepspeed or None, "frozen_models": frozen}

    def save(
        self,
        run: Run,
        step: int,
        keep: int,
        modules: dict[str, Any],
        stateful: dict[str, Any],
        extra: dict[str, Any],
    ) -> None:
        loop.save_loop(run, step, keep, self.acc, modules, stateful, extra)

    def load(self, ckpt: Path, modules: dict[str, Any], stateful: dict[str, Any]) -> dict[str, Any]:
        """Restore a checkpoint into the unprepared modules (call before `prepare`)."""
        if any((Path(ckpt) / name).is_dir() for name in modules):
            raise ValueError(
                f"{ckpt} holds DeepSpeed engine states: it was written with train.deepspeed;"
                " resume it with the same train.deepspeed"
            )
        return loop.load_loop(ckpt, self.acc, modules, stateful)


class DeepSpeedLoop(DDPLoop):
    """DeepSpeed ZeRO engines (`deepspeed.initialize`, the library's public API) for the trained
    models, with the loop's own torch AdamW and scheduler. Checkpoints: each engine's
    `save_checkpoint` (every process writes its partition) beside the loop's `state.pt`."""

    def __init__(self, acc: Any, train: TrainConfig, micro_batch: int) -> None:
        super().__init__(acc, train)
        import os

        import deepspeed

        if acc.num_processes == 1 and "WORLD_SIZE" not in os.environ:
            # started without torchrun: a group of one, as `torchrun --nproc_per_node 1` makes
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ["MASTER_PORT"] = str(_free_port())
        deepspeed.init_distributed(  # joins accelerate's process group when there is one
            dist_backend="nccl" if acc.device.type == "cuda" else "gloo", verbose=False
        )
        self.config = loop_deepspeed_config(train, micro_batch, acc.num_processes)
        self.stage = self.config["zero_optimization"].get("stage", 0)
        self.lockstep = self.stage == 3
        self._resume: Path | None = None

    def prepare(self, models: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
        import deepspeed

        out = {}
        for name, (model, opt) in models.items():
            engine, optimizer, _, _ = deepspeed.initialize(
                model=model, optimizer=opt, config=dict(self.config)
            )
            out[name] = (engine, optimizer)
        self.engines = {name: engine for name, (engine, _) in out.items()}
        self.optimizers = [opt for _, opt in out.values()]
        if self._resume is not None:
            for name, (engine, _) in out.items():
                # the loop's scheduler was restored from state.pt; the engine has none
                engine.load_checkpoint(str(self._resume), tag=name, load_lr_scheduler_states=False)
        return out

    def unwrap(self, wrapped: Any) -> Any:
        return wrapped.module

    def final_model(self, wrapped: Any) -> Any:
        return wrapped.module

    def accumulate(self, wrapped: Any, k: int, count: int) -> Any:
        # The loop scales each micro-batch's loss itself; DeepSpeed reduces at the boundary.
        wrapped.set_gradient_accumulation_boundary(k == count - 1)
        return contextlib.nullcontext()

    def backward(self, wrapped: Any, loss: Any) -> None:
        wrapped.backward(loss, scale_wrt_gas=False)

    def update(self, wrapped: Any, opt: Any, sched: Any) -> None:
        wrapped.set_gradient_accumulation_boundary(True)
        wrapped.step()  # clips (gradient_clipping), steps, zeroes the gradients
        sched.step()

    @contextlib.contextmanager
    def full_weights(self, *wrapped: Any) -> Iterator[None]:
        """ZeRO-3: gather every engine's parameters and lift its fetch/release hooks (as trl
        does for generation; DeepSpeed's `unwrap_model_for_generation`); each process must
        enter, and forward passes inside must still run in step (the root module's hook checks
        its trace across processes). ZeRO-0/1/2: the weights are whole anyway."""
        if self.stage != 3:
            yield
            return
        from deepspeed.runtime.zero import unwrap_model_for_generation

        with contextlib.ExitStack() as stack:
            for engine in wrapped:
                stack.enter_context(unwrap_model_for_generation(engine))
            yield

    def frozen(self, model: Any) -> Any:
        """ZeRO-3: the frozen model as an inference-only engine, partitioned across the
        processes (`deepspeed.initialize` without an optimiser builds DeepSpeed's parameter
        manager alone); the run's config, its batch keys too, and its
        `stage3_param_persistence_threshold` (smaller tensors stay whole in each process)."""
        import deepspeed

        if self.stage != 3:
            raise ConfigError(f"frozen=partition needs ZeRO-3, {self.train.deepspeed} is not")
        engine, *_ = deepspeed.initialize(model=model, config=dict(self.config))
        engine.eval()  # (returns None)
        return engine

    def save(
        self,
        run: Run,
        step: int,
        keep: int,
        modules: dict[str, Any],
        stateful: dict[str, Any],
        extra: dict[str, Any],
    ) -> None:
        import torch
        from accelerate.utils import broadcast_object_list, gather_object

        rng = gather_object([loop.rng_state()])
        with contextlib.ExitStack() as stack:
            tmp = [None]
            if run.main:
                tmp = [str(stack.enter_context(run.checkpoint(step, keep=keep)))]
            broadcast_object_list(tmp)
            for name in modules:  # every process writes its partitions
                self.engines[name].save_checkpoint(tmp[0], tag=name, save_latest=False)
            self.acc.wait_for_everyone()
            if run.main:  # the optimisers' states are in the engines' checkpoints
                states = {
                    k: v.state_dict()
                    for k, v in stateful.items()
                    if v is not None and all(v is not o for o in self.optimizers)
                }
                state = {"step": step, **extra, "states": states, "rng": rng}
                torch.save({**state, "deepspeed": self.config}, Path(tmp[0]) / "state.pt")
        self.acc.wait_for_everyone()

    def load(self, ckpt: Path, modules: dict[str, Any], stateful: dict[str, Any]) -> dict[str, Any]:
        """Restore the loop's state now and the engines' at `prepare` (they must exist first)."""
        self._resume = ckpt = Path(ckpt)
        if not all((ckpt / name).is_dir() for name in modules):
            raise ValueError(
                f"{ckpt} holds no DeepSpeed engine states ({', '.join(modules)}): it was written"
                " without train.deepspeed; resume it without train.deepspeed"
            )
        return loop.load_loop(ckpt, self.acc, {}, stateful)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def refuse_on_zero3(train: TrainConfig, command: str, needs_whole: dict[str, bool]) -> None:
    """Refuse settings that need a whole model outside the engines when ZeRO-3 partitions it
    (before anything loads)."""
    bad = [what for what, on in needs_whole.items() if on]
    if bad and zero_stage(train) == 3:
        raise ConfigError(
            f"{bad[0]} with ZeRO-3 ({train.deepspeed}) is not supported by {command}: use"
            " configs/deepspeed/zero2.json (ZeRO-2 shards the optimiser state and gradients)"
        )


FROZEN_HELP = (
    "the frozen reference and reward models: replicate = whole in each process; partition ="
    " inference-only ZeRO-3 engines, each process stores 1/W of their weights and every forward"
    " gathers them (less memory, more communication; needs train.deepspeed with ZeRO stage 3)"
)


def check_frozen(train: TrainConfig, frozen: str) -> None:
    """`frozen=partition` needs ZeRO-3 engines (before anything loads)."""
    if frozen == "partition" and zero_stage(train) != 3:
        now = f" ({train.deepspeed} is ZeRO stage {zero_stage(train)})" if train.deepspeed else ""
        raise ConfigError(
            f"frozen=partition needs DeepSpeed ZeRO-3{now}: set"
            " train.deepspeed=configs/deepspeed/zero3.json and launch with torchrun, or"
            " frozen=replicate"
        )


def loop_engines(acc: Any, train: TrainConfig, micro_batch: int) -> DDPLoop:
    """The engines of a hand-written loop: DeepSpeed when `train.deepspeed` is set, else DDP."""
    if train.deepspeed:
        return DeepSpeedLoop(acc, train, micro_batch)
    return DDPLoop(acc, train)


def loop_deepspeed_config(train: TrainConfig, micro_batch: int, world: int) -> dict[str, Any]:
    """`train.deepspeed` with its "auto" values filled from `train` for a loop that brings its
    own torch AdamW and scheduler (the file's optimizer/scheduler sections are dropped, said
    aloud): one micro-batch of `micro_batch` rows, `train.grad_accum` of them per update."""
    import sys

    import torch

    cfg = deepspeed_config(train.deepspeed)
    dropped = [k for k in ("optimizer", "scheduler") if k in cfg]
    if dropped:
        print(
            f"[hanlm] {train.deepspeed}: ignoring its {' and '.join(dropped)} (the loop's AdamW and"
            f" train.scheduler are used)",
            file=sys.stderr,
        )
    cfg = {k: v for k, v in cfg.items() if k not in dropped}
    precision = pick_precision(train.precision)
    filled = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": micro_batch * train.grad_accum * world,
        "gradient_clipping": train.max_grad_norm,
    }
    for key, value in filled.items():
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
    for key, on in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        section = dict(cfg.get(key, {}))
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = on
        cfg[key] = section
    zero = dict(cfg.get("zero_optimization", {}))
    for key in list(zero):
        if zero[key] == "auto":  # sizes DeepSpeed picks itself when left out
            del zero[key]
    cfg["zero_optimization"] = zero
    cfg["zero_allow_untested_optimizer"] = True  # torch AdamW: the same update as the DDP path
    if not torch.cuda.is_available():
        cfg["zero_force_ds_cpu_optimizer"] = False
    cfg.setdefault("steps_per_print", 10**9)
    return cfg
