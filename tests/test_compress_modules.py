"""Every compressor: output shapes for M in {1, 4, 16, 64} (and N for the MLP), gradient flow,
determinism in eval; key-diversity pruning keeps exactly M tokens (token 0 included when it is the
most distinct); the text-conditioned compressor changes its output when only the text changes."""

import pytest
import torch

from aimv2.compress.base import CompressorSpec, to_grid
from aimv2.compress.prune import kdv_scores, kdv_select
from aimv2.compress.registry import COMPRESSORS, build_compressor
from aimv2.errors import UserError

B, D_VIS, D_LLM, GRID = 2, 32, 48, (16, 16)  # N = 256 patches
N = GRID[0] * GRID[1]
M_VALUES = (1, 4, 16, 64)
KINDS_M = [(kind, m) for kind in COMPRESSORS if kind != "mlp" for m in M_VALUES] + [("mlp", N)]


def make(kind: str, m: int, **kw):
    torch.manual_seed(0)
    spec = CompressorSpec(kind=kind, d_vis=D_VIS, d_llm=D_LLM, grid=GRID, num_tokens=m, hidden=kw.get("hidden", 32),
                          heads=4, layers=2)
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
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable), \
        [n for n, p in comp.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
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
    comp.region.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
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
