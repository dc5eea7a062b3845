"""Representation regularization (RR), PAPER.md §3.2, Eq. 3-5. Only torch.

    text       v_b[1..Tt]  (B, Tt, Dt)  frozen T5 output of sample b's caption (still encoded on a CFG step)
    text_mask              (B, Tt) bool True = real token
    audio      u_b[1..Ta]  (B, Ta, Da)  LM transformer output before the per-codebook heads (lm_loss 'hidden')
    audio_mask             (B, Ta) bool True = real frame
    pool       F           "max" (the paper's best) or "mean"; padding never wins the max, never enters the mean
    T_b = F(v_b), A_b = F(u_b)                     pooled vectors, (B, Dt) and (B, Da)
    T[b,b'] = cos(T_b, T_b')   (Eq. 3),  A[b,b'] = cos(A_b, A_b')   (Eq. 4)
    L_rr = sum_{b != b'} (T[b,b'] - A[b,b'])^2 / (B (B - 1))   (Eq. 5)
Training adds it on CFG steps only: L = L_uncond + lambda * L_rr (Eq. 6, train.py). With data parallelism,
pool per rank, all-gather the pooled vectors with gradient, then `rr_from_pooled` on the global batch.
"""
import torch
import torch.nn.functional as F


def pool_time(x, mask, pool="max"):
    """(B, T, D), (B, T) bool -> (B, D). Max: padding is filled with the dtype's lowest value first."""
    m = mask.bool().unsqueeze(-1)  # (B, T, 1)
    if pool == "max":
        return x.masked_fill(~m, torch.finfo(x.dtype).min).amax(dim=1)
    if pool == "mean":
        return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1).to(x.dtype)
    raise ValueError(f"pool must be 'max' or 'mean', got {pool!r}")


def rr_from_pooled(t, a):
    """Eq. 3-5 on pooled vectors t (B, Dt), a (B, Da) -> scalar L_rr."""
    B = t.shape[0]
    if B < 2 or a.shape[0] != B:
        raise ValueError(f"RR needs a batch of >= 2 pairs (Eq. 5 divides by B(B-1)); got text {B}, audio {a.shape[0]}")
    t, a = F.normalize(t.float(), dim=-1), F.normalize(a.float(), dim=-1)
    diff = (t @ t.T - a @ a.T) ** 2  # (B, B): (T[b,b'] - A[b,b'])^2; the diagonal is 1 - 1 = 0 up to rounding
    off = ~torch.eye(B, dtype=torch.bool, device=diff.device)
    return diff[off].sum() / (B * (B - 1))


def rr_loss(text, text_mask, audio, audio_mask, pool="max"):
    """L_rr (Eq. 5) of one batch; see the module docstring for the shapes."""
    return rr_from_pooled(pool_time(text, text_mask, pool), pool_time(audio, audio_mask, pool))
