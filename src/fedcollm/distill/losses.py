"""Pure loss functions on logits, targets and masks (no models, no optimizers): FedCoLLM Eq. 3-6.

All losses average over answer tokens (mask == 1), so their scale does not grow with answer length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def answer_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of `logits` [B, K, V] against `targets` [B, K], averaged over masked-in tokens."""
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return (nll * mask).sum() / mask.sum().clamp(min=1)


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
               temperature: float = 1.0, direction: str = "forward", top_k: int = 0) -> torch.Tensor:
    """Token-level KL between student and (detached) teacher distributions, mean over answer tokens, x T^2.

    forward: KL(P_teacher || P_student) (the FedCoLLM authors' choice; mean-seeking)
    reverse: KL(P_student || P_teacher) (mode-seeking)
    top_k > 0 keeps only the teacher's k largest logits per token (renormalized): the student is scored on
    that support, which bounds what a teacher has to hold or send to k values per token.
    """
    teacher_logits = teacher_logits.detach()
    s = student_logits / temperature
    t = teacher_logits / temperature
    if top_k:
        t_top, idx = t.topk(min(top_k, t.shape[-1]), dim=-1)
        t_logp = F.log_softmax(t_top, -1)
        if direction == "forward":  # student keeps its full-vocabulary normalisation
            s_logp = F.log_softmax(s, -1).gather(-1, idx)
        else:  # reverse: both renormalised on the teacher's support
            s_logp = F.log_softmax(s.gather(-1, idx), -1)
    else:
        t_logp, s_logp = F.log_softmax(t, -1), F.log_softmax(s, -1)
    kl = _kl_from_logp(s_logp, t_logp, direction)
    return (kl * mask).sum() / mask.sum().clamp(min=1) * temperature**2


def _kl_from_logp(s_logp: torch.Tensor, t_logp: torch.Tensor, direction: str) -> torch.Tensor:
    """Per-row KL from log-probabilities (rows already restricted to answer tokens)."""
    if direction == "forward":
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    if direction == "reverse":
        return (s_logp.exp() * (s_logp - t_logp)).sum(-1)
    raise ValueError(f"direction must be forward or reverse, got {direction!r}")


def mutual_losses(llm_logits: torch.Tensor, slm_logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                  kd_weight: float, temperature: float = 1.0, direction: str = "forward",
                  top_k: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """L^f and L^g of one batch from logits computed once per model; each KL's target is the other, detached.

    L^f = CE(f, y) + lambda * KL_f (updates omega);  L^g = CE(g, y) + lambda * KL_g (updates theta).
    Because each target is detached, (L^f + L^g).backward() sends L^f's gradient only to f and L^g's only to g.
    With T = 1 and the full vocabulary, only answer-token rows are kept and each model's log-softmax is computed
    once and shared by its CE and both KL directions (same values as answer_ce + distill_kl, less memory traffic).
    """
    if temperature == 1.0 and not top_k:
        rows = mask.bool()
        logp_f = F.log_softmax(llm_logits[rows], -1)
        logp_g = F.log_softmax(slm_logits[rows], -1)
        y = targets[rows].unsqueeze(-1)
        ce_f, ce_g = -logp_f.gather(-1, y).mean(), -logp_g.gather(-1, y).mean()
        kl_f = _kl_from_logp(logp_f, logp_g.detach(), direction).mean()
        kl_g = _kl_from_logp(logp_g, logp_f.detach(), direction).mean()
    else:
        ce_f, ce_g = answer_ce(llm_logits, targets, mask), answer_ce(slm_logits, targets, mask)
        kl_f = distill_kl(llm_logits, slm_logits, mask, temperature, direction, top_k)
        kl_g = distill_kl(slm_logits, llm_logits, mask, temperature, direction, top_k)
    loss_f, loss_g = ce_f + kd_weight * kl_f, ce_g + kd_weight * kl_g
    stats = {"ce_f": ce_f.item(), "ce_g": ce_g.item(), "kl_f": kl_f.item(), "kl_g": kl_g.item()}
    return loss_f, loss_g, stats
