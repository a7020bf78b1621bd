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
                  kd_weight: float, temperature: float = 1.0, direction: str = "forward", top_k: int = 0, *,
                  slm_kd_weight: float | None = None, slm_temperature: float | None = None,
                  llm_teacher: torch.Tensor | None = None, slm_teacher: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """L^f and L^g of one batch from logits computed once per model; each KL's target is the other, detached.

    L^f = CE(f, y) + lambda_f * KL_f (updates omega);  L^g = CE(g, y) + lambda_g * KL_g (updates theta).
    lambda_f = kd_weight at `temperature`; lambda_g and the SLM's temperature default to the same.
    `llm_teacher` / `slm_teacher`: the logits each model is a target with (e.g. from an eval-mode forward, without
    LoRA dropout); by default its own training logits, detached.
    Because each target is detached, (L^f + L^g).backward() sends L^f's gradient only to f and L^g's only to g.
    With T = 1 on both sides, the full vocabulary and the targets taken from the training logits, only answer-token
    rows are kept and each model's log-softmax is computed once and shared by its CE and both KL directions (same
    values as answer_ce + distill_kl, less memory traffic).
    """
    weight_g = kd_weight if slm_kd_weight is None else slm_kd_weight
    temp_g = temperature if slm_temperature is None else slm_temperature
    if temperature == temp_g == 1.0 and not top_k and llm_teacher is None and slm_teacher is None:
        rows = mask.bool()
        logp_f = F.log_softmax(llm_logits[rows], -1)
        logp_g = F.log_softmax(slm_logits[rows], -1)
        y = targets[rows].unsqueeze(-1)
        ce_f, ce_g = -logp_f.gather(-1, y).mean(), -logp_g.gather(-1, y).mean()
        kl_f = _kl_from_logp(logp_f, logp_g.detach(), direction).mean()
        kl_g = _kl_from_logp(logp_g, logp_f.detach(), direction).mean()
    else:
        f_target = llm_logits if llm_teacher is None else llm_teacher
        g_target = slm_logits if slm_teacher is None else slm_teacher
        ce_f, ce_g = answer_ce(llm_logits, targets, mask), answer_ce(slm_logits, targets, mask)
        kl_f = distill_kl(llm_logits, g_target, mask, temperature, direction, top_k)
        kl_g = distill_kl(slm_logits, f_target, mask, temp_g, direction, top_k)
    loss_f, loss_g = ce_f + kd_weight * kl_f, ce_g + weight_g * kl_g
    stats = {"ce_f": ce_f.item(), "ce_g": ce_g.item(), "kl_f": kl_f.item(), "kl_g": kl_g.item()}
    return loss_f, loss_g, stats


def one_way_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                 mask: torch.Tensor, kd_weight: float, temperature: float = 1.0, direction: str = "forward",
                 top_k: int = 0) -> tuple[torch.Tensor, dict[str, float]]:
    """CE(student, y) + lambda * KL against a fixed teacher: one side of Eq. 5-6, as FATE-LLM's sequential
    schedule trains each model in turn."""
    ce = answer_ce(student_logits, targets, mask)
    kl = distill_kl(student_logits, teacher_logits, mask, temperature, direction, top_k)
    return ce + kd_weight * kl, {"ce": ce.item(), "kl": kl.item()}


def pad_choices(scores: list[torch.Tensor]) -> torch.Tensor:
    """Items' per-choice scores (one 1-D tensor each, counts may differ) as [B, C], missing choices -inf."""
    width = max(s.numel() for s in scores)
    return torch.stack([F.pad(s, (0, width - s.numel()), value=-torch.inf) for s in scores])


def choice_kl(student_scores: torch.Tensor, teacher_scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Choice-level distillation: KL(P_teacher || P_student) between distributions over an item's choices, each
    the softmax of per-choice log-likelihoods (summed continuation log-probs, [B, C], -inf where an item has fewer
    choices) at `temperature`, mean over items, x T^2. The target is the teacher's ranking of every choice, the
    distractors included, not only which one is gold."""
    t_logp = F.log_softmax(teacher_scores.detach() / temperature, -1)
    s_logp = F.log_softmax(student_scores / temperature, -1)
    present = torch.isfinite(teacher_scores)
    kl = torch.where(present, t_logp.exp() * (t_logp - s_logp), 0.0).sum(-1)
    return kl.mean() * temperature**2


def choice_distill_loss(student_scores: list[torch.Tensor], teacher_scores: torch.Tensor, answers: list[int],
                        gold_tokens: list[int], kd_weight: float, temperature: float = 1.0,
                        shares: tuple[float, float] = (1.0, 1.0)) -> tuple[torch.Tensor, dict[str, float]]:
    """CE + lambda * choice_kl on a batch of items: CE is the gold choice's answer-token cross-entropy (its
    summed log-prob over its token count, as `answer_ce` averages) on the labelled items (answer >= 0); items
    without a label (the unlabelled public pool) learn from the teacher's choice distribution alone.
    Where the batch is a micro-batch of a larger one, `shares` scales CE and KL by its share of that batch's labelled
    gold tokens and of its items, so that the micro-batches' losses add up to the whole batch's."""
    labelled = [i for i, a in enumerate(answers) if a >= 0]
    ce = (-sum(student_scores[i][answers[i]] for i in labelled) / sum(gold_tokens[i] for i in labelled)
          if labelled else torch.zeros((), device=teacher_scores.device)) * shares[0]
    kl = choice_kl(pad_choices(student_scores), teacher_scores, temperature) * shares[1]
    return ce + kd_weight * kl, {"ce": ce.detach().item(), "kl": kl.detach().item()}
