"""Property tests (hypothesis) of the sparse ops and layouts, and a census of bad inputs to public functions.

Every bad input must raise ValueError or TypeError whose message names the argument; the census counts them
(``BAD_INPUTS``) and ``docs/reliability.md`` reports the figure. Known bugs are listed in ``KNOWN_BAD`` and
run as strict xfails, so they flip to failures once fixed.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _grid import python_metadata
from capsparse.layout import (BlockLayout, ElementMask, normalize_block_size, pack_bits, topk_mask, unpack_bits)
from capsparse.ops import (block_sparse_linear, block_sparse_linear_reference, cap_contrastive_loss,
                           masked_linear, masked_linear_reference)

BACKENDS = ["reference", "cpu"]  # CPU paths never skip: a missing cpu backend fails
DTYPES = {"fp32": (torch.float32, 2e-5), "fp64": (torch.float64, 1e-10)}
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def block_case(draw):
    bm = draw(st.sampled_from([16, 32, 64]))
    bk = draw(st.sampled_from([16, 32, 64]))
    r, c = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    t = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2 ** 16))
    density = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    bias = draw(st.booleans())
    return bm, bk, r, c, t, seed, density, dtype, bias


@SETTINGS
@given(block_case(), st.sampled_from(BACKENDS))
def test_block_sparse_linear_matches_reference(case, backend):
    bm, bk, r, c, t, seed, density, dname, has_bias = case
    dtype, tol = DTYPES[dname]
    g = torch.Generator().manual_seed(seed)
    bitmap = torch.rand(r, c, generator=g) < density
    n, k = r * bm, c * bk
    layout = BlockLayout.from_bitmap(bitmap, (n, k), (bm, bk))
    x = torch.randn(t, k, generator=g, dtype=dtype)
    w = torch.randn(n, k, generator=g, dtype=dtype)
    b = torch.randn(n, generator=g, dtype=dtype) if has_bias else None
    gy = torch.randn(t, n, generator=g, dtype=dtype)
    outs = []
    for fn in (lambda *a: block_sparse_linear(*a, backend=backend), block_sparse_linear_reference):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        bb = b.clone().requires_grad_() if b is not None else None
        y = fn(xx, ww, layout, bb)
        y.backward(gy)
        outs.append((y, xx.grad, ww.grad, None if bb is None else bb.grad))
    for name, a, ref in zip(("y", "dx", "dw", "db"), outs[0], outs[1]):
        if ref is None:
            continue
        scale = max(1.0, ref.abs().max().item())
        assert (a - ref).abs().max().item() <= tol * scale * k, (name, backend, case)
    mask = layout.to_dense_mask()
    assert torch.all(outs[0][2][~mask] == 0), "dW outside kept blocks must be exactly 0"


@SETTINGS
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 6), st.integers(0, 2 ** 16),
       st.sampled_from(sorted(DTYPES)), st.sampled_from(BACKENDS), st.floats(0.0, 1.0))
def test_masked_linear_matches_reference(n, k, t, seed, dname, backend, density):
    dtype, tol = DTYPES[dname]
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, k, generator=g) < density
    x = torch.randn(t, k, generator=g, dtype=dtype)
    w = torch.randn(n, k, generator=g, dtype=dtype)
    gy = torch.randn(t, n, generator=g, dtype=dtype)
    res = []
    for fn in (lambda *a: masked_linear(*a, backend=backend), masked_linear_reference):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xx, ww, mask)
        y.backward(gy)
        res.append((y, xx.grad, ww.grad))
    for a, ref in zip(res[0], res[1]):
        assert (a - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item()) * k
    assert torch.all(res[0][2][~mask] == 0)


@SETTINGS
@given(st.integers(1, 5), st.integers(1, 5), st.integers(0, 2 ** 16), st.floats(0.0, 1.0),
       st.sampled_from([16, 32, 64]))
def test_block_layout_metadata_matches_python(r, c, seed, density, b):
    g = torch.Generator().manual_seed(seed)
    bitmap = torch.rand(r, c, generator=g) < density
    layout = BlockLayout.from_bitmap(bitmap, (r * b, c * b), b)
    ref = python_metadata(bitmap)
    assert int(layout.nnz) == ref["nnz"]
    for name in ("row_ptr", "row_cols", "col_ptr", "col_rows", "block_rows"):
        assert getattr(layout, name).tolist() == ref[name], name
        assert getattr(layout, name).dtype == torch.int32
    assert torch.equal(layout.block_cols, layout.row_cols)
    assert torch.equal(BlockLayout.from_dense_mask(layout.to_dense_mask(), b).bitmap, bitmap)


@SETTINGS
@given(st.lists(st.integers(1, 13), min_size=1, max_size=3), st.integers(0, 2 ** 16), st.floats(0.0, 1.0))
def test_pack_unpack_roundtrip(shape, seed, density):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(*shape, generator=g) < density
    bits = pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_bits(bits, shape), mask)
    if mask.dim() == 2:
        assert torch.equal(ElementMask.unpack(ElementMask(mask).pack(), shape).mask, mask)


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 3), st.sampled_from([16, 32]), st.integers(0, 2 ** 16),
       st.floats(0.0, 1.0), st.sampled_from([torch.float32, torch.float64]))
def test_bsr_csr_roundtrip(r, c, b, seed, density, dtype):
    g = torch.Generator().manual_seed(seed)
    bitmap = torch.rand(r, c, generator=g) < density
    n, k = r * b, c * b
    layout = BlockLayout.from_bitmap(bitmap, (n, k), b)
    w = torch.randn(n, k, generator=g, dtype=dtype)
    back, dense = BlockLayout.from_sparse_bsr(layout.to_sparse_bsr(w))
    assert torch.equal(back.bitmap, bitmap) and torch.equal(dense, w * layout.to_dense_mask())
    emask = ElementMask(torch.rand(n, k, generator=g) < density)
    w = torch.randn(n, k, generator=g, dtype=dtype) + 10.0  # no stored zeros: the mask round-trips exactly
    m2, dense = ElementMask.from_sparse_csr(emask.to_sparse_csr(w))
    assert torch.equal(m2.mask, emask.mask) and torch.equal(dense, w * emask.mask)


@SETTINGS
@given(st.integers(1, 200), st.floats(0.0, 1.0), st.integers(0, 2 ** 16))
def test_topk_mask_keeps_exactly_the_count(numel, density, seed):
    scores = torch.randint(0, 4, (numel,), generator=torch.Generator().manual_seed(seed)).float()  # many ties
    mask = topk_mask(scores, density)
    keep = int(numel * density)
    assert int(mask.sum()) == keep
    if 0 < keep < numel:
        assert scores[mask].min() >= scores[~mask].max()


# ----------------------------------------------------------------------------------------------------------
# bad inputs: ValueError / TypeError naming the argument
# ----------------------------------------------------------------------------------------------------------

_x, _w = torch.randn(3, 32), torch.randn(32, 32)
_lay = BlockLayout.dense((32, 32), 16)
_m = torch.ones(32, 32, dtype=torch.bool)
_q, _k = torch.randn(4, 8), torch.randn(6, 8)
_qi, _ki = torch.arange(4), torch.tensor([0, 1, 2, 3, 0, 1])


def _bsl(**kw):
    a = dict(x=_x, weight=_w, layout=_lay, bias=None)
    a.update(kw)
    return lambda: block_sparse_linear(**a)


def _ml(**kw):
    a = dict(x=_x, weight=_w, mask=_m, bias=None)
    a.update(kw)
    return lambda: masked_linear(**a)


def _cl(**kw):
    a = dict(query=_q, keys=_k, query_ids=_qi, key_ids=_ki)
    a.update(kw)
    return lambda: cap_contrastive_loss(**a)


def _sparse_linear(**kw):
    from capsparse.nn import SparseLinear

    return lambda: SparseLinear(**kw)


def _set_mask(mask, block=None):
    from capsparse.nn import SparseLinear

    layer = SparseLinear(32, 32, block_size=block)
    return lambda: layer.set_mask(mask)


def _sparsify(model=None, **kw):
    from capsparse import sparsify

    model = torch.nn.Sequential(torch.nn.Linear(32, 32)) if model is None else model
    return lambda: sparsify(model, **kw)


BAD_INPUTS = {
    # block_sparse_linear
    "bsl x not tensor": (_bsl(x=[1.0]), "x"),
    "bsl x wrong last dim": (_bsl(x=torch.randn(3, 16)), "x"),
    "bsl x int dtype": (_bsl(x=torch.ones(3, 32, dtype=torch.int64)), "x"),
    "bsl x dtype mismatch": (_bsl(x=_x.double()), "x"),
    "bsl weight 3-D": (_bsl(weight=torch.randn(2, 32, 32)), "weight"),
    "bsl weight wrong shape": (_bsl(weight=torch.randn(64, 32)), "weight"),
    "bsl layout wrong type": (_bsl(layout=_m), "layout"),
    "bsl bias wrong shape": (_bsl(bias=torch.randn(5)), "bias"),
    "bsl bias 2-D": (_bsl(bias=torch.randn(32, 1)), "bias"),
    "bsl bias dtype": (_bsl(bias=torch.randn(32, dtype=torch.float64)), "bias"),
    "bsl unknown backend": (lambda: block_sparse_linear(_x, _w, _lay, backend="gpu9000"), "backend"),
    # masked_linear
    "ml mask not tensor": (_ml(mask=1), "mask"),
    "ml mask float": (_ml(mask=_m.float()), "mask"),
    "ml mask wrong shape": (_ml(mask=_m[:16]), "mask"),
    "ml x wrong dim": (_ml(x=torch.randn(3, 8)), "x"),
    "ml weight not tensor": (_ml(weight="w"), "weight"),
    "ml bias wrong shape": (_ml(bias=torch.randn(31)), "bias"),
    # cap_contrastive_loss
    "cl query 1-D": (_cl(query=torch.randn(8)), "query"),
    "cl keys wrong dim": (_cl(keys=torch.randn(6, 7)), "keys"),
    "cl query int": (_cl(query=torch.ones(4, 8, dtype=torch.int64)), "query"),
    "cl query_ids float": (_cl(query_ids=_qi.float()), "query_ids"),
    "cl query_ids wrong len": (_cl(query_ids=_qi[:3]), "query_ids"),
    "cl key_ids wrong len": (_cl(key_ids=_ki[:2]), "key_ids"),
    "cl only query_labels": (_cl(query_labels=_qi), "key_labels"),
    "cl float labels": (_cl(query_labels=_qi.float(), key_labels=_ki.float()), "query_labels"),
    "cl key_labels wrong len": (_cl(query_labels=_qi, key_labels=_ki[:2]), "key_labels"),
    "cl temperature 0": (_cl(temperature=0.0), "temperature"),
    "cl temperature negative": (_cl(temperature=-0.1), "temperature"),
    "cl temperature str": (_cl(temperature="0.1"), "temperature"),
    "cl normalization": (_cl(normalization="mean"), "normalization"),
    "cl exclude_index wrong len": (_cl(exclude_index=torch.zeros(3, dtype=torch.int64)), "exclude_index"),
    "cl exclude_index float": (_cl(exclude_index=torch.zeros(4)), "exclude_index"),
    "cl exclude_index out of range": (_cl(exclude_index=torch.tensor([0, 1, 2, 99])), "exclude_index"),
    "cl exclude_index below -1": (_cl(exclude_index=torch.tensor([0, 1, 2, -5])), "exclude_index"),
    "cl backend unknown": (_cl(backend="tpu"), "backend"),
    # layouts
    "block_size 0": (lambda: normalize_block_size(0), "block_size"),
    "block_size 24": (lambda: normalize_block_size(24), "block_size"),
    "block_size str": (lambda: normalize_block_size("32"), "block_size"),
    "block_size triple": (lambda: normalize_block_size((16, 16, 16)), "block_size"),
    "from_bitmap float": (lambda: BlockLayout.from_bitmap(torch.ones(2, 2), (32, 32), 16), "bitmap"),
    "from_bitmap wrong shape": (lambda: BlockLayout.from_bitmap(torch.ones(3, 2, dtype=torch.bool), (32, 32), 16),
                                "bitmap"),
    "from_bitmap not divisible": (lambda: BlockLayout.from_bitmap(torch.ones(2, 2, dtype=torch.bool), (40, 32), 16),
                                  "block_size"),
    "to_sparse_bsr weight shape": (lambda: _lay.to_sparse_bsr(torch.randn(16, 32)), "weight"),
    "from_sparse_bsr dense": (lambda: BlockLayout.from_sparse_bsr(_w), "bsr"),
    "ElementMask float": (lambda: ElementMask(_m.float()), "mask"),
    "ElementMask 1-D": (lambda: ElementMask(_m[0]), "mask"),
    "from_sparse_csr dense": (lambda: ElementMask.from_sparse_csr(_w), "csr"),
    "unpack_bits wrong count": (lambda: unpack_bits(torch.zeros(3, dtype=torch.uint8), (5, 8)), "bits"),
    "unpack_bits wrong dtype": (lambda: unpack_bits(torch.zeros(5, dtype=torch.int32), (5, 8)), "bits"),
    "topk_mask density 1.5": (lambda: topk_mask(torch.randn(10), 1.5), "density"),
    "topk_mask density nan-like str": (lambda: topk_mask(torch.randn(10), "0.5"), "density"),
    "topk_mask density bool": (lambda: topk_mask(torch.randn(10), True), "density"),
    # nn / surgery
    "SparseLinear bad block": (_sparse_linear(in_features=32, out_features=32, block_size=24), "block_size"),
    "SparseLinear not divisible": (_sparse_linear(in_features=40, out_features=32, block_size=16), "block_size"),
    "SparseLinear.from_linear conv": (lambda: __import__("capsparse").SparseLinear.from_linear(torch.nn.Conv1d(1, 1, 1)),
                                      "linear"),
    "set_mask float": (_set_mask(_m.float()), "mask"),
    "set_mask wrong shape": (_set_mask(_m[:16]), "mask"),
    "set_mask block wrong shape": (_set_mask(torch.ones(3, 2, dtype=torch.bool), block=16), "mask"),
    "set_mask block float": (_set_mask(torch.ones(2, 2), block=16), "mask"),
    "sparsify not module": (lambda: __import__("capsparse").sparsify("bert"), "model"),
    "sparsify no match": (_sparsify(targets=r"nothing\.here"), "targets"),
    "sparsify bad regex": (_sparsify(targets="(["), "targets"),
    "sparsify empty targets": (_sparsify(targets=[]), "targets"),
    "sparsify protected": (_sparsify(model=torch.nn.ModuleDict({"classifier": torch.nn.Linear(32, 32)}),
                                     targets="classifier"), "targets"),
    "sparsify block not dividing": (_sparsify(model=torch.nn.Sequential(torch.nn.Linear(40, 32)), targets="0",
                                              block_size=16), "block_size"),
    "densify nothing": (lambda: __import__("capsparse").densify(torch.nn.Linear(2, 2)), "model"),
    # backends
    "get_backend unknown": (lambda: __import__("capsparse.backends", fromlist=["x"]).get_backend("tpu"), "backend"),
}

# Bugs found by this census; each is a strict xfail that fails loudly once fixed.
KNOWN_BAD: dict = {}  # case -> reason; empty: every bad input found so far is handled


def _raises_naming(fn, arg):
    try:
        fn()
    except (ValueError, TypeError) as exc:
        return arg in str(exc), f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - any other exception type is a failure of the contract
        return False, f"{type(exc).__name__} (expected ValueError/TypeError): {exc}"
    return False, "no exception"


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_naming_the_argument(case):
    fn, arg = BAD_INPUTS[case]
    if case in KNOWN_BAD:
        ok, got = _raises_naming(fn, arg)
        if not ok:
            pytest.xfail(f"known bug: {KNOWN_BAD[case]} ({got})")
        pytest.fail(f"{case} is fixed: remove it from KNOWN_BAD")
    ok, got = _raises_naming(fn, arg)
    assert ok, f"{case}: expected ValueError/TypeError naming {arg!r}, got {got}"


def test_bad_input_census():
    results = {case: _raises_naming(fn, arg)[0] for case, (fn, arg) in BAD_INPUTS.items()}
    assert len(results) >= 60
    failing = sorted(c for c, ok in results.items() if not ok)
    assert failing == sorted(KNOWN_BAD), failing


# ----------------------------------------------------------------------------------------------------------
# fuzzed GLUE files: ValueError naming the file (and the line), never another crash
# ----------------------------------------------------------------------------------------------------------

_GLUE_LINES = st.one_of(
    st.binary(max_size=40),
    st.lists(st.sampled_from(["sentence", "label", "0", "1", "2", "x y", "", " ", "\ufeff", "nan", "-1", "é",
                              "\r", "\"q\""]), max_size=4).map(lambda f: "\t".join(f).encode("utf-8")),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.booleans(), st.lists(_GLUE_LINES, max_size=6), st.sampled_from(["sst2", "mrpc", "stsb", "cola"]))
def test_fuzzed_glue_files_fail_cleanly(tmp_path_factory, good_header, lines, task):
    from capsparse.data.glue import get_glue_task, load_glue

    t = get_glue_task(task)
    root = tmp_path_factory.mktemp("glue")
    (root / t.dir_name).mkdir()
    fname = t.splits["train"][0]
    path = root / t.dir_name / fname
    header = "\t".join(list(t.tsv_columns.values()) + [t.label_column]).encode() if good_header else b""
    path.write_bytes(b"\n".join(([header] if good_header else []) + lines))
    try:
        ds = load_glue(task, "train", glue_dir=root)
    except ValueError as exc:
        assert str(path) in str(exc), f"message does not name the file: {exc}"
        return
    assert len(ds) == len(ds["idx"])  # parsed: a consistent dataset
