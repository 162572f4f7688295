"""The fused linear + cross-entropy head (fused_head.py) against the chunked head and plain F.cross_entropy on
all the logits, its FLOP count, and bench/fused_head.py's dry run. The Triton kernels run on the CPU under
Triton's interpreter, which must be switched on before triton is imported."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import fused_head  # noqa: E402
from auto_regressive_model import chunked_cross_entropy  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_case(n, c, v, seed=0):
    """h (n, C), w (V, C), targets with some -1 and some equal to the argmax (so accuracy is neither 0 nor 1),
    and a loss mask of 0, 0.5 and 1."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=gen)
    w = torch.randn(v, c, generator=gen) * c ** -0.5
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::3] = (h @ w.t()).argmax(1)[::3]
    targets[1::7] = -1
    loss_mask = torch.randint(0, 3, (n,), generator=gen).float() / 2
    return h, w, targets, loss_mask


def loss_and_grads(head, h, w, targets, loss_mask, scale=3.0, **options):
    """(loss, accuracy, d (scale * loss) / d h, ... / d w) of one head."""
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss, accuracy = head(h, w, targets, loss_mask, with_accuracy=True, **options)
    (scale * loss).backward()
    return loss.detach(), accuracy, h.grad, w.grad


def full_logits_head(h, w, targets, loss_mask, with_accuracy=True):
    """The definition: F.cross_entropy on all the logits, weighted by the mask, averaged over the scored tokens."""
    logits = h @ w.t()
    weights = (targets != -1).float() * loss_mask
    losses = F.cross_entropy(logits, targets.clamp(min=0), reduction="none")
    total = weights.sum().clamp(min=1.0)
    hits = (logits.argmax(1) == targets).float()
    return (losses * weights).sum() / total, (hits * weights).sum() / total


# N, C, V: the bytes tokenizer's vocabulary padded (320), and a GPT-2-like one shrunk to what the interpreter
# runs in a second or two (1000: not a multiple of any tile, so the last vocabulary tile is masked); N not a
# multiple of the row tile either. (V = 50304 takes ~16 s at N = 64 under the interpreter.)
@pytest.mark.parametrize("n, c, v", [(64, 32, 320), (100, 48, 1000), (256, 64, 320)])
def test_fused_head_equals_chunked_and_full_logits_fp32(n, c, v):
    h, w, targets, loss_mask = make_case(n, c, v)
    fused = loss_and_grads(fused_head.fused_linear_cross_entropy, h, w, targets, loss_mask)
    chunked = loss_and_grads(chunked_cross_entropy, h, w, targets, loss_mask, chunk_rows=40)
    full = loss_and_grads(full_logits_head, h, w, targets, loss_mask)
    assert 0 < fused[1] < 1, "the case should have some hits and some misses"
    for reference in (chunked, full):
        for got, want in zip(fused, reference):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fused_head_bf16_autocast_and_bf16_inputs_match_chunked():
    """Under bf16 autocast (as training runs on CUDA) the matmuls take bf16 operands and the gradients come back
    in the inputs' dtype; so they do with bf16 inputs. C = 192 (the rtx3080 preset's width)."""
    h, w, targets, loss_mask = make_case(128, 192, 1000, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = loss_and_grads(fused_head.fused_linear_cross_entropy, h, w, targets, loss_mask)
        chunked = loss_and_grads(chunked_cross_entropy, h, w, targets, loss_mask)
    for grad in fused[2:]:   # fp32 gradients, not bf16 ones cast back to fp32
        assert not torch.equal(grad, grad.bfloat16().float())
    exact = loss_and_grads(full_logits_head, h.bfloat16().float(), w.bfloat16().float(), targets, loss_mask)
    for got, want, reference in zip(fused, chunked, exact):
        assert got.dtype == want.dtype == torch.float32
        # bf16 rounding of the softmax before the gradient products (both heads round it, in different places)
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3 * reference.abs().max().item())
        torch.testing.assert_close(got, reference, rtol=2e-2, atol=2e-3 * reference.abs().max().item())
    fused16 = loss_and_grads(fused_head.fused_linear_cross_entropy, h.bfloat16(), w.bfloat16(), targets, loss_mask)
    assert fused16[2].dtype == fused16[3].dtype == torch.bfloat16
    for got, reference in zip(fused16, exact):
        torch.testing.assert_close(got.float(), reference, rtol=2e-2, atol=2e-3 * reference.abs().max().item())


def test_fused_head_without_grad_equals_chunked():
    h, w, targets, loss_mask = make_case(70, 32, 320, seed=2)
    with torch.no_grad():
        got = fused_head.fused_linear_cross_entropy(h, w, targets, loss_mask, with_accuracy=True)
        want = chunked_cross_entropy(h, w, targets, loss_mask, with_accuracy=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not got[0].requires_grad


def test_fused_head_with_every_target_ignored_is_zero():
    h, w, targets, _ = make_case(20, 16, 320, seed=3)
    targets[:] = -1
    loss, accuracy, grad_h, grad_w = loss_and_grads(fused_head.fused_linear_cross_entropy, h, w, targets, None)
    assert loss.item() == accuracy.item() == 0.0
    assert not grad_h.any() and not grad_w.any()


def test_head_flops_counts_what_flop_counter_sees_in_the_chunked_head():
    n, c, v = 96, 32, 320
    h, w, targets, _ = make_case(n, c, v)
    h.requires_grad_()
    with FlopCounterMode(display=False) as counter:
        chunked_cross_entropy(h, w, targets, chunk_rows=40).backward()
    assert fused_head.head_flops(n, v, c, recompute=False) == counter.get_total_flops()
    assert fused_head.head_flops(n, v, c) == counter.get_total_flops() + 2 * n * v * c   # logits recomputed
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        chunked_cross_entropy(h, w, targets, chunk_rows=40)
    assert fused_head.head_flops(n, v, c, training=False) == counter.get_total_flops()


def test_linear_cross_entropy_falls_back_to_the_chunked_head_without_triton(monkeypatch):
    h, w, targets, loss_mask = make_case(64, 32, 320)
    assert fused_head.head_kind("cpu") == "fused"      # the interpreter is on in this module
    monkeypatch.setattr(fused_head, "triton", None)
    assert fused_head.head_kind("cpu") == "chunked"
    got = loss_and_grads(fused_head.linear_cross_entropy, h, w, targets, loss_mask, chunk_rows=40)
    want = loss_and_grads(chunked_cross_entropy, h, w, targets, loss_mask, chunk_rows=40)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="chunked_cross_entropy"):
        fused_head.fused_linear_cross_entropy(h, w, targets)


def run_bench(*args):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}   # the same answers on a machine with a GPU
    env.pop("TRITON_INTERPRET")                         # --dry-run must switch the interpreter on by itself
    return subprocess.run([sys.executable, os.path.join(REPO, "bench", "fused_head.py"), *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)


def test_bench_dry_run_times_both_heads_and_they_agree():
    result = run_bench("--dry-run")
    assert result.returncode == 0, result.stderr
    rows = {line[:18].strip(): line[18:].split() for line in result.stdout.splitlines()
            if line.startswith(("chunked", "fused"))}
    assert set(rows) == {"chunked", "fused", "fused 32x64x4"}, result.stdout
    for row in rows.values():
        d_loss, d_grad = float(row[-2]), float(row[-1])
        assert d_loss < 1e-3 and d_grad < 1e-2, result.stdout


@pytest.mark.parametrize("args, message", [(["--tiles", "64x64"], "OUTERxINNERxWARPS"),
                                           (["--channels", "0"], "must be >= 1"),
                                           ([], "needs a CUDA GPU")])
def test_bench_bad_input_is_one_line(args, message):
    result = run_bench(*args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
