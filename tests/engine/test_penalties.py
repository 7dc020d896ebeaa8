"""logit_bias and presence/frequency penalties in the sampler, against a plain per-row reference."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from sluice.engine.penalties import apply_penalties
from sluice.engine.sampling import SamplingError, SamplingParams, sample
from sluice.engine.structured import Constraint

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@dataclass
class Seq:
    completion_token_ids: list[int]


def reference(logits: torch.Tensor, params: list[SamplingParams], seqs: list[Seq]) -> torch.Tensor:
    """OpenAI's formula, one token at a time."""
    out = logits.clone()
    for i, (p, s) in enumerate(zip(params, seqs)):
        for token, bias in p.logit_bias:
            out[i, token] += bias
        for token in set(s.completion_token_ids):
            c = s.completion_token_ids.count(token)
            out[i, token] -= c * p.frequency_penalty + p.presence_penalty
    return out


def random_batch(S: int, V: int, seed: int) -> tuple[list[SamplingParams], list[Seq]]:
    rng = random.Random(seed)
    params, seqs = [], []
    for _ in range(S):
        kind = rng.choice(["none", "bias", "pen", "both"])
        bias = tuple((t, rng.uniform(-100, 100)) for t in rng.sample(range(V), rng.randint(1, 5))) \
            if kind in ("bias", "both") else ()
        pen = kind in ("pen", "both")
        params.append(SamplingParams(presence_penalty=rng.uniform(-2, 2) if pen else 0.0,
                                     frequency_penalty=rng.uniform(-2, 2) if pen else 0.0, logit_bias=bias))
        seqs.append(Seq([rng.randrange(V) for _ in range(rng.randint(0, 40))]))
    return params, seqs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("S", "V"), [(1, 7), (5, 33), (17, 1000), (64, 32000)])
def test_bias_and_penalties_match_the_reference(device: str, S: int, V: int) -> None:
    for seed in range(3):
        params, seqs = random_batch(S, V, seed)
        logits = torch.randn(S, V, generator=torch.Generator().manual_seed(seed)).to(device)
        want = reference(logits.cpu(), params, seqs)
        apply_penalties(logits, params, seqs)
        torch.testing.assert_close(logits.cpu(), want, rtol=0, atol=1e-4)


def test_rows_without_them_are_untouched() -> None:
    logits = torch.randn(4, 50)
    before = logits.clone()
    params = [SamplingParams(), SamplingParams(frequency_penalty=1.0), SamplingParams(), SamplingParams()]
    apply_penalties(logits, params, [Seq([3, 3]), Seq([3, 3, 7]), Seq([3]), Seq([])])
    assert torch.equal(logits[[0, 2, 3]], before[[0, 2, 3]])
    assert logits[1, 3] == before[1, 3] - 2 and logits[1, 7] == before[1, 7] - 1


def _generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_draws_from_the_adjusted_distribution(device: str) -> None:
    S, V = 6, 300
    params, seqs = random_batch(S, V, 11)
    params = [SamplingParams(temperature=t, top_p=0.9, seed=1, logprobs=True, top_logprobs=2,
                             presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                             logit_bias=p.logit_bias)
              for t, p in zip([0, 0.7, 1.0, 1.3, 0, 0.5], params)]
    logits = torch.randn(S, V, generator=torch.Generator().manual_seed(3)).to(device)
    adjusted = reference(logits.cpu(), params, seqs).to(device)
    plain = [SamplingParams(temperature=p.temperature, top_p=0.9, seed=1, logprobs=True, top_logprobs=2)
             for p in params]
    got = sample(logits.clone(), params, _generators(5, S), seqs)
    want = sample(adjusted.clone(), plain, _generators(5, S), seqs)
    assert [t.token_id for t in got] == [t.token_id for t in want]
    logprobs = torch.log_softmax(adjusted.cpu(), dim=-1)
    for i, t in enumerate(got):  # the processed distribution's (before temperature)
        assert t.logprob == pytest.approx(logprobs[i, t.token_id].item(), abs=1e-4)
        assert t.top_logprobs[0][0] == logprobs[i].argmax().item()


def test_a_large_negative_bias_moves_greedy_off_its_token() -> None:
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    first = logits.argmax(dim=-1).tolist()
    second = logits.topk(2).indices[:, 1].tolist()
    params = [SamplingParams(temperature=0, logit_bias=((first[0], -100),)), SamplingParams(temperature=0),
              SamplingParams(temperature=0, logit_bias=((7, 100),))]
    got = [t.token_id for t in sample(logits.clone(), params, _generators(0, 3), [Seq([])] * 3)]
    assert got == [second[0], first[1], 7]


def test_frequency_penalty_stops_a_greedy_repeat() -> None:
    logits = torch.zeros(1, 10)
    logits[0, 4] = 1.0  # token 4 leads by 1.0; after one use a penalty of 1.5 puts it behind
    params = [SamplingParams(temperature=0, frequency_penalty=1.5)]
    assert sample(logits.clone(), params, _generators(0, 1), [Seq([])])[0].token_id == 4
    assert sample(logits.clone(), params, _generators(0, 1), [Seq([4])])[0].token_id != 4
    negative = [SamplingParams(temperature=0, presence_penalty=-2.0)]  # a negative one encourages it
    assert sample(logits.clone(), negative, _generators(0, 1), [Seq([2])])[0].token_id == 2


def test_bias_cannot_unmask_what_the_grammar_forbids() -> None:
    logits = torch.zeros(2, 64)
    params = [SamplingParams(temperature=0, logit_bias=((5, 100),), constraint=Constraint(banned=[5])),
              SamplingParams(temperature=1.0, seed=0, logit_bias=((9, 100), (5, 100)),
                             constraint=Constraint(banned=[9]), logprobs=True)]
    out = sample(logits, params, _generators(0, 2), [Seq([]), Seq([])])
    assert out[0].token_id != 5
    assert out[1].token_id == 5 and out[1].logprob == pytest.approx(0.0, abs=1e-6)


def test_penalties_need_the_rows_sequences() -> None:
    with pytest.raises(ValueError):
        sample(torch.zeros(1, 8), [SamplingParams(presence_penalty=1.0)], _generators(0, 1))


@pytest.mark.parametrize(("field", "value"), [("presence_penalty", 2.5), ("frequency_penalty", -2.01),
                                              ("logit_bias", ((3, 101.0),)), ("logit_bias", ((-1, 1.0),))])
def test_out_of_range_values_name_their_field(field: str, value: object) -> None:
    with pytest.raises(SamplingError) as err:
        SamplingParams(**{field: value})
    assert err.value.param == field


def test_a_non_contiguous_logits_view_is_updated_in_place() -> None:
    params, seqs = random_batch(4, 50, 7)
    params = [SamplingParams(frequency_penalty=1.0, presence_penalty=0.5, logit_bias=((3, 9.0),))] * 4
    buffer = torch.randn(4, 64)
    logits = buffer[:, :50]  # e.g. a padded vocabulary's first columns
    want = reference(logits.clone(), params, seqs)
    apply_penalties(logits, params, seqs)
    torch.testing.assert_close(buffer[:, :50], want, rtol=0, atol=1e-4)
