"""Cost of a JSON-schema grammar mask per decode step, xgrammar against llguidance.

Per step and batch size B: every row's matcher fills its row of one (B, ceil(V/32)) int32
bitmask on the CPU (the libraries' parallel batch calls), the bitmask goes to the logits'
device and is applied in place to (B, V) fp32 logits, a token is picked among the allowed
ones and every matcher accepts its token. Each phase is timed apart (device synchronised).
The vocabulary is Mixtral's (mistral-common's tokenizer.model.v1, V = 32000).

    python bench/grammar_mask.py [--device cuda] [--batch 1 64] [--steps 64] [--out result.json]
    python bench/grammar_mask.py --dump-vocab vocab.json   # for a host without mistral-common
    python bench/grammar_mask.py --vocab vocab.json --sp-model tokenizer.model.v1 ...
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import types
from typing import Any

import torch

from sluice.engine.tokenizer import SentencePieceTokenizer

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["name", "age", "tags", "address", "score"],
    "additionalProperties": False,
}


class XGrammar:
    name = "xgrammar"

    def __init__(self, token_bytes: list[bytes], eos: int, batch: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo(token_bytes, xgr.VocabType.RAW, vocab_size=len(token_bytes), stop_token_ids=[eos])
        began = time.perf_counter()
        grammar = xgr.GrammarCompiler(info).compile_json_schema(SCHEMA, any_whitespace=False)
        self.compile_s = time.perf_counter() - began
        self.matchers = [xgr.GrammarMatcher(grammar) for _ in range(batch)]
        self.batch = xgr.BatchGrammarMatcher()

    def fill(self, bitmask: torch.Tensor) -> None:
        live = [i for i, m in enumerate(self.matchers) if not m.is_terminated()]  # finished rows: left as is
        self.batch.batch_fill_next_token_bitmask([self.matchers[i] for i in live], bitmask, live)

    def accept(self, tokens: list[int]) -> None:
        self.xgr.BatchGrammarMatcher.batch_accept_token(self.matchers, tokens)

    def done(self) -> bool:
        return all(m.is_terminated() for m in self.matchers)

    def apply(self, logits: torch.Tensor, mask: torch.Tensor) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, mask)


class Sluice:
    """The engine's own path (engine/structured.py, xgrammar underneath): one call masks the
    batch (fill + copy + apply, timed as ``fill_ms``), then each constraint accepts its token."""

    name = "sluice"

    def __init__(self, token_bytes: list[bytes], eos: int, batch: int) -> None:
        from sluice.engine.structured import Constraint, Grammars, apply_constraints

        vocab = token_bytes

        class Vocab:  # what Grammars reads of a tokenizer
            eos_ids, vocab_size, tool_calls_id = (eos,), len(vocab), None

            def token_bytes(self) -> list[bytes]:
                return vocab

        began = time.perf_counter()
        grammar = Grammars(Vocab()).json_schema(SCHEMA)  # type: ignore[arg-type]
        self.compile_s = time.perf_counter() - began
        self.constraints = [Constraint(grammar) for _ in range(batch)]
        self.apply_constraints = apply_constraints
        self.logits: torch.Tensor | None = None

    def fill(self, bitmask: torch.Tensor) -> None:
        assert self.logits is not None
        self.apply_constraints(self.logits, self.constraints)

    def apply(self, logits: torch.Tensor, mask: torch.Tensor) -> None:
        pass  # done in fill

    def accept(self, tokens: list[int]) -> None:
        for c, t in zip(self.constraints, tokens):
            c.accept(t)

    def done(self) -> bool:
        return all(c.done for c in self.constraints)


class LLGuidance:
    name = "llguidance"

    def __init__(self, token_bytes: list[bytes], eos: int, batch: int, sp: Any = None) -> None:
        import llguidance
        import llguidance.torch as lt

        self.lt = lt

        class Tok:
            eos_token_id, bos_token_id = eos, 1
            tokens = token_bytes
            special_token_ids = [i for i, b in enumerate(token_bytes) if b.startswith(b"\xff")]

            def __call__(self, s: str) -> list[int]:
                # SentencePiece adds a dummy-prefix space; llguidance wants the text's own tokens
                ids = sp.encode("\n" + s)
                return ids[ids.index(13) + 1:]

        tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Tok()))
        began = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
        self.matchers = [llguidance.LLMatcher(tokenizer, grammar) for _ in range(batch)]
        self.compile_s = time.perf_counter() - began
        self.executor = llguidance.LLExecutor()

    def fill(self, bitmask: torch.Tensor) -> None:
        self.lt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(self.matchers)], bitmask)

    def accept(self, tokens: list[int]) -> None:
        for m, t in zip(self.matchers, tokens):
            m.consume_token(t)

    def done(self) -> bool:
        return all(m.is_stopped() for m in self.matchers)

    def apply(self, logits: torch.Tensor, mask: torch.Tensor) -> None:
        self.lt.apply_token_bitmask_inplace(logits, mask)


def load_vocab(args: argparse.Namespace) -> tuple[list[bytes], Any]:
    if args.vocab:  # a GPU host with torch but not mistral-common: the same bytes, dumped here
        import sentencepiece

        with open(args.vocab) as f:
            xbytes = [bytes.fromhex(h) for h in json.load(f)]
        return xbytes, sentencepiece.SentencePieceProcessor(model_file=args.sp_model)
    sp = SentencePieceTokenizer()
    return sp.token_bytes(), sp.sp


def llg_special(xbytes: list[bytes], sp: Any) -> list[bytes]:
    """llguidance marks special tokens with a leading 0xFF byte."""
    return [b"\xff" + sp.id_to_piece(i).encode() if not b else b for i, b in enumerate(xbytes)]


def run(lib: Any, batch: int, steps: int, device: str, vocab: int) -> dict[str, Any]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    bitmask = torch.full((batch, (vocab + 31) // 32), -1, dtype=torch.int32,
                         pin_memory=device == "cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    fill, apply, accept = [], [], []
    for _ in range(steps):
        logits = torch.randn(batch, vocab, device=device, generator=gen)  # (B, V)
        lib.logits = logits
        sync()
        t0 = time.perf_counter()
        lib.fill(bitmask)
        sync()
        t1 = time.perf_counter()
        lib.apply(logits, bitmask.to(device, non_blocking=True))
        sync()
        t2 = time.perf_counter()
        tokens = logits.argmax(dim=-1).tolist()
        t3 = time.perf_counter()
        lib.accept(tokens)
        t4 = time.perf_counter()
        fill.append(t1 - t0)
        apply.append(t2 - t1)
        accept.append(t4 - t3)
        if lib.done():
            break

    def ms(xs: list[float]) -> float:
        return round(statistics.median(xs[1:] or xs) * 1e3, 4)  # the first step warms caches up

    return {"library": lib.name, "batch": batch, "steps": len(fill), "compile_s": round(lib.compile_s, 4),
            "fill_ms": ms(fill), "apply_ms": ms(apply), "accept_ms": ms(accept),
            "total_ms": round(ms(fill) + ms(apply) + ms(accept), 4)}


def step_overhead(token_bytes: list[bytes], batch: int, forward_ms: float, steps: int) -> dict[str, Any]:
    """A decode step on the GPU with and without the grammar: a stand-in forward pass of
    ``forward_ms`` (a GPU sleep kernel, launched asynchronously like the engine's CUDA graph),
    then the sampler's part: mask (fill on the CPU while the GPU is busy, copy, apply),
    argmax, tokens to the host, constraints advanced. The difference is what a constrained
    batch costs per step."""
    from sluice.engine.structured import accept_tokens, apply_constraints


    vocab = len(token_bytes)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(1_000_000)
    end.record()
    end.synchronize()
    cycles = int(1_000_000 * forward_ms / start.elapsed_time(end))
    logits = torch.randn(batch, vocab, device="cuda")
    make = lambda: Sluice(token_bytes, 2, batch).constraints  # noqa: E731
    constraints = make()

    def one(constrained: bool) -> float:
        nonlocal constraints
        if constrained and any(c.done for c in constraints):
            constraints = make()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.cuda._sleep(cycles)  # the forward pass
        work = logits.clone()  # (B, V)
        if constrained:
            apply_constraints(work, constraints)
        tokens = work.argmax(dim=-1).tolist()
        if constrained:
            accept_tokens(constraints, tokens)
        return time.perf_counter() - t0

    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(2 * steps + 4):
        times[i % 2 == 1].append(one(i % 2 == 1))
    plain, masked = (statistics.median(times[k][2:]) * 1e3 for k in (False, True))
    return {"batch": batch, "forward_ms": forward_ms, "step_ms": round(plain, 4), "step_masked_ms": round(masked, 4),
            "overhead_ms": round(masked - plain, 4), "overhead_pct": round(100 * (masked - plain) / plain, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--libraries", nargs="+", default=["sluice", "xgrammar", "llguidance"])
    ap.add_argument("--out")
    ap.add_argument("--forward-ms", type=float, nargs="*", default=[],
                    help="with --device cuda: a decode step's forward time per --batch entry; adds the "
                         "step-overhead rows (a constrained step against a plain one)")
    ap.add_argument("--vocab", help="token bytes as a JSON list of hex strings (--dump-vocab)")
    ap.add_argument("--sp-model", help="with --vocab: the SentencePiece model (for llguidance)")
    ap.add_argument("--dump-vocab", help="write the token bytes of Mixtral's tokenizer and exit")
    args = ap.parse_args()
    if args.dump_vocab:
        with open(args.dump_vocab, "w") as f:
            json.dump([b.hex() for b in SentencePieceTokenizer().token_bytes()], f)
        return
    try:
        import transformers  # noqa: F401  (xgrammar imports it for its HF helpers only)
    except ImportError:  # a bare GPU host: those helpers are not used here
        stub = types.ModuleType("transformers")
        stub.PreTrainedTokenizerBase = stub.PreTrainedTokenizerFast = type("Unused", (), {})  # type: ignore[attr-defined]
        sys.modules["transformers"] = stub
    xbytes, sp = load_vocab(args)
    lbytes = llg_special(xbytes, sp)
    vocab = len(xbytes)
    rows = []
    for batch in args.batch:
        for name in args.libraries:
            def make() -> Any:
                if name == "llguidance":
                    return LLGuidance(lbytes, 2, batch, sp)
                return (XGrammar if name == "xgrammar" else Sluice)(xbytes, 2, batch)

            run(make(), batch, 4, args.device, vocab)  # warm-up (kernels compile)
            rows.append(run(make(), batch, args.steps, args.device, vocab))
            print(json.dumps(rows[-1]), flush=True)
    overhead = [step_overhead(xbytes, b, ms, args.steps) for b, ms in zip(args.batch, args.forward_ms)]
    for row in overhead:
        print(json.dumps(row), flush=True)
    result = {"overhead": overhead, "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
              "cpus": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
