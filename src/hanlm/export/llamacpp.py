"""llama.cpp as the judge of a written GGUF: finding its binaries, running `llama-server` on the
file, and comparing what it does with what transformers does on the fp32 source.

What is compared (`llamacpp_parity`):
- token ids: `/tokenize` (BOS as the GGUF says, special tokens parsed) against the HF tokenizer
  on a string set that includes prompts rendered by the chat template, special tokens and all;
- the chat template: `/apply-template` (llama.cpp's own Jinja engine on the template the GGUF
  carries) against `apply_chat_template`;
- probabilities: `/completion` with `n_probs` gives llama.cpp's log-probabilities before
  sampling for its top k tokens at each step; they are compared with the fp32 model's
  log-softmax on the same ids at every step where both share the context (the first step on, up
  to where the greedy answers part, and before the first token that ends inside a UTF-8
  character: llama-server reports those merged with a later one). Log-probabilities differ from
  logits by a constant per position, so their error is judged as a logit error, against the
  largest reference logit;
- greedy answers (temperature 0, the prompt sent as the template's ids) and where they stop. Where
  an answer differs, the fp32 model is asked for its logits at the first differing step: a
  difference is a near tie when transformers' choice beats llama.cpp's by no more than the
  type's tolerance (tiny random models are full of them); anything else fails.

`llama-server` runs with one thread (the machines this is made on are shared), an f32 KV cache
and flash attention off, so that the check measures the file and not llama.cpp's cache
quantisation.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hanlm.export.gguf import read_gguf_types
from hanlm.modeling import ModelError

ENV_VAR = "HANLM_LLAMA_CPP"
SERVER = "llama-server"
# f32 weights through llama.cpp's kernels (a different summation order than torch's) end about
# 1e-6 of the largest logit away; the others keep the transformers-reader limits.
LLAMACPP_TOLERANCE = {"f32": 1e-4}
TOP_K = 10
# GGUF types llama.cpp's llama-quantize makes from hanlm's f32 GGUF (hanlm's writer has no k-quants)
QUANTIZE_TYPES = {"q4_k_m": "Q4_K_M"}


class LlamaCppError(ModelError):
    """llama.cpp is missing, does not start, or answers with an error."""


def find_llama_cpp() -> Path | None:
    """The directory holding `llama-server`: $HANLM_LLAMA_CPP (the directory or the binary),
    else `llama.cpp/bin` inside the running venv (`make llamacpp` builds it there), else PATH."""
    env = os.environ.get(ENV_VAR, "")
    if env:
        p = Path(env).expanduser()
        d = p.parent if p.is_file() else p
        if (d / SERVER).is_file():
            return d
        if (d / "bin" / SERVER).is_file():
            return d / "bin"
        raise LlamaCppError(f"${ENV_VAR}={env} holds no {SERVER}; build it with `make llamacpp`")
    local = Path(sys.prefix) / "llama.cpp" / "bin"
    if (local / SERVER).is_file():
        return local
    found = shutil.which(SERVER)
    return Path(found).parent if found else None


def quantize_gguf(
    bin_dir: Path | None, write_f32: Callable[[Path], Any], dst: Path, gtype: str
) -> dict[str, Any]:
    """`dst` in `gtype` (a QUANTIZE_TYPES key): `write_f32(path)` writes the f32 GGUF, which
    llama-quantize (one thread) turns into `dst`. Returns the file's size and tensor types."""
    binary = bin_dir / "llama-quantize" if bin_dir else None
    if binary is None or not binary.is_file():
        raise LlamaCppError(
            f"gguf_type={gtype} is made by llama.cpp's llama-quantize, which was not found: run"
            f" `make llamacpp` or set ${ENV_VAR}"
        )
    with tempfile.TemporaryDirectory(prefix=".f32.", dir=dst.parent) as d:
        f32, part = Path(d) / "model-f32.gguf", Path(d) / dst.name
        write_f32(f32)
        cmd = [str(binary), str(f32), str(part), QUANTIZE_TYPES[gtype], "1"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            tail = "\n".join((p.stdout + p.stderr).splitlines()[-10:])
            raise LlamaCppError(f"llama-quantize failed ({p.returncode}):\n{tail}")
        os.replace(part, dst)
    return {"file": dst.name, "bytes": dst.stat().st_size, "tensors": read_gguf_types(dst)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """`llama-server` on one GGUF, on a free local port, for the length of a `with` block."""

    def __init__(
        self,
        bin_dir: Path,
        gguf: Path,
        ctx: int = 2048,
        timeout: float = 120.0,
        threads: int = 1,
        parallel: int = 1,
    ) -> None:
        """One thread and one slot by default, so parity checks are repeatable; `threads` and
        `parallel` (slots, each `ctx` tokens) for a server that answers many requests."""
        self.binary = bin_dir / SERVER
        self.gguf = gguf
        self.ctx = ctx
        self.timeout = timeout
        self.threads = threads
        self.parallel = parallel
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self._log: Any = None

    def __enter__(self) -> LlamaServer:
        for _ in range(3):  # another process may take the free port before the server binds it
            if self._start():
                return self
        raise LlamaCppError(f"{self.binary} did not start on {self.gguf}:\n{self._tail()}")

    def _start(self) -> bool:
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._log = tempfile.TemporaryFile(mode="w+b")  # noqa: SIM115 - closed in __exit__
        cmd = [
            str(self.binary),
            *("-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(port)),
            *("-t", str(self.threads), "-tb", str(self.threads), "-np", str(self.parallel)),
            *("-c", str(self.ctx * self.parallel)),
            *("-ctk", "f32", "-ctv", "f32", "-fa", "off", "--jinja", "--no-webui", "--no-warmup"),
        ]
        try:
            self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        except OSError as e:
            raise LlamaCppError(f"cannot run {self.binary}: {e}") from None
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                if b"address already in use" in self._read_log().lower():
                    return False
                raise LlamaCppError(
                    f"{self.binary} exited with status {self.proc.returncode} on"
                    f" {self.gguf}:\n{self._tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self._stop()
        raise LlamaCppError(
            f"{self.binary} did not answer /health within {self.timeout:.0f} s:\n{self._tail()}"
        )

    def _read_log(self) -> bytes:
        if self._log is None:
            return b""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def _tail(self, n: int = 15) -> str:
        return "\n".join(self._read_log().decode("utf-8", "replace").splitlines()[-n:])

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __exit__(self, *exc: Any) -> None:
        self._stop()
        if self._log is not None:
            self._log.close()
            self._log = None

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise LlamaCppError(f"{SERVER} {path}: HTTP {e.code}: {e.read()[:300]!r}") from None
        except (urllib.error.URLError, OSError) as e:
            raise LlamaCppError(f"{SERVER} {path}: {e}\n{self._tail()}") from None

    def tokenize(self, text: str) -> list[int]:
        out = self.post("/tokenize", {"content": text, "add_special": True, "parse_special": True})
        return list(out["tokens"])

    def apply_template(self, messages: list[dict[str, str]]) -> str:
        return str(self.post("/apply-template", {"messages": messages})["prompt"])

    def complete(self, ids: list[int], n_predict: int, n_probs: int = TOP_K) -> dict[str, Any]:
        """Greedy continuation of `ids`: every sampled id (the end-of-generation token included
        when it stopped on one), whether it stopped so, and the steps llama-server reports
        log-probabilities for: (id, text, {id: log-probability before sampling}). It reports a
        token that ends inside a UTF-8 character together with the one that completes it, and
        not always then, so `aligned_steps` decides which steps these are."""
        out = self.post(
            "/completion",
            {
                "prompt": ids,
                "n_predict": n_predict,
                "temperature": 0,
                "top_k": 1,
                "n_probs": n_probs,
                "post_sampling_probs": False,
                "return_tokens": True,
                "cache_prompt": False,
                "stream": False,
            },
        )
        steps = [
            (
                int(c["id"]),
                c["token"],
                {int(t["id"]): float(t["logprob"]) for t in c["top_logprobs"]},
            )
            for c in out.get("completion_probabilities") or []
        ]
        tokens = [int(t) for t in out.get("tokens") or []]
        return {"ids": tokens, "stopped": out.get("stop_type") == "eos", "steps": steps}


def aligned_steps(tok: Any, got: dict[str, Any]) -> dict[int, dict[int, float]]:
    """Step index -> llama.cpp's top log-probabilities, for the leading steps whose report is
    certainly that step's: each one's id and text are those of the sampled token alone (a
    report that carries an earlier token's bytes, or follows one left out, ends the run)."""
    top: dict[int, dict[int, float]] = {}
    for j, (tid, text, probs) in enumerate(got["steps"]):
        if j >= len(got["ids"]) or got["ids"][j] != tid or not text:
            break
        piece = tok.decode([tid])
        if text != piece or "\ufffd" in piece:
            break
        top[j] = probs
    return top


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def llamacpp_parity(
    server: LlamaServer,
    tok: Any,
    texts: list[str],
    chats: list[list[dict[str, str]]],
    prompt_ids: list[list[int]],
    answers: list[list[int]],
    scale: float,
    path_logits: Callable[[list[int]], Any],
    n_predict: int,
    limit: float,
) -> dict[str, Any]:
    """llama.cpp against the fp32 model (see the module docstring). `answers` are the fp32
    model's greedy answers to `prompt_ids`, cut before their stop id; `path_logits(ids)` its
    logits at every position of `ids`; `scale` the largest reference logit; `limit` the type's
    tolerance, as a fraction of it."""
    import torch

    differ = [t[:40] for t in texts if server.tokenize(t) != tok(t)["input_ids"]]
    rendered = [
        server.apply_template(c)
        == tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
        for c in chats
    ]
    worst = 0.0
    steps = top1 = same = stops_same = near = 0
    unexplained: list[str] = []
    for k, (ids, ref_answer) in enumerate(zip(prompt_ids, answers)):
        got = server.complete(ids, n_predict)
        answer = got["ids"][:-1] if got["stopped"] else got["ids"]
        ref_stopped = len(ref_answer) < n_predict
        at = _first_difference(ref_answer, got["ids"])
        # the fp32 model's log-probabilities along its own greedy path, which llama.cpp shares
        # up to step `at`
        logits = path_logits(ids + ref_answer)[len(ids) - 1 :].double()
        logp = torch.log_softmax(logits, -1)
        for j, top in aligned_steps(tok, got).items():
            if j <= at:
                worst = max(worst, max(abs(logp[j, i].item() - lp) for i, lp in top.items()))
                top1 += int(max(top, key=top.get) == int(logp[j].argmax()))
                steps += 1
        stops_same += int(ref_stopped == got["stopped"])
        if answer == ref_answer and ref_stopped == got["stopped"]:
            same += 1
            continue
        if at >= len(got["ids"]):
            unexplained.append(f"prompt {k}: llama.cpp ended after {at} tokens")
            continue
        theirs, ours = got["ids"][at], int(logits[at].argmax())
        margin = float(logits[at, ours] - logits[at, theirs]) / max(scale, 1e-12)
        if ours == theirs:
            unexplained.append(f"prompt {k}: id {theirs} ends the answer in one runtime only")
        elif margin <= limit:
            near += 1
        else:
            unexplained.append(
                f"prompt {k}, step {at}: llama.cpp chose id {theirs}, transformers id {ours},"
                f" {margin:.2e} of the largest logit apart"
            )
    if not steps:  # every answer began inside a UTF-8 character: logits judged by greedy only
        print("[hanlm] WARNING: llama-server reported no log-probabilities to compare")
    n = len(prompt_ids)
    return {
        "judge": "llama.cpp",
        "llama_server": str(server.binary),
        "token_ids_equal": not differ,
        "texts_checked": len(texts),
        "texts_equal": len(texts) - len(differ),
        "differ": differ[:5],
        "template_equal": f"{sum(rendered)}/{len(rendered)}",
        "max_abs_logprob_diff": worst,
        "rel_logit_diff": worst / max(scale, 1e-12),
        "logprob_steps_compared": steps,
        "top1_agreement": top1 / max(steps, 1),
        "top_k_compared": TOP_K,
        "greedy_identical": f"{same}/{n}",
        "greedy_equal": same == n,
        "greedy_near_ties": near,
        "greedy_unexplained": unexplained,
        "stops_equal": f"{stops_same}/{n}",
    }
