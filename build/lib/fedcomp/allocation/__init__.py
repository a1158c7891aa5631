"""Compression budgets: DAGC per client (000_... Theorem 4, Algorithm 2, and the exact
optimum), AdapTop-K per round (002_... Eq. 21, Lemma 3 / 8), and the ratio controllers."""

from fedcomp.allocation.adaptopk import adaptopk_ratio, fit_alpha_beta, lemma_t_hat, log_contraction
from fedcomp.allocation.dagc import dagc_phi, dagc_ratios, rescale_ratios

__all__ = ["adaptopk_ratio", "dagc_phi", "dagc_ratios", "fit_alpha_beta", "lemma_t_hat", "log_contraction", "rescale_ratios"]
