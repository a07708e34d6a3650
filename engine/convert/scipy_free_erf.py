"""Vectorised erf for the numpy reference passes (no scipy dependency): math.erf per element."""
import math

import numpy as np

erf_vec = np.vectorize(math.erf, otypes=[np.float64])
