"""Generate ar2_simulated.csv: a simulated stationary AR(2) series.

    y_t = 0.6 * y_{t-1} - 0.3 * y_{t-2} + e_t,   e_t ~ N(0, 1) i.i.d.

The recursion starts from y = 0, 0 and runs 200 burn-in steps that are dropped,
then 600 steps that are written as columns `t` (0..599) and `y` (full float64
precision, Python repr). Noise comes from numpy.random.default_rng(2026).

Regenerate (overwrites the CSV next to this script, byte for byte):

    python sweeps/data/make_ar2.py

Written with numpy 2.4; numpy's Generator streams for PCG64 normals have been stable since 1.17.
"""

from pathlib import Path

import numpy as np

PHI1, PHI2, SIGMA, SEED = 0.6, -0.3, 1.0, 2026
BURN_IN, N = 200, 600


def simulate():
    e = np.random.default_rng(SEED).standard_normal(BURN_IN + N) * SIGMA
    y1 = y2 = 0.0  # y_{t-1}, y_{t-2}
    ys = []
    for et in e.tolist():  # plain Python floats: same result on any BLAS / CPU
        y = PHI1 * y1 + PHI2 * y2 + et
        ys.append(y)
        y1, y2 = y, y1
    return ys[BURN_IN:]


def main():
    out = Path(__file__).with_name("ar2_simulated.csv")
    lines = ["t,y"] + [f"{t},{y!r}" for t, y in enumerate(simulate())]
    out.write_text("\n".join(lines) + "\n", newline="\n")


if __name__ == "__main__":
    main()
