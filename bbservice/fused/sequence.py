"""A whole layer's sequence as one autograd node: the training path of the plain cell.

Forward, per step: ``z_t = xp_t + h_{t−1} Uᵀ`` (one ``addmm`` into a preallocated buffer) and
one fused kernel (:func:`bbservice.fused.step.kernel_forward`). Backward, per step in reverse:
one fused kernel and one ``addmm`` for ``dh_{t−1}``; then ``dU`` for all steps in a single
matrix product ``dZᵀ H`` — as cuDNN / oneDNN LSTMs do — instead of a product and a
``(kH, H)`` accumulation per step. Saved: ``Z`` ``(T, B, kH)``, the states and the noise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bbservice.fused.step import _RNG, KernelCaller, _Spec, noise_width


class FusedSequence(torch.autograd.Function):
    """``apply(xp, weight_hh, h0, c0, active, spec, seed, want_kl)`` →
    ``(out (T, B, H), h_n, c_n, kl (T, B) or None)``.

    ``xp`` ``(T, B, kH)`` projected inputs (bias included); ``weight_hh`` ``(kH, H)``;
    ``h0``, ``c0`` ``(B, H)``; ``active`` ``(T, B, 1)`` float 0/1 step masks or ``None`` (a
    masked step keeps the state and outputs zeros); ``seed`` of the in-kernel noise (spec mode
    RNG) or ignored (mean); ``kl`` is the per-row prior KL of every step, unmasked.
    """

    @staticmethod
    def forward(ctx, xp, weight_hh, h0, c0, active, spec: _Spec, seed: int, want_kl: bool):
        steps, batch, _ = xp.shape
        hidden = h0.shape[1]
        xp = xp.contiguous()
        if spec.mode == _RNG and spec.config.family != "g2":
            spec = spec._replace(save_log=True)  # the backward reads log G, skips its recompute
        zs = torch.empty_like(xp)
        hs = xp.new_empty(steps + 1, batch, hidden)  # carried states, hs[0] = h0
        cs = xp.new_empty(steps + 1, batch, hidden)
        hs[0], cs[0] = h0, c0
        eps = lub = None
        if spec.mode == _RNG:
            eps = xp.new_empty(steps, batch, noise_width(spec, hidden))
            if spec.config.family != "g2":
                lub = torch.empty_like(eps)
        kl = xp.new_empty(steps, batch, hidden) if want_kl else None
        out = xp.new_empty(steps, batch, hidden) if active is not None else None
        h_new = c_new = None
        if active is not None:
            h_new, c_new = xp.new_empty(batch, hidden), xp.new_empty(batch, hidden)
        w_t = weight_hh.t()
        call = KernelCaller(spec, xp.dtype, batch, hidden, seed)
        for t in range(steps):
            torch.addmm(xp[t], hs[t], w_t, out=zs[t])
            e = None if eps is None else eps[t]
            u = None if lub is None else lub[t]
            k = None if kl is None else kl[t]
            if active is None:
                call.forward(t, zs[t], cs[t], hs[t + 1], cs[t + 1], e, u, k)
            else:
                call.forward(t, zs[t], cs[t], h_new, c_new, e, u, k)
                m = active[t]
                torch.lerp(hs[t], h_new, m, out=hs[t + 1])
                torch.lerp(cs[t], c_new, m, out=cs[t + 1])
                torch.mul(h_new, m, out=out[t])
        ctx.call, ctx.want_kl = call, want_kl
        ctx.save_for_backward(zs, hs, cs, eps, lub, weight_hh, active)
        output = hs[1:] if active is None else out
        kl_rows = kl.sum(dim=2) if kl is not None else None
        return output, hs[steps].clone(), cs[steps].clone(), kl_rows

    @staticmethod
    def backward(ctx, grad_out, grad_hn, grad_cn, grad_kl):
        zs, hs, cs, eps, lub, weight_hh, active = ctx.saved_tensors
        call = ctx.call
        steps, batch, _ = zs.shape
        hidden = hs.shape[2]
        grad_zs = torch.empty_like(zs)
        dh = grad_hn.clone() if grad_hn is not None else hs.new_zeros(batch, hidden)
        dc = grad_cn.clone() if grad_cn is not None else hs.new_zeros(batch, hidden)
        if grad_out is not None:
            grad_out = grad_out.contiguous()
            if active is None:
                dh += grad_out[steps - 1]
        dc_prev = torch.empty_like(dc)
        want_kl = ctx.want_kl and grad_kl is not None
        for t in range(steps - 1, -1, -1):
            gkl = grad_kl[t].unsqueeze(1).expand(batch, hidden).contiguous() if want_kl else None
            e = None if eps is None else eps[t]
            u = None if lub is None else lub[t]
            if active is None:  # dh already holds dL/dh_t (from the future and the output)
                call.backward(zs[t], cs[t], e, u, dh, dc, gkl, grad_zs[t], dc_prev)
                if grad_out is not None and t > 0:
                    dh = torch.addmm(grad_out[t - 1], grad_zs[t], weight_hh)
                else:
                    dh = torch.mm(grad_zs[t], weight_hh)
                dc, dc_prev = dc_prev, dc
            else:  # h_t = m h_new + (1 − m) h_{t−1}; out_t = m h_new
                m = active[t]
                gh = dh if grad_out is None else dh + grad_out[t]
                call.backward(zs[t], cs[t], e, u, gh * m, dc * m, gkl, grad_zs[t], dc_prev)
                keep = 1.0 - m
                dh = torch.addmm(dh * keep, grad_zs[t], weight_hh)
                dc = torch.addcmul(dc_prev, dc, keep)
        grad_w = None
        if ctx.needs_input_grad[1]:
            flat = grad_zs.view(steps * batch, -1)
            grad_w = torch.mm(flat.t(), hs[:steps].reshape(steps * batch, hidden))
        return grad_zs, grad_w, dh, dc, None, None, None, None


@torch.no_grad()
def run_inference(
    xp: Tensor,
    h0: Tensor,
    c0: Tensor,
    active: Tensor | None,
    spec: _Spec,
    seed: int,
    matmuls,
    want_kl: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The same loop without autograd: ``matmuls`` from
    :meth:`bbservice.cells.GatedLSTMCell.recurrent_matmuls` (pre-packed oneDNN weights on the
    CPU) and no saved state. Returns ``(out, h_n, c_n, kl (T, B) or None)``."""
    steps, batch, _ = xp.shape
    hidden = h0.shape[1]
    mm_h, mm_m = matmuls
    call = KernelCaller(spec, xp.dtype, batch, hidden, seed)
    out = xp.new_empty(steps, batch, hidden)
    h, c = h0.contiguous(), c0.contiguous()
    eps = lub = None
    if spec.mode == _RNG:
        eps = xp.new_empty(batch, noise_width(spec, hidden))
        lub = torch.empty_like(eps) if spec.config.family != "g2" else None
    kl = xp.new_empty(steps, batch, hidden) if want_kl else None
    for t, xp_t in enumerate(xp.unbind(0)):
        if mm_m is not None:  # mlstm: z = xz + (xm ⊙ h W_mhᵀ) Uᵀ
            xz, xm = xp_t.split([xp_t.shape[1] - hidden, hidden], dim=1)
            z = mm_h(xz, xm * mm_m(None, h))
        else:
            z = mm_h(xp_t, h)
        z = z.contiguous()
        k = None if kl is None else kl[t]
        if active is None:
            h_new, c_new = out[t], torch.empty_like(c)
            call.forward(t, z, c, h_new, c_new, eps, lub, k)
            h, c = h_new, c_new
        else:
            h_new, c_new = torch.empty_like(h), torch.empty_like(c)
            call.forward(t, z, c, h_new, c_new, eps, lub, k)
            m = active[t]
            torch.mul(h_new, m, out=out[t])
            h, c = torch.lerp(h, h_new, m), torch.lerp(c, c_new, m)
    return out, h, c, (kl.sum(dim=2) if kl is not None else None)
