"""One engine across ranks, driven from rank 0.

Rank 0's engine (``Leader``) sends every call that changes engine state (enqueue,
abort, step, sleep, wake, warm-up) to the other ranks before making it; each of them
(``follow``) makes the same call on its own engine. Their schedulers see the same
requests in the same order and their samplers the same logits with the same generator
states, so all ranks take the same steps (each step's forward pass needs every rank,
which is why a call is sent before it is made) and rank 0's outputs are the answer.

Calls travel pickled over a gloo group of their own (``Group.control``): one small
broadcast per call, beside the forward pass's all-reduces. Requests with a decoding
constraint (structured outputs) are refused: their parse state does not travel yet.
"""

from __future__ import annotations

import contextlib
from multiprocessing.process import BaseProcess
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from sluice.engine.errors import RequestError
from sluice.engine.output import Completion, RequestOutput
from sluice.engine.sampling import SamplingParams
from sluice.engine.sequence import Sequence

if TYPE_CHECKING:
    from sluice.engine.llm import LLM

CLOSE = "close"


def _broadcast(llm: LLM, message: tuple[Any, ...] | None = None) -> tuple[Any, ...]:
    box = [message]
    dist.broadcast_object_list(box, src=0, group=llm.sharding.group.control)
    return box[0]  # type: ignore[return-value]


class Leader:
    """Rank 0's engine, with the same methods as ``LLM``: calls that change its state
    are repeated by every other rank; everything else is rank 0's engine as is."""

    def __init__(self, llm: LLM, processes: Seq[BaseProcess] = ()) -> None:
        """``processes``: the other ranks, when this process started them (launch.py)."""
        if llm.sharding.group.rank != 0:
            raise ValueError("Leader runs on rank 0; the other ranks run follow(llm)")
        self.llm = llm
        self.processes = list(processes)

    def __getattr__(self, name: str) -> Any:  # reads: asleep, has_unfinished, tokenizer, ...
        return getattr(self.llm, name)

    @property
    def on_launch(self) -> Callable[[], None] | None:  # rank 0's step calls it (AsyncLLM)
        return self.llm.on_launch

    @on_launch.setter
    def on_launch(self, hook: Callable[[], None] | None) -> None:
        self.llm.on_launch = hook

    def make_sequence(self, prompt: str | list[int], params: SamplingParams | None = None,
                      request_id: str | None = None) -> Sequence:
        if params is not None and params.constraint is not None:
            raise RequestError("structured outputs are not served by a parallel engine yet")
        return self.llm.make_sequence(prompt, params, request_id)

    def enqueue(self, seq: Sequence) -> None:
        _broadcast(self.llm, ("enqueue", seq.seq_id, seq.prompt_token_ids, seq.params, seq.request_id,
                              seq.generator.get_state()))
        self.llm.enqueue(seq)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> Sequence:
        seq = self.make_sequence(prompt, params, request_id)
        self.enqueue(seq)
        return seq

    def abort(self, seq_id: int) -> None:
        _broadcast(self.llm, ("abort", seq_id))
        self.llm.abort(seq_id)

    def step(self) -> list[RequestOutput]:
        _broadcast(self.llm, ("step",))
        return self.llm.step()

    def sleep(self) -> None:
        _broadcast(self.llm, ("sleep",))
        self.llm.sleep()

    def wake(self) -> str:
        _broadcast(self.llm, ("wake",))
        return self.llm.wake()

    def warm_step(self) -> bool:
        _broadcast(self.llm, ("warm_step",))
        return self.llm.warm_step()

    def warm_up(self) -> None:
        _broadcast(self.llm, ("warm_up",))
        self.llm.warm_up()

    def generate(self, prompts: Seq[str | list[int]], params: SamplingParams | Seq[SamplingParams] | None = None
                 ) -> list[Completion]:
        from sluice.engine.llm import LLM

        return LLM.generate(self, prompts, params)  # type: ignore[arg-type]  # its calls come back here

    def close(self, timeout_s: float = 30.0) -> None:
        """Let the other ranks' ``follow`` return; with ``processes``, wait for them and
        leave the process group."""
        _broadcast(self.llm, (CLOSE,))
        if self.processes:
            for p in self.processes:
                p.join(timeout_s)
                if p.is_alive():
                    p.kill()
            dist.destroy_process_group()


def follow(llm: LLM) -> dict[str, list[int]]:
    """Make rank 0's calls on this rank's engine until rank 0 closes; returns the tokens
    this rank generated per request id (equal to rank 0's: a check for tests)."""
    ours: dict[int, int] = {}  # rank 0's sequence id -> this rank's
    tokens: dict[str, list[int]] = {}
    while (call := _broadcast(llm))[0] != CLOSE:
        name, args = call[0], call[1:]
        with contextlib.suppress(RequestError):  # rank 0 met the same refusal
            if name == "enqueue":
                leader_id, ids, params, request_id, state = args
                seq = Sequence(ids, params)
                seq.request_id = request_id
                seq.generator.set_state(state)
                ours[leader_id], tokens[request_id] = seq.seq_id, []
                llm.enqueue(seq)
            elif name == "abort":
                llm.abort(ours.pop(args[0], -1))
            elif name == "step":
                for out in llm.step():
                    tokens[out.request_id] += out.token_ids
                ours = {k: v for k, v in ours.items() if v in llm.sequences}
            else:
                getattr(llm, name)()
    return tokens
