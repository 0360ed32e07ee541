"""Fit the rational Φ(x) ≈ ½ + x·P(x²)/Q(x²) of csrc/cpu/isa/vec_math.h
(vnormal_cdf_rational) and check it in float32 arithmetic.

Minimax in absolute error on [0, X] by the differential correction algorithm: each
round solves the linear programme  min e  s.t. |x·P(x²) − g·Q(x²)| ≤ e·Q_prev(x²),
Q(0) = 1, for g = Φ − ½ on a grid, and keeps the best fit. The coefficients are then
rounded to float32, and Φ is evaluated as the kernel does (Horner in float32) over
±1.3·X against mpmath.

    python scripts/fit_normal_cdf.py            # needs scipy and mpmath
"""

from __future__ import annotations

import argparse

import mpmath
import numpy as np
from scipy.optimize import linprog


def normal_cdf(x: np.ndarray) -> np.ndarray:
    return np.array([float(mpmath.ncdf(value)) for value in x.astype(np.float64)])


def fit(degree: int, clamp: float, rounds: int = 30) -> tuple[np.ndarray, np.ndarray, float]:
    """(P, Q) coefficients, lowest power first, and the fit's float64 error."""
    # Uniform points, plus points crowded towards the clamp where the error peaks.
    x = np.unique(
        np.concatenate(
            [np.linspace(0, clamp, 6000)[1:], clamp * np.sin(np.linspace(0, np.pi / 2, 3000))[1:]]
        )
    )
    target = normal_cdf(x) - 0.5
    powers = np.stack([(x * x) ** i for i in range(degree + 1)], axis=1)
    numerator_terms = x[:, None] * powers
    denominator_terms = target[:, None] * powers[:, 1:]
    unknowns = 2 * degree + 2  # P (degree + 1), Q without its constant (degree), e
    cost = np.zeros(unknowns)
    cost[-1] = 1
    previous = np.ones_like(x)
    best = (np.inf, None, None)
    for _ in range(rounds):
        bound = -previous[:, None]
        rows = np.vstack(
            [
                np.hstack([numerator_terms, -denominator_terms, bound]),
                np.hstack([-numerator_terms, denominator_terms, bound]),
                # Q ≥ 1/100 on the grid: no pole.
                np.hstack([np.zeros_like(numerator_terms), -powers[:, 1:], np.zeros_like(bound)]),
            ]
        )
        limits = np.concatenate([target, -target, np.full_like(x, 1 - 0.01)])
        solution = linprog(
            cost,
            A_ub=rows,
            b_ub=limits,
            bounds=[(None, None)] * (unknowns - 1) + [(0, None)],
            method="highs",
        ).x
        p = solution[: degree + 1]
        q = np.concatenate([[1.0], solution[degree + 1 : -1]])
        previous = powers @ q
        error = np.abs(numerator_terms @ p / previous - target).max()
        if error < best[0]:
            best = (error, p, q)
    error, p, q = best
    return p, q, error


def float32_cdf(x: np.ndarray, p: np.ndarray, q: np.ndarray, clamp: float) -> np.ndarray:
    x = np.clip(x.astype(np.float32), np.float32(-clamp), np.float32(clamp))
    square = x * x
    numerator = np.full_like(x, p[-1])
    for c in p[-2::-1]:
        numerator = numerator * square + c
    denominator = np.full_like(x, q[-1])
    for c in q[-2::-1]:
        denominator = denominator * square + c
    return (np.float32(0.5) * denominator + x * numerator) / denominator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--degree", type=int, default=5, help="of P and Q in x²")
    parser.add_argument("--clamp", type=float, default=5.6, help="|x| beyond which Φ is 0 or 1")
    args = parser.parse_args()
    p, q, error = fit(args.degree, args.clamp)
    p32, q32 = p.astype(np.float32), q.astype(np.float32)
    x = np.linspace(-1.3 * args.clamp, 1.3 * args.clamp, 20001).astype(np.float32)
    float32_error = np.abs(float32_cdf(x, p32, q32, args.clamp) - normal_cdf(x)).max()
    print(f"fit error (float64): {error:.3g}; float32 evaluation error: {float32_error:.3g}")
    print("P, highest power first:", ", ".join(f"{c:.9g}f" for c in p32[::-1]))
    print("Q, highest power first:", ", ".join(f"{c:.9g}f" for c in q32[::-1]))


if __name__ == "__main__":
    main()
