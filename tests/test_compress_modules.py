"""Every compressor: output shapes for M in {1, 4, 16, 64} (and N for the MLP), gradient flow,
determinism in eval; key-diversity pruning keeps exactly M tokens (token 0 included when it is the
most distinct); the text-conditioned compressor changes its output when only the text changes, and
only by what its queries pick (no residual); the resampler is Flamingo's Perceiver Resampler
(latents attend over [patches; latents]): a hand-computed attention, a hand-written forward, hand
parameter counts; weights of both compressors' earlier forms are refused in one line."""

import math

import pytest
import torch
import torch.nn.functional as F

from aimv2.compress.base import CompressorSpec, to_grid
from aimv2.compress.components import COMPRESSORS, build_compressor
from aimv2.compress.projectors import kdv_scores, kdv_select
from aimv2.errors import UserError

B, D_VIS, D_LLM, GRID = 2, 32, 48, (16, 16)  # N = 256 patches
N = GRID[0] * GRID[1]
M_VALUES = (1, 4, 16, 64)
KINDS_M = [(kind, m) for kind in COMPRESSORS if kind != "mlp" for m in M_VALUES] + [("mlp", N)]


def make(kind: str, m: int, **kw):
    torch.manual_seed(0)
    spec = CompressorSpec(
        kind=kind, d_vis=D_VIS, d_llm=D_LLM, grid=GRID, num_tokens=m, hidden=kw.get("hidden", 32), heads=4, layers=2
    )
    return build_compressor(spec)


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D_VIS, generator=g)  # (B, N, D_vis)
    text = torch.randn(B, D_LLM, generator=g)  # (B, D_llm)
    keys = torch.randn(B, N, 16, generator=g)  # (B, N, D_k)
    return x, text, keys


@pytest.mark.parametrize("kind,m", KINDS_M)
def test_shape_gradient_and_eval_determinism(kind, m):
    comp = make(kind, m)
    x, text, keys = inputs()
    x.requires_grad_(True)
    out = comp(x, text=text, keys=keys)
    assert out.shape == (B, m, D_LLM)
    out.square().mean().backward()
    trainable = [p for p in comp.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable), [
        n for n, p in comp.named_parameters() if p.grad is None or p.grad.abs().sum() == 0
    ]
    assert x.grad.abs().sum() > 0  # gradient reaches the features (through the kept ones for kdv)
    comp.eval()
    with torch.no_grad():
        assert torch.equal(comp(x, text=text, keys=keys), comp(x, text=text, keys=keys))


def test_mlp_keeps_all_tokens_and_zero_means_all():
    assert make("mlp", 0).num_tokens == N
    with pytest.raises(UserError, match="compressor.num_tokens"):
        make("mlp", 16)


@pytest.mark.parametrize("kind", ["pool", "tokenpacker", "quecc"])
def test_grid_compressors_reject_non_square_m(kind):
    with pytest.raises(UserError, match="compressor.num_tokens"):
        make(kind, 8)


def test_region_compressors_need_sqrt_m_dividing_the_grid():
    with pytest.raises(UserError, match=r"sqrt\(M\)=3"):
        make("tokenpacker", 9)  # 3 does not divide 16
    assert make("pool", 9)(inputs()[0]).shape == (B, 9, D_LLM)  # adaptive pooling handles it


def test_flexible_m_after_training():
    comp = make("pool", 16).eval()
    comp.set_num_tokens(1)
    x = inputs()[0]
    out = comp(x)
    assert out.shape == (B, 1, D_LLM)
    assert torch.allclose(out[:, 0], comp.proj(x.mean(dim=1)), atol=1e-6)  # M=1 is the MLP of the mean patch
    with pytest.raises(UserError, match="train one run per M"):
        make("resampler", 16).set_num_tokens(4)


def test_kdv_keeps_exactly_m_distinct_tokens_in_grid_order():
    keys = inputs()[2]
    for m in M_VALUES + (N,):
        idx = kdv_select(keys, m)
        assert idx.shape == (B, m)
        for row in idx:
            assert len(set(row.tolist())) == m and torch.equal(row, row.sort().values)
    # the kept ones are exactly the m highest scores
    scores = kdv_scores(keys)
    kept = kdv_select(keys, 16)
    assert torch.equal(scores.gather(1, kept).sort(dim=1).values, scores.topk(16, dim=1).values.sort(dim=1).values)


def test_kdv_keeps_token_zero_when_it_is_the_most_distinct_and_drops_it_otherwise():
    keys = torch.ones(1, N, 8) + 0.01 * torch.randn(1, N, 8, generator=torch.Generator().manual_seed(0))
    keys[0, 0] = torch.tensor([1.0, -1, 1, -1, 1, -1, 1, -1])  # token 0 points away from the mean key
    assert kdv_select(keys, 1).tolist() == [[0]]
    assert 0 in kdv_select(keys, 4)[0].tolist()
    keys[0, 0] = keys[0, 1:].mean(dim=0)  # now token 0 is the most typical one
    assert 0 not in kdv_select(keys, N - 1)[0].tolist()


def test_kdv_output_is_the_projection_of_the_kept_patches():
    comp = make("kdv", 4).eval()
    x, _, keys = inputs()
    idx = kdv_select(keys, 4)
    expected = comp.proj(torch.stack([x[b, idx[b]] for b in range(B)]))
    assert torch.allclose(comp(x, keys=keys), expected, atol=1e-6)


@pytest.mark.parametrize("m", [1, 16])
def test_text_conditioned_compressor_follows_the_text(m):
    comp = make("quecc", m).eval()
    x, text, _ = inputs()
    other = torch.randn(B, D_LLM, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        a, b = comp(x, text=text), comp(x, text=other)
        assert (a - b).abs().max() > 1e-3  # same image, different text: different tokens
        assert torch.equal(a, comp(x, text=text.clone()))
        # one text for the whole batch broadcasts like per-sample copies of it
        assert torch.allclose(comp(x, text=text[:1]), comp(x, text=text[:1].expand(B, -1)), atol=1e-6)
    for kind in ("pool", "tokenpacker", "resampler", "mlp"):  # the others ignore the text
        other_comp = make(kind, N if kind == "mlp" else m).eval()
        with torch.no_grad():
            assert torch.equal(other_comp(x, text=text), other_comp(x, text=other))


def test_quecc_text_reaches_the_output_only_through_the_queries():
    """Keys and values are the visual features without the text (QueCC, arXiv 2411.03312): with the
    queries held at those of text A, text B gives exactly A's tokens; the region attention's
    key/value input is x itself whatever the text."""
    comp = make("quecc", 16).eval()
    x, text, _ = inputs()
    other = torch.randn(B, D_LLM, generator=torch.Generator().manual_seed(7))
    seen, held = [], {}
    comp.region_attn.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
    comp.downsample.register_forward_hook(lambda mod, args, out: held.get("queries", out))
    with torch.no_grad():
        a = comp(x, text=text)
        held["queries"] = comp.downsample(to_grid(x + comp.text_norm(comp.text_proj(text)).unsqueeze(1), GRID))
        b_with_a_queries = comp(x, text=other)
        held.clear()
        b = comp(x, text=other)
    assert torch.equal(b_with_a_queries, a)  # nothing of the text but the queries
    assert (a - b).abs().max() > 1e-3  # through the queries the text does change the tokens
    assert all(torch.equal(kv, x) for kv in seen)  # keys/values never carry the text
    assert isinstance(comp.text_norm, torch.nn.LayerNorm)  # text projection: Linear + LayerNorm


def test_quecc_tokens_are_attention_over_their_region_only_no_residual():
    """With every patch of a region equal, its attention has one value to average, so each token is
    the MLP of that value's output projection, whatever the text and the query (the paper's QueCC;
    a residual would add the text-conditioned query to it)."""
    comp = make("quecc", 4).eval()  # 2 x 2 regions of 8 x 8 patches
    per_region = torch.randn(B, 2, 2, D_VIS, generator=torch.Generator().manual_seed(3))
    x = per_region.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2).reshape(B, N, D_VIS)
    ra, w = comp.region_attn, comp.region_attn.attn.embed_dim
    with torch.no_grad():
        v = F.linear(
            ra.norm_kv(ra.kv(per_region.reshape(B, 4, D_VIS))),
            ra.attn.in_proj_weight[2 * w :],
            ra.attn.in_proj_bias[2 * w :],
        )  # (B, 4, W): each region's one value
        expected = comp.out(ra.attn.out_proj(v))  # (B, 4, D_llm)
        for seed in (5, 6):
            text = torch.randn(B, D_LLM, generator=torch.Generator().manual_seed(seed))
            assert torch.allclose(comp(x, text=text), expected, atol=1e-5)


def test_quecc_and_resampler_refuse_weights_of_their_earlier_forms():
    quecc = make("quecc", 4)
    old = {k.replace("region_attn.", "region."): v for k, v in quecc.state_dict().items()}  # the residual form's keys
    with pytest.raises(UserError, match=r"^compressor quecc: .*residual.*retrain the compressor$") as err:
        quecc.load_state_dict(old)
    assert "\n" not in str(err.value)
    quecc.load_state_dict(make("quecc", 4).state_dict())  # its own form loads
    resampler = make("resampler", 4)
    old = {
        "inp.weight": torch.zeros(32, D_VIS),
        "norm_kv.weight": torch.ones(32),
        "queries": torch.zeros(4, 32),
        "blocks.0.norm_q.weight": torch.ones(32),
        "out.1.weight": torch.zeros(D_LLM, 32),
    }
    parent = torch.nn.ModuleDict({"compressor": resampler})  # inside a module, as in a training checkpoint
    for target, state in ((resampler, old), (parent, {f"compressor.{k}": v for k, v in old.items()})):
        with pytest.raises(UserError, match=r"^compressor resampler: .*\[patches; latents\].*retrain") as err:
            target.load_state_dict(state)
        assert "\n" not in str(err.value)
    resampler.load_state_dict(make("resampler", 4).state_dict())


def tiny_resampler(m: int = 3, hidden: int = 0, layers: int = 1, heads: int = 2, d_vis: int = 8):
    torch.manual_seed(0)
    return build_compressor(
        CompressorSpec(
            kind="resampler", d_vis=d_vis, d_llm=6, grid=(4, 4), num_tokens=m, hidden=hidden, heads=heads, layers=layers
        )
    )


def test_resampler_parameter_counts_by_hand():
    """W = 8 (the encoder width), M = 3, D_llm = 6: latents 3*8 = 24; per layer norm_media + norm_latents
    2*16, to_q 64, to_kv 128, to_out 64 (no biases), feed-forward LN 16 + 8*32 + 32*8 = 528: 816;
    final LN 16; proj 8*6 + 6 = 54. One layer: 910; two: 1726. hidden=4: inp 8*4 + 4 = 36, latents 12,
    layer 12*16 + 6*4 = 216, LN 8, proj 4*6 + 6 = 30: 302."""

    def count(comp):
        return sum(p.numel() for p in comp.parameters())

    assert count(tiny_resampler()) == 910
    assert count(tiny_resampler(layers=2)) == 1726
    assert count(tiny_resampler(hidden=4)) == 302
    assert isinstance(tiny_resampler().inp, torch.nn.Identity)  # at the encoder width no input Linear


def test_resampler_latents_are_keys_and_values_hand_computed():
    """One latent l = (1, -1, 2, 0), one head of width 4, identity q/k/v/out projections, N = 16 zero
    patches. LN(0) = 0, so the patches' keys and values are 0; LN(l) = n = (l - 0.5) / sqrt(1.25 + 1e-5).
    The latent is its own key: score s = n.n / sqrt(4) = 2.5 / (1.25 + 1e-5) against 0 for each patch,
    so the attention output is n * e^s / (16 + e^s) (0.3159 n): not 0, and it moves with the latent."""
    comp = tiny_resampler(m=1, heads=1, d_vis=4)
    attn = comp.layers[0].attn
    with torch.no_grad():
        for lin in (attn.to_q, attn.to_out):
            lin.weight.copy_(torch.eye(4))
        attn.to_kv.weight.copy_(torch.cat([torch.eye(4), torch.eye(4)]))
    lat = torch.tensor([[[1.0, -1.0, 2.0, 0.0]]])  # (1, M=1, W=4)
    x = torch.zeros(1, 16, 4)  # (1, N, W)
    n = [(v - 0.5) / math.sqrt(1.25 + 1e-5) for v in (1.0, -1.0, 2.0, 0.0)]
    s = 2.5 / (1.25 + 1e-5)
    weight = math.exp(s) / (16 + math.exp(s))
    with torch.no_grad():
        out = attn(x, lat)
        assert torch.allclose(out, torch.tensor([[[weight * v for v in n]]]), atol=1e-6)
        assert abs(weight - 0.31592) < 1e-4
        # Two latents, zero patches: changing latent 1 changes latent 0's output (it is one of its keys).
        comp2 = tiny_resampler(m=2)
        a2 = comp2.layers[0].attn
        lats = torch.randn(1, 2, 8, generator=torch.Generator().manual_seed(0))
        moved = lats.clone()
        moved[0, 1, 0] += 1.0  # one coordinate: LayerNorm would cancel a shift of all of them
        zeros = torch.zeros(1, 16, 8)
        assert (a2(zeros, lats)[0, 0] - a2(zeros, moved)[0, 0]).abs().max() > 1e-3
        assert comp2(zeros).shape == (1, 2, 6)  # (B, M, D_llm)


def test_resampler_is_the_perceiver_resampler_written_out():
    """The whole forward against Flamingo's Perceiver Resampler written with explicit softmax:
    per layer latents += Attn(LN_l(latents) -> q; [LN_m(x); LN_l(latents)] -> k, v), += FF; final LN,
    then the Linear into the LLM width."""
    comp = tiny_resampler(m=3, hidden=4, layers=2, heads=2).eval()
    x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(1))  # (B, N, D_vis)

    def ln(t, norm):
        return F.layer_norm(t, t.shape[-1:], norm.weight, norm.bias, norm.eps)

    with torch.no_grad():
        feats = x @ comp.inp.weight.T + comp.inp.bias  # (B, N, W=4)
        lat = comp.latents.expand(2, -1, -1)  # (B, M, W)
        for layer in comp.layers:
            a = layer.attn
            wk, wv = a.to_kv.weight.chunk(2)
            ll = ln(lat, a.norm_latents)
            kv_in = torch.cat([ln(feats, a.norm_media), ll], dim=1)  # (B, N + M, W)
            heads = []
            for h in range(2):  # head h owns channels 2h, 2h + 1
                sl = slice(2 * h, 2 * h + 2)
                q, k, v = (ll @ a.to_q.weight.T)[..., sl], (kv_in @ wk.T)[..., sl], (kv_in @ wv.T)[..., sl]
                heads.append(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(2), dim=-1) @ v)  # (B, M, 2)
            lat = lat + torch.cat(heads, dim=-1) @ a.to_out.weight.T
            ff = layer.ff
            lat = lat + F.gelu(ln(lat, ff[0]) @ ff[1].weight.T) @ ff[3].weight.T
        expected = ln(lat, comp.norm) @ comp.proj.weight.T + comp.proj.bias  # (B, M, D_llm)
        assert torch.allclose(comp(x), expected, atol=1e-5)


def test_tokenpacker_queries_attend_only_to_their_region():
    comp = make("tokenpacker", 4).eval()  # 2 x 2 regions of 8 x 8 patches
    x = inputs()[0]
    y = x.clone().reshape(B, 16, 16, D_VIS)
    y[:, :8, :8] += 5.0  # change only the top-left region
    with torch.no_grad():
        a, b = comp(x), comp(y.reshape(B, N, D_VIS))
    changed = (a - b).abs().amax(dim=(0, 2)) > 1e-5
    assert changed.tolist() == [True, False, False, False]


def test_unknown_kind_is_a_user_error():
    with pytest.raises(UserError, match="compressor.kind"):
        make("perceiverio", 4)
