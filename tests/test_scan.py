"""Selective scan: the fast paths agree with the reference loop (Mamba's S6 recurrence)."""
import json
import math

import pytest
import torch

import common


def make_inputs(batch=2, dim=6, length=37, state=4, b_form="groups", c_form="groups",
                seed=0, strong_decay=False):
    """Random float32 scan inputs as a dict of leaves, every one requiring grad."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        """Standard normal float32 tensor from this case's generator."""
        return torch.randn(*shape, generator=generator)

    def operand(form):
        """B or C as (D, N), (b, N, L), (b, G=2, N, L) or (b, G=D, N, L)."""
        shapes = dict(fixed=(dim, state), shared=(batch, state, length),
                      groups=(batch, 2, state, length), per_channel=(batch, dim, state, length))
        return randn(*shapes[form])

    if strong_decay:  # delta = softplus(...) up to 5, A = -exp(log(1..16)) down to -16
        delta = torch.log(torch.expm1(0.01 + 4.99 * torch.rand(batch, dim, length,
                                                                generator=generator)))
        A = -torch.exp(torch.log(torch.arange(1.0, state + 1))).repeat(dim, 1)
    else:
        delta, A = randn(batch, dim, length), -torch.exp(randn(dim, state))
    inputs = dict(u=randn(batch, dim, length), delta=delta, A=A, B=operand(b_form),
                  C=operand(c_form), D=randn(dim), z=randn(batch, dim, length),
                  delta_bias=0.5 * randn(dim))
    return {k: v.requires_grad_() for k, v in inputs.items()}


def run(scan, inputs, dtype=None, **flags):
    """Out, last state and the gradients of a fixed random loss w.r.t. every tensor input."""
    leaves = {k: v.detach().to(dtype or v.dtype).requires_grad_() for k, v in inputs.items()}
    out, last = scan(**leaves, return_last_state=True, **flags)
    generator = torch.Generator().manual_seed(1)
    w_out = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    w_last = torch.randn(last.shape, generator=generator, dtype=torch.float64)
    loss = (out.double() * w_out).sum() + (last.double() * w_last).sum()
    grads = torch.autograd.grad(loss, [v for v in leaves.values() if v.requires_grad],
                                materialize_grads=True)  # zeros, e.g. for A when L = 1
    return out, last, dict(zip([k for k, v in leaves.items() if v.requires_grad], grads))


def rel_err(a, b):
    """Relative error ||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_agree(result, expected, tol=1e-4):
    """Outputs, last states and every gradient agree to tol (relative, norm-based)."""
    (out, last, grads), (out_ref, last_ref, grads_ref) = result, expected
    assert out.shape == out_ref.shape and last.shape == last_ref.shape
    assert rel_err(out, out_ref) < tol
    assert rel_err(last, last_ref) < tol
    assert grads.keys() == grads_ref.keys()
    for name in grads_ref:
        assert grads[name].shape == grads_ref[name].shape, name
        assert rel_err(grads[name], grads_ref[name]) < tol, name


def drop(inputs, *names):
    """The inputs with the optional arguments in names left out."""
    return {k: v for k, v in inputs.items() if k not in names}


def blocked(block_elements):
    """The fast path with blocks of about block_elements states (as short as that makes them)."""
    def scan(**kwargs):
        """Fast path with this block size."""
        return common._selective_scan_fast(**kwargs, block_elements=block_elements, min_steps=1)
    return scan


CASES = [  # b_form, c_form, batch, length, optional inputs left out, softplus
    ("fixed", "fixed", 2, 37, (), True),
    ("shared", "shared", 1, 37, (), True),
    ("groups", "groups", 3, 37, (), True),
    ("per_channel", "groups", 2, 37, ("z",), False),
    ("fixed", "groups", 2, 29, ("D", "delta_bias"), True),
    ("groups", "shared", 2, 37, ("D", "z", "delta_bias"), False),
    ("groups", "fixed", 1, 1, (), True),
    ("shared", "groups", 2, 64, ("delta_bias",), True),
]


@pytest.mark.parametrize("b_form, c_form, batch, length, left_out, softplus", CASES)
def test_fast_path_matches_reference(b_form, c_form, batch, length, left_out, softplus):
    """Fast path (default, blocks of a few steps, of one step) = float64 reference, grads too."""
    inputs = drop(make_inputs(batch=batch, length=length, b_form=b_form, c_form=c_form),
                  *left_out)
    expected = run(common.selective_scan_reference, inputs, torch.float64,
                   delta_softplus=softplus)
    per_step = batch * 6 * 4  # b D N of make_inputs
    for scan in (common.selective_scan, blocked(5 * per_step), blocked(1)):
        assert_agree(run(scan, inputs, delta_softplus=softplus), expected)


def test_default_path_spans_several_blocks():
    """selective_scan itself over several default-size blocks, the last one shorter."""
    dim, state = 64, 16
    steps = common.SCAN_BLOCK_ELEMENTS // (dim * state)  # per block of the default path
    inputs = make_inputs(batch=1, dim=dim, state=state, length=2 * steps + 37)
    expected = run(common.selective_scan_reference, inputs, torch.float64, delta_softplus=True)
    assert_agree(run(common.selective_scan, inputs, delta_softplus=True), expected)


def test_long_sequence_with_strong_decay_stays_finite():
    """L = 2000, delta up to 5, A down to -16: no overflow, same values as the reference."""
    inputs = make_inputs(batch=1, dim=4, length=2000, state=16, strong_decay=True)
    flags = dict(delta_softplus=True)
    assert float(torch.nn.functional.softplus(inputs["delta"].detach()).max()) > 4.9
    expected = run(common.selective_scan_reference, drop(inputs, "delta_bias"), torch.float64,
                   **flags)
    for scan in (common.selective_scan, blocked(7 * 4 * 16)):
        out, last, grads = result = run(scan, drop(inputs, "delta_bias"), **flags)
        assert torch.isfinite(out).all() and torch.isfinite(last).all()
        assert all(torch.isfinite(g).all() for g in grads.values())
        assert_agree(result, expected)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)])
def test_half_precision_inputs(dtype, tol):
    """bfloat16/float16 in: output and gradients in that dtype, close to float64 on them."""
    inputs = make_inputs(batch=2, length=40)
    halves = {k: v.detach().to(dtype) for k, v in inputs.items()}
    expected = run(common.selective_scan_reference, halves, torch.float64, delta_softplus=True)
    for scan in (common.selective_scan, common.selective_scan_reference):
        out, last, grads = run(scan, halves, delta_softplus=True)
        assert out.dtype == dtype and last.dtype == torch.float32
        assert rel_err(out, expected[0]) < tol
        assert rel_err(last, expected[1]) < 1e-4  # the state stays float32
        for name, grad in grads.items():
            assert grad.dtype == dtype and rel_err(grad, expected[2][name]) < tol, name


def test_reference_on_a_hand_checkable_case():
    """The oracle itself on a case worked out by hand."""
    # One channel, N = 1, A_bar = exp(log(1/2)) = 1/2, B_bar u = 1: h = 1, 1.5, 1.75, 1.875.
    ones = torch.ones(1, 1, 4)
    A = torch.tensor([[math.log(0.5)]])
    out, last = common.selective_scan_reference(ones, ones, A, torch.ones(1, 1),
                                                torch.ones(1, 1), return_last_state=True)
    torch.testing.assert_close(out[0, 0], torch.tensor([1.0, 1.5, 1.75, 1.875]))
    torch.testing.assert_close(last, torch.tensor([[[1.875]]]))


def test_channel_uses_group_d_over_channels_per_group():
    """Channel d reads B group d // (D / G), as mamba-ssm does."""
    # D = 4 channels, G = 2 groups: channels 0, 1 read group 0 (B = 0), channels 2, 3 group 1.
    u, delta = torch.ones(1, 4, 5), torch.ones(1, 4, 5)
    B = torch.stack([torch.zeros(1, 3, 5), torch.ones(1, 3, 5)], dim=1)  # (b, G, N, L)
    for scan in (common.selective_scan_reference, common.selective_scan):
        out = scan(u, delta, -torch.ones(4, 3), B, torch.ones(1, 2, 3, 5))
        assert (out[0, :2] == 0).all() and (out[0, 2:] > 0.5).all()


@pytest.mark.parametrize("b_form, c_form", [("groups", "groups"), ("fixed", "shared")])
@pytest.mark.parametrize("block_elements, min_steps", [(2 * 2 * 4 * 3, 1), (6, 2)],
                         ids=["blocks of two steps", "and one channel"])
def test_gradcheck_fast_path_float64(b_form, c_form, block_elements, min_steps):
    """Finite differences agree with the hand-written backward, every input, float64: blocks
    of two steps (the last one of one step), then also cut into one channel each (B and C of
    two groups then repeated to four)."""
    inputs = make_inputs(batch=2, dim=4, length=7, state=3, b_form=b_form, c_form=c_form)
    leaves = [v.detach().double().requires_grad_() for v in inputs.values()]

    def scan(*tensors):
        """Fast path with these blocks."""
        return common._selective_scan_fast(*tensors[:5], D=tensors[5], z=tensors[6],
                                           delta_bias=tensors[7], delta_softplus=True,
                                           return_last_state=True,
                                           block_elements=block_elements, min_steps=min_steps)
    assert scan(*leaves)[0].dtype == torch.float64
    assert torch.autograd.gradcheck(scan, leaves, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_backend_dispatch(monkeypatch):
    """CPU tensors take the torch path; the kernel path passes the arguments through."""
    inputs = {k: v.detach() for k, v in make_inputs(length=9).items()}
    assert isinstance(common.MAMBA_SSM_AVAILABLE, bool)
    assert common.scan_backend(inputs["u"]) == "torch"
    torch.testing.assert_close(common.selective_scan(**inputs),
                               common._selective_scan_fast(**inputs), rtol=0, atol=0)
    calls = []
    monkeypatch.setattr(common, "scan_backend", lambda u: "mamba_ssm")
    monkeypatch.setattr(common, "_mamba_selective_scan_fn",
                        lambda *args, **kwargs: calls.append((args, kwargs)) or "kernel")
    assert common.selective_scan(**inputs, delta_softplus=True) == "kernel"
    (args, kwargs), = calls
    assert args[0] is inputs["u"] and kwargs["delta_softplus"] is True
    assert kwargs["z"] is inputs["z"] and kwargs["return_last_state"] is False


def test_bench_prints_one_json_line_per_size(capsys, monkeypatch):
    """bench_scan prints one parseable JSON line per size: both scans' figures and ratios."""
    baselines = []
    monkeypatch.setattr(common, "_scan_at_revision",  # no git in a test: the loop stands in
                        lambda rev: baselines.append(rev) or common.selective_scan_reference)
    common.bench_scan([dict(batch=1, dim=8, length=48, state=4, groups=2),
                       dict(batch=2, dim=4, length=5, state=2, groups=1)], repeats=1)
    lines = capsys.readouterr().out.strip().splitlines()
    assert baselines == [common.SCAN_BASELINE_REV] and len(lines) == 2
    result = json.loads(lines[0])
    assert result["length"] == 48 and result["baseline"] == common.SCAN_BASELINE_REV
    for key in ("baseline_s", "fast_s", "baseline_cpu_s", "fast_peak_mib", "baseline_peak_mib",
                "speedup_s", "speedup_cpu_s", "memory_ratio"):
        assert result[key] > 0, key
    assert result["speedup_s"] == pytest.approx(result["baseline_s"] / result["fast_s"], rel=0.01)
    assert result["memory_ratio"] == pytest.approx(
        result["fast_peak_mib"] / result["baseline_peak_mib"], rel=0.01)
    common.bench_scan([dict(batch=1, dim=4, length=5, state=2, groups=1)], baseline_rev=None,
                      repeats=1)
    result = json.loads(capsys.readouterr().out)
    assert result["baseline"] is None and "speedup_s" not in result and result["fast_s"] > 0


def test_skip_gate_bias_and_softplus_on_a_hand_checkable_case():
    """D u, silu(z), delta_bias and softplus around the recurrence, worked out by hand."""
    # softplus(0 + log(e - 1)) = 1 = delta; A_bar = 1/2; B = 1, C = 2; u = 1, 2:
    # h = 1, 2.5; y = C h + D u = 2 + D, 5 + 2 D: D = 3 gives 5, 11 and D = -1 gives 1, 3.
    u = torch.tensor([1.0, 2.0]).expand(2, 2, 2) * torch.tensor([1.0, -1.0])[:, None, None]
    bias = torch.full((2,), math.log(math.e - 1))
    z = torch.tensor([0.0, math.log(3)]).expand(2, 2, 2)  # silu = 0 and 0.75 log 3
    A, B, C = torch.full((2, 1), math.log(0.5)), torch.ones(2, 1), torch.full((2, 1), 2.0)
    expected = torch.tensor([[5.0, 11.0], [1.0, 3.0]])
    for scan in (common.selective_scan_reference, common.selective_scan):
        kwargs = dict(D=torch.tensor([3.0, -1.0]), delta_bias=bias, delta_softplus=True)
        out = scan(u, torch.zeros(2, 2, 2), A, B, C, **kwargs)
        torch.testing.assert_close(out, torch.stack([expected, -expected]))
        gated = scan(u, torch.zeros(2, 2, 2), A, B, C, z=z, **kwargs)
        torch.testing.assert_close(gated[..., 0], torch.zeros(2, 2))
        torch.testing.assert_close(gated[..., 1], out[..., 1] * 0.75 * math.log(3))


@pytest.mark.parametrize("size", common.SCAN_BENCH_SIZES,
                         ids=lambda size: f"{size['dim']}x{size['length']}")
def test_paper_preset_shapes_match_reference(size):
    """At cmssm_unet's four scan shapes and call: values of all channels, gradients of some.

    The channels do not interact, so the float64 reference loop with autograd on eight of them
    (first and last of each group) gives every gradient a loss on those channels has.
    """
    inputs = common._scan_bench_inputs(**size)
    generator = torch.Generator().manual_seed(2)
    inputs["A"] = -torch.exp(0.5 * torch.randn(inputs["A"].shape, generator=generator))
    dim, per_group = size["dim"], size["dim"] // size["groups"]
    picked = torch.tensor([g * per_group + k for g in range(size["groups"])
                           for k in (0, per_group - 1)])
    tensors = {k: v for k, v in inputs.items() if torch.is_tensor(v)}
    leaves = {k: v.clone().requires_grad_() for k, v in tensors.items()}
    out, last = common.selective_scan(**leaves, delta_softplus=True, return_last_state=True)
    with torch.no_grad():
        out_ref, last_ref = common.selective_scan_reference(
            **{k: v.double() for k, v in tensors.items()}, delta_softplus=True,
            return_last_state=True)
    assert rel_err(out, out_ref) < 1e-4 and rel_err(last, last_ref) < 1e-4
    w_out = torch.randn(out.shape[0], len(picked), out.shape[2], generator=generator,
                        dtype=torch.float64)
    w_last = torch.randn(last.shape[0], len(picked), last.shape[2], generator=generator,
                         dtype=torch.float64)
    loss = (out[:, picked].double() * w_out).sum() + (last[:, picked].double() * w_last).sum()
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    few = {k: (v[:, picked] if k in ("u", "delta") else v[picked] if k in ("A", "D", "delta_bias")
               else v).double().requires_grad_() for k, v in tensors.items()}
    out_few, last_few = common.selective_scan_reference(**few, delta_softplus=True,
                                                        return_last_state=True)
    loss_few = (out_few * w_out).sum() + (last_few * w_last).sum()
    grads_ref = torch.autograd.grad(loss_few, list(few.values()))
    for name, grad_ref in zip(few, grads_ref):
        grad = grads[name]
        if name in ("u", "delta", "A", "D", "delta_bias"):
            axis = 1 if name in ("u", "delta") else 0
            others = torch.ones(dim, dtype=torch.bool)
            others[picked] = False
            assert (grad.index_select(axis, others.nonzero()[:, 0]) == 0).all(), name
            grad = grad.index_select(axis, picked)
        assert rel_err(grad, grad_ref) < 1e-4, name


def test_bench_baseline_of_an_unknown_revision_is_none():
    """Outside a git checkout, or for a revision it lacks, bench-scan runs without a baseline."""
    assert common._scan_at_revision("no-such-revision-0000") is None


def test_fast_path_ops_run_on_scan_threads_and_the_setting_comes_back(monkeypatch):
    """Forward and backward run their ops on SCAN_THREADS threads; afterwards, and after an
    error inside the scan, torch has the caller's thread count again."""
    seen, real = [], common._run_states

    def spy(*args):
        """_run_states, noting the thread count it runs under."""
        seen.append(torch.get_num_threads())
        return real(*args)
    monkeypatch.setattr(common, "_run_states", spy)
    caller = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = common.selective_scan(**make_inputs(), delta_softplus=True)
        assert seen == [common.SCAN_THREADS] and torch.get_num_threads() == 2  # forward
        out.sum().backward()
        assert seen == [common.SCAN_THREADS] * 2 and torch.get_num_threads() == 2  # backward
        monkeypatch.setattr(common, "_run_states", lambda *args: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            common.selective_scan(**make_inputs())
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(caller)


def test_forward_keeps_its_inputs_and_one_state_per_sixteen_steps():
    """What the default fast path holds for the backward: its inputs and one state per block,
    blocks of at least 16 steps however large a step's state is. The model's graph holds this
    for every scan until the backward: with one state per block of a few steps, cmssm_unet's
    --bench peak rose above the scan's before issue 14 (3.6 GB against 3.2 GB, measured)."""
    batch, dim, state, length = 2, 8, 4, 100
    inputs = make_inputs(batch=batch, dim=dim, state=state, length=length)
    operands = {k: inputs[k].detach().requires_grad_() for k in ("u", "delta", "A", "B", "C")}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x,
                                                  lambda x: x):
        common._selective_scan_fast(**operands, block_elements=1)  # a step would fill a block
    states_per_step = batch * dim * state
    bound = sum(x.numel() for x in operands.values()) + math.ceil(length / 16) * states_per_step
    assert 0 < sum(saved) <= bound


@pytest.mark.parametrize("call, cut", [
    ((1, 768, 16, 4, 4096), (4, 21, 1)),  # 21 steps of 12,288 states fill a block
    ((2, 768, 16, 4, 4096), (4, 16, 2)),  # 16 steps of 24,576 would be 1.5 blocks: 2 slices
    ((1, 3072, 16, 4, 256), (12, 16, 3)),  # 16 x 49,152 = 3 blocks: 3 slices of 4 groups of 12
    ((1, 6144, 16, 4, 64), (12, 16, 6)),  # 6 blocks: 6 slices, groups refined 4 -> lcm(4, 6)
    ((1, 6, 4, 2, 37), (6, 1, 6)),  # one state a block: at most 6 slices, of one channel
    ((1, 5, 4, 5, 9), (5, 1, 5)),  # 5 channels: 1 or 5 slices
])
def test_blocks_cut_the_channels_where_min_steps_would_overfill_them(call, cut):
    """_tiles(batch, dim, N, groups, L, ...) -> (groups, steps, slices), worked by hand for the
    default block of 2^18 states and 16 steps (cmssm_unet's calls) and for one-state blocks."""
    batch, dim, state, groups, length = call
    limits = (common.SCAN_BLOCK_ELEMENTS, 16) if dim >= 768 else (1, 1)
    assert common._tiles(batch, dim, state, groups, length, *limits) == cut
