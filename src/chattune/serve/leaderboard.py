"""The arena leaderboard: a Bradley-Terry fit of the votes, with bootstrap intervals.

Bradley-Terry gives each model a strength p with P(i beats j) = p_i / (p_i + p_j). A tie
(and "both are bad", which the Arena also fits as a tie) counts as half a win for each
side. The fit is Hunter's MM iteration (Hunter 2004, "MM algorithms for generalized
Bradley-Terry models", eq. 3), written here with numpy: it is a dozen lines, vectorised
over all bootstrap rounds at once, where the field's routes are a logistic regression in
scikit-learn (LMSYS's notebook) or the ``choix`` package, each a dependency this package
would carry for one small fit and neither giving the bootstrap.

Every model also plays one virtual game, half won and half lost, against a fixed player
of strength 1: a prior that keeps an unbeaten (or winless) model's rating finite and
anchors the scale; ratings are on the Arena's Elo-like scale, ``1000 + 400 log10 p``.
Intervals are the 2.5 and 97.5 percentiles over rounds that resample the votes with
replacement (a multinomial draw over the vote counts per pair and outcome).
"""

from __future__ import annotations

import numpy as np

SCALE, BASE = 400.0, 1000.0


def fit(wins: np.ndarray, iterations: int = 2000, tol: float = 1e-10) -> np.ndarray:
    """Bradley-Terry strengths from ``wins[..., i, j]``: (half) wins of model i over model j.

    Leading dimensions are independent fits (bootstrap rounds). Returns (..., k) strengths.
    """
    games = wins + np.swapaxes(wins, -1, -2)  # (..., k, k) games between i and j
    won = wins.sum(-1) + 0.5  # (..., k), with the half win against the virtual player
    p = np.ones(won.shape)
    for _ in range(iterations):
        denominator = (games / (p[..., :, None] + p[..., None, :])).sum(-1) + 1.0 / (p + 1.0)
        new = won / denominator
        if np.max(np.abs(np.log(new) - np.log(p))) < tol:
            return new
        p = new
    return p


def leaderboard(results: list[tuple[str, str, str]], names: list[str], rounds: int = 200,
                seed: int = 0) -> dict:
    """The served ``names`` ranked by rating; every vote in ``results`` informs the fit.

    Args:
        results: ``(model_a, model_b, winner)`` per vote, winner as in an Arena row.
        names: the models to list (those served); models only in older votes still count
            in the fit but are not listed.
        rounds: bootstrap rounds for the intervals.

    Returns:
        ``{"object": "list", "votes": N, "data": [{"model", "rating", "lower", "upper",
        "votes", "wins", "losses", "ties"}, ...]}``; a model without votes has rating None.
    """
    models = list(dict.fromkeys([*names, *(m for a, b, _ in results for m in (a, b))]))
    index = {m: i for i, m in enumerate(models)}
    k = len(models)
    # cells: (i, j, outcome) with outcome 0 = i won, 1 = j won, 2 = tie; counts per cell
    cells: dict[tuple[int, int, int], int] = {}
    for a, b, winner in results:
        outcome = {"model_a": 0, "model_b": 1}.get(winner, 2)
        key = (index[a], index[b], outcome)
        cells[key] = cells.get(key, 0) + 1
    keys = list(cells)
    counts = np.array([cells[c] for c in keys], dtype=float)
    point = _wins(keys, counts[None], k)[0]
    ratings = _rating(fit(point))
    lower = upper = np.full(k, np.nan)
    if keys:
        rng = np.random.default_rng(seed)
        drawn = rng.multinomial(int(counts.sum()), counts / counts.sum(), size=rounds).astype(float)
        boot = _rating(fit(_wins(keys, drawn, k)))  # (rounds, k)
        lower, upper = np.percentile(boot, 2.5, axis=0), np.percentile(boot, 97.5, axis=0)
    rows = []
    for name in names:
        i = index[name]
        won = sum(n for (a, b, o), n in cells.items() if (a == i and o == 0) or (b == i and o == 1))
        lost = sum(n for (a, b, o), n in cells.items() if (a == i and o == 1) or (b == i and o == 0))
        tied = sum(n for (a, b, o), n in cells.items() if o == 2 and i in (a, b))
        played = won + lost + tied
        rows.append({"model": name, "rating": round(float(ratings[i]), 1) if played else None,
                     "lower": round(float(lower[i]), 1) if played else None,
                     "upper": round(float(upper[i]), 1) if played else None,
                     "votes": played, "wins": won, "losses": lost, "ties": tied})
    rows.sort(key=lambda r: (r["rating"] is None, -(r["rating"] or 0.0)))
    return {"object": "list", "votes": len(results), "data": rows}


def _wins(keys: list[tuple[int, int, int]], counts: np.ndarray, k: int) -> np.ndarray:
    """(rounds, cells) vote counts -> (rounds, k, k) wins, a tie half a win each way."""
    wins = np.zeros((counts.shape[0], k, k))
    for c, (a, b, outcome) in enumerate(keys):
        if outcome == 0:
            wins[:, a, b] += counts[:, c]
        elif outcome == 1:
            wins[:, b, a] += counts[:, c]
        else:
            wins[:, a, b] += counts[:, c] / 2
            wins[:, b, a] += counts[:, c] / 2
    return wins


def _rating(p: np.ndarray) -> np.ndarray:
    return BASE + SCALE * np.log10(p)
