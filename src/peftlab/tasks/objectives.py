"""Preference objectives: DPO (sigmoid), IPO, ORPO, KTO and SimPO, from sequence log-probabilities.

The formulas, defaults and logged metric names are TRL's (1.16: DPOTrainer, KTOTrainer, and the
experimental ORPOTrainer and CPOTrainer with ``loss_type="simpo"``, ``cpo_alpha=0``), the objective and its knobs
the run config's ``preference`` section (:class:`peftlab.config.PreferenceConfig`); the tests check
each against TRL on the same model and batch. A batch is one padded tensor of sequences (pairs: the
chosen rows, then the rejected rows in the same order), ``labels`` -100 outside the completion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from peftlab.config import PreferenceConfig
from peftlab.tasks.base import output_scores


@dataclass
class SequenceLogps:
    """Per sequence: the completion's summed log-probability and its token count, and the next-token loss summed over
    every non-padding token, prompt included, with their count (ORPO's SFT term)."""

    logps: torch.Tensor  # (rows,)
    tokens: torch.Tensor  # (rows,) completion tokens
    token_nll_sum: torch.Tensor  # (rows,) next-token loss summed over the non-padding tokens
    token_count: torch.Tensor  # (rows,) their number

    @property
    def mean(self) -> torch.Tensor:
        """Average log-probability per completion token (ORPO, SimPO; pairwise accuracy)."""
        return self.logps / self.tokens.clamp(min=1)


def sequence_logps(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> SequenceLogps:
    """One forward pass: each row's completion log-probability (``labels`` != -100) and its whole-sequence NLL."""
    logits = output_scores(model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False))
    logits = logits[:, -input_ids.shape[1]:]  # prompt-learning techniques prepend their virtual tokens' outputs
    shifted = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    token_logps = -F.cross_entropy(shifted.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
    completion = (labels[:, 1:] != -100)
    present = attention_mask[:, 1:].bool()
    return SequenceLogps(logps=(token_logps * completion).sum(-1), tokens=completion.sum(-1),
                         token_nll_sum=-(token_logps * present).sum(-1), token_count=present.sum(-1))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def pair_loss(objective: PreferenceConfig, chosen: SequenceLogps, rejected: SequenceLogps,
              ref_chosen: torch.Tensor | None, ref_rejected: torch.Tensor | None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A paired objective's per-pair losses and its per-pair logged values (TRL's names), unreduced."""
    beta, loss = objective.beta, objective.loss
    logged: dict[str, torch.Tensor] = {}
    if loss in ("dpo", "ipo"):
        chosen_ratio, rejected_ratio = chosen.logps - ref_chosen, rejected.logps - ref_rejected
        if loss == "dpo":
            losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
        else:  # TRL normalises IPO's log-ratios by the completion's token count (agreed with the IPO authors)
            delta = chosen_ratio / chosen.tokens.clamp(min=1) - rejected_ratio / rejected.tokens.clamp(min=1)
            losses = (delta - 1 / (2 * beta)) ** 2
        chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
        chosen_logps, rejected_logps = chosen.logps, rejected.logps
    elif loss == "simpo":
        chosen_logps, rejected_logps = chosen.mean, rejected.mean
        margin = chosen_logps - rejected_logps - objective.simpo_gamma / beta
        losses = -F.logsigmoid(beta * margin)
        chosen_reward, rejected_reward = beta * chosen_logps, beta * rejected_logps
    elif loss == "orpo":
        chosen_logps, rejected_logps = chosen.mean, rejected.mean
        log_odds = (chosen_logps - rejected_logps) - (_log1mexp(chosen_logps) - _log1mexp(rejected_logps))
        ratio = F.logsigmoid(log_odds)
        # the SFT term: the chosen rows' mean next-token loss over all their tokens (TRL: prompt included)
        nll = chosen.token_nll_sum.sum() / chosen.token_count.sum().clamp(min=1)
        losses = nll - beta * ratio
        chosen_reward, rejected_reward = beta * chosen_logps, beta * rejected_logps
        logged.update({"nll_loss": nll.expand_as(ratio), "log_odds_ratio": ratio, "log_odds_chosen": log_odds})
    else:
        raise ValueError(f"{loss} is not a paired objective")
    chosen_reward, rejected_reward = chosen_reward.detach(), rejected_reward.detach()
    logged.update({"rewards/chosen": chosen_reward, "rewards/rejected": rejected_reward,
                   "rewards/accuracies": (chosen_reward > rejected_reward).float(),
                   "rewards/margins": chosen_reward - rejected_reward,
                   "logps/chosen": chosen_logps.detach(), "logps/rejected": rejected_logps.detach()})
    return losses, {k: v.detach() for k, v in logged.items()}


def kto_loss(objective: PreferenceConfig, policy: SequenceLogps, reference: torch.Tensor, desirable: torch.Tensor,
             kl: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """KTO's loss over a batch of unpaired rows (``desirable``: bool per row) and its logged values (batch means,
    as TRL logs them); ``kl``: the batch's estimate of KL(policy || reference), clamped at 0 and detached."""
    beta = objective.beta
    ratio = policy.logps - reference
    chosen, rejected = ratio[desirable], ratio[~desirable]
    seen, seen_logps = ratio.detach(), policy.logps.detach()
    losses = torch.cat([objective.desirable_weight * (1 - torch.sigmoid(beta * (chosen - kl))),
                        objective.undesirable_weight * (1 - torch.sigmoid(beta * (kl - rejected)))])
    logged: dict[str, float] = {"kl": float(kl)}
    if len(chosen):
        logged["rewards/chosen"] = float((beta * seen[desirable]).mean())
        logged["logps/chosen"] = float(seen_logps[desirable].mean())
    if len(rejected):
        logged["rewards/rejected"] = float((beta * seen[~desirable]).mean())
        logged["logps/rejected"] = float(seen_logps[~desirable].mean())
    if len(chosen) and len(rejected):
        logged["rewards/margins"] = logged["rewards/chosen"] - logged["rewards/rejected"]
    return losses.nanmean(), logged
