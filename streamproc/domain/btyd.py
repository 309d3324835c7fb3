"""BG/NBD, the "buy till you die" model of Fader, Hardie and Lee (2005), as a live churn baseline.

Each customer buys at a Poisson rate λ while alive and, after every purchase, drops out for good with probability
p; across customers λ ~ Gamma(r, α) and p ~ Beta(a, b). A customer's sufficient statistics are ``x`` (repeat
purchases: purchases after the first), ``t_x`` (time from the first purchase to the last) and ``T`` (time from the
first purchase to now), all in days here.

The churn label is "no purchase within the horizon after the snapshot". A customer who dropped out never buys
again; one still alive buys nothing in ``h`` days with probability e^{-λh}, and, given alive and the data, λ is
Gamma(r + x, α + T), so

    P(no purchase in (T, T + h]) = 1 - P(alive) + P(alive) · ((α + T) / (α + T + h))^(r + x)
    P(alive) = 1 / (1 + [x > 0] · a / (b + x - 1) · ((α + T) / (α + t_x))^(r + x))

The four parameters are fitted by maximum likelihood from a sample of customers' statistics (the trainer refits
them periodically); the log-likelihood is the paper's equation (6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import gammaln


@dataclass(frozen=True, slots=True)
class BgNbd:
    """The four population parameters (days as the time unit)."""

    r: float = 1.0
    alpha: float = 30.0
    a: float = 1.0
    b: float = 3.0

    def p_alive(self, x: float, t_x: float, big_t: float) -> float:
        if x <= 0:
            return 1.0
        log_ratio = (self.r + x) * (math.log(self.alpha + big_t) - math.log(self.alpha + t_x))
        odds = self.a / (self.b + x - 1) * math.exp(min(log_ratio, 700.0))
        return 1.0 / (1.0 + odds)

    def p_no_purchase(self, x: float, t_x: float, big_t: float, horizon: float) -> float:
        """P(no purchase in the next ``horizon`` days | x, t_x, T): the churn label's probability."""
        alive = self.p_alive(x, t_x, big_t)
        quiet_if_alive = math.exp((self.r + x) * (math.log(self.alpha + big_t)
                                                   - math.log(self.alpha + big_t + horizon)))
        return min(max(1.0 - alive + alive * quiet_if_alive, 0.0), 1.0)


def log_likelihood(params: BgNbd, x: np.ndarray, t_x: np.ndarray, big_t: np.ndarray) -> np.ndarray:
    """Per customer: the log-likelihood of (x, t_x, T) under ``params`` (Fader, Hardie and Lee 2005, eq. 6)."""
    r, alpha, a, b = params.r, params.alpha, params.a, params.b
    a1 = gammaln(r + x) - gammaln(r) + r * np.log(alpha)
    a2 = gammaln(a + b) + gammaln(b + x) - gammaln(b) - gammaln(a + b + x)
    a3 = -(r + x) * np.log(alpha + big_t)
    repeat = x > 0
    a4 = np.full_like(a3, -np.inf)
    xs = x[repeat]
    a4[repeat] = np.log(a) - np.log(b + xs - 1) - (r + xs) * np.log(alpha + t_x[repeat])
    result: np.ndarray = a1 + a2 + np.logaddexp(a3, a4)
    return result


def fit(x: list[float], t_x: list[float], big_t: list[float], start: BgNbd | None = None,
        penalty: float = 1e-4) -> BgNbd:
    """Maximum-likelihood parameters for these customers' statistics (log-parameters, L-BFGS-B, a small L2
    penalty on them so an uninformative sample cannot run off to the bounds). ``start``: the last fit (a warm
    start). Raises ValueError on an empty sample."""
    if not x:
        raise ValueError("no customers to fit BG/NBD to")
    xa, ta, ba = np.asarray(x, float), np.asarray(t_x, float), np.asarray(big_t, float)
    ta = np.minimum(ta, ba)  # t_x <= T by definition (day rounding can break it by half a day)
    first = start or BgNbd()
    n = len(xa)

    def loss(theta: np.ndarray) -> float:
        r, alpha, a, b = np.exp(theta)
        ll = log_likelihood(BgNbd(r, alpha, a, b), xa, ta, ba).sum()
        return float(-ll / n + penalty * float(np.dot(theta, theta)))

    theta0 = np.log([first.r, first.alpha, first.a, first.b])
    found = minimize(loss, theta0, method="L-BFGS-B", bounds=[(-9.0, 9.0)] * 4)
    r, alpha, a, b = (float(v) for v in np.exp(found.x))
    return BgNbd(r, alpha, a, b)
