"""Multi-scale deformable attention: native kernels (ops/csrc) against the grid_sample reference.

Tolerances (stated per test): float64 forward <= 1e-10 absolute, float32 forward <= 1e-5 relative
(max |native - reference| / max |reference|), gradients checked with torch.autograd.gradcheck in
float64 (eps 1e-6, atol 1e-5, rtol 1e-3) or against the reference's autograd gradients.
"""

import importlib
import logging
import math

import pytest
import torch

from detr_variants.layers.ms_deform_attn import (
    MultiScaleDeformableAttention,
    ms_deform_attn,
    ms_deform_attn_pytorch,
    native_available,
)

# the module itself (detr_variants.layers re-exports a function of the same name)
msda = importlib.import_module("detr_variants.layers.ms_deform_attn")

F64_ABS = 1e-10
F32_REL = 1e-5


def level_start(shapes):
    areas = shapes[:, 0] * shapes[:, 1]
    return torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])


def make_inputs(
    N=2,
    Lq=5,
    M=2,
    D=4,
    shapes=((6, 4), (3, 2), (1, 1), (5, 7)),
    P=3,
    dtype=torch.float64,
    seed=0,
    lo=-0.1,
    hi=1.1,
    device="cpu",
):
    """Random inputs: value ~ N(0,1), locations ~ U[lo, hi], weights softmaxed over L*P."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(shapes, dtype=torch.long)
    L = shapes.shape[0]
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    value = torch.randn(N, S, M, D, generator=g, dtype=dtype)
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=dtype) * (hi - lo) + lo
    attn = torch.randn(N, Lq, M, L * P, generator=g, dtype=dtype).softmax(-1).view(N, Lq, M, L, P)
    return [t.to(device) for t in (value, shapes, level_start(shapes), loc, attn)]


def native(*args):
    return msda._C.ms_deform_attn_forward(*args)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def grads(fn, value, shapes, lsi, loc, attn, grad_out=None):
    v, l, a = (t.detach().clone().requires_grad_() for t in (value, loc, attn))
    out = fn(v, shapes, lsi, l, a)
    if grad_out is None:
        grad_out = torch.randn(
            out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64
        )
        grad_out = grad_out.to(device=out.device, dtype=out.dtype)
    out.backward(grad_out)
    return out.detach(), v.grad, l.grad, a.grad


requires_native = pytest.mark.skipif(
    not native_available("cpu"), reason="detr_variants._C not built"
)


def test_native_op_is_built():
    """Fails (does not skip) when the extension is missing, so `make test` catches a broken build."""
    from detr_variants import _C  # noqa: F401

    assert hasattr(_C, "ms_deform_attn_forward") and hasattr(_C, "ms_deform_attn_backward")
    assert native_available("cpu")
    assert native_available("cpu", torch.float32) and native_available("cpu", torch.float64)


CONFIGS = [
    # (N, Lq, M, D, shapes, P)
    (1, 4, 1, 1, ((4, 4),), 1),
    (2, 5, 2, 3, ((6, 4), (3, 2), (1, 1), (5, 7)), 3),
    (3, 7, 3, 32, ((5, 3), (1, 1)), 2),
    (1, 6, 2, 64, ((2, 9), (4, 4), (1, 1)), 4),
    (2, 3, 2, 71, ((3, 5), (2, 1)), 2),
    (1, 300, 8, 32, ((20, 30), (10, 15), (5, 8), (3, 4)), 4),
]


@requires_native
@pytest.mark.parametrize(
    "cfg", CONFIGS, ids=lambda c: f"N{c[0]}Lq{c[1]}M{c[2]}D{c[3]}L{len(c[4])}P{c[5]}"
)
def test_forward_matches_reference(cfg):
    """float64 <= 1e-10 absolute, float32 <= 1e-5 relative."""
    N, Lq, M, D, shapes, P = cfg
    args = make_inputs(N, Lq, M, D, shapes, P, dtype=torch.float64)
    out = native(*args)
    assert out.shape == (N, Lq, M * D)
    assert (out - ms_deform_attn_pytorch(*args)).abs().max().item() <= F64_ABS
    args32 = [t.float() if t.is_floating_point() else t for t in args]
    assert rel_err(native(*args32), ms_deform_attn_pytorch(*args32)) <= F32_REL


@requires_native
@pytest.mark.parametrize(
    "cfg", CONFIGS, ids=lambda c: f"N{c[0]}Lq{c[1]}M{c[2]}D{c[3]}L{len(c[4])}P{c[5]}"
)
def test_backward_matches_reference(cfg):
    """Gradients equal the reference's autograd gradients: float64 <= 1e-9 relative to the max."""
    N, Lq, M, D, shapes, P = cfg
    args = make_inputs(N, Lq, M, D, shapes, P, dtype=torch.float64, seed=1)
    mine = grads(ms_deform_attn, *args)
    ref = grads(ms_deform_attn_pytorch, *args)
    for a, b in zip(mine, ref):
        assert rel_err(a, b) <= 1e-9


GRADCHECK_CONFIGS = [
    # (N, Lq, M, D, shapes, P)
    (1, 3, 2, 1, ((3, 4), (1, 1)), 2),
    (3, 2, 1, 3, ((2, 3), (1, 1), (3, 2)), 3),
    (1, 2, 2, 30, ((3, 2), (1, 1)), 2),
    (3, 2, 2, 32, ((2, 3), (1, 1)), 2),
    (1, 2, 1, 64, ((3, 2), (1, 1)), 3),
    (1, 2, 2, 71, ((2, 2), (1, 3)), 2),
]


@requires_native
@pytest.mark.parametrize(
    "cfg", GRADCHECK_CONFIGS, ids=lambda c: f"N{c[0]}M{c[2]}D{c[3]}L{len(c[4])}P{c[5]}"
)
def test_gradcheck(cfg):
    """torch.autograd.gradcheck in float64 (eps 1e-6, atol 1e-5, rtol 1e-3)."""
    N, Lq, M, D, shapes, P = cfg
    value, shapes, lsi, loc, attn = make_inputs(N, Lq, M, D, shapes, P, seed=2)
    value, loc, attn = (t.requires_grad_() for t in (value, loc, attn))
    assert torch.autograd.gradcheck(
        lambda v, l, a: ms_deform_attn(v, shapes, lsi, l, a),
        (value, loc, attn),
        eps=1e-6,
        atol=1e-5,
        rtol=1e-3,
    )


@requires_native
def test_border_and_outside_locations():
    """Locations on cell borders (multiples of 1/W, 1/(2W)), on the map edges and outside [0, 1].

    Forward <= 1e-12 absolute (float64) against the reference; value / weight gradients equal the
    reference's (<= 1e-12); location gradients too, except where h_im or w_im is exactly -1: there
    the kernel (like the official one) takes no tap while grid_sample's one-sided gradient is not 0.
    """
    shapes = torch.tensor([[4, 8], [2, 2], [1, 1]])
    lsi = level_start(shapes)
    N, M, D, L, P = 1, 2, 3, 3, 4
    W = 8  # finest level; the coarser levels' borders are multiples of these values too
    xs = torch.tensor([k / (2 * W) for k in range(-3, 2 * W + 4)], dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, xs, indexing="ij")
    pts = torch.stack([gx.flatten(), gy.flatten()], -1)  # exact dyadic values
    Lq = math.ceil(pts.shape[0] / (M * L * P))
    loc = pts.repeat(Lq * M * L * P // pts.shape[0] + 1, 1)[: Lq * M * L * P].view(
        N, Lq, M, L, P, 2
    )
    g = torch.Generator().manual_seed(3)
    value = torch.randn(
        N, int((shapes[:, 0] * shapes[:, 1]).sum()), M, D, generator=g, dtype=torch.float64
    )
    attn = torch.rand(N, Lq, M, L, P, generator=g, dtype=torch.float64)
    args = (value, shapes, lsi, loc, attn)
    out, gv, gl, ga = grads(ms_deform_attn, *args)
    rout, rgv, rgl, rga = grads(ms_deform_attn_pytorch, *args)
    assert (out - rout).abs().max().item() <= 1e-12
    assert (gv - rgv).abs().max().item() <= 1e-12
    assert (ga - rga).abs().max().item() <= 1e-12
    hw = shapes.to(torch.float64)[None, None, None, :, None, :].flip(-1)  # (W, H) per level
    at_minus_one = ((loc * hw - 0.5) == -1).any(-1, keepdim=True).expand_as(loc)
    assert at_minus_one.any()
    assert (gl - rgl)[~at_minus_one].abs().max().item() <= 1e-12
    assert (gl[at_minus_one] == 0).all()
    # outside the maps entirely: zero output and zero gradients
    far = torch.full_like(loc, 1.5)
    out, gv, gl, ga = grads(ms_deform_attn, value, shapes, lsi, far, attn)
    for t in (out, gv, gl, ga):
        assert t.abs().max().item() == 0


@requires_native
def test_zero_queries_and_empty_batch():
    for N, Lq in ((2, 0), (0, 3)):
        value, shapes, lsi, loc, attn = make_inputs(N=N, Lq=Lq, M=2, D=4)
        out, gv, gl, ga = grads(
            ms_deform_attn,
            value,
            shapes,
            lsi,
            loc,
            attn,
            grad_out=torch.zeros(N, Lq, 8, dtype=torch.float64),
        )
        assert out.shape == (N, Lq, 8)
        assert gv.shape == value.shape and gl.shape == loc.shape and ga.shape == attn.shape
        assert gv.abs().sum().item() == 0


@requires_native
def test_non_contiguous_inputs():
    """Transposed / sliced views give bit-identical outputs and gradients to contiguous copies."""
    value, shapes, lsi, loc, attn = make_inputs(N=2, Lq=6, M=3, D=5, dtype=torch.float32)
    expected = grads(ms_deform_attn, value, shapes, lsi, loc, attn)

    value_t = value.transpose(1, 2).contiguous().requires_grad_()  # (N, M, S, D) storage
    loc_big = torch.zeros(*loc.shape[:-1], 5)
    loc_big[..., 1:5:2] = loc
    loc_big.requires_grad_()
    attn_t = attn.transpose(0, 1).contiguous().requires_grad_()
    value_nc, loc_nc, attn_nc = value_t.transpose(1, 2), loc_big[..., 1:5:2], attn_t.transpose(0, 1)
    shapes_nc = torch.stack([shapes[:, 0], shapes[:, 1]], 0).t()
    for t in (value_nc, loc_nc, attn_nc, shapes_nc):
        assert not t.is_contiguous()
    out = ms_deform_attn(value_nc, shapes_nc, lsi, loc_nc, attn_nc)
    grad_out = torch.randn(
        out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64
    ).float()
    out.backward(grad_out)
    assert torch.equal(out, expected[0])
    assert torch.equal(value_t.grad.transpose(1, 2), expected[1])
    assert torch.equal(loc_big.grad[..., 1:5:2], expected[2])
    assert torch.equal(attn_t.grad.transpose(0, 1), expected[3])


@requires_native
@pytest.mark.parametrize("N,M", [(2, 4), (1, 1)])
def test_thread_count(N, M):
    """Forward is bitwise identical with 1 and 2 threads; backward equal within 1e-5 relative
    (N=1, M=1 exercises the per-chunk grad_value buffers used when N*M < threads)."""
    args = make_inputs(
        N=N, Lq=1500, M=M, D=8, shapes=((12, 20), (6, 10), (3, 5)), P=2, dtype=torch.float32
    )
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out1, *g1 = grads(ms_deform_attn, *args)
        torch.set_num_threads(2)
        out2, *g2 = grads(ms_deform_attn, *args)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(out1, out2)
    for a, b in zip(g1, g2):
        assert rel_err(a, b) <= 1e-5


@requires_native
def test_cpu_instruction_sets_agree():
    """Every CPU variant the machine supports matches the reference (float32 <= 1e-5 relative)."""
    args = make_inputs(N=2, Lq=40, M=2, D=32, P=2, dtype=torch.float32)
    ref = grads(ms_deform_attn_pytorch, *args)
    old = msda._C.cpu_isa()
    tried = 0
    try:
        for isa in ("baseline", "avx2", "avx512"):
            try:
                msda._C.set_cpu_isa(isa)
            except RuntimeError:
                continue
            tried += 1
            for a, b in zip(grads(ms_deform_attn, *args), ref):
                assert rel_err(a, b) <= F32_REL, isa
    finally:
        msda._C.set_cpu_isa(old)
    assert tried >= 1


@requires_native
def test_input_validation():
    value, shapes, lsi, loc, attn = make_inputs()
    with pytest.raises(RuntimeError, match="head counts differ"):
        native(value, shapes, lsi, loc[:, :, :1], attn)
    with pytest.raises(RuntimeError, match="running sum"):
        native(value, shapes * 2, lsi, loc, attn)
    with pytest.raises(RuntimeError, match="share one dtype"):
        native(value, shapes, lsi, loc.float(), attn)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        native(value.half(), shapes, lsi, loc.half(), attn.half())


@requires_native
def test_level_start_index_is_checked_against_spatial_shapes():
    """Start indices that fit in S but are not the running sum of H*W (the layout every path
    assumes), a negative size, and levels that do not cover value's S positions are errors."""
    value, shapes, lsi, loc, attn = (
        make_inputs()
    )  # shapes (6,4),(3,2),(1,1),(5,7): starts 0,24,30,31
    for bad in ([0, 1, 2, 3], [0, 24, 31, 30], [1, 25, 31, 32]):
        with pytest.raises(RuntimeError, match="running sum of H\\*W"):
            native(value, shapes, torch.tensor(bad), loc, attn)
        with pytest.raises(RuntimeError, match="running sum of H\\*W"):
            msda._C.ms_deform_attn_backward(
                value, shapes, torch.tensor(bad), loc, attn, torch.ones(2, 5, 8, dtype=value.dtype)
            )
    with pytest.raises(RuntimeError, match="negative size"):
        native(value, torch.tensor([[6, 4], [3, 2], [1, 1], [-5, 7]]), lsi, loc, attn)
    with pytest.raises(RuntimeError, match="cover 66 positions, but value has S=67"):
        native(torch.cat([value, value[:, :1]], 1), shapes, lsi, loc, attn)


def nan_inputs(dtype):
    """make_inputs with non-finite entries: a NaN x, a NaN y, (+inf, -inf) and a NaN weight on a
    sample inside the maps and on one outside them. Returns the inputs and the (n, q, m) rows
    whose outputs must be NaN."""
    value, shapes, lsi, loc, attn = make_inputs(dtype=dtype, seed=4)
    nan, inf = float("nan"), float("inf")
    loc[0, 1, 0, 0, 0, 0] = nan
    loc[0, 2, 1, 1, 1, 1] = nan
    loc[1, 0, 0, 2, 0] = torch.tensor([inf, -inf])
    loc[1, 3, 1, 0, 2] = torch.tensor([0.4, 0.6])
    attn[1, 3, 1, 0, 2] = nan
    loc[1, 4, 0, 3, 1] = torch.tensor([1.7, -0.9])
    attn[1, 4, 0, 3, 1] = nan
    return (value, shapes, lsi, loc, attn), [(0, 1, 0), (0, 2, 1), (1, 0, 0), (1, 3, 1), (1, 4, 0)]


@requires_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_non_finite_inputs_propagate_as_in_the_pytorch_path(dtype):
    """NaN / inf sampling locations and NaN attention weights, inside and outside the maps: the
    output (NaN in exactly the rows of those samples) and all three gradients have NaN exactly
    where grid_sample + weighted sum has them, and agree elsewhere (absolute and relative <= 1e-10
    in float64, 1e-5 in float32)."""
    args, nan_rows = nan_inputs(dtype)
    mine = grads(ms_deform_attn, *args)
    ref = grads(ms_deform_attn_pytorch, *args)
    tol = F64_ABS if dtype == torch.float64 else F32_REL
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, equal_nan=True, atol=tol, rtol=tol)
    out = mine[0].view(2, 5, 2, 4)
    rows = torch.zeros(2, 5, 2, dtype=torch.bool)
    rows[tuple(zip(*nan_rows))] = True
    assert out[rows].isnan().all() and out[~rows].isfinite().all()
    assert all(t.isnan().any() and t.isfinite().any() for t in mine[1:])


@requires_native
def test_dtype_promotion():
    """Mixed float32 / float64 inputs are promoted (float64 result, <= 1e-10 absolute)."""
    value, shapes, lsi, loc, attn = make_inputs()
    out = ms_deform_attn(value.float(), shapes, lsi, loc, attn)
    assert out.dtype == torch.float64
    assert (
        out - ms_deform_attn_pytorch(value.float().double(), shapes, lsi, loc, attn)
    ).abs().max() <= F64_ABS


def test_fallback_warns_once(monkeypatch):
    """bfloat16 on the CPU has no native kernel: one warning, then silence (same reason)."""
    monkeypatch.setattr(msda, "_WARNED", set())
    args = [t.bfloat16() if t.is_floating_point() else t for t in make_inputs(N=1, Lq=2)]
    with pytest.warns(RuntimeWarning, match="PyTorch") as record:
        ms_deform_attn(*args)
        ms_deform_attn(*args)
    assert len([w for w in record if "ms_deform_attn" in str(w.message)]) == 1


def module_inputs(
    N=2, Lq=7, C=32, shapes=((6, 5), (3, 3), (1, 2)), dtype=torch.float64, seed=0, ref_dim=2
):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(shapes)
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    L = shapes.shape[0]
    query = torch.randn(N, Lq, C, generator=g, dtype=dtype)
    inp = torch.randn(N, S, C, generator=g, dtype=dtype)
    ref = torch.rand(N, Lq, L, ref_dim, generator=g, dtype=dtype)
    if ref_dim == 4:
        ref[..., 2:] = ref[..., 2:] * 0.5 + 0.05
    mask = torch.zeros(N, S, dtype=torch.bool)
    mask[1, -3:] = True
    return query, ref, inp, shapes, level_start(shapes), mask


def perturbed_module(C=32, M=4, L=3, P=2, seed=0):
    torch.manual_seed(seed)
    mod = MultiScaleDeformableAttention(C, M, L, P).double()
    with torch.no_grad():  # non-trivial offsets / weights
        mod.sampling_offsets.weight.normal_(0, 0.3)
        mod.attention_weights.weight.normal_(0, 0.3)
    return mod


@requires_native
@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_fallback_matches_native(monkeypatch, ref_dim):
    """Module output and parameter gradients: native path == forced PyTorch path (float64, <= 1e-10)."""
    mod = perturbed_module()
    inputs = module_inputs(ref_dim=ref_dim)

    def run():
        mod.zero_grad()
        out = mod(*inputs)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in mod.parameters()]

    out_native, g_native = run()
    monkeypatch.setattr(msda, "_C", None)
    monkeypatch.setattr(msda, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="not built"):
        out_fallback, g_fallback = run()
    assert (out_native - out_fallback).abs().max().item() <= F64_ABS
    for a, b in zip(g_native, g_fallback):
        assert (a - b).abs().max().item() <= F64_ABS


def official_locations(mod, query, ref, shapes):
    """The official sampling locations: 2-d references + offsets / (W_l, H_l); 4-d boxes + offsets
    / P * wh / 2."""
    N, Lq, _ = query.shape
    M, L, P = mod.num_heads, mod.num_levels, mod.num_points
    off = mod.sampling_offsets(query).view(N, Lq, M, L, P, 2)
    if ref.shape[-1] == 2:
        wh = torch.stack([shapes[:, 1], shapes[:, 0]], -1).to(off.dtype)
        return ref[:, :, None, :, None, :] + off / wh[None, None, None, :, None, :]
    return ref[:, :, None, :, None, :2] + off / P * ref[:, :, None, :, None, 2:] * 0.5


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_sampling_locations(monkeypatch, ref_dim):
    """The module computes the official sampling locations (2-d: offsets / (W_l, H_l); 4-d boxes:
    offsets / P * wh / 2) and softmax over L*P; checked through the op's arguments (float64, to
    rounding: the module multiplies by reciprocals in one fused pass)."""
    mod = perturbed_module()
    query, ref, inp, shapes, lsi, mask = inputs = module_inputs(ref_dim=ref_dim)
    seen = {}

    def spy(value, spatial_shapes, level_start_index, loc, attn):
        seen.update(value=value, loc=loc, attn=attn)
        return ms_deform_attn_pytorch(value, spatial_shapes, level_start_index, loc, attn)

    monkeypatch.setattr(msda, "ms_deform_attn", spy)
    out = mod(*inputs)
    N, Lq, C = query.shape
    M, L, P = 4, 3, 2
    assert torch.allclose(
        seen["loc"], official_locations(mod, query, ref, shapes), rtol=1e-14, atol=1e-15
    )
    logits = mod.attention_weights(query).view(N, Lq, M, L * P)
    assert torch.allclose(seen["attn"], logits.softmax(-1).view(N, Lq, M, L, P), rtol=0, atol=1e-15)
    value = seen["value"]
    assert value.shape == (N, inp.shape[1], M, C // M)
    assert value[mask].abs().max().item() == 0  # padding zeroed
    assert out.shape == (N, Lq, C)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_gradients_match_the_official_formula(ref_dim):
    """Output and gradients (inputs and parameters) equal the official module's computation written
    out plainly (out-of-place padding fill, offsets scaled after the projection), float64: the
    module's in-place fill and its scaling of the projection rows change nothing but rounding."""
    mod = perturbed_module()
    query, ref, inp, shapes, lsi, mask = module_inputs(ref_dim=ref_dim)
    query.requires_grad_(True)
    inp.requires_grad_(True)
    N, Lq, C = query.shape
    M, L, P = 4, 3, 2

    def official():
        value = mod.value_proj(inp).masked_fill(mask[..., None], 0.0).view(N, -1, M, C // M)
        loc = official_locations(mod, query, ref, shapes)
        attn = mod.attention_weights(query).view(N, Lq, M, L * P).softmax(-1).view(N, Lq, M, L, P)
        return mod.output_proj(ms_deform_attn_pytorch(value, shapes, lsi, loc, attn))

    results = []
    for forward in (lambda: mod(query, ref, inp, shapes, lsi, mask), official):
        out = forward()
        tensors = [query, inp, *mod.parameters()]
        results.append((out, torch.autograd.grad(out.square().sum(), tensors)))
    (out, grads), (out_ref, grads_ref) = results
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    assert grads[1][mask].abs().max().item() == 0  # nothing flows into padded values


def test_module_rejects_bad_reference_points():
    mod = perturbed_module()
    query, ref, inp, shapes, lsi, mask = module_inputs()
    with pytest.raises(ValueError, match="reference_points"):
        mod(query, torch.rand(2, 7, 3, 3, dtype=torch.float64), inp, shapes, lsi, mask)


def test_module_rejects_a_padding_mask_of_the_wrong_size():
    """A mask that is not (N, S) bool is an error, also a transposed one with N*S elements (it
    would otherwise be reshaped silently onto the wrong positions)."""
    mod = perturbed_module()
    query, ref, inp, shapes, lsi, mask = module_inputs()
    for bad in (mask.t().contiguous(), mask[:, :-1], mask.float()):
        with pytest.raises(ValueError, match=r"input_padding_mask must be a \(2, 41\) bool"):
            mod(query, ref, inp, shapes, lsi, bad)
    assert mod(query, ref, inp, shapes, lsi, mask).isfinite().all()


def test_module_init():
    """Official init: offsets bias = per-head direction (cos, sin)/max(|cos|,|sin|) * (i+1), same for
    every level; zero offset / attention weights; xavier projections with zero bias (exact)."""
    M, L, P = 8, 4, 4
    mod = MultiScaleDeformableAttention(256, M, L, P)
    assert mod.sampling_offsets.weight.abs().max().item() == 0
    bias = mod.sampling_offsets.bias.view(M, L, P, 2)
    expected_dirs = torch.tensor(
        [[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]], dtype=torch.float32
    )
    for i in range(P):
        for lvl in range(L):
            assert torch.allclose(bias[:, lvl, i], expected_dirs * (i + 1), atol=1e-6)
    assert mod.attention_weights.weight.abs().max().item() == 0
    assert mod.attention_weights.bias.abs().max().item() == 0
    assert (
        mod.value_proj.bias.abs().max().item() == 0 and mod.output_proj.bias.abs().max().item() == 0
    )
    bound = math.sqrt(6 / (256 + 256))
    assert 0 < mod.value_proj.weight.abs().max().item() <= bound
    assert [n for n, _ in mod.named_children()] == [
        "sampling_offsets",
        "attention_weights",
        "value_proj",
        "output_proj",
    ]
    assert (
        mod.sampling_offsets.out_features == M * L * P * 2
        and mod.attention_weights.out_features == M * L * P
    )


def test_module_arguments(caplog):
    with pytest.raises(ValueError, match="divisible"):
        MultiScaleDeformableAttention(30, 4)
    with caplog.at_level(logging.WARNING, logger="detr_variants.layers.ms_deform_attn"):
        MultiScaleDeformableAttention(24, 4)  # 6 channels per head
    assert "power of 2" in caplog.text


# ----------------------------------------------------------------------------------------- CUDA
cuda_native = pytest.mark.skipif(
    not (torch.cuda.is_available() and native_available("cuda")),
    reason="needs CUDA and the CUDA kernels",
)


@pytest.mark.cuda
@cuda_native
@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)]
)
@pytest.mark.parametrize("D", [1, 3, 8, 32, 64, 71])
def test_cuda_forward_backward_match_reference(dtype, tol, D):
    """CUDA vs float64 reference, relative to the max: fp32 1e-5, fp16 2e-3, bf16 1.6e-2 (outputs
    and gradients, inputs rounded to the dtype first)."""
    args64 = make_inputs(N=2, Lq=33, M=3, D=D, P=3, seed=4)
    args = [t.to(dtype) if t.is_floating_point() else t for t in args64]
    args64 = [
        t.to(torch.float64) if t.is_floating_point() else t for t in args
    ]  # same rounded inputs
    mine = grads(ms_deform_attn, *[t.cuda() for t in args])
    ref = grads(ms_deform_attn_pytorch, *args64)
    assert mine[0].dtype == dtype
    for a, b in zip(mine, ref):
        assert rel_err(a.double().cpu(), b) <= tol


@pytest.mark.cuda
@cuda_native
@pytest.mark.parametrize("D", [1, 3, 30, 32, 64, 71])
def test_cuda_gradcheck(D):
    """torch.autograd.gradcheck in float64 on the GPU (eps 1e-6, atol 1e-5, rtol 1e-3)."""
    value, shapes, lsi, loc, attn = make_inputs(
        N=2, Lq=2, M=2, D=D, shapes=((3, 2), (1, 1), (2, 3)), P=2, seed=5, device="cuda"
    )
    value, loc, attn = (t.requires_grad_() for t in (value, loc, attn))
    assert torch.autograd.gradcheck(
        lambda v, l, a: ms_deform_attn(v, shapes, lsi, l, a),
        (value, loc, attn),
        eps=1e-6,
        atol=1e-5,
        rtol=1e-3,
    )


# ------------------------------------------------------------ CUDA kernels, emulated on the host
def _cuda_emulation_module():
    """Builds ops/csrc/cuda/ms_deform_attn_cuda_emulation.cpp (the .cu compiled as C++, kernels run
    on CPU threads); cached by torch's extension cache, keyed on a hash of the sources."""
    import hashlib
    import os

    from torch.utils.cpp_extension import CUDA_HOME, load

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    csrc = os.path.join(root, "ops", "csrc")
    roots = [os.environ.get("CUDA_HOME"), CUDA_HOME, "/usr/local/cuda"]
    includes = [os.path.join(r, "include") for r in roots if r]
    includes = [d for d in includes if os.path.exists(os.path.join(d, "cuda_runtime_api.h"))]
    if not includes:
        pytest.skip("CUDA headers not found (set CUDA_HOME)")
    cuda_include = includes[0]
    srcs = [
        os.path.join(csrc, "cuda", "ms_deform_attn_cuda_emulation.cpp"),
        os.path.join(csrc, "ms_deform_attn.cpp"),
    ]
    digest = hashlib.sha256()
    for path in srcs + [
        os.path.join(csrc, f)
        for f in ("cuda/ms_deform_attn_cuda.cu", "ms_deform_attn.h", "ms_deform_attn_bilinear.h")
    ]:
        with open(path, "rb") as f:
            digest.update(f.read())
    return load(
        "detr_variants_msda_cuda_emulation",
        srcs,
        extra_include_paths=[csrc, cuda_include],
        extra_cflags=[
            "-O1",
            "-std=c++20",
            "-DWITH_CUDA",
            "-Wno-unknown-pragmas",
            f"-DMSDA_SOURCE_HASH={digest.hexdigest()[:16]}",
        ],
        verbose=False,
    )


def _emulated_cuda_function():
    """The emulated CUDA forward/backward as an autograd function (called like ms_deform_attn)."""
    emu = _cuda_emulation_module()

    class EmulatedFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, shapes, lsi, loc, attn):
            ctx.save_for_backward(value, shapes, lsi, loc, attn)
            return emu.ms_deform_attn_forward(value, shapes, lsi, loc, attn)

        @staticmethod
        def backward(ctx, grad_out):
            value, shapes, lsi, loc, attn = ctx.saved_tensors
            gv, gl, ga = emu.ms_deform_attn_backward(value, shapes, lsi, loc, attn, grad_out)
            return gv, None, None, gl, ga

    return EmulatedFn.apply


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_kernels_propagate_non_finite_inputs_in_host_emulation(dtype):
    """The CUDA kernels (host emulation) on the non-finite inputs of
    test_non_finite_inputs_propagate_as_in_the_pytorch_path: NaN exactly where the PyTorch path
    has NaN, equal elsewhere (absolute and relative <= 1e-10 in float64, 1e-5 in float32)."""
    args, _ = nan_inputs(dtype)
    mine = grads(_emulated_cuda_function(), *args)
    ref = grads(ms_deform_attn_pytorch, *args)
    tol = F64_ABS if dtype == torch.float64 else F32_REL
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a, b, equal_nan=True, atol=tol, rtol=tol)


@pytest.mark.slow
def test_cuda_kernels_in_host_emulation():
    """The CUDA kernels and launchers, run by the host emulation, against the float64 reference
    (outputs and all gradients, relative to the max): float64 1e-12, float32 1e-5, float16 2e-3,
    bfloat16 1.6e-2. Covers every vector width, the multi-group backward (D=256 float32, D=71) and
    a misaligned value tensor (scalar loads)."""
    emulated = _emulated_cuda_function()
    cases = [
        (dt, D, False)
        for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
        for D in (1, 3, 32, 71)
    ]
    cases += [
        (torch.float32, 256, False),
        (torch.float16, 2, False),
        (torch.float32, 32, True),
        (torch.bfloat16, 16, True),
    ]
    tols = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
    for dtype, D, misaligned in cases:
        args = make_inputs(N=2, Lq=4, M=3, D=D, P=2, seed=6)
        args = [t.to(dtype) if t.is_floating_point() else t for t in args]
        if misaligned:  # same values, data pointer offset by one element
            storage = torch.empty(args[0].numel() + 1, dtype=dtype)
            storage[1:] = args[0].flatten()
            args[0] = storage[1:].view(args[0].shape)
        args64 = [t.double() if t.is_floating_point() else t for t in args]
        mine = grads(emulated, *args)
        ref = grads(ms_deform_attn_pytorch, *args64)
        assert mine[0].dtype == dtype and mine[1].dtype == dtype
        for a, b in zip(mine, ref):
            assert rel_err(a.double(), b) <= tols[dtype], (dtype, D, misaligned)
