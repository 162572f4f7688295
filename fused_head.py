"""
A fused linear + cross-entropy head: the language-model loss of h @ w^T without ever writing the (N, V) logits
to memory, as a Triton kernel of our own in the FlashAttention manner.

    loss = fused_linear_cross_entropy(h, w, targets, loss_mask=None, with_accuracy=False)

Same contract as auto_regressive_model.chunked_cross_entropy: h (..., C), w (V, C), targets (...) with -1 = not
scored, loss_mask (...) optional; the loss is sum_i weights_i * CE(h_i @ w^T, targets_i) with
weights = (targets != -1) * loss_mask / max(1, sum of those); with_accuracy also returns the argmax accuracy
over the same weights. bf16 or fp32 inputs (autocast's dtype when autocast is on), fp32 accumulation.

How it works (N rows, V vocabulary, C channels; one program per tile of rows or of vocabulary):
    _forward_kernel  per row tile, a loop over vocabulary tiles: the running max, sum of exponentials, target
                     logit and argmax stay on chip -> per row loss, log-sum-exp (saved) and hit. With gradients
                     it also accumulates d loss / d h as FlashAttention accumulates its output (w is both the
                     keys and the values: d/d h_i = wt_i * (softmax_i @ w - w[t_i])), rescaled as the max moves.
    _grad_w_kernel   (backward) per vocabulary tile, a loop over row tiles: recomputes that tile's logits from
                     the saved log-sum-exp and accumulates d loss / d w in registers. No atomics: each program
                     owns its rows of d/d w. Atomics in one kernel would add one partial sum per row tile into every
                     element of d/d w (2048 x 50304 x 384 for 65536 rows in tiles of 32): far more traffic.
    Cost: 8 N V C FLOPs for a training step (logits 2, d/d h 2, recomputed logits 2, d/d w 2) against the
    chunked head's 6; memory: O(N C + V C), no O(N V) tensor at all. See head_flops().
Limits: C is one tile padded to a power of two (192 -> 256, 384 -> 512: a quarter of the matmul work is on
zeros; a loop over C would remove it), checked free of register spills for C <= 512 only; offsets are int32,
so N C and V C must stay below 2**31.

How the trainer would use it (not wired in yet: measure first with bench/fused_head.py):
    fused_head_available(device) is True on CUDA with triton importable (or under TRITON_INTERPRET=1, for the
    tests on a CPU); the trainer calls fused_linear_cross_entropy then, else chunked_cross_entropy
    (linear_cross_entropy below does exactly this choice), and logs which head it uses (head_kind(device):
    "fused" or "chunked") so that a run's speed and loss can be traced to its head.

triton is optional: this module imports without it; the CPU wheel of torch does not pull it in, the CUDA wheel
does. Living at the root beside auto_regressive_model.py, as the model's math, not in plumbing/ (the trainer's
machinery).
"""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU install without triton: the chunked head does the work
    triton = None

# Triton's CPU interpreter (for the tests): read once, when the kernels below are made, as triton.jit reads it.
INTERPRET = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


def fused_head_available(device):
    """True when the Triton kernels can run on tensors of `device`: CUDA, or Triton's CPU interpreter."""
    if triton is None:
        return False
    device = torch.device(device)
    return device.type == "cuda" or INTERPRET


def head_kind(device):
    """The name of the head linear_cross_entropy uses on `device`, for the training log."""
    return "fused" if fused_head_available(device) else "chunked"


def head_flops(n_rows, vocab, channels, training=True, recompute=True):
    """Matmul FLOPs of the head (profilers do not see inside Triton kernels, so MFU needs this count).
    Forward: the logits, 2 N V C. Training adds d/d h and d/d w, 2 N V C each (the chunked head's 6 N V C as
    torch's FlopCounterMode counts it); recompute=True adds the fused kernel's recomputed logits in backward,
    another 2 N V C (the work the GPU does; leave it out for model FLOPs)."""
    unit = 2 * n_rows * vocab * channels
    if not training:
        return unit
    return unit * (4 if recompute else 3)


def _compute_dtype(h):
    """The matmul dtype: autocast's (bf16 on CUDA) when it is on, else h's (as the chunked head does)."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return h.dtype


if triton is not None:

    @triton.jit
    def _dot(a, b, FP32: tl.constexpr):
        """a @ b with fp32 accumulation. FP32: both operands in fp32 with IEEE products (fp32 inputs; and bf16
        under the interpreter, whose bf16 tl.dot returns garbage in triton 3.9: bf16 products are exact in fp32,
        so this is the GPU's bf16 dot up to summation order)."""
        if FP32:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            out = tl.dot(a, b)
        return out

    @triton.jit
    def _forward_kernel(h_ptr, w_ptr, t_ptr, wt_ptr, loss_ptr, lse_ptr, hit_ptr, gh_ptr,
                        N, V, C, FP32: tl.constexpr, WITH_GRAD: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        chans = tl.arange(0, BLOCK_C)
        row_ok = rows < N
        chan_ok = chans < C
        h = tl.load(h_ptr + rows[:, None] * C + chans[None, :], mask=row_ok[:, None] & chan_ok[None, :], other=0.0)
        t = tl.load(t_ptr + rows, mask=row_ok, other=0)
        wt = tl.load(wt_ptr + rows, mask=row_ok, other=0.0)
        m = tl.full((BLOCK_N,), float("-inf"), tl.float32)      # running max
        s = tl.zeros((BLOCK_N,), tl.float32)                     # sum of exp(logit - m)
        target_logit = tl.zeros((BLOCK_N,), tl.float32)
        best = tl.zeros((BLOCK_N,), tl.int32)                    # argmax so far (first index on ties)
        acc = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)           # sum of exp(logit - m) * w_v
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            wv = tl.load(w_ptr + cols[:, None] * C + chans[None, :], mask=col_ok[:, None] & chan_ok[None, :],
                         other=0.0)
            logits = _dot(h, tl.trans(wv), FP32)
            logits = tl.where(col_ok[None, :], logits, float("-inf"))   # the last tile's padding columns
            tile_max = tl.max(logits, 1)
            tile_arg = tl.argmax(logits, 1).to(tl.int32) + v0
            best = tl.where(tile_max > m, tile_arg, best)
            target_logit += tl.sum(tl.where(cols[None, :] == t[:, None], logits, 0.0), 1)
            m_new = tl.maximum(m, tile_max)
            alpha = tl.exp(m - m_new)
            p = tl.exp(logits - m_new[:, None])
            s = s * alpha + tl.sum(p, 1)
            if WITH_GRAD:
                acc = acc * alpha[:, None] + _dot(p.to(wv.dtype), wv, FP32)
            m = m_new
        lse = m + tl.log(s)
        tl.store(loss_ptr + rows, (lse - target_logit) * wt, mask=row_ok)
        tl.store(lse_ptr + rows, lse, mask=row_ok)
        tl.store(hit_ptr + rows, (best == t).to(tl.float32) * wt, mask=row_ok)
        if WITH_GRAD:
            # d/d h_i = wt_i * (softmax_i @ w - w[t_i]); the target row of w is gathered, not a one-hot product
            mask2 = row_ok[:, None] & chan_ok[None, :]
            w_target = tl.load(w_ptr + t[:, None] * C + chans[None, :], mask=mask2, other=0.0).to(tl.float32)
            grad = wt[:, None] * (acc / s[:, None] - w_target)
            tl.store(gh_ptr + rows[:, None] * C + chans[None, :], grad, mask=mask2)

    @triton.jit
    def _grad_w_kernel(h_ptr, w_ptr, t_ptr, wt_ptr, lse_ptr, scale_ptr, gw_ptr,
                       N, V, C, FP32: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr):
        cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
        chans = tl.arange(0, BLOCK_C)
        col_ok = cols < V
        chan_ok = chans < C
        wv = tl.load(w_ptr + cols[:, None] * C + chans[None, :], mask=col_ok[:, None] & chan_ok[None, :], other=0.0)
        acc = tl.zeros((BLOCK_V, BLOCK_C), tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            row_ok = rows < N
            h = tl.load(h_ptr + rows[:, None] * C + chans[None, :], mask=row_ok[:, None] & chan_ok[None, :],
                        other=0.0)
            t = tl.load(t_ptr + rows, mask=row_ok, other=-1)
            wt = tl.load(wt_ptr + rows, mask=row_ok, other=0.0)
            lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
            logits = _dot(wv, tl.trans(h), FP32)                     # (BLOCK_V, BLOCK_N)
            # d loss / d logits, transposed: wt * (softmax - onehot); padding rows have wt 0
            g = wt[None, :] * (tl.exp(logits - lse[None, :]) - (cols[:, None] == t[None, :]).to(tl.float32))
            acc += _dot(g.to(h.dtype), h, FP32)
        acc = acc * tl.load(scale_ptr)
        tl.store(gw_ptr + cols[:, None] * C + chans[None, :], acc, mask=col_ok[:, None] & chan_ok[None, :])


def _fp32_dots(h):
    return h.dtype == torch.float32 or INTERPRET


# (outer, inner, warps) to override the tile sizes below (bench/fused_head.py --tiles sweeps them)
TILES = None


def _tiles(channels):
    """Tile sizes (outer, inner, C, warps). The outer tile owns an (outer, C) fp32 accumulator for the whole
    loop: rows in the forward kernel, vocabulary entries in the backward one; the inner tile streams past it.
    C is one tile (padded to a power of two, >= 16 for tl.dot). Chosen so that neither kernel spills registers
    on an H100 (ptxas -v on Triton 3.9's sm_90a code: C 192 and 384, bf16)."""
    block_c = max(16, triton.next_power_of_2(channels))
    if TILES is not None:
        return TILES[0], TILES[1], block_c, TILES[2]
    if block_c <= 64:
        return 64, 64, block_c, 4
    return 32, 64 if block_c <= 256 else 32, block_c, 8


def _forward(h, w, targets, weights, with_grad):
    n, c = h.shape
    vocab = w.size(0)
    block_n, block_v, block_c, warps = _tiles(c)          # rows outer, vocabulary inner
    loss = torch.empty(n, dtype=torch.float32, device=h.device)
    lse = torch.empty_like(loss)
    hits = torch.empty_like(loss)
    grad_h = torch.empty(n, c, dtype=torch.float32, device=h.device) if with_grad else loss  # loss: a dummy pointer
    _forward_kernel[(triton.cdiv(n, block_n),)](
        h, w, targets, weights, loss, lse, hits, grad_h, n, vocab, c,
        FP32=_fp32_dots(h), WITH_GRAD=with_grad, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_C=block_c,
        num_warps=warps)
    return loss.sum(), hits.sum(), lse, (grad_h if with_grad else None)


class _FusedCrossEntropy(torch.autograd.Function):
    """h (N, C), w (V, C), targets (N,) int32 >= 0, weights (N,) fp32 already normalised, dtype the matmul dtype
    -> (loss, weighted hits). d/d h comes out of the forward kernel (the loss is the last operation before
    .backward(), as in the chunked head); d/d w is the backward kernel's. h and w are cast in here, not before,
    so that their gradients come back in their own dtype without a round trip through the matmul dtype."""

    @staticmethod
    def forward(ctx, h, w, targets, weights, dtype):
        hd, wd = h.to(dtype).contiguous(), w.to(dtype).contiguous()
        loss, hits, lse, grad_h = _forward(hd, wd, targets, weights, with_grad=True)
        ctx.save_for_backward(hd, wd, targets, weights, lse, grad_h)
        ctx.out_dtypes = h.dtype, w.dtype
        ctx.mark_non_differentiable(hits)
        return loss, hits

    @staticmethod
    def backward(ctx, grad_loss, grad_hits):
        h, w, targets, weights, lse, grad_h = ctx.saved_tensors
        out_h_dtype, out_w_dtype = ctx.out_dtypes
        n, c = h.shape
        vocab = w.size(0)
        block_v, block_n, block_c, warps = _tiles(c)          # vocabulary outer, rows inner
        grad_w = torch.empty(vocab, c, dtype=torch.float32, device=w.device)
        scale = grad_loss.reshape(1).float().contiguous()
        _grad_w_kernel[(triton.cdiv(vocab, block_v),)](
            h, w, targets, weights, lse, scale, grad_w, n, vocab, c,
            FP32=_fp32_dots(h), BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_C=block_c, num_warps=warps)
        return (grad_h * scale).to(out_h_dtype), grad_w.to(out_w_dtype), None, None, None


def fused_linear_cross_entropy(h, w, targets, loss_mask=None, with_accuracy=False):
    """chunked_cross_entropy(h, w, targets, loss_mask, with_accuracy=...) by the Triton kernels (module
    docstring); needs fused_head_available(h.device)."""
    if not fused_head_available(h.device):
        raise RuntimeError(f"the fused head needs triton and a CUDA device (or TRITON_INTERPRET=1), not {h.device}; "
                           "use chunked_cross_entropy")
    h2 = h.reshape(-1, h.size(-1))
    if max(h2.numel(), w.numel()) >= 2 ** 31:
        raise ValueError(f"the fused head's int32 offsets need N C and V C below 2**31, got h {tuple(h2.shape)} and "
                         f"w {tuple(w.shape)}; split the rows or use chunked_cross_entropy")
    flat = targets.reshape(-1)
    weights = (flat != -1).float()      # the chunked head's weights, normalised the same way
    if loss_mask is not None:
        weights = weights * loss_mask.reshape(-1).float()
    weights = (weights / weights.sum().clamp(min=1.0)).contiguous()
    t = flat.clamp(min=0).to(torch.int32).contiguous()
    dtype = _compute_dtype(h2)
    with torch.autocast(h2.device.type, enabled=False):
        if torch.is_grad_enabled() and (h2.requires_grad or w.requires_grad):
            loss, hits = _FusedCrossEntropy.apply(h2, w, t, weights, dtype)
        else:
            hd, wd = h2.detach().to(dtype).contiguous(), w.detach().to(dtype).contiguous()
            loss, hits, _, _ = _forward(hd, wd, t, weights, with_grad=False)
    return (loss, hits) if with_accuracy else loss


def linear_cross_entropy(h, w, targets, loss_mask=None, with_accuracy=False, **chunked_options):
    """The fused head where it can run (head_kind), else auto_regressive_model.chunked_cross_entropy with
    chunked_options (chunk_rows, chunk_fn, token_fn)."""
    if fused_head_available(h.device):
        return fused_linear_cross_entropy(h, w, targets, loss_mask, with_accuracy)
    from auto_regressive_model import chunked_cross_entropy  # here: that module may come to import this one
    return chunked_cross_entropy(h, w, targets, loss_mask, with_accuracy=with_accuracy, **chunked_options)
