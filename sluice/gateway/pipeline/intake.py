"""Intake: a parsed request body becomes a :class:`Call` (model routed, permission and
limits on ``n`` checked, one GenerationRequest per choice)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from sluice.gateway.accounts.auth import Principal
from sluice.gateway.backends.contract import Backend, GenerationRequest
from sluice.gateway.backends.registry import ModelRegistry
from sluice.gateway.backends.routing import Router
from sluice.gateway.backends.runtime import Runtime
from sluice.gateway.errors import InvalidRequest, NotFound, ServiceUnavailable
from sluice.gateway.http.formats import ChatFormat, TextFormat
from sluice.gateway.http.schemas import ChatCompletionRequest, CompletionRequest
from sluice.gateway.ledger.metering import Meter
from sluice.gateway.pipeline.call import Call, Choice
from sluice.gateway.pipeline.guard_text import conversation_of
from sluice.gateway.telemetry import gen_ai_attributes


@dataclasses.dataclass(frozen=True, slots=True)
class Intake:
    registry: ModelRegistry
    runtime: Runtime
    # One never-started instance per backend, for what needs no worker (token counts).
    probes: dict[str, Backend]
    meter: Meter
    router: Router
    max_n: int  # choices per request
    refuse_without_db: bool  # SLUICE_DB_OUTAGE=refuse
    default_reserve_tokens: int  # reserved against tokens/min when max_tokens is unset

    def chat(self, request_id: str, principal: Principal, body: ChatCompletionRequest,
             span: Any) -> Call:
        conversation = conversation_of(body.messages, body.tools)  # all the model reads
        # the last user turn (OpenAI needs none: a system-only chat scores its last message)
        last_user = next((m.content for m in reversed(body.messages) if m.role == "user"),
                         body.messages[-1].content)
        return self._open(request_id, principal, body, span, endpoint="chat", fmt=ChatFormat(),
                          prompt_text=last_user, conversation=conversation,
                          logprobs=body.logprobs)

    def completion(self, request_id: str, principal: Principal, body: CompletionRequest,
                   span: Any) -> Call:
        texts = body.prompt_texts()  # none for token ids (the route refuses them to the guard)
        return self._open(request_id, principal, body, span, endpoint="completions",
                          fmt=TextFormat(), prompt_text="\n".join(texts),
                          conversation=[("user", t) for t in texts],
                          logprobs=body.logprobs is not None)

    def _open(self, request_id: str, principal: Principal,
              body: ChatCompletionRequest | CompletionRequest, span: Any, *, endpoint: str,
              fmt: ChatFormat | TextFormat, prompt_text: str,
              conversation: list[tuple[str, str]], logprobs: bool) -> Call:
        model = self.router.resolve(body.model)  # an alias names its target
        route = self.registry.get(model)
        hidden = principal.models is None and not self.registry.visible(model, None)
        if route is None or hidden:  # the guard model is unknown to tenants
            raise NotFound(
                f"The model '{body.model}' does not exist", param="model", code="model_not_found"
            )
        principal.check_model(model)
        if body.n > self.max_n:
            raise InvalidRequest(f"n must be at most {self.max_n}", param="n")
        if not self.meter.accepting or (self.refuse_without_db and not self.meter.healthy):
            raise ServiceUnavailable("usage cannot be recorded right now; try again shortly")
        requests = body.generation_requests(request_id)
        if len(requests) > self.max_n:  # several prompts: each has its n choices
            raise InvalidRequest(f"prompts times n must be at most {self.max_n}", param="prompt")
        if model != body.model:
            requests = [dataclasses.replace(r, model=model) for r in requests]
        reserve = (body.token_limit() or route.card.context_length
                   or self.default_reserve_tokens)
        span.set_attributes(gen_ai_attributes(model=model, operation=endpoint,
                                              provider=route.card.provider))
        return Call(
            request_id=request_id,
            endpoint=endpoint,
            principal=principal,
            model=model,
            pool=self.runtime.pools[route.backend_name],
            plan=self.router.plan(model) if model in self.router.config.groups else None,
            body=body.data,
            requests=requests,
            count_prompt=functools.partial(_count_prompts, self.probes[route.backend_name],
                                           requests[::body.n]),
            prompts=len(requests) // body.n,
            prompt_text=prompt_text,
            conversation=conversation,
            reserve_tokens=reserve,
            fmt=fmt,
            span=span,
            stream=body.stream,
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
            want_logprobs=logprobs,
            provider=route.card.provider,
            prompt_per_choice=route.card.prompt_per_choice,
            choices=[Choice(logprobs=[] if logprobs else None) for _ in requests],
        )


def _count_prompts(probe: Backend, firsts: list[GenerationRequest]) -> int:
    """Prompt tokens of a call: each prompt once (the first choice of each)."""
    if len(firsts) == 1:
        return probe.count_tokens(firsts[0])
    return sum(probe.count_tokens(r) for r in firsts)
