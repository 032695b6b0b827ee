"""The cost limit of a round on its cost model's scale: pure functions of costs and shares.

    derive_threshold(stats, unsafe_share, h, p)           from the cost model's score quantiles (round 1)
    derive_threshold_on_policy(safe_winners, unsafe, h, p, fallback_c_harm)
                                                          from the costs of the last policy's labelled answers
    threshold_for_round(safe_winners, unsafe, answered, h, p, by_quantiles, rule)
                                                          a later round's: the above, the quantile rule when no
                                                          answer qualifies, and the no-looser cap

Every rule has the same shape: J_C ~ c_safe + h p (c_harm - c_safe) for a policy that answers a share h
of prompts that are harmful, a rate p of those harmfully, and every other prompt safely. The rules differ
in where c_safe and c_harm are read. What each gave, measured: bench/RESULTS.md ("rounds").
"""

from __future__ import annotations

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def quantile(stats: dict, q: float) -> float:
    """The score at quantile q, linearly interpolated between the saved q05 ... q95 (clamped)."""
    points = [(p, stats[f"q{int(p * 100):02d}"]) for p in QUANTILES]
    if q <= points[0][0]:
        return points[0][1]
    for (p0, v0), (p1, v1) in zip(points, points[1:]):
        if q <= p1:
            return v0 + (q - p0) / (p1 - p0) * (v1 - v0)
    return points[-1][1]


def derive_threshold(stats: dict, unsafe_share: float, harmful_prompt_share: float, target_harmful_rate: float) -> dict:
    """The cost limit for a harmful-answer rate of `target_harmful_rate` on harmful prompts.

    The held-out answers the quantiles were taken on are a share u unsafe; with a cost model that
    separates them (the sign term puts safe answers below 0 and harmful ones above), the safe ones
    fill the lower 1 - u of the distribution and the harmful ones the top u, so the typical safe cost
    is the quantile (1 - u) / 2 and the typical harmful cost the quantile 1 - u / 2. On round 1's
    scale this reproduces the tiny recipe's hand-set threshold (bench/RESULTS.md)."""
    u = min(max(unsafe_share, 0.01), 0.99)
    c_safe, c_harm = quantile(stats, (1 - u) / 2), quantile(stats, 1 - u / 2)
    return {"threshold": c_safe + harmful_prompt_share * target_harmful_rate * (c_harm - c_safe),
            "c_safe": c_safe, "c_harm": c_harm, "unsafe_share": unsafe_share,
            "harmful_prompt_share": harmful_prompt_share, "target_harmful_rate": target_harmful_rate}


def derive_threshold_on_policy(safe_winner_costs, unsafe_costs, harmful_prompt_share: float,
                               target_harmful_rate: float, fallback_c_harm: float, min_unsafe: int = 20) -> dict:
    """The cost limit on the new cost model's scale, read off this round's labelled answers of the
    last policy: c_safe, the mean cost of the answers labelled safe that won their pair on
    helpfulness (a benign request answered, a harmful one redirected: the most helpful safe
    behaviour), c_harm the mean cost of the answers labelled unsafe that the cost model also scores
    harmful (> 0; `fallback_c_harm`, the quantile rule's estimate, when fewer than `min_unsafe`).

    Why only the unsafe answers scored harmful: with a policy that is rarely harmful, most answers
    labelled unsafe are label noise, which would pull c_harm below 0. Why only the helpful safe
    answers: safe answers do not cost the same. The harmlessness annotators prefer the more cautious
    of two safe answers, so refusals cost less than redirects or benign answers; a c_safe over every
    safe answer of a policy that refuses a lot sits below what a helpful safe policy costs, and PPO,
    turning refusals into redirects, runs into it with lambda at its cap."""
    c_safe = sum(safe_winner_costs) / len(safe_winner_costs)
    harmful = [c for c in unsafe_costs if c > 0]
    c_harm = sum(harmful) / len(harmful) if len(harmful) >= min_unsafe else fallback_c_harm
    return {"threshold": c_safe + harmful_prompt_share * target_harmful_rate * (c_harm - c_safe),
            "rule": "helpful-safe answers", "c_safe": c_safe, "c_harm": c_harm,
            "harmful_prompt_share": harmful_prompt_share, "target_harmful_rate": target_harmful_rate,
            "safe_winners": len(safe_winner_costs), "unsafe_answers": len(unsafe_costs), "unsafe_scored_harmful": len(harmful)}


def threshold_for_round(safe_winner_costs, unsafe_costs, answered_costs, harmful_prompt_share: float,
                        target_harmful_rate: float, by_quantiles: dict, rule: str) -> dict:
    """A later round's limit: derive_threshold_on_policy over its labelled answers (the quantile rule
    `by_quantiles` when none is labelled both safe and more helpful), and with rule "no-looser" never
    above the last policy's own mean cost over every answer it gave this round's prompts
    (`answered_costs`, on the new cost model): a round may trade helpfulness against cost, not buy it
    with cost. "uncapped_threshold" keeps the value before the cap."""
    if safe_winner_costs:
        result = derive_threshold_on_policy(safe_winner_costs, unsafe_costs, harmful_prompt_share,
                                            target_harmful_rate, by_quantiles["c_harm"])
    else:
        result = {**by_quantiles, "rule": "quantiles"}
    result["uncapped_threshold"] = result["threshold"]
    if answered_costs:
        last_cost = result["last_policy_cost"] = sum(answered_costs) / len(answered_costs)
        if rule == "no-looser" and last_cost < result["threshold"]:
            result["threshold"] = last_cost
            result["rule"] += ", capped at the last policy's cost"
    return result
