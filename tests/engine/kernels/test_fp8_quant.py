import torch
from torch import nn

from sluice.engine.layers.moe import Experts
from sluice.engine.quant.fp8 import Fp8FusedExperts, Fp8Linear, quantize_fp8

from ._util import DEVICE, rel_err


class SparseMoeBlock(nn.Module):
    def __init__(self, d: int, i: int, e: int, k: int) -> None:
        super().__init__()
        self.k = k
        self.gate = nn.Linear(d, e, bias=False)
        self.experts = Experts(d, i, e, k)
        self.experts.w13.data = torch.randn(e, 2 * i, d) / d**0.5
        self.experts.w2.data = torch.randn(e, d, i) / i**0.5

    def forward(self, x):
        w, ids = self.gate(x).float().softmax(-1).topk(self.k)
        return self.experts(x, (w / w.sum(-1, keepdim=True)).to(x.dtype), ids)


class TinyModel(nn.Module):
    def __init__(self, d=64, i=96, e=4, vocab=50) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 2 * d, bias=True)
        self.down = nn.Linear(2 * d, d, bias=False)
        self.moe = SparseMoeBlock(d, i, e, 2)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.q_proj(h)
        h = h + self.down(torch.relu(self.up(h)))
        h = h + self.moe(h.reshape(-1, h.shape[-1])).view_as(h)
        return self.lm_head(h)


def test_quantize_fp8_keeps_outputs_close():
    torch.manual_seed(0)
    model = TinyModel().to(DEVICE)
    ids = torch.randint(0, 50, (3, 5), device=DEVICE)
    with torch.no_grad():
        ref = model(ids).float()
        quantize_fp8(model)
        out = model(ids).float()
    assert isinstance(model.q_proj, Fp8Linear) and isinstance(model.up, Fp8Linear)
    assert isinstance(model.down, Fp8Linear) and isinstance(model.moe.experts, Fp8FusedExperts)
    assert type(model.lm_head) is nn.Linear and type(model.moe.gate) is nn.Linear
    assert isinstance(model.embed, nn.Embedding)
    assert not any(p.dtype == torch.float32 and p.dim() == 3 for p in model.moe.parameters())  # 16-bit stacks gone
    assert rel_err(out, ref) < 5e-2


def test_prequantized_per_tensor_scale_broadcasts():
    torch.manual_seed(1)
    w = torch.randn(24, 40)
    scale = w.abs().max() / 448.0
    q = (w / scale).to(torch.float8_e4m3fn)
    layer = Fp8Linear.from_prequantized(q, scale.reshape(()), input_scale=torch.tensor(0.01), out_dtype=torch.float32)
    assert layer.weight_scale.shape == (24,) and layer.input_scale.shape == (1,)
    layer_ch = Fp8Linear.from_prequantized(q, scale.expand(24, 1), out_dtype=torch.float32)
    x = torch.randn(3, 40)
    assert torch.allclose(layer(x), layer_ch(x))
    assert rel_err(layer(x), x @ w.t()) < 5e-2


def test_prequantized_experts_match_stacked():
    torch.manual_seed(2)
    e, d, i = 3, 32, 48
    w1 = [torch.randn(i, d) for _ in range(e)]
    w3 = [torch.randn(i, d) for _ in range(e)]
    w2 = [torch.randn(d, i) for _ in range(e)]

    def q(w):
        s = w.abs().amax(1, keepdim=True) / 448.0
        return (w / s).to(torch.float8_e4m3fn), s

    q1, q3, q2 = zip(*map(q, w1)), zip(*map(q, w3)), zip(*map(q, w2))
    (w1q, s1), (w3q, s3), (w2q, s2) = (list(map(list, z)) for z in (q1, q3, q2))
    experts = Fp8FusedExperts.from_prequantized(w1q, s1, w3q, s3, w2q, s2)
    assert experts.w13.shape == (e, 2 * i, d) and experts.w13_scale.shape == (e, 2 * i)
    x = torch.randn(4, d)
    ids = torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2]])
    tw = torch.full((4, 2), 0.5)
    out = experts(x, tw, ids)
    ref = torch.zeros(4, d)
    for t in range(4):
        for j in range(2):
            e_ = int(ids[t, j])
            h = torch.nn.functional.silu(x[t] @ w1[e_].t()) * (x[t] @ w3[e_].t())
            ref[t] += 0.5 * (h @ w2[e_].t())
    assert rel_err(out, ref) < 5e-2
