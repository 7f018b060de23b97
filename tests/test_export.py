"""Export for α,β-CROWN: normalization stripped soundly, ONNX parity, VNN-LIB syntax (read back by an
independent parser written here), instances.csv / manifest.json / abcrown.yaml, drop-proven."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from ccdist_plugin.bounds import (
    CERT_TOL,
    certify,
    elided_margin_lower_bound,
    input_box,
    interval_bounds,
    margin_lower_bound,
)
from ccdist_plugin.models import cnn3, mlp
from ccdist_plugin.verification import (
    ExportError,
    export_instances,
    export_onnx,
    normalized_box,
    template_path,
    write_abcrown_config,
    write_vnnlib,
)

# --------------------------------------------------------------------------------------------
# An independent VNN-LIB reader (shares no code with the writer): s-expressions → boxes + disjunction
# --------------------------------------------------------------------------------------------


def _sexprs(text: str) -> list:
    text = "\n".join(line.split(";", 1)[0] for line in text.splitlines())
    tokens = re.findall(r"\(|\)|[^\s()]+", text)
    stack: list[list] = [[]]
    for tok in tokens:
        if tok == "(":
            stack.append([])
        elif tok == ")":
            done = stack.pop()
            stack[-1].append(done)
        else:
            stack[-1].append(tok)
    assert len(stack) == 1, "unbalanced parentheses"
    return stack[0]


def parse_vnnlib(path: Path) -> dict:
    """{'n_x', 'n_y', 'lo', 'hi', 'disjuncts': [list of (op, a, b)]} of a robustness VNN-LIB file."""
    xs, ys, lo, hi, disjuncts = set(), set(), {}, {}, None
    for expr in _sexprs(Path(path).read_text()):
        head = expr[0]
        if head == "declare-const":
            assert expr[2] == "Real"
            (xs if expr[1].startswith("X_") else ys).add(expr[1])
            continue
        assert head == "assert", expr
        body = expr[1]
        if body[0] in ("<=", ">=") and body[1].startswith("X_") and not body[2].startswith(("X_", "Y_")):
            i, v = int(body[1][2:]), float(body[2])
            (hi if body[0] == "<=" else lo)[i] = v
        elif body[0] == "or":
            assert disjuncts is None, "one disjunction expected"
            disjuncts = []
            for conj in body[1:]:
                assert conj[0] == "and" and len(conj) == 2
                disjuncts.append(tuple(conj[1]))
        else:
            raise AssertionError(f"unexpected assertion {body}")
    n = len(xs)
    assert xs == {f"X_{i}" for i in range(n)} and sorted(lo) == list(range(n)) == sorted(hi)
    return {
        "n_x": n,
        "n_y": len(ys),
        "lo": np.array([lo[i] for i in range(n)]),
        "hi": np.array([hi[i] for i in range(n)]),
        "disjuncts": disjuncts,
    }


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    sk = pytest.importorskip("sklearn.datasets")
    d = sk.load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    return x[:1500], y[:1500], x[1500:], y[1500:]


@pytest.fixture(scope="module")
def digits_model(digits):
    """An MLP trained for a second on digits (clean CE): a mix of robust and non-robust points."""
    xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    net = mlp(1, 8, 10, width=32, depth=2, mean=[0.3], std=[0.4])
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: threads only add overhead
    try:
        for _ in range(15):
            for b in torch.randperm(len(xtr)).split(100):
                opt.zero_grad()
                nn.functional.cross_entropy(net(xtr[b]), ytr[b]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval()


def _bn_cnn():
    """A cnn3 with BatchNorm (non-trivial running statistics) and per-channel normalization."""
    torch.manual_seed(1)
    net = cnn3(3, 8, 4, width=16, channels=(4, 6), mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-1.5, 1.5)  # includes negative scales
    return net.eval()


# --------------------------------------------------------------------------------------------
# Normalization stripped from the ONNX: the mapped box gives the same bounds
# --------------------------------------------------------------------------------------------


def test_normalized_box_formula_and_outward_rounding():
    x = torch.rand(3, 4, 4)
    x[0, 0, 0], x[1, 1, 1] = 0.0, 1.0
    mean, std, eps = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3], 0.05
    lo, hi = normalized_box(x, eps, mean, std)
    xd = x.double().numpy()
    mu, sd = np.array(mean).reshape(3, 1, 1), np.array(std).reshape(3, 1, 1)
    want_lo = ((np.maximum(xd - eps, 0) - mu) / sd).reshape(-1)
    want_hi = ((np.minimum(xd + eps, 1) - mu) / sd).reshape(-1)
    assert (lo <= want_lo).all() and (hi >= want_hi).all()  # contains the exact box
    assert np.allclose(lo, want_lo, atol=1e-6) and np.allclose(hi, want_hi, atol=1e-6)
    assert (lo.astype(np.float32).astype(np.float64) == lo).all()  # float32-exact: read back unchanged
    assert lo[0] == pytest.approx(-0.5 / 0.2, abs=1e-6)  # clipped at pixel 0


def test_normalized_box_rejects_bad_input():
    with pytest.raises(ValueError, match="pixel space"):
        normalized_box(torch.full((1, 2, 2), 2.0), 0.1, [0.0], [1.0])
    with pytest.raises(ValueError, match="channels"):
        normalized_box(torch.rand(3, 2, 2), 0.1, [0.0], [1.0])
    with pytest.raises(ValueError, match="eps"):
        normalized_box(torch.rand(1, 2, 2), -0.1, [0.0], [1.0])


@pytest.mark.parametrize("make", [_bn_cnn, lambda: mlp(1, 8, 10, width=16, mean=[0.3], std=[0.4]).eval()])
def test_stripped_model_bounds_equal_full_model_bounds(make):
    """IBP of model.without_normalization() on the mapped box = IBP of the full model on the pixel box."""
    model = make().double()
    c, h, w = model.input_shape
    x = torch.rand(5, c, h, w, dtype=torch.float64)
    y = torch.randint(0, model.num_classes, (5,))
    eps = 0.03
    mean, std = model.normalize.mean.flatten().tolist(), model.normalize.std.flatten().tolist()
    boxes = [normalized_box(xi, eps, mean, std) for xi in x]
    lo_n = torch.tensor(np.stack([b[0] for b in boxes])).view_as(x)
    hi_n = torch.tensor(np.stack([b[1] for b in boxes])).view_as(x)
    stripped = model.without_normalization()
    lb_s, ub_s = interval_bounds(stripped, lo_n, hi_n)
    lo_p, hi_p = input_box(x, eps)
    lb_f, ub_f = interval_bounds(model, lo_p, hi_p)
    assert torch.allclose(lb_s, lb_f, atol=1e-5) and torch.allclose(ub_s, ub_f, atol=1e-5)
    # the elided margins the verdicts rest on agree too
    feats = nn.Sequential(*list(model.features)[1:])
    h_lb, h_ub = interval_bounds(feats, lo_n, hi_n)
    z_s = elided_margin_lower_bound(model.head, h_lb, h_ub, y)
    z_f = margin_lower_bound(model, x, y, eps)
    assert torch.allclose(z_s, z_f, atol=1e-5)
    # and the stripped network computes the same function on normalized inputs
    x_n = (x - model.normalize.mean) / model.normalize.std
    assert torch.allclose(stripped(x_n), model(x), atol=1e-10)


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------


def test_export_onnx_parity_and_format(tmp_path):
    model = _bn_cnn()
    model.train()  # export must use eval mode and restore the mode afterwards
    path = tmp_path / "m.onnx"
    x_n = torch.randn(6, *model.input_shape)
    diff = export_onnx(model.without_normalization(), path, model.input_shape, test_inputs=x_n)
    assert model.training and diff <= 1e-5
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert {op.domain or "": op.version for op in proto.opset_import}[""] == 13
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, *model.input_shape]
    assert not any(n.op_type in ("Sub", "Div") for n in proto.graph.node), (
        "normalization leaked into the ONNX"
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model.eval()
    with torch.no_grad():
        for xi in x_n:
            got = sess.run(None, {"input": xi[None].numpy()})[0]
            assert np.abs(got - model.without_normalization()(xi[None]).numpy()).max() <= 1e-5


def test_export_onnx_fails_loudly_on_mismatch(tmp_path):
    model = _bn_cnn()
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_onnx(model.without_normalization(), tmp_path / "m.onnx", model.input_shape, atol=-1.0)
    with pytest.raises(ValueError, match="test_inputs"):
        export_onnx(
            model.without_normalization(), tmp_path / "m.onnx", model.input_shape, torch.rand(2, 1, 8, 8)
        )


# --------------------------------------------------------------------------------------------
# VNN-LIB
# --------------------------------------------------------------------------------------------


def test_write_vnnlib_parsed_independently(tmp_path):
    lo = np.array([-1.5, 0.0, 0.25, 3.0])
    hi = np.array([-1.0, 0.0, 0.75, 3.5])
    path = tmp_path / "p.vnnlib"
    targets = write_vnnlib(path, lo, hi, y=2, num_classes=5, drop=[0, 4], comment="two\nlines")
    assert targets == [1, 3]
    got = parse_vnnlib(path)
    assert got["n_x"] == 4 and got["n_y"] == 5
    assert (got["lo"] == lo).all() and (got["hi"] == hi).all()
    assert got["disjuncts"] == [(">=", "Y_1", "Y_2"), (">=", "Y_3", "Y_2")]


def test_write_vnnlib_roundtrips_float32_box_exactly(tmp_path):
    x = torch.rand(1, 8, 8)
    lo, hi = normalized_box(x, 0.1, [0.3], [0.4])
    write_vnnlib(tmp_path / "p.vnnlib", lo, hi, 3, 10)
    got = parse_vnnlib(tmp_path / "p.vnnlib")
    assert (got["lo"] == lo).all() and (got["hi"] == hi).all()
    assert len(got["disjuncts"]) == 9


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lo=[0.0, 1.0], hi=[1.0, 0.5], y=0, num_classes=3), "lo > hi"),
        (dict(lo=[0.0], hi=[1.0, 2.0], y=0, num_classes=3), "same non-zero size"),
        (dict(lo=[0.0], hi=[1.0], y=3, num_classes=3), "out of range"),
        (dict(lo=[0.0], hi=[1.0], y=0, num_classes=3, drop=[0]), "must not contain the label"),
        (dict(lo=[0.0], hi=[1.0], y=0, num_classes=3, drop=[1, 2]), "nothing left to verify"),
        (dict(lo=[0.0], hi=[float("nan")], y=0, num_classes=3), "finite"),
    ],
)
def test_write_vnnlib_rejects_bad_input(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_vnnlib(tmp_path / "p.vnnlib", **kwargs)


# --------------------------------------------------------------------------------------------
# The export directory
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(digits_model, digits, tmp_path_factory):
    _, _, xte, yte = digits
    out = tmp_path_factory.mktemp("export")
    result = export_instances(digits_model, (xte, yte), out, eps=0.04, count=40, start=5, timeout_s=77)
    return result, out


def test_export_files_and_manifest(exported, digits, digits_model):
    result, out = exported
    _, _, xte, yte = digits
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["indices"] == list(range(5, 45)) and manifest["labels"] == yte[5:45].tolist()
    assert manifest["eps"] == 0.04 and manifest["count"] == 40
    assert manifest["normalization"] == {"mean": [pytest.approx(0.3)], "std": [pytest.approx(0.4)]}
    assert manifest["model_arch"] == digits_model.arch and len(manifest["model_sha256"]) == 64
    assert manifest["onnx_max_abs_diff"] <= 1e-4  # logits ~30: a few float32 ulp
    assert sum(manifest["counts"].values()) == 40
    assert all(manifest["counts"][k] > 0 for k in ("pre-certified", "bab")), manifest["counts"]
    rows = list(csv.reader((out / "instances.csv").read_text().splitlines()))
    assert len(rows) == manifest["counts"]["bab"] == result.num_instances
    for r, row in enumerate(rows):
        assert row[0] == "model.onnx" and (out / row[1]).is_file() and float(row[2]) == 77
        point = next(p for p in manifest["points"] if p["instance"] == r)
        assert point["outcome"] == "bab" and point["vnnlib"] == row[1]
    with torch.no_grad():
        pred = digits_model(xte[5:45]).argmax(1)
    for pos, p in enumerate(manifest["points"]):
        assert p["prediction"] == int(pred[pos])
        if p["outcome"] != "bab":
            assert p["instance"] is None  # not sent to BaB
        if not p["correct"]:
            assert p["outcome"] == "misclassified"
    cfg = yaml.safe_load((out / "abcrown.yaml").read_text())
    assert cfg["general"]["root_path"] == str(out.resolve()) and cfg["general"]["csv_name"] == "instances.csv"
    assert cfg["general"]["results_file"] == str(out.resolve() / "abcrown_results.pkl")
    assert cfg["bab"]["timeout"] == 77 and cfg["model"]["input_shape"] == [-1, 1, 8, 8]


def test_drop_proven_only_drops_certified_differences(exported, digits, digits_model):
    """Every difference left out of a VNN-LIB file is proved by an independent IBP/CROWN run, every
    pre-certified point is certified by one of them, and the vnnlib box is the mapped pixel ball."""
    result, out = exported
    _, _, xte, yte = digits
    x, y = xte[5:45], yte[5:45]
    ibp = certify(digits_model, x, y, 0.04, method="ibp")
    crown = certify(digits_model, x, y, 0.04, method="crown")
    proved = ibp.proved(CERT_TOL) | crown.proved(CERT_TOL)
    manifest = json.loads((out / "manifest.json").read_text())
    n_dropped = 0
    for pos, p in enumerate(manifest["points"]):
        label = p["label"]
        others = [j for j in range(10) if j != label]
        if p["outcome"] == "pre-certified":
            assert bool(ibp.certified[pos] | crown.certified[pos])
        if p["outcome"] != "bab":
            continue
        assert not all(bool(proved[pos, j]) for j in others)
        for j in p["dropped"]:
            assert bool(proved[pos, j]), f"point {p['index']}: dropped z_{j} is not certified"
        n_dropped += len(p["dropped"])
        vnn = parse_vnnlib(out / p["vnnlib"])
        kept = sorted(int(a[2:]) for _, a, _ in vnn["disjuncts"])
        assert kept == [j for j in others if j not in p["dropped"]]
        assert all(b == f"Y_{label}" and op == ">=" for op, _, b in vnn["disjuncts"])
        norm = digits_model.normalize  # the float32 μ, σ the model itself uses
        lo, hi = normalized_box(x[pos], 0.04, norm.mean.flatten().tolist(), norm.std.flatten().tolist())
        assert (vnn["lo"] == lo).all() and (vnn["hi"] == hi).all()
    assert n_dropped > 0, "no difference was dropped: the test does not exercise drop-proven"


def test_no_drop_and_verify_all(digits_model, digits, tmp_path):
    _, _, xte, yte = digits
    res = export_instances(
        digits_model,
        (xte, yte),
        tmp_path,
        eps=0.04,
        count=20,
        drop_proven=False,
        verify_all=True,
        attack_steps=0,
    )
    assert res.num_instances == 20
    for p in res.points:
        vnn = parse_vnnlib(tmp_path / p["vnnlib"])
        assert len(vnn["disjuncts"]) == 9 and p["dropped"] == []


def test_attacked_points_recorded(digits_model, digits, tmp_path):
    pytest.importorskip("ccdist_plugin.attacks")
    _, _, xte, yte = digits
    res = export_instances(digits_model, (xte, yte), tmp_path, eps=0.15, count=30, attack_steps=20)
    attacked = [p for p in res.points if p["outcome"] == "attacked"]
    assert attacked, res.counts
    with torch.no_grad():
        for p in attacked:
            assert p["pgd_broken"] and p["pgd_margin"] < 0 and p["instance"] is None
    for p in res.points:
        if p["outcome"] == "pre-certified":
            assert not p["pgd_broken"] or p["pgd_margin"] > 0  # a certified point cannot be broken


def test_export_validates_arguments(digits_model, digits, tmp_path):
    _, _, xte, yte = digits
    with pytest.raises(ValueError, match="eps"):
        export_instances(digits_model, (xte, yte), tmp_path, eps=-1.0)
    with pytest.raises(ValueError, match="start"):
        export_instances(digits_model, (xte, yte), tmp_path, eps=0.1, start=10_000)
    with pytest.raises(ValueError, match="template"):
        export_instances(digits_model, (xte, yte), tmp_path, eps=0.1, template="nope")
    with pytest.raises(ValueError, match="CertifiedNet"):
        export_instances(nn.Linear(2, 2), (xte, yte), tmp_path, eps=0.1)
    with pytest.raises(ValueError, match="shape"):
        export_instances(digits_model, (torch.rand(4, 3, 8, 8), yte[:4]), tmp_path, eps=0.1)


def test_template_resolution(tmp_path):
    assert template_path("cifar10").name == "cifar10.yaml"
    custom = tmp_path / "mine.yaml"
    custom.write_text("bab:\n  timeout: 5\n")
    assert template_path(custom) == custom.resolve()
    cfg_path = write_abcrown_config(tmp_path, custom, timeout_s=9, overrides={"solver.batch_size": 8})
    cfg = yaml.safe_load(cfg_path.read_text())
    assert cfg["bab"]["timeout"] == 9 and cfg["solver"]["batch_size"] == 8
    with pytest.raises(ValueError, match="does not exist"):
        template_path(tmp_path / "missing.yaml")


def test_cli_export_from_checkpoint(digits_model, tmp_path):
    pytest.importorskip("sklearn")
    from ccdist_plugin.checkpoint import save_checkpoint
    from ccdist_plugin.cli import main

    ckpt = save_checkpoint(
        tmp_path / "ckpt.pt",
        {"arch": digits_model.arch, "model_state": digits_model.state_dict(), "config": {"eps": "1/255"}},
    )
    out = tmp_path / "export"
    args = ["export", "--checkpoint", str(ckpt), "--data", "digits", "--out", str(out), "--count", "8"]
    res = CliRunner().invoke(
        main, [*args, "--attack-steps", "0", "--timeout", "30", "--set", "solver.batch_size=16"]
    )
    assert res.exit_code == 0, res.output
    assert "8 test points" in res.output and "ccdist verify --export" in res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["eps"] == pytest.approx(1 / 255) and manifest["dataset"] == "digits"
    assert len(manifest["checkpoint_sha256"]) == 64 and manifest["template"] == "digits.yaml"
    cfg = yaml.safe_load((out / "abcrown.yaml").read_text())
    assert cfg["solver"]["batch_size"] == 16 and cfg["bab"]["timeout"] == 30
    bad = CliRunner().invoke(main, [*args, "--eps", "two"])
    assert bad.exit_code != 0 and "eps" in bad.output
